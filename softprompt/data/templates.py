"""Every prompt softprompt renders, in one place: the seed's Human/Assistant format and the tokenizer's chat template.

    training_texts(tokenizer, "alpaca", instruction, input, output)  # (prompt, response) a row trains on
    conversation_texts(tokenizer, "alpaca", messages)                # [(text, is_assistant), ...] of a conversation
    prompt_text(tokenizer, "alpaca", instruction, input, history)    # what `generate` / `chat` / `eval` send
    seed_chat_prompt([("user", "hi")])                               # what the server sends (OpenAI messages)

`prompt_text` (CLI chat) and `seed_chat_prompt` (server) join earlier turns differently (one newline after an
answer vs two); both are kept as they were, so that replies do not change.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def alpaca_prompt(instruction: str, input: str) -> str:
    """The seed's prompt, exactly: the model answers after "Assistant: "."""
    return "\n".join(["Human: " + instruction, input]).strip() + "\n\nAssistant: "


def training_texts(
    tokenizer: PreTrainedTokenizerBase, template: str, instruction: str, input: str, output: str,
    system: str | None = None,
) -> tuple[str, str]:
    """(prompt, response) as text: the prompt's tokens are masked from the loss, the response's learned.
    A system text goes first, as in a conversation (`conversation_texts`)."""
    system = [{"role": "system", "content": system}] if system and system.strip() else []
    if template == "alpaca":
        before = system[0]["content"].strip() + "\n\n" if system else ""
        return before + alpaca_prompt(instruction, input), output + tokenizer.eos_token
    user = {"role": "user", "content": (instruction + "\n" + input).strip()}
    messages = [*system, user, {"role": "assistant", "content": output}]
    (prompt, _), (response, _) = conversation_texts(tokenizer, template, messages)
    return prompt, response


def conversation_texts(
    tokenizer: PreTrainedTokenizerBase, template: str, messages: list[dict[str, str]]
) -> list[tuple[str, bool]]:
    """A conversation as (text, is_assistant) pieces that join to the whole rendered conversation.

    "alpaca", the seed's format carried on turn by turn (the server's `seed_chat_prompt` layout, with an eos
    where each answer ends):

        {system}\n\n  Human: {user}\n\nAssistant: | {answer}</s> | \n\nHuman: {user}\n\nAssistant: | {answer}</s>

    so a one-turn conversation is exactly an Alpaca row's (prompt, output + eos). "chat": the tokenizer's
    template, cut where each assistant turn starts and ends (it must render each shorter conversation as the
    start of the longer one).
    """
    pieces: list[tuple[str, bool]] = []
    if template == "alpaca":
        before = ""
        for message in messages:
            if message["role"] == "system":
                before = message["content"].strip() + "\n\n"
            elif message["role"] == "user":
                pieces.append((before + alpaca_prompt(message["content"], ""), False))
            else:
                pieces.append((message["content"] + tokenizer.eos_token, True))
                before = "\n\n"
        return pieces
    done = ""
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
        whole = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        if not (prompt.startswith(done) and whole.startswith(prompt)):
            raise ValueError("the tokenizer's chat template does not render the prompt as the start of the "
                             "conversation, so the assistant's tokens cannot be told apart; use template='alpaca'")
        pieces += [(prompt[len(done):], False), (whole[len(prompt):], True)]
        done = whole
    return pieces


def prompt_text(tokenizer, template: str, instruction: str, input: str = "", history: list[tuple[str, str]] | None = None) -> str:
    """The text a model trained with `template` answers after: the seed's Human/Assistant prompt, or the
    tokenizer's chat template. `history` holds earlier (user, assistant) turns of a conversation."""
    history = history or []
    if template == "alpaca":
        turns = [alpaca_prompt(q, "") + a for q, a in history]
        return "\n".join(turns + [alpaca_prompt(instruction, input)])
    if template == "chat":
        messages = []
        for q, a in history:
            messages += [{"role": "user", "content": q}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": (instruction + "\n" + input).strip()})
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    raise ValueError(f"template={template!r} is not valid; allowed values: 'alpaca', 'chat'")


def seed_chat_prompt(messages: list[tuple[str, str]]) -> str:
    """The seed's training format for an OpenAI chat request (`(role, text)` pairs): `Human: ...\\n\\nAssistant: `, turns one after another.

    System (or developer) text goes first; an assistant message at the end is continued, not closed.
    """
    parts: list[str] = []
    for i, (role, text) in enumerate(messages):
        text = text.strip()
        if role in ("system", "developer"):
            parts.append(text + "\n\n")
        elif role == "user":
            parts.append("Human: " + text + "\n\nAssistant: ")
        elif i == len(messages) - 1:
            parts.append(text)  # continue the assistant's answer
        else:
            parts.append(text + "\n\n")
    return "".join(parts)
