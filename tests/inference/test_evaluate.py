"""`evaluate` on conversations: the last assistant turn is the answer, asked with everything before it."""

from __future__ import annotations

from transformers import AutoTokenizer

from softprompt.inference.evaluate import evaluate

from conftest import make_base


def test_conversations_are_asked_up_to_their_last_answer(tokenizer_dir):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = tokenizer.eos_token
    rows = [
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "u1"},
                      {"role": "assistant", "content": "a1"}, {"role": "user", "content": "u2"},
                      {"role": "assistant", "content": "a2"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"},
                      {"role": "user", "content": "no answer to score"}]},  # ends with the user: left out
        {"messages": [{"role": "assistant", "content": "first"}]},  # cannot train: left out
    ]
    asked = []

    def decode(prompts: list[str], max_new_tokens: int) -> list[str]:
        asked.extend(prompts)
        return ["a2", "wrong"]

    result = evaluate(make_base("llama"), tokenizer, rows, loss=False, decode=decode)
    assert asked == [f"Be brief.\n\nHuman: u1\n\nAssistant: a1{eos}\n\nHuman: u2\n\nAssistant: ",
                     "Human: q\n\nAssistant: "]
    assert [a["reference"] for a in result.answers] == ["a2", "r"]
    assert result.exact_match == 0.5
