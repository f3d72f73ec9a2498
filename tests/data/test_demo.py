import json
import re

import pytest

from softprompt.data.demo import TASKS, make_demo_dataset, write_demo_dataset

CJK = re.compile(r"[\u4e00-\u9fff]")


def subject(row: dict) -> str:
    """The thing a row asks about (a word, a sum, a list), the same in its English and Chinese forms."""
    if row["input"]:
        return row["input"]
    if m := re.search(r'[“"](.+?)[”"]', row["instruction"]):
        return m[1]
    raise AssertionError(f"cannot find what this row asks about: {row}")


def item_key(row: dict) -> tuple[str, str]:
    return subject(row), row["output"]


def kind(row: dict) -> str:
    """Which task a row is, told from its text alone."""
    text = row["instruction"] + " " + row["input"]
    cues = [("add", r"\d \+ \d"), ("subtract", r"\d - \d"), ("last_word", ", "),
            ("upper", "capital letters|大写"), ("antonym", "opposite|反义词"), ("plural", "plural|复数")]
    for name, cue in cues:
        if re.search(cue, text):
            return name
    raise AssertionError(f"no task matches {row}")


def expected_answer(row: dict) -> str | None:
    """The answer recomputed from the row by rule; None for facts looked up in a table."""
    inp, ins = row["input"], row["instruction"]
    if m := re.fullmatch(r"(\d+) ([+-]) (\d+)", inp):
        a, op, b = int(m[1]), m[2], int(m[3])
        return str(a + b if op == "+" else a - b)
    if ", " in inp:
        return inp.split(", ")[-1]
    if "capital letters" in ins or "大写" in ins:
        return subject(row).upper()
    return None


def test_deterministic_by_seed():
    assert make_demo_dataset(120, 30, seed=3) == make_demo_dataset(120, 30, seed=3)
    assert make_demo_dataset(120, 30, seed=3) != make_demo_dataset(120, 30, seed=4)


def test_eval_rows_do_not_depend_on_n_train():
    assert make_demo_dataset(50, 40)[1] == make_demo_dataset(600, 40)[1]


def test_sizes_and_alpaca_fields():
    train, evals = make_demo_dataset(300, 60)
    assert (len(train), len(evals)) == (300, 60)
    for row in train + evals:
        assert set(row) == {"instruction", "input", "output"}
        assert all(isinstance(v, str) for v in row.values())
    assert make_demo_dataset(0, 0) == ([], [])


def test_train_and_eval_share_no_item_in_any_language():
    train, evals = make_demo_dataset(1000, 120)
    assert not {item_key(r) for r in train} & {item_key(r) for r in evals}
    assert len({item_key(r) for r in evals}) == len(evals), "an eval item is asked twice"
    # Training does hold items in both languages: the split is by item, not by row.
    by_key: dict[tuple[str, str], set[bool]] = {}
    for r in train:
        by_key.setdefault(item_key(r), set()).add(bool(CJK.search(r["instruction"])))
    assert any(len(langs) == 2 for langs in by_key.values())


def test_every_answer_is_short_single_line_and_checkable():
    train, evals = make_demo_dataset(1000, 120)
    answers: dict[tuple[str, str], str] = {}
    checked = 0
    for row in train + evals:
        out = row["output"]
        assert out and out == out.strip() and "\n" not in out and " " not in out, row
        # One prompt, one answer: exact match is well defined.
        assert answers.setdefault((row["instruction"], row["input"]), out) == out
        want = expected_answer(row)
        if want is not None:
            assert out == want, row
            checked += 1
    assert checked > len(train + evals) // 2


def test_lookup_answers_are_right():
    train, evals = make_demo_dataset(1000, 120)
    facts = {(subject(r), r["output"]) for r in train + evals if expected_answer(r) is None}
    known = {("hot", "cold"), ("big", "small"), ("child", "children"), ("mouse", "mice"), ("box", "boxes")}
    assert known <= facts
    assert not {("hot", "warm"), ("child", "childs"), ("mouse", "mouses")} & facts


def test_bilingual_and_every_task_in_both_splits():
    train, evals = make_demo_dataset(600, 60)
    for rows in (train, evals):
        zh = sum(bool(CJK.search(r["instruction"])) for r in rows)
        assert 0.3 < zh / len(rows) < 0.7, f"{zh}/{len(rows)} rows have a Chinese instruction"
        assert any(CJK.search(r["output"]) for r in rows), "no answer in Chinese"
        assert {kind(r) for r in rows} == set(TASKS)
    # Round robin: the first len(TASKS) eval rows are one of each task.
    assert sorted(kind(r) for r in evals[: len(TASKS)]) == sorted(TASKS)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_train=100000"):
        make_demo_dataset(100_000, 10)
    with pytest.raises(ValueError, match="n_eval=10000"):
        make_demo_dataset(10, 10_000)
    with pytest.raises(ValueError, match="known tasks: antonym"):
        make_demo_dataset(10, 10, tasks=["antonym", "poetry"])
    with pytest.raises(ValueError, match="n_train=-1"):
        make_demo_dataset(-1, 10)


def test_tasks_subset():
    train, evals = make_demo_dataset(40, 10, tasks=["add"])
    assert {kind(r) for r in train + evals} == {"add"}


def test_write_demo_dataset_round_trips(tmp_path):
    train_path, eval_path = write_demo_dataset(tmp_path / "demo", 40, 12, seed=1)
    assert (train_path.name, eval_path.name) == ("train.jsonl", "eval.jsonl")
    read = [[json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()]
            for p in (train_path, eval_path)]
    assert tuple(read) == make_demo_dataset(40, 12, seed=1)
    assert CJK.search(train_path.read_text(encoding="utf-8")), "Chinese should be written as text, not escapes"


def test_chinese_only_rows_keep_eval_items_out_of_training():
    train, evals = make_demo_dataset(240, 30, seed=0, langs=("zh",))
    assert all(CJK.search(r["instruction"]) for r in train + evals)  # every question is asked in Chinese
    assert not {item_key(r) for r in evals} & {item_key(r) for r in train}
    assert {kind(r) for r in evals} == set(TASKS)
    assert make_demo_dataset(240, 30, seed=0) == make_demo_dataset(240, 30, seed=0, langs=("en", "zh"))
    with pytest.raises(ValueError, match="langs=.*'fr'.*give some of en, zh"):
        make_demo_dataset(10, 6, langs=("fr",))
