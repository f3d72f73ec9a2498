import json
import re

import pytest

from softprompt.demo_data import TASKS, chinese_numeral, make_demo_dataset, write_demo_dataset

CJK = re.compile(r"[\u4e00-\u9fff]")
_ZH_VALUE = {c: i for i, c in enumerate("零一二三四五六七八九")}


def parse_chinese(text: str) -> int:
    """An independent reader of 1..99 in Chinese numerals, to check the generator against."""
    if "十" not in text:
        return _ZH_VALUE[text]
    tens, _, ones = text.partition("十")
    return (_ZH_VALUE[tens] if tens else 1) * 10 + (_ZH_VALUE[ones] if ones else 0)


def item_key(row: dict) -> tuple:
    """What makes two rows the same fact, whatever the language: (input or operands, answer)."""
    return (row["input"] or tuple(re.findall(r"\d+", row["instruction"])), row["output"])


def expected_answer(row: dict) -> str | None:
    """The answer recomputed from the row, for the tasks a rule can check; None for lookups."""
    inp, ins = row["input"], row["instruction"]
    if "+" in ins or "加" in ins:
        a, b = map(int, re.findall(r"\d+", ins))
        return str(a + b)
    if CJK.search(inp):
        return str(parse_chinese(inp))
    if inp.isdigit():
        n = int(inp)
        return next(z for z in (chinese_numeral(k) for k in range(1, 100)) if parse_chinese(z) == n)
    if "capital letters" in ins or "大写" in ins:
        return inp.upper()
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


def test_train_and_eval_share_no_item_in_any_language():
    train, evals = make_demo_dataset(800, 120)
    train_keys = {item_key(r) for r in train}
    assert not train_keys & {item_key(r) for r in evals}
    assert not {(r["instruction"], r["input"]) for r in train} & {(r["instruction"], r["input"]) for r in evals}
    assert len({item_key(r) for r in evals}) == len(evals), "an eval fact is asked twice"


def test_every_answer_is_short_single_line_and_checkable():
    train, evals = make_demo_dataset(800, 120)
    answers: dict[tuple[str, str], str] = {}
    checked = 0
    for row in train + evals:
        out = row["output"]
        assert out and out == out.strip() and "\n" not in out
        assert len(out.split()) <= 2, out
        # One prompt, one answer: exact match is well defined.
        assert answers.setdefault((row["instruction"], row["input"]), out) == out
        want = expected_answer(row)
        if want is not None:
            assert out == want, row
            checked += 1
    assert checked > len(train + evals) // 2


def test_lookup_answers_are_right():
    train, evals = make_demo_dataset(800, 120)
    facts = {(r["input"], r["output"]) for r in train + evals}
    known = {("France", "Paris"), ("Japan", "Tokyo"), ("hot", "cold"), ("big", "small"), ("up", "down")}
    wrong = {("France", "Lyon"), ("hot", "warm")}
    assert known <= facts
    assert not wrong & facts


def test_bilingual_and_every_task_in_both_splits():
    train, evals = make_demo_dataset(600, 60)
    for rows in (train, evals):
        zh = sum(bool(CJK.search(r["instruction"])) for r in rows)
        assert 0.3 < zh / len(rows) < 0.7, f"{zh}/{len(rows)} rows have a Chinese instruction"
        assert any(CJK.search(r["output"]) for r in rows), "no answer in Chinese"
        assert any(r["output"].isdigit() for r in rows)
    # Round robin: the first len(TASKS) eval rows are one of each task, each with a different rule.
    kinds = {expected_answer(r) is None for r in evals[: len(TASKS)]}
    assert kinds == {True, False}


def test_chinese_numeral():
    cases = {1: "一", 10: "十", 11: "十一", 17: "十七", 20: "二十", 21: "二十一", 70: "七十", 99: "九十九"}
    assert {n: chinese_numeral(n) for n in cases} == cases
    assert all(parse_chinese(chinese_numeral(n)) == n for n in range(1, 100))
    for bad in (0, 100):
        with pytest.raises(ValueError, match="1..99"):
            chinese_numeral(bad)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="n_train=100000"):
        make_demo_dataset(100_000, 10)
    with pytest.raises(ValueError, match="n_eval"):
        make_demo_dataset(10, 10_000)
    with pytest.raises(ValueError, match="known tasks"):
        make_demo_dataset(10, 10, tasks=["capital", "poetry"])
    with pytest.raises(ValueError, match="n_train=-1"):
        make_demo_dataset(-1, 10)


def test_write_demo_dataset_round_trips(tmp_path):
    train_path, eval_path = write_demo_dataset(tmp_path / "demo", 40, 12, seed=1)
    assert (train_path.name, eval_path.name) == ("train.jsonl", "eval.jsonl")
    read = [[json.loads(line) for line in p.read_text(encoding="utf-8").splitlines()] for p in (train_path, eval_path)]
    assert tuple(read) == make_demo_dataset(40, 12, seed=1)
    assert CJK.search(train_path.read_text(encoding="utf-8")), "Chinese should be written as text, not escapes"
