"""Conversations (ShareGPT, OpenAI messages): the same rows as Alpaca give the same tokens, multi-turn labels
only on the assistant's tokens, bad rows reported, a file of no known format refused, the token cache keyed."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from softprompt.data.rows import ColumnMap, DataError, load_rows, tokenize
from softprompt.data.token_cache import tokenized_rows
from tiny_lm import EN_DEMO, make_tiny_lm, need_shared, write_rows

datasets.disable_progress_bars()

CHAT = [  # a system turn and two exchanges
    {"role": "system", "content": "Answer in capitals."},
    {"role": "user", "content": "Write apple."},
    {"role": "assistant", "content": "APPLE"},
    {"role": "user", "content": "And river?"},
    {"role": "assistant", "content": "RIVER"},
]


def as_sharegpt(row: dict) -> dict:
    user = (row["instruction"] + "\n" + row["input"]).strip()
    return {"conversations": [{"from": "human", "value": user}, {"from": "gpt", "value": row["output"]}]}


def as_messages(row: dict) -> dict:
    user = (row["instruction"] + "\n" + row["input"]).strip()
    return {"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": row["output"]}]}


@pytest.fixture(scope="module")
def en_rows() -> list[dict]:
    need_shared(EN_DEMO)
    return json.loads(EN_DEMO.read_text(encoding="utf-8"))[:200]


@pytest.fixture(scope="module")
def tok(tmp_path_factory, en_rows):
    texts = [r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in en_rows]
    folder = make_tiny_lm(tmp_path_factory.mktemp("conv") / "model", texts + ["Human: Assistant: " + m["content"]
                                                                             for m in CHAT], vocab_size=600)
    return AutoTokenizer.from_pretrained(folder)


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_alpaca_sharegpt_and_messages_files_give_the_same_tokens(tmp_path, en_rows, tok, template):
    """200 real rows written three ways: the same input_ids and labels, and the same report (cuts, skips)."""
    (tmp_path / "alpaca.json").write_text(json.dumps(en_rows, ensure_ascii=False), encoding="utf-8")
    (tmp_path / "sharegpt.json").write_text(json.dumps([as_sharegpt(r) for r in en_rows]), encoding="utf-8")
    write_rows(tmp_path / "messages.jsonl", [as_messages(r) for r in en_rows])
    results = {}
    for name in ("alpaca.json", "sharegpt.json", "messages.jsonl"):
        data, report = tokenize(load_rows(tmp_path / name), tok, max_length=128, template=template)
        results[name] = (data.to_list(), report.rows, report.kept, report.truncated, report.skipped, report.first_rows)
    assert results["alpaca.json"] == results["sharegpt.json"] == results["messages.jsonl"]
    rows, total, kept, truncated, skipped, _ = results["alpaca.json"]
    assert total == 200 and kept == len(rows) > 150 and truncated > 0  # max_length=128 cuts some rows
    assert list(skipped) == ["response cut away by max_length=128"]  # the bad-row path too
    # the learned tokens are the outputs (+ eos), nothing of the prompt
    first = next(r for r in en_rows if len(tok(r["output"])["input_ids"]) < 60)
    index = en_rows.index(first)
    row = tokenize(load_rows(tmp_path / "messages.jsonl").select([index]), tok, max_length=128, template=template)[0][0]
    learned = [t for t in row["labels"] if t != -100]
    assert tok.decode(learned).removesuffix("</s>") == first["output"]
    assert row["input_ids"][-len(learned):] == learned


def test_multi_turn_labels_only_the_assistant_tokens(tok):
    rows = datasets.Dataset.from_list([{"messages": CHAT}])
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    pieces = [("Answer in capitals.\n\nHuman: Write apple.\n\nAssistant: ", False), ("APPLE</s>", True),
              ("\n\nHuman: And river?\n\nAssistant: ", False), ("RIVER</s>", True)]
    row = tokenize(rows, tok)[0][0]
    assert row["input_ids"] == sum((ids(text) for text, _ in pieces), [])
    assert row["labels"] == sum((ids(text) if learned else [-100] * len(ids(text)) for text, learned in pieces), [])
    assert [t for t in row["labels"] if t != -100] == ids("APPLE</s>") + ids("RIVER</s>")
    everything = tokenize(rows, tok, loss_on="all")[0][0]
    assert everything["labels"] == everything["input_ids"] == row["input_ids"]

    chat = tokenize(rows, tok, template="chat")[0][0]
    pieces = [("<|system|>Answer in capitals.</s><|user|>Write apple.</s><|assistant|>", False), ("APPLE</s>", True),
              ("<|user|>And river?</s><|assistant|>", False), ("RIVER</s>", True)]
    assert chat["input_ids"] == sum((ids(text) for text, _ in pieces), [])
    assert chat["labels"] == sum((ids(text) if learned else [-100] * len(ids(text)) for text, learned in pieces), [])


def test_truncation_and_bad_rows_are_reported(tmp_path, tok):
    bad = [
        [{"from": "human", "value": "hi"}],  # no answer
        [{"from": "gpt", "value": "hi"}, {"from": "human", "value": "x"}],
        [{"from": "human", "value": "hi"}, {"from": "tool", "value": "x"}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}],
        [{"role": "user", "content": "hi"}, {"role": "assistant", "content": 3}],
        [CHAT[0], CHAT[1], CHAT[0], CHAT[2]],
        [{"role": "user"}, {"role": "assistant", "content": "x"}],
        json.dumps(CHAT),  # a JSON string is no list of turns
        None,
    ]
    path = write_rows(tmp_path / "bad.jsonl", [{"conversations": CHAT}] + [{"conversations": t} for t in bad])
    data, report = tokenize(load_rows(path), tok)
    assert len(data) == report.kept == 1
    assert report.skipped == {reason: 1 for reason in [
        "the last turn is not the assistant's", "turns do not alternate user, assistant",
        "role 'tool' is none of system, user, assistant (human, gpt)", "an assistant turn is empty",
        "a turn's text is int, not a string", "a system turn after the first turn (or besides a system column)",
        "a turn has no role (from/role) or no text (value/content)", "conversation is str, not a list of turns",
        "conversation is missing"]}
    assert report.first_rows["the last turn is not the assistant's"] == (2,)
    # max_length inside the second exchange: kept and counted as cut; before the first answer: skipped
    first = len(tok("Answer in capitals.\n\nHuman: Write apple.\n\nAssistant: ")["input_ids"])
    chats = datasets.Dataset.from_list([{"messages": CHAT}] * 2)
    cut, report = tokenize(chats, tok, max_length=first + 3)
    assert report.kept == 2 and report.truncated == 2 and len(cut[0]["input_ids"]) == first + 3
    _, report = tokenize(chats, tok, max_length=first)
    assert report.kept == 0 and report.skipped == {f"response cut away by max_length={first}": 2}


def test_a_chat_template_that_refuses_a_row_skips_it(tok):
    strict = copy.deepcopy(tok)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                            "{% endif %}" + tok.chat_template)
    rows = datasets.Dataset.from_list([{"messages": CHAT}, {"messages": CHAT[1:]}])
    data, report = tokenize(rows, strict, template="chat")
    assert report.skipped == {"the chat template refuses it: System role not supported": 1} and len(data) == 1
    assert data[0]["input_ids"] == tokenize(rows.select([1]), tok, template="chat")[0][0]["input_ids"]


def test_bad_rows_of_a_file_are_skipped_and_named(tmp_path, tok):
    rows = [{"messages": CHAT}] * 3 + [{"messages": CHAT[:2] + CHAT[1:3]}]  # row 4: user after user
    data, report = tokenize(load_rows(write_rows(tmp_path / "chats.jsonl", rows)), tok)
    assert report.summary().endswith("skipped 1: turns do not alternate user, assistant: 1 (rows 4).")
    assert len(data) == 3
    with pytest.raises(DataError, match="row 4 \\(1-based\\): turns do not alternate user, assistant"):
        tokenize(load_rows(tmp_path / "chats.jsonl"), tok, on_bad_row="error")


def test_formats_named_or_detected(tmp_path, tok):
    sharegpt = [{"dialog": [{"from": "human", "value": "Write apple."}, {"from": "gpt", "value": "APPLE"}],
                 "sys": "Answer in capitals."}]
    path = tmp_path / "custom.json"
    path.write_text(json.dumps(sharegpt), encoding="utf-8")
    rows = load_rows(path, ColumnMap(messages="dialog", system="sys"))
    assert rows.column_names == ["messages", "system"]
    expected = tokenize(datasets.Dataset.from_list([{"messages": CHAT[:3]}]), tok)[0].to_list()
    assert tokenize(rows, tok)[0].to_list() == expected  # the system column is the system turn
    both = tmp_path / "both.jsonl"
    write_rows(both, [{"messages": CHAT, "conversations": CHAT}])
    with pytest.raises(DataError, match="both a 'conversations' and a 'messages' column; set format"):
        load_rows(both)
    assert load_rows(both, format="sharegpt")["messages"] == [CHAT]
    with pytest.raises(DataError, match="no column 'conversations' holding the sharegpt turns"):
        load_rows(write_rows(tmp_path / "m.jsonl", [{"messages": CHAT}]), format="sharegpt")


@pytest.mark.parametrize("template", ["alpaca", "chat"])
def test_a_named_system_column_of_alpaca_rows_is_the_system_turn(tmp_path, tok, template):
    rows = [{"instruction": "Write apple.", "input": "", "output": "APPLE", "sys": "Answer in capitals."},
            {"instruction": "Write", "input": "river", "output": "RIVER", "sys": ""}]
    path = write_rows(tmp_path / "rows.jsonl", rows)
    named = tokenize(load_rows(path, ColumnMap(system="sys")), tok, template=template)[0].to_list()
    chats = [[CHAT[0], CHAT[1], CHAT[2]], [{"role": "user", "content": "Write\nriver"}, {"role": "assistant", "content": "RIVER"}]]
    expected = tokenize(datasets.Dataset.from_list([{"messages": m} for m in chats]), tok, template=template)[0]
    assert named == expected.to_list()
    plain = tokenize(load_rows(path), tok, template=template)[0].to_list()  # not named: not read, as before
    assert plain[1] == named[1] and plain[0] != named[0]
    with pytest.raises(DataError, match="no column 'system' for the system text"):
        load_rows(path, ColumnMap(system="system"))


def test_a_file_of_no_known_format_is_refused_in_one_line(tmp_path):
    path = write_rows(tmp_path / "pairs.jsonl", [{"prompt": "a", "completion": "b"}])
    with pytest.raises(DataError) as error:
        load_rows(path)
    message = str(error.value)
    assert "\n" not in message
    assert message == (f"{path}: matches no data format: its columns are prompt, completion; the formats accepted "
                       "are alpaca (instruction, input, output), sharegpt (conversations: turns of from/value), "
                       "messages (messages: turns of role/content); rename the columns or set format and the "
                       "*_column keys")


def test_token_cache_keys_format_and_loss_on(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    path = write_rows(tmp_path / "chats.jsonl", [{"messages": CHAT}] * 4)
    assistant, _ = tokenized_rows(path, ColumnMap(), tok, 64, "alpaca")
    every, _ = tokenized_rows(path, ColumnMap(), tok, 64, "alpaca", loss_on="all")
    named, _ = tokenized_rows(path, ColumnMap(), tok, 64, "alpaca", format="messages")
    assert assistant["labels"] != every["labels"] and named["labels"] == assistant["labels"]
    assert len(list((tmp_path / "cache" / "tokenized").iterdir())) == 3

    import softprompt.data.token_cache as token_cache

    monkeypatch.setattr(token_cache, "tokenize", lambda *a, **k: pytest.fail("tokenized again"))
    again, _ = tokenized_rows(path, ColumnMap(), tok, 64, "alpaca", loss_on="all")
    assert again["labels"] == every["labels"] == every["input_ids"]
