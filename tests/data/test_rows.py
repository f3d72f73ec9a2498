"""softprompt.data.rows: every file format, the seed's template token for token, bad rows, split, collator."""

from __future__ import annotations

import copy
import gzip
import json
import logging
import os
import time
from pathlib import Path

import datasets
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast
from transformers.trainer_pt_utils import LengthGroupedSampler

from softprompt.data.rows import (
    ColumnMap, DataError, DataReport, load_rows, make_collator, split, tokenize,
)
from softprompt.data.templates import alpaca_prompt

datasets.disable_progress_bars()

SHARED = Path(__file__).parents[3] / "shared"  # the shared folder beside the repo checkout
ZH_DEMO = SHARED / "data/llama-factory/alpaca_zh_demo.json"
EN_DEMO = SHARED / "data/llama-factory/alpaca_en_demo.json"
ZH_52K = SHARED / "data/alpaca-chinese-dataset/alpaca_chinese_52k.jsonl.gz"

ROWS = [
    {"instruction": "Give three tips for staying healthy.", "input": "", "output": "Eat well, sleep, move."},
    {"instruction": "翻译成英文", "input": "你好，世界", "output": "Hello, world"},
    {"instruction": "Say hi.", "output": "Hi!"},  # no input: reads as ""
]
EXPECTED = [{"input": "", **row} for row in ROWS]
CORPUS = [r["instruction"] + " " + r.get("input", "") + " " + r["output"] for r in ROWS] * 20 + [
    "Human: Assistant: the quick brown fox jumps over the lazy dog 0123456789",
    "下面是一段人与机器人的对话。请用中文回答问题，给出详细的解释和步骤。",
]


def shared_file(path: Path) -> Path:
    """A file under shared/: CI must have it, elsewhere its absence skips the test."""
    if not path.exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{path} is missing; CI runs with shared/ beside the checkout")
        pytest.skip(f"{path} is missing (shared/ is not beside this checkout)")
    return path


