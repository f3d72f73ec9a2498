"""Every prompt softprompt renders, in one place: the seed's Human/Assistant format and the tokenizer's chat template.

    training_texts(tokenizer, "alpaca", instruction, input, output)  # (prompt, response) a row trains on
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
    tokenizer: PreTrainedTokenizerBase, template: str, instruction: str, input: str, output: str
) -> tuple[str, str]:
    """(prompt, response) as text: the prompt's tokens are masked from the loss, the response's learned."""
    if template == "alpaca":
        return alpaca_prompt(instruction, input), output + tokenizer.eos_token
    user = {"role": "user", "content": (instruction + "\n" + input).strip()}
    prompt = tokenizer.apply_chat_template([user], tokenize=False, add_generation_prompt=True)
    whole = tokenizer.apply_chat_template([user, {"role": "assistant", "content": output}], tokenize=False)
    if not whole.startswith(prompt):
        raise ValueError("the tokenizer's chat template does not render the prompt as the start of the "
                         "conversation, so the assistant's tokens cannot be told apart; use template='alpaca'")
    return prompt, whole[len(prompt):]


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
