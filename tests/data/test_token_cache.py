"""softprompt/data/token_cache.py: the tokenized rows come back from disk, equal, and a changed file is tokenized again."""

from __future__ import annotations

import os
import time

import pytest
from transformers import AutoTokenizer

from softprompt.data.rows import ColumnMap, load_rows, tokenize
from softprompt.data.token_cache import tokenized_rows
from tiny_lm import make_workspace, toy_rows, write_rows


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    return make_workspace(tmp_path, 12)


def test_second_call_reads_the_cache_and_equals_tokenize(workspace, monkeypatch):
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    data = workspace / "data.jsonl"
    first, report = tokenized_rows(data, ColumnMap(), tokenizer, 64, "alpaca")
    assert len(list((workspace / "cache" / "tokenized").iterdir())) == 1

    import softprompt.data.token_cache as token_cache

    def no_tokenizing(*args, **kwargs):
        raise AssertionError("tokenized again although the cache holds these rows")

    monkeypatch.setattr(token_cache, "tokenize", no_tokenizing)
    again, report_again = tokenized_rows(data, ColumnMap(), tokenizer, 64, "alpaca")
    expected, expected_report = tokenize(load_rows(data), tokenizer, max_length=64)
    assert again["input_ids"] == first["input_ids"] == expected["input_ids"]
    assert again["labels"] == expected["labels"]
    assert report_again == report == expected_report


def test_changed_file_or_settings_tokenize_again(workspace):
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    data = workspace / "data.jsonl"
    a, _ = tokenized_rows(data, ColumnMap(), tokenizer, 64, "alpaca")
    b, _ = tokenized_rows(data, ColumnMap(), tokenizer, 18, "alpaca")  # another max_length: another entry
    assert max(map(len, b["input_ids"])) <= 18 < max(map(len, a["input_ids"]))
    write_rows(data, toy_rows(5))
    os.utime(data, (time.time() + 5, time.time() + 5))
    c, report = tokenized_rows(data, ColumnMap(), tokenizer, 64, "alpaca")
    assert report.rows == 5 and len(c) == 5
    assert len(list((workspace / "cache" / "tokenized").iterdir())) == 3


def test_a_damaged_cache_is_rebuilt(workspace):
    tokenizer = AutoTokenizer.from_pretrained(workspace / "model")
    data = workspace / "data.jsonl"
    tokenized_rows(data, ColumnMap(), tokenizer, 64, "alpaca")
    (entry,) = (workspace / "cache" / "tokenized").iterdir()
    for f in entry.glob("*.arrow"):
        f.write_bytes(b"broken")
    rows, report = tokenized_rows(data, ColumnMap(), tokenizer, 64, "alpaca")
    assert len(rows) == report.kept == 12
