"""BLEU-4 and ROUGE-1/2/L of `softprompt eval --generate`: hand-computed Chinese values, equality with the reference
packages called directly on fixed predictions, and the engine's batched answers equal to a per-row loop."""

from __future__ import annotations

import json
import math
import random

import pytest

from softprompt.inference.metrics import CJKTokenizer, generation_metrics
from tiny_lm import ZH_DEMO, make_tiny_lm, need_shared, row_texts


def test_chinese_is_scored_per_character():
    # 4 of the reference's 7 characters, in order: every n-gram precision is 1, the brevity penalty exp(1 - 7/4).
    scores = generation_metrics(["我爱北京"], ["我爱北京天安门"])
    assert scores["bleu4"] == pytest.approx(100 * math.exp(1 - 7 / 4), abs=1e-9)
    assert scores["rouge1"] == pytest.approx(100 * 8 / 11)  # P = 4/4, R = 4/7
    assert scores["rouge2"] == pytest.approx(100 * 2 / 3)  # 3 of 6 bigrams: P = 1, R = 1/2
    assert scores["rougeL"] == pytest.approx(100 * 8 / 11)  # LCS = 4
    # rouge-score's own tokenizer keeps [a-z0-9] only: Chinese would score 0 (why we hand it the zh tokenizer).
    from rouge_score import rouge_scorer

    assert rouge_scorer.RougeScorer(["rouge1"]).score("我爱北京天安门", "我爱北京")["rouge1"].fmeasure == 0.0
    assert CJKTokenizer().tokenize("GPT-4 写了 3.5 首诗.") == ["gpt-4", "写", "了", "3.5", "首", "诗", "."]


def test_identical_and_disjoint_answers():
    assert generation_metrics(["天气很好。", "Hello world"], ["天气很好。", "Hello world"]) == pytest.approx(
        {"bleu4": 100.0, "rouge1": 100.0, "rouge2": 100.0, "rougeL": 100.0})
    assert generation_metrics(["甲乙丙丁"], ["戊己庚辛"]) == pytest.approx(
        {"bleu4": 0.0, "rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0})
    with pytest.raises(ValueError, match="2 predictions for 1 references"):
        generation_metrics(["a", "b"], ["a"])


def package_scores(predictions: list[str], references: list[str]) -> dict:
    """The packages called as their documentation shows, nothing of softprompt's."""
    import sacrebleu
    from rouge_score import rouge_scorer
    from sacrebleu.tokenizers.tokenizer_zh import TokenizerZh

    class PerCharacter:
        zh = TokenizerZh()

        def tokenize(self, text):
            return self.zh(text.strip()).lower().split()

    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], tokenizer=PerCharacter())
    rows = [scorer.score(r, p) for p, r in zip(predictions, references)]
    out = {"bleu4": sacrebleu.corpus_bleu(predictions, [references], tokenize="zh").score}
    for name in ("rouge1", "rouge2", "rougeL"):
        out[name] = 100 * sum(s[name].fmeasure for s in rows) / len(rows)
    return out


def test_200_chinese_rows_equal_the_reference_packages():
    """Fixed predictions made from the 200 rows' references (cut, shuffled, mixed with English, empty)."""
    need_shared()
    rows = json.loads(ZH_DEMO.read_text(encoding="utf-8"))[:200]
    references = [r["output"] for r in rows]
    rng = random.Random(0)
    predictions = []
    for i, ref in enumerate(references):
        chars = list(ref)
        if i % 4 == 0:
            predictions.append(ref[: len(ref) // 2])
        elif i % 4 == 1:
            rng.shuffle(chars)
            predictions.append("".join(chars[:40]))
        elif i % 4 == 2:
            predictions.append(f"Answer: {ref[:30]} OK")
        else:
            predictions.append("" if i % 8 == 3 else ref)
    ours = generation_metrics(predictions, references)
    assert ours == pytest.approx(package_scores(predictions, references), rel=1e-12)
    assert 10 < ours["bleu4"] < 90 and 10 < ours["rougeL"] < ours["rouge1"] < 90  # partly right, as built


def test_eval_generate_on_200_chinese_rows(tmp_path, capsys):
    """`softprompt eval --generate`: the engine's batched answers equal a per-row `generate` loop, the
    predictions file holds them, and its metrics equal the packages' on that file."""
    need_shared()
    from softprompt.cli import main
    from softprompt.data.templates import prompt_text
    from softprompt.inference.evaluate import generate_answers
    from softprompt.io.base_models import load_base

    rows = json.loads(ZH_DEMO.read_text(encoding="utf-8"))[:200]
    make_tiny_lm(tmp_path / "model", row_texts(rows), vocab_size=600)
    data = tmp_path / "zh.json"
    data.write_text(json.dumps(rows, ensure_ascii=False), encoding="utf-8")
    out = tmp_path / "pred" / "zh.jsonl"
    assert main(["eval", "--model", str(tmp_path / "model"), "--data", str(data), "--generate", "--max-new-tokens",
                 "6", "--predictions", str(out), "--max-length", "128", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    lines = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert len(lines) == 200 and result["rows"] == 200 and result["predictions"] == str(out)
    assert [x["reference"] for x in lines] == [r["output"] for r in rows]
    predictions = [x["prediction"] for x in lines]
    assert sum(bool(p) for p in predictions) > 150
    assert {k: result[k] for k in ("bleu4", "rouge1", "rouge2", "rougeL")} == pytest.approx(
        package_scores(predictions, [x["reference"] for x in lines]), rel=1e-12)

    base, tokenizer = load_base(str(tmp_path / "model"))
    prompts = [prompt_text(tokenizer, "alpaca", r["instruction"], r["input"]) for r in rows[:40]]
    assert [x["prompt"] for x in lines[:40]] == prompts
    assert generate_answers(base, tokenizer, prompts, max_new_tokens=6, batch_size=1) == predictions[:40]


def test_eval_generate_refuses_a_bad_max_new_tokens(tmp_path, capsys):
    from softprompt.cli import main

    data = tmp_path / "d.jsonl"
    data.write_text('{"instruction": "a", "input": "", "output": "b"}\n')
    assert main(["eval", "--model", "x", "--data", str(data), "--generate", "--max-new-tokens", "0"]) == 2
    assert "--max-new-tokens 0 is not valid" in capsys.readouterr().err
