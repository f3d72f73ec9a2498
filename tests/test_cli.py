"""The `softprompt` CLI: train (YAML + overrides), generate, chat (piped stdin), eval, inspect."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from softprompt.cli import main
from tiny_lm import REPO, make_tiny_lm, make_workspace, row_texts, toy_rows, write_rows


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = make_workspace(tmp_path_factory.mktemp("cli"), 32)
    config = {"model": str(root / "model"), "data": str(root / "data.jsonl"), "method": "prompt_tuning",
              "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Write this word in capital letters.",
              "output_dir": str(root / "adapter"), "max_steps": 4, "save_steps": 2,
              "per_device_train_batch_size": 4, "learning_rate": 1e-3, "report_to": "none"}
    (root / "train.yaml").write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    assert main(["train", str(root / "train.yaml"), "--max_steps", "6", "--logging_steps", "2",
                 "--disable_tqdm", "true", "--val_size", "4", "--num_samples", "0"]) == 0
    return root


def test_train_applies_overrides_on_the_yaml(workspace):
    saved = yaml.safe_load((workspace / "adapter" / "softprompt_train.yaml").read_text(encoding="utf-8"))
    assert saved["max_steps"] == 6 and saved["logging_steps"] == 2 and saved["val_size"] == 4
    assert saved["learning_rate"] == 1e-3 and saved["prompt_tuning_init"] == "TEXT"
    state = json.loads((workspace / "adapter" / "trainer_state.json").read_text())
    assert state["global_step"] == 6 and (workspace / "adapter" / "checkpoint-6").is_dir()
    results = json.loads((workspace / "adapter" / "all_results.json").read_text())
    assert results["learning_rate"] == 1e-3  # the rate the run used, and why, in the run folder
    # the tiny model's embeddings are N(0, 0.02): TEXT init's rule (0.22 x their RMS) gives 4.4e-3 here
    assert results["learning_rate_choice"] == ("learning_rate 1e-3 (given; softprompt's default for prompt tuning, "
                                               "TEXT init would be 4.4e-3)")


def test_train_errors_are_clear(workspace, capsys):
    assert main(["train", str(workspace / "train.yaml"), "--num_virtual_token", "4"]) == 2
    assert "did you mean num_virtual_tokens" in capsys.readouterr().err
    assert main(["train", str(workspace / "train.yaml"), "--prefix_projection", "true"]) == 2
    assert "prefix_projection is a prefix_tuning option" in capsys.readouterr().err
    assert main(["train", str(workspace / "missing.yaml")]) == 2
    assert "missing.yaml" in capsys.readouterr().err
    assert main(["train", str(workspace / "train.yaml"), "--data", str(workspace / "nope.jsonl")]) == 2
    assert "nope.jsonl: no such file" in capsys.readouterr().err


@pytest.mark.parametrize("option, message", [
    (["--method", "p_tuning", "--encoder_dropout", "2"], "encoder_dropout=2.0 is not valid; it must be in [0, 1)"),
    (["--method", "prefix_tuning", "--prefix_projection", "maybe"], "prefix_projection='maybe' is not valid"),
    (["--method", "prompt_tuning", "--encoder_dropout", "0.1"], "encoder_dropout is a p_tuning option"),
])
def test_a_bad_method_option_fails_before_torch_loads(option, message):
    """The method's config is built when the run config is read, from modules that import no torch or
    transformers: a bad option is refused (exit code 2, the field named) before any model code loads."""
    code = ("import sys\n"
            "from softprompt.cli import main\n"
            f"rc = main(['train', *{option!r}])\n"
            "loaded = sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'transformers', 'datasets'})\n"
            "print('loaded:', loaded, file=sys.stderr)\n"
            "sys.exit(rc)\n")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "loaded: []" in proc.stderr, proc.stderr


def test_train_stops_when_most_rows_are_bad(workspace, capsys):
    """Issue #9: 103 of 104 rows skipped used to train on 1 row with exit code 0."""
    rows = [json.loads(line) for line in (workspace / "data.jsonl").read_text(encoding="utf-8").splitlines()][:4]
    rows += [{**rows[0], "output": 7}] * 4
    bad = workspace / "mostly_bad.jsonl"
    bad.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert main(["train", str(workspace / "train.yaml"), "--data", str(bad), "--output_dir", str(workspace / "bad")]) == 2
    err = capsys.readouterr().err
    assert "kept 4 of 8 rows" in err and "output is int, not a string: 4 (rows 5, 6, 7, 8)" in err
    assert "more than max_skipped_fraction=0.05" in err and not (workspace / "bad" / "checkpoint-2").exists()
    assert main(["train", str(workspace / "train.yaml"), "--max_skipped_fraction", "2"]) == 2
    assert "max_skipped_fraction=2.0 is not valid" in capsys.readouterr().err


