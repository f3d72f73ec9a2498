"""bench/sweep_lr.py without training: the rows it splits, the runs it plans (and skips), the table it writes."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("sweep_lr", REPO / "bench" / "sweep_lr.py")
sweep = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(sweep)


def test_train_validation_and_report_rows_are_disjoint(tmp_path):
    rows = [{"instruction": f"q{i}", "input": "", "output": f"a{i}"} for i in range(999)]
    (tmp_path / "alpaca_en_demo.json").write_text(json.dumps(rows))
    parts = sweep.splits("en", None, tmp_path)
    assert [len(parts[k]) for k in ("train", "validation", "report")] == [400, 200, 200]
    assert parts["train"][0]["instruction"] == "q0" and parts["validation"][0]["instruction"] == "q400"
    assert parts["report"][-1]["instruction"] == "q998" and parts["report"][0]["instruction"] == "q799"
    small = sweep.splits("en", 8, tmp_path)
    assert [len(small[k]) for k in ("train", "validation", "report")] == [8, 8, 8]
    with pytest.raises(SystemExit, match="alpaca_zh_demo.json does not exist"):
        sweep.splits("zh", None, tmp_path)


def test_variants_keys_and_text_init_per_language():
    assert sweep.method_keys("prompt_text", "zh", None) == (
        "prompt_tuning", {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "下面是一段人与机器人的对话。"})
    assert sweep.method_keys("ptune_lstm", "en", None) == ("p_tuning", {"encoder_reparameterization_type": "LSTM"})
    assert len(sweep.VARIANTS) == 7 and set(sweep.PEFT_VARIANTS) <= set(sweep.VARIANTS)


def args_for(out: Path, *extra: str):
    import argparse

    ns = argparse.Namespace(lang="en", model=None, rates=[1e-2, 3e-1], extra_rates=None, variants=None, peft=False,
                            out=str(out), rows=16, jobs=1, seeds=[0], variant_rates=None, warmup=None)
    for name, value in zip(extra[::2], extra[1::2]):
        setattr(ns, name, value)
    return ns


def test_plan_skips_finished_runs_and_retries_failed_ones(tmp_path, capsys):
    out = tmp_path / "s.jsonl"
    runs = sweep.plan(args_for(out))
    assert len(runs) == 1 + 7 * 2 and runs[0]["engine"] == "base"
    done = {**runs[3], "rows": 16, "validation_loss": 1.0, "report_loss": 1.0}
    failed = {**runs[4], "rows": 16, "error": "RuntimeError: nan"}
    other_size = {**runs[5], "rows": None, "validation_loss": 1.0, "report_loss": 1.0}
    out.write_text("".join(json.dumps(r) + "\n" for r in (done, failed, other_size)))
    again = sweep.plan(args_for(out))
    assert runs[3] not in again and runs[4] in again and runs[5] in again and len(again) == len(runs) - 1
    peft = sweep.plan(args_for(tmp_path / "p.jsonl", "peft", True))
    assert {r["variant"] for r in peft[1:]} == set(sweep.PEFT_VARIANTS) and peft[1]["engine"] == "peft"


def test_report_marks_the_rate_chosen_on_validation_not_on_report_rows():
    def row(variant, rate, val, rep, engine="softprompt"):
        return {"lang": "en", "model": "m", "engine": engine, "variant": variant, "rate": rate, "rows": None,
                "validation_loss": val, "report_loss": rep}

    rows = [row("base", None, 2.0, 1.9, engine="base"),
            row("prompt_random", 1e-2, 1.50, 1.40), row("prompt_random", 3e-1, 1.60, 1.30),  # report would pick 3e-1
            row("ptune_mlp", 1e-2, 1.70, 1.60), {**row("ptune_mlp", 3e-1, 0, 0), "error": "nan"}]
    text = sweep.report(rows)
    assert "the base model: 1.900 (2.000)" in text
    assert "| prompt_random | **1.400 (1.500)** | 1.300 (1.600) | 1e-2: 1.400 |" in text
    assert "| ptune_mlp | **1.600 (1.700)** | error | 1e-2: 1.600 |" in text
    assert text.index("prompt_random") < text.index("ptune_mlp")


def test_seeds_are_runs_of_their_own_and_the_report_averages_them(tmp_path):
    out = tmp_path / "s.jsonl"
    first = {**sweep.plan(args_for(out))[1], "rows": 16, "validation_loss": 1.0, "report_loss": 2.0}
    first.pop("seed")  # rows written before seeds existed are seed 0
    out.write_text(json.dumps(first) + "\n")
    runs = sweep.plan(args_for(out, "seeds", [0, 1]))
    assert len(runs) == 1 + 2 * 7 * 2 - 1 and {r["seed"] for r in runs[1:]} == {0, 1}
    second = {**first, "seed": 1, "validation_loss": 3.0, "report_loss": 4.0}
    failed = {**first, "seed": 2, "error": "nan"}
    text = sweep.report([first, second, failed])
    assert "the mean of seeds 0, 1, 2" in text and "**3.000 (2.000)**" in text  # the failed seed is left out


def test_cells_with_more_seeds_than_the_rest_are_marked(tmp_path):
    """Two rates of one variant ran two more seeds: their cells say so, the others keep the header's seeds."""
    base = {**sweep.plan(args_for(tmp_path / "s.jsonl"))[1], "rows": 16}
    cells = [("prompt_random", 1e-2, 2), ("prompt_random", 3e-2, 2), ("ptune_lstm", 1e-2, 2), ("ptune_mlp", 3e-3, 4)]
    rows = [{**base, "variant": variant, "rate": rate, "seed": seed, "validation_loss": 1.0 + seed,
             "report_loss": 1.0 + seed} for variant, rate, seeds in cells for seed in range(seeds)]
    text = sweep.report(rows)
    assert "the mean of seeds 0, 1 (cells marked †" in text
    assert "| prompt_random | – | 1.500 (1.500) | 1.500 (1.500) |" in text.replace("**", "")  # two seeds: unmarked
    assert "2.500 (2.500)†" in text and "† ptune_mlp at 3e-3: seeds 0, 1, 2, 3." in text


def test_a_variant_may_have_its_own_rates_and_a_warm_up_is_a_run_of_its_own(tmp_path):
    out = tmp_path / "s.jsonl"
    own = [sweep.variant_rates("prefix=1e-1,3e-2")]
    assert own == [("prefix", [0.03, 0.1])]
    runs = sweep.plan(args_for(out, "variants", ["prefix", "ptune_mlp"], "variant_rates", own))
    assert sorted((r["variant"], r["rate"]) for r in runs[1:]) == [
        ("prefix", 0.03), ("prefix", 0.1), ("ptune_mlp", 1e-2), ("ptune_mlp", 3e-1)]
    with pytest.raises(SystemExit, match="unknown variants"):
        sweep.plan(args_for(out, "variant_rates", [("prefx", [1e-2])]))
    plain = {**runs[1], "rows": 16, "validation_loss": 1.0, "report_loss": 1.0}
    out.write_text(json.dumps(plain) + "\n")
    warm = sweep.plan(args_for(out, "variants", ["prefix"], "variant_rates", own, "warmup", 0.1))
    assert len(warm) == 1 + 2 and all(r["warmup"] == 0.1 for r in warm[1:])  # not skipped: a different run
    text = sweep.report([plain, {**warm[1], "rows": 16, "validation_loss": 0.5, "report_loss": 0.6}])
    assert "| prefix | **1.000 (1.000)** |" in text and "| prefix (warm-up 0.1) | **0.600 (0.500)** |" in text