def build_tokenizer(corpus: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """A byte-level BPE like GPT-2's / SmolLM2's that, like Llama's, puts <s> before every text it encodes:
    so a template that dropped the tokenizer's default special tokens would not match the seed."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")


@pytest.fixture(scope="module")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer(CORPUS, 600)


@pytest.fixture(scope="module")
def zh_tok() -> PreTrainedTokenizerFast:
    rows = json.loads(shared_file(ZH_DEMO).read_text(encoding="utf-8"))
    return build_tokenizer([r["instruction"] + r["input"] + r["output"] for r in rows], 4000)


def seed_process_func(tokenizer, example):
    """The seed's process_func, verbatim but for the tokenizer it is handed."""
    MAX_LENGTH = 256
    input_ids, attention_mask, labels = [], [], []
    instruction = tokenizer("\n".join(["Human: " + example["instruction"], example["input"]]).strip() + "\n\nAssistant: ")  # noqa: E501
    response = tokenizer(example["output"] + tokenizer.eos_token)
    input_ids = instruction["input_ids"] + response["input_ids"]
    attention_mask = instruction["attention_mask"] + response["attention_mask"]
    labels = [-100] * len(instruction["input_ids"]) + response["input_ids"]
    if len(input_ids) > MAX_LENGTH:
        input_ids = input_ids[:MAX_LENGTH]
        attention_mask = attention_mask[:MAX_LENGTH]
        labels = labels[:MAX_LENGTH]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def seed_rows_one_bos(tokenizer, example):
    """The seed's process_func but for softprompt's one difference: a tokenizer that starts every text with BOS
    keeps it at the row's start only (the seed's would learn a BOS as the first token of every answer)."""
    return seed_process_func(_NoBosResponse(tokenizer), example)


class _NoBosResponse:
    """`tokenizer` for the seed's function, dropping the leading BOS of its second call (the response)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.eos_token, self.calls = tokenizer, tokenizer.eos_token, 0

    def __call__(self, text):
        out = dict(self.tokenizer(text))
        self.calls += 1
        if self.calls == 2 and out["input_ids"][:1] == [self.tokenizer.bos_token_id]:
            out = {k: v[1:] for k, v in out.items()}
        return out


def write_jsonl(path: Path, rows: list, opener=open) -> Path:
    with opener(path, "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)
    return path


# ---- formats ----------------------------------------------------------------------------------------

def write(kind: str, folder: Path, rows: list[dict]) -> Path:
    if kind == "json array":
        path = folder / "rows.json"
        path.write_text(json.dumps(rows, ensure_ascii=False, indent=2), encoding="utf-8")
    elif kind == "json lines in .json":
        path = write_jsonl(folder / "rows.json", rows)
    elif kind in (".jsonl", ".jsonl.gz", ".json.gz"):
        path = write_jsonl(folder / ("rows" + kind), rows, gzip.open if kind.endswith(".gz") else open)
    elif kind in (".csv", ".parquet"):
        table = datasets.Dataset.from_list([{"input": "", **row} for row in rows])
        path = folder / ("rows" + kind)
        table.to_csv(str(path), index=False) if kind == ".csv" else table.to_parquet(str(path))
    elif kind == "save_to_disk":
        path = folder / "saved"
        datasets.Dataset.from_list([{"input": "", **row} for row in rows]).save_to_disk(str(path))
    else:
        path = folder / "saved_dict"
        table = datasets.Dataset.from_list([{"input": "", **row} for row in rows])
        datasets.DatasetDict({"train": table, "test": table.select([0])}).save_to_disk(str(path))
    return path


@pytest.mark.parametrize("kind", ["json array", "json lines in .json", ".jsonl", ".jsonl.gz", ".json.gz", ".csv",
                                  ".parquet", "save_to_disk", "save_to_disk DatasetDict"])
def test_each_format_reads_the_same_rows(kind, tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="softprompt.data.rows"):
        rows = load_rows(write(kind, tmp_path, ROWS))
    assert rows.column_names == ["instruction", "input", "output"]
    assert rows.to_list() == EXPECTED
    if kind == "save_to_disk DatasetDict":
        assert "'train' split, not test" in caplog.text


def test_column_map_renames_and_drops_other_columns(tmp_path, tok):
    path = write_jsonl(tmp_path / "custom.jsonl", [
        {"prompt": r["instruction"], "context": r.get("input", ""), "answer": r["output"], "id": i}
        for i, r in enumerate(ROWS)])
    rows = load_rows(path, ColumnMap(instruction="prompt", input="context", output="answer"))
    assert rows.to_list() == EXPECTED
    data, report = tokenize(rows, tok)
    assert data.column_names == ["input_ids", "attention_mask", "labels"] and report.source == str(path)


def test_csv_keeps_na_and_numbers_as_text(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("instruction,input,output\nWhat is missing?,,NA\nCount.,,42\n", encoding="utf-8")
    assert load_rows(path).to_list() == [
        {"instruction": "What is missing?", "input": "", "output": "NA"},
        {"instruction": "Count.", "input": "", "output": "42"}]


# ---- file problems: DataError naming the file -------------------------------------------------------

NESTED = "[" * 50_000 + "]" * 50_000


@pytest.mark.parametrize("name, content, message", [
    ("empty.json", "", "the file is empty"),
    ("blank.jsonl", "\n  \n", "the file is empty"),
    ("empty.csv", "", "the file is empty"),
    ("header.csv", "instruction,input,output\n", "the file has no rows"),
    ("none.json", "[]", "the file has no rows"),
    ("bad.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "output": }\n',
     "line 3 is not valid JSON"),
    ("bad.json", '[\n {"instruction": "a", "output": "b"},\n {"instruction": "c" "output": "d"}\n]',
     "invalid JSON at line 3"),
    ("list.jsonl", '{"instruction": "a", "output": "b"}\n["c", "d"]\n', "line 2 is a list, not an object"),
    ("rows.txt", "instruction\n", "unknown file type"),
    # issue #9: nesting past what the reader handles, and a key or column given twice
    ("deep.json", '[{"instruction": "a", "output": ' + NESTED + "}]", "the file nests JSON arrays or objects deeper"),
    ("deep.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": ' + NESTED + "}\n",
     "line 2 nests JSON arrays or objects deeper"),
    ("twice.jsonl", '{"instruction": "a", "output": "b"}\n{"instruction": "a", "output": "b", "output": "c"}\n',
     "line 2 gives the key 'output' twice"),
    ("twice.json", '[{"instruction": "a", "output": "b"}, {"output": "b", "instruction": "a", "instruction": "c"}]',
     r"row 2 \(1-based\) gives the key 'instruction' twice"),
    ("twice.csv", "instruction,output,output\na,b,c\n", "the column 'output' appears twice"),
])
def test_file_problems_name_the_file(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(DataError, match=message) as error:
        load_rows(path)
    assert str(path) in str(error.value)


def test_empty_gzip_and_wrong_path(tmp_path):
    with gzip.open(tmp_path / "empty.jsonl.gz", "wt") as f:
        f.write("")
    with pytest.raises(DataError, match="empty.jsonl.gz: the file is empty"):
        load_rows(tmp_path / "empty.jsonl.gz")
    with pytest.raises(DataError, match="nope.json: no such file or folder"):
        load_rows(tmp_path / "nope.json")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not a folder written by datasets' save_to_disk"):
        load_rows(tmp_path / "folder")


def test_unknown_column_mapping_names_the_columns_present(tmp_path):
    path = write_jsonl(tmp_path / "rows.jsonl", ROWS)
    present = r"\(columns present: instruction, input, output\)"
    with pytest.raises(DataError, match=r"no column 'response' for the output " + present):
        load_rows(path, ColumnMap(output="response"))
    with pytest.raises(DataError, match="no column 'context' for the input"):  # a named input must be there
        load_rows(path, ColumnMap(input="context"))
    with pytest.raises(ValueError, match="two fields to one column"):
        ColumnMap(input="output")
    with pytest.raises(ValueError, match="ColumnMap.output=''"):
        ColumnMap(output="")


def test_datasetdict_without_train_split(tmp_path):
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS[:2])}).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(DataError, match="without a 'train' split \\(splits: test\\)"):
        load_rows(tmp_path / "d")


# ---- the seed's template ----------------------------------------------------------------------------

@pytest.mark.parametrize("demo", [ZH_DEMO, EN_DEMO], ids=["zh", "en"])
def test_alpaca_template_equals_the_seeds_process_func(demo, zh_tok):
    rows = load_rows(shared_file(demo)).select(range(400))
    data, report = tokenize(rows, zh_tok)
    expected = [seed_rows_one_bos(zh_tok, row) for row in rows]
    cut_away = [i + 1 for i, row in enumerate(expected) if set(row["labels"]) == {-100}]
    kept = [row for i, row in enumerate(expected) if i + 1 not in cut_away]
    assert data.to_list() == kept  # token for token, in order
    assert report.rows == 400 and report.kept == len(kept)
    assert report.skipped == ({"response cut away by max_length=256": len(cut_away)} if cut_away else {})
    # Both paths are exercised: some rows are cut at 256, most are not.
    assert 0 < report.truncated < report.kept
    full = []  # untruncated lengths, the response's leading BOS dropped
    for r in rows:
        response = zh_tok(r["output"] + "</s>")["input_ids"]
        bos = response[:1] == [zh_tok.bos_token_id]
        full.append(len(zh_tok(alpaca_prompt(r["instruction"], r["input"]))["input_ids"]) + len(response) - bos)
    assert report.truncated == sum(n > 256 for i, n in enumerate(full) if i + 1 not in cut_away)


def test_alpaca_template_on_one_row(tok):
    assert alpaca_prompt("Say hi.", "") == "Human: Say hi.\n\nAssistant: "
    assert alpaca_prompt("Translate", "你好 ") == "Human: Translate\n你好\n\nAssistant: "
    data, _ = tokenize(datasets.Dataset.from_list(EXPECTED[2:]), tok)
    row = data[0]
    prompt, response = tok("Human: Say hi.\n\nAssistant: ")["input_ids"], tok("Hi!</s>")["input_ids"]
    assert prompt[0] == response[0] == tok.bos_token_id  # this tokenizer starts every text with BOS ...
    response = response[1:]  # ... which a row keeps once, at its start: never a learned BOS inside a row
    assert row["input_ids"] == prompt + response
    assert row["labels"] == [-100] * len(prompt) + response
    assert row["attention_mask"] == [1] * len(prompt + response)


def test_num_proc_gives_the_same_rows(tok):
    rows = datasets.Dataset.from_list(EXPECTED * 40)
    assert tokenize(rows, tok, num_proc=2)[0].to_list() == tokenize(rows, tok)[0].to_list()


def test_chat_template_masks_all_but_the_assistant(tok):
    chat = copy.deepcopy(tok)
    chat.chat_template = CHAT_TEMPLATE
    data, report = tokenize(datasets.Dataset.from_list(EXPECTED), chat, template="chat")
    assert report.kept == 3
    row = data[1]
    learned = [t for t in row["labels"] if t != -100]
    masked = row["input_ids"][: len(row["input_ids"]) - len(learned)]
    assert chat.decode(masked) == "<|user|>\n翻译成英文\n你好，世界</s>\n<|assistant|>\n"
    assert chat.decode(learned) == "Hello, world</s>\n"
    assert row["labels"][-len(learned):] == row["input_ids"][-len(learned):]
    assert masked[0] != chat.bos_token_id  # the template's text is taken as it is, no <s> added


def test_chat_template_errors(tok):
    rows = datasets.Dataset.from_list(EXPECTED)
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        tokenize(rows, tok, template="chat")
    odd = copy.deepcopy(tok)
    # the generation prompt ">>" is not how the assistant's turn starts in the whole conversation
    odd.chat_template = ("{% for m in messages %}{{ m['content'] }}{% endfor %}"
                         "{% if add_generation_prompt %}>>{% endif %}")
    with pytest.raises(ValueError, match="does not render the prompt as the start"):
        tokenize(rows, odd, template="chat")


def test_argument_errors(tok):
    rows = datasets.Dataset.from_list(EXPECTED)
    with pytest.raises(ValueError, match="template='plain' is not valid"):
        tokenize(rows, tok, template="plain")
    with pytest.raises(ValueError, match="max_length=0 is not valid"):
        tokenize(rows, tok, max_length=0)
    with pytest.raises(ValueError, match="on_bad_row='drop' is not valid"):
        tokenize(rows, tok, on_bad_row="drop")
    no_eos = copy.deepcopy(tok)
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="no eos_token"):
        tokenize(rows, no_eos)
    with pytest.raises(DataError, match=r"the dataset: no column 'output' \(columns present: instruction, answer\)"):
        tokenize(datasets.Dataset.from_list([{"instruction": "a", "answer": "b"}]), tok)


# ---- bad rows: skipped and reported, or DataError naming file and row --------------------------------

LONG = "word " * 300
BAD_ROWS = [  # (row, the reason tokenize gives)
    ({"input": "x", "output": "y"}, "instruction is missing"),
    ({"instruction": "x", "input": "y"}, "output is missing"),
    ({"instruction": "x", "output": 5}, "output is int, not a string"),
    ({"instruction": ["x"], "output": "y"}, "instruction is list, not a string"),
    ({"instruction": "x", "input": 1.5, "output": "y"}, "input is float, not a string"),
    ({"instruction": "x", "output": " \n"}, "output is empty"),
    ({"instruction": LONG, "output": "y"}, "response cut away by max_length=256"),
]


@pytest.mark.parametrize("bad, reason", BAD_ROWS, ids=[reason for _, reason in BAD_ROWS])
def test_each_bad_row_is_named(tmp_path, tok, bad, reason):
    path = write_jsonl(tmp_path / "rows.jsonl", [ROWS[0], ROWS[1], bad, ROWS[2]])
    rows = load_rows(path)
    data, report = tokenize(rows, tok)
    assert len(data) == 3 and report.kept == 3 and report.num_skipped == 1
    assert report.skipped == {reason: 1} and report.first_rows == {reason: (3,)}
    assert f"{path}: kept 3 of 4 rows" in report.summary() and f"{reason}: 1 (rows 3)" in report.summary()
    with pytest.raises(DataError, match=f"{path}: row 3 \\(1-based\\): {reason}; fix the row"):
        tokenize(rows, tok, on_bad_row="error")


def test_bad_rows_are_counted_per_reason(tmp_path, tok, caplog):
    rows = [ROWS[0]] + [{"instruction": "x", "output": ""}] * 7 + [{"instruction": "x", "output": 1}, ROWS[1]]
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with caplog.at_level(logging.WARNING, logger="softprompt.data.rows"):
        data, report = tokenize(load_rows(path), tok)
    assert report == DataReport(source=str(path), rows=10, kept=2, truncated=0, max_length=256,
                                skipped={"output is empty": 7, "output is int, not a string": 1},
                                first_rows={"output is empty": (2, 3, 4, 5, 6), "output is int, not a string": (9,)})
    assert "output is empty: 7 (rows 2, 3, 4, 5, 6, ...)" in report.summary()
    assert report.summary() in caplog.text  # never dropped in silence
    assert [r["input_ids"] for r in data] == [r["input_ids"] for r in tokenize(load_rows(path).select([0, 9]), tok)[0]]


def test_long_rows_keep_their_start(tok):
    rows = datasets.Dataset.from_list([{"instruction": "Say hi.", "input": "", "output": LONG}])
    data, report = tokenize(rows, tok, max_length=32)
    assert report.truncated == 1 and len(data[0]["input_ids"]) == 32
    assert data[0]["input_ids"] == seed_rows_one_bos(tok, rows[0])["input_ids"][:32]
    prompt = len(tok(alpaca_prompt("Say hi.", ""))["input_ids"])
    data, report = tokenize(rows, tok, max_length=prompt + 1)  # one response token left: kept
    first = [t for t in seed_rows_one_bos(tok, rows[0])["labels"] if t != -100][:1]  # the answer's first token
    assert report.kept == 1 and [t for t in data[0]["labels"] if t != -100] == first != [tok.bos_token_id]
    _, report = tokenize(rows, tok, max_length=prompt)  # none left: skipped
    assert report.skipped == {f"response cut away by max_length={prompt}": 1}


# ---- split, collator, length grouping ---------------------------------------------------------------

def test_split(tok):
    data = datasets.Dataset.from_dict({"input_ids": [[i] for i in range(100)]})
    train, val = split(data, 0.1, seed=1)
    assert (len(train), len(val)) == (90, 10)
    assert sorted(r[0] for r in list(train["input_ids"]) + list(val["input_ids"])) == list(range(100))
    assert list(split(data, 0.1, seed=1)[1]["input_ids"]) == list(val["input_ids"])  # the seed fixes the split
    assert list(split(data, 0.1, seed=2)[1]["input_ids"]) != list(val["input_ids"])
    assert len(split(data, 7, seed=0)[1]) == 7
    assert split(data, 0, seed=0) == (data, None) and split(data, 0.0, seed=0)[1] is None
    for bad in (1.0, -0.1, 100, -3, True, "0.1"):
        with pytest.raises(ValueError, match="val_size="):
            split(data, bad, seed=0)


def test_collator_pads_right_with_minus_100_labels(tok):
    data, _ = tokenize(datasets.Dataset.from_list(EXPECTED), tok)
    features = data.to_list()
    lengths = [len(f["input_ids"]) for f in features]
    batch = make_collator(tok)(features)
    longest = max(lengths)
    assert batch["input_ids"].shape == batch["labels"].shape == batch["attention_mask"].shape == (3, longest)
    for row, n in enumerate(lengths):
        assert batch["input_ids"][row, :n].tolist() == features[row]["input_ids"]
        assert batch["input_ids"][row, n:].tolist() == [tok.pad_token_id] * (longest - n)
        assert batch["labels"][row].tolist() == features[row]["labels"] + [-100] * (longest - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (longest - n)
    assert make_collator(tok, pad_to_multiple_of=8)(features)["labels"].shape[1] == -(-longest // 8) * 8


def test_collator_leaves_the_callers_tokenizer_alone(tok):
    left = copy.deepcopy(tok)
    left.padding_side, left.pad_token = "left", None
    features = tokenize(datasets.Dataset.from_list(EXPECTED), left)[0].to_list()
    batch = make_collator(left)(features)
    n = len(features[2]["input_ids"])
    assert batch["input_ids"][2, :n].tolist() == features[2]["input_ids"]  # right padding all the same
    assert batch["input_ids"][2, n:].unique().tolist() == [tok.eos_token_id]  # eos pads where no pad exists
    assert (left.padding_side, left.pad_token) == ("left", None)
    with pytest.raises(ValueError, match="pad_to_multiple_of=0"):
        make_collator(tok, pad_to_multiple_of=0)


def test_length_grouped_sampler_reads_input_ids(tok):
    rows = datasets.Dataset.from_list([{"instruction": "x " * n, "input": "", "output": "y"} for n in range(1, 41)])
    data, _ = tokenize(rows, tok)
    sampler = LengthGroupedSampler(batch_size=4, dataset=data, model_input_name=tok.model_input_names[0])
    assert sampler.lengths == [len(ids) for ids in data["input_ids"]] and len(set(sampler.lengths)) > 10
    assert sorted(sampler) == list(range(40))


# ---- speed ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_52k_rows_tokenize_in_seconds(zh_tok):
    start = time.perf_counter()
    rows = load_rows(shared_file(ZH_52K))
    read = time.perf_counter()
    data, report = tokenize(rows, zh_tok)
    done = time.perf_counter()
    print(f"\n52k rows: read {read - start:.1f}s, tokenized {done - read:.1f}s "
          f"(byte-level BPE, vocab {len(zh_tok)}, {os.cpu_count()} cores)\n{report.summary()}")
    assert report.rows == 52002 and report.skipped["output is empty"] == 50
    assert len(data) == report.kept


# ---- issue #9: values as the file has them, no silent row loss, one handling in every format ---------

def test_a_column_mixing_strings_and_a_number_keeps_the_strings(tmp_path, tok):
    """99 rows whose output is a string such as "42", one whose output is the number 7: 99 kept, 1 named."""
    rows = [{"instruction": f"Add {i} and 0.", "output": str(i)} for i in range(99)]
    rows.insert(50, {"instruction": "Add 7 and 0.", "output": 7})
    rows += [{"instruction": "Read.", "output": text} for text in ("null", "[1, 2]", "true", '"quoted"')]
    path = write_jsonl(tmp_path / "mixed.jsonl", rows)
    loaded = load_rows(path)
    assert [r["output"] for r in loaded.select([0, 42, 98, 99, 100, 101, 102, 103])] == [
        "0", "42", "97", "98", "null", "[1, 2]", "true", '"quoted"']
    assert loaded[50]["output"] == 7
    data, report = tokenize(loaded, tok)
    assert report.kept == 103 and report.skipped == {"output is int, not a string": 1}
    assert report.first_rows == {"output is int, not a string": (51,)}
    array = tmp_path / "mixed.json"
    array.write_text(json.dumps(rows), encoding="utf-8")
    assert tokenize(load_rows(array), tok)[1] == DataReport(**{**report.__dict__, "source": str(array)})


def test_too_many_skipped_rows_stop_with_a_clear_message(tmp_path, tok):
    rows = [{"instruction": "x", "output": 7}] * 3 + ROWS  # 3 of 6 rows bad
    data, report = tokenize(load_rows(write_jsonl(tmp_path / "rows.jsonl", rows)), tok)
    with pytest.raises(DataError, match=r"kept 3 of 6 rows.*output is int, not a string: 3 \(rows 1, 2, 3\)\. That is "
                                        r"50\.0% of the rows, more than max_skipped_fraction=0\.05: fix those rows"):
        report.check_skipped(0.05)
    report.check_skipped(0.5)  # exactly the limit: allowed
    with pytest.raises(ValueError, match="max_skipped_fraction=1.5 is not valid"):
        report.check_skipped(1.5)


def test_repeated_parquet_column_is_refused(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.Table.from_arrays([pa.array(["a"]), pa.array(["b"]), pa.array(["c"])], names=["instruction", "output", "output"])
    pq.write_table(table, tmp_path / "twice.parquet")
    with pytest.raises(DataError, match="twice.parquet: the column 'output' appears twice"):
        load_rows(tmp_path / "twice.parquet")


def test_nesting_in_a_column_that_is_not_read_is_harmless(tmp_path):
    rows = [{"instruction": "a", "output": "b", "extra": json.loads("[" * 500 + "]" * 500)}]
    assert load_rows(write_jsonl(tmp_path / "rows.jsonl", rows)).to_list() == [{"instruction": "a", "input": "", "output": "b"}]


@pytest.mark.parametrize("kind", ["json array", ".jsonl", ".jsonl.gz", ".csv"])
def test_a_byte_order_mark_is_dropped_in_every_text_format(kind, tmp_path):
    path = write(kind, tmp_path, ROWS)
    opener = gzip.open if kind.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    with opener(path, "wb") as f:
        f.write(b"\xef\xbb\xbf" + raw)
    assert load_rows(path).to_list() == EXPECTED