def test_generate_greedy_and_sampled(workspace, capsys):
    adapter = str(workspace / "adapter")
    args = ["generate", "--adapter", adapter, "Write this word in capital letters.", "--input", "apple",
            "--max-new-tokens", "6"]
    assert main(args) == 0
    greedy = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == greedy and greedy.strip()  # greedy is deterministic
    sampled = []
    for _ in range(2):
        assert main(args + ["--do-sample", "--temperature", "1.5", "--seed", "3"]) == 0
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1]  # seeded sampling repeats
    assert main(["generate", "--adapter", adapter, "one", "two", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr().out
    assert ">>> one" in out and ">>> two" in out
    # A checkpoint folder is an adapter too; the base model comes from its config.
    assert main(["generate", "--adapter", str(workspace / "adapter" / "checkpoint-6"), "hi", "--max-new-tokens", "3"]) == 0


def test_eval_reports_loss_perplexity_and_exact_match(workspace, capsys):
    from softprompt.data.templates import prompt_text
    from softprompt.inference.evaluate import generate_answers
    from softprompt.core.model import PeftModel
    from softprompt.io.base_models import load_base

    # Rows whose outputs are the adapter's own greedy answers score 1.0; altered outputs score 0.0.
    base, tokenizer = load_base(str(workspace / "model"))
    model = PeftModel.from_pretrained(base, str(workspace / "adapter"))
    rows = toy_rows(6)
    prompts = [prompt_text(tokenizer, "alpaca", r["instruction"], r["input"]) for r in rows]
    answers = generate_answers(model, tokenizer, prompts, max_new_tokens=5)
    write_rows(workspace / "own.jsonl", [dict(r, output=a or "x") for r, a in zip(rows, answers)])
    assert main(["eval", "--adapter", str(workspace / "adapter"), "--data", str(workspace / "own.jsonl"),
                 "--max-new-tokens", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["exact_match"] == 1.0 and result["rows"] == 6
    assert result["perplexity"] == pytest.approx(math.exp(result["loss"]))
    # --generate: the engine decodes with the adapter the same answers, so BLEU and ROUGE are perfect too.
    predictions = workspace / "own_predictions.jsonl"
    assert main(["eval", "--adapter", str(workspace / "adapter"), "--data", str(workspace / "own.jsonl"),
                 "--max-new-tokens", "5", "--json", "--generate", "--predictions", str(predictions)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["exact_match"] == 1.0
    assert [result[k] for k in ("bleu4", "rouge1", "rouge2", "rougeL")] == pytest.approx([100.0] * 4)
    lines = [json.loads(line) for line in predictions.read_text(encoding="utf-8").splitlines()]
    assert [x["prediction"] for x in lines] == [a or "x" for a in answers] and lines[0]["prompt"] == prompts[0]
    write_rows(workspace / "other.jsonl", [dict(r, output=a + " nope") for r, a in zip(rows, answers)])
    assert main(["eval", "--model", str(workspace / "model"), "--data", str(workspace / "other.jsonl"),
                 "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "exact_match=0.000 (0/6)" in out and "perplexity=" in out and "[bad]" in out


def test_eval_loss_matches_the_models_own_loss(workspace):
    import torch

    from softprompt.inference.evaluate import evaluate
    from softprompt.io.base_models import load_base

    base, tokenizer = load_base(str(workspace / "model"))
    row = toy_rows(1)
    result = evaluate(base, tokenizer, row, exact_match=False)
    text = "Human: " + row[0]["instruction"] + "\n" + row[0]["input"] + "\n\nAssistant: "
    prompt = tokenizer(text)["input_ids"]
    answer = tokenizer(row[0]["output"] + tokenizer.eos_token)["input_ids"]
    ids = torch.tensor([prompt + answer])
    labels = torch.tensor([[-100] * len(prompt) + answer])
    with torch.no_grad():
        expected = base(input_ids=ids, labels=labels).loss.item()
    assert result.loss == pytest.approx(expected, rel=1e-5) and result.tokens == len(answer)


def test_inspect_shows_config_size_and_nearest_tokens(workspace, capsys):
    from softprompt import PromptTuningConfig, get_peft_model
    from softprompt.io.base_models import load_base

    base, tokenizer = load_base(str(workspace / "model"))
    text = "capital letters"
    config = PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text=text,
                                base_model_name_or_path=str(workspace / "model"))
    get_peft_model(base, config, tokenizer=tokenizer).save_pretrained(str(workspace / "untrained"))
    assert main(["inspect", str(workspace / "untrained"), "--json", "--top-k", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["peft_type"] == "PROMPT_TUNING" and report["exported_shape"] == [4, 32]
    assert report["exported_parameters"] == 128 and report["trainable_parameters"] == 128
    assert report["files"]["adapter_model.safetensors"] > 0
    ids = (tokenizer(text)["input_ids"] * 4)[:4]
    # An untrained TEXT-initialised prompt is its init tokens: each one's nearest token is itself.
    assert [near[0][0] for near in report["neighbours"]] == [tokenizer.decode([i]) for i in ids]
    assert all(near[0][1] == pytest.approx(1.0, abs=1e-4) for near in report["neighbours"])
    assert main(["inspect", str(workspace / "adapter")]) == 0
    text_out = capsys.readouterr().out
    assert "method: PROMPT_TUNING" in text_out and "nearest vocabulary tokens" in text_out and "v0:" in text_out


def test_python_m_softprompt_chat_with_piped_stdin(workspace):
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1")
    proc = subprocess.run(
        [sys.executable, "-m", "softprompt", "chat", "--adapter", str(workspace / "adapter"), "--max-new-tokens", "4"],
        input="Write this word in capital letters.\n\n/reset\nhello again\n/exit\nnever read\n",
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert sum(line.startswith("assistant> ") for line in lines) == 2  # two turns; /exit ends before the third
    assert "(conversation cleared)" in lines


def test_chat_keeps_the_conversation(workspace, monkeypatch, capsys):
    import io

    import softprompt.inference.evaluate as evaluate

    seen: list[str] = []
    real = evaluate.generate_answers

    def spy(model, tokenizer, prompts, **kwargs):
        seen.extend(prompts)
        return real(model, tokenizer, prompts, **kwargs)

    monkeypatch.setattr(evaluate, "generate_answers", spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n/reset\nthird\n"))
    assert main(["chat", "--adapter", str(workspace / "adapter"), "--max-new-tokens", "3"]) == 0
    assert seen[0] == "Human: first question\n\nAssistant: "
    assert seen[1].startswith("Human: first question\n\nAssistant: ") and seen[1].endswith("Human: second question\n\nAssistant: ")
    assert seen[2] == "Human: third\n\nAssistant: "  # /reset forgot the earlier turns


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("train", "generate", "chat", "eval", "inspect", "demo"):
        assert command in out


def test_demo_runs_end_to_end_on_a_tiny_model(tmp_path, capsys):
    """The demo's whole path (data, zero-shot eval, training, reload, eval, report) on a tiny model; the real
    demo (`make demo`, builtin:smollm2-135m) is measured in docs/TRAINING.md."""
    from softprompt import demo
    from softprompt.data.demo import make_demo_dataset

    train_rows, eval_rows = make_demo_dataset(60, 12, seed=0)
    make_tiny_lm(tmp_path / "model", row_texts(train_rows + eval_rows), vocab_size=500)
    result = demo.run(model=str(tmp_path / "model"), n_train=60, n_eval=12, max_steps=3, batch_size=4,
                      output_dir=str(tmp_path / "demo"), show=2)
    out = capsys.readouterr().out
    assert "before training: exact match" in out and "after training:  exact match" in out
    assert "exact match, 12 held-out rows: before" in out and out.count("\nQ: ") == 2
    assert 0.0 <= result["before"] <= 1.0 and 0.0 <= result["after"] <= 1.0
    assert (tmp_path / "demo" / "adapter" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "demo" / "adapter" / "loss.png").is_file()
    # no rate given: train printed the one it chose and why, and wrote it beside the adapter
    why = ("learning_rate 1e-2 (softprompt's default for P-tuning, MLP encoder; rule: 1e-2 x (128 / encoder width "
           "128)^0.8, through the sweeps' best rates); give --learning_rate to override")
    assert why in out.splitlines()
    results = json.loads((tmp_path / "demo" / "adapter" / "all_results.json").read_text())
    assert results["learning_rate"] == 1e-2 and results["learning_rate_choice"] == why
    run_config = (tmp_path / "demo" / "adapter" / "softprompt_train.yaml").read_text(encoding="utf-8")
    assert run_config.startswith(f"# {why}\n") and "learning_rate" not in yaml.safe_load(run_config)


def test_demo_in_chinese_trains_on_chinese_questions(tmp_path, capsys):
    """`softprompt demo --lang zh`: the rows ask in Chinese only (the real run uses builtin:gemma3-270m)."""
    from softprompt import demo
    from softprompt.data.demo import make_demo_dataset

    train_rows, eval_rows = make_demo_dataset(40, 12, seed=0, langs=("zh",))
    make_tiny_lm(tmp_path / "model", row_texts(train_rows + eval_rows), vocab_size=500)
    demo.run(model=str(tmp_path / "model"), n_train=40, n_eval=12, max_steps=2, batch_size=4,
             output_dir=str(tmp_path / "demo"), show=1, lang="zh")
    out = capsys.readouterr().out
    assert "questions in zh" in out and "exact match, 12 held-out rows: before" in out
    written = [json.loads(line) for line in (tmp_path / "demo" / "data" / "train.jsonl").read_text("utf-8").splitlines()]
    assert written == train_rows
    with pytest.raises(ValueError, match="lang='fr' is not valid"):
        demo.run(model=str(tmp_path / "model"), lang="fr")
    assert demo.LANG_CHOICES["zh"][1] == "builtin:gemma3-270m"
