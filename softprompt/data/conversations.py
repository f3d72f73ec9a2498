"""Conversation rows: which format a file is in, and each row's turns checked and named alike.

    ShareGPT  {"conversations": [{"from": "human", "value": "..."}, {"from": "gpt", "value": "..."}], "system": "..."}
    messages  {"messages": [{"role": "system", "content": "..."}, {"role": "user", ...}, {"role": "assistant", ...}]}

Both are read the same way: a turn's role from `from` or `role` (human/user, gpt/assistant/model, system),
its text from `value` or `content`. A row is one conversation: an optional system turn (or a `system`
column), then user and assistant turns in alternation, ending with the assistant's. Plain Python only: the
run config imports the names here before anything heavy loads.
"""

from __future__ import annotations

from typing import Any

FORMATS = ("auto", "alpaca", "sharegpt", "messages")
LOSS_ON = ("assistant", "all")  # which tokens carry labels: the assistant's turns, or every token of the row
DEFAULT_COLUMN = {"sharegpt": "conversations", "messages": "messages"}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "model": "assistant",
         "system": "system"}
ACCEPTED = ("alpaca (instruction, input, output), sharegpt (conversations: turns of from/value), "
            "messages (messages: turns of role/content)")


def detect_format(source: str, present: list[str], format: str, alpaca: tuple[str, str], messages: str | None) -> str:
    """`format` itself, or (auto) the one the columns say: a conversation column, else Alpaca's.

    `alpaca` holds the instruction and output column names, `messages` the conversation column if one was named.
    A file that matches none is refused in one line that names its columns and the accepted formats.
    """
    if format not in FORMATS:
        raise ValueError(f"format={format!r} is not valid; allowed values: {', '.join(FORMATS)}")
    if format != "auto":
        return format
    if messages is not None:
        if messages in present:
            return "messages"
    else:
        found = [name for fmt, name in DEFAULT_COLUMN.items() if name in present]
        if len(found) == 2:
            raise ValueError(f"{source}: both a 'conversations' and a 'messages' column; set format: sharegpt "
                             "(reads conversations) or format: messages (reads messages)")
        if found:
            return "sharegpt" if found[0] == "conversations" else "messages"
    if any(name in present for name in alpaca):
        return "alpaca"  # the reader then names a missing column
    raise ValueError(f"{source}: matches no data format: its columns are {', '.join(present) or '(none)'}; "
                     f"the formats accepted are {ACCEPTED}; rename the columns or set format and the *_column keys")


def read_conversation(turns: Any, system: Any = None) -> tuple[list[dict[str, str]] | None, str | None]:
    """(messages as `{"role", "content"}` dicts, None), or (None, the reason the row cannot train).

    The reasons are worded without row details, so that a report counts rows per reason.
    """
    if turns is None:
        return None, "conversation is missing"
    if not isinstance(turns, list):
        return None, f"conversation is {type(turns).__name__}, not a list of turns"
    messages: list[dict[str, str]] = []
    if system is not None:
        if not isinstance(system, str):
            return None, f"system is {type(system).__name__}, not a string"
        if system.strip():
            messages.append({"role": "system", "content": system})
    for turn in turns:
        if not isinstance(turn, dict):
            return None, f"a turn is {type(turn).__name__}, not an object"
        role, content = turn.get("role", turn.get("from")), turn.get("content", turn.get("value"))
        if role is None or content is None:
            return None, "a turn has no role (from/role) or no text (value/content)"
        if not isinstance(content, str):
            return None, f"a turn's text is {type(content).__name__}, not a string"
        if ROLES.get(role) is None:
            return None, f"role {role!r} is none of system, user, assistant (human, gpt)"
        messages.append({"role": ROLES[role], "content": content})
    start = 1 if messages and messages[0]["role"] == "system" else 0
    roles = [m["role"] for m in messages[start:]]
    if "system" in roles:
        return None, "a system turn after the first turn (or besides a system column)"
    if not roles:
        return None, "conversation has no turns"
    if any(role != ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(roles)):
        return None, "turns do not alternate user, assistant"
    if roles[-1] != "assistant":
        return None, "the last turn is not the assistant's"
    if any(not m["content"].strip() for m in messages if m["role"] == "assistant"):
        return None, "an assistant turn is empty"
    return messages, None
