"""Exact resume: a run stopped part-way (even by SIGKILL, even mid-save) and resumed logs the same losses as
an uninterrupted run with the same seed and data order; encoders, optimizer, scheduler and RNG included."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from softprompt.hf.trainer import STAGING_DIR
from softprompt.train.config import TrainConfig
from softprompt.train.trainer import build_trainer, train
from tiny_lm import REPO, make_workspace

METHODS = {
    "prompt_tuning": {},
    # dropout in the encoder: the resumed run matches only if the RNG state is restored too
    "p_tuning": {"encoder_hidden_size": 16, "encoder_dropout": 0.3},
    "prefix_tuning": {"prefix_projection": True, "encoder_hidden_size": 16},
}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("resume"), 40)


def settings(root: Path, out: Path, method: str = "p_tuning", **extra) -> dict:
    base = dict(model=str(root / "model"), data=str(root / "data.jsonl"), output_dir=str(out), method=method,
                max_steps=8, save_steps=2, logging_steps=1, per_device_train_batch_size=4, disable_tqdm=True,
                dataloader_pin_memory=False, learning_rate=0.05, val_size=4, eval_steps=4, **METHODS[method])
    return {**base, **extra}


def logged(folder: Path) -> tuple[list, list]:
    """(step, train loss) and (step, eval loss) pairs from a run's trainer_state.json."""
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return ([(e["step"], e["loss"]) for e in history if "loss" in e],
            [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e])


@pytest.mark.parametrize("method", list(METHODS))
def test_resume_from_a_checkpoint_logs_identical_losses(workspace, method):
    full = workspace / f"full-{method}"
    train(TrainConfig.from_mapping(settings(workspace, full, method)), num_samples=0)
    resumed = workspace / f"resumed-{method}"
    shutil.copytree(full / "checkpoint-4", resumed / "checkpoint-4")
    train(TrainConfig.from_mapping(settings(workspace, resumed, method, resume_from_checkpoint="true")), num_samples=0)
    train_full, eval_full = logged(full)
    train_resumed, eval_resumed = logged(resumed)
    assert len(train_full) == 8 and train_resumed == train_full  # exact: bit-for-bit the same floats
    assert eval_resumed == eval_full


def test_losses_differ_without_the_optimizer_state(workspace):
    """The comparison above is sensitive: resuming with fresh Adam moments gives other losses."""
    full = workspace / "full-p_tuning"
    if not full.exists():
        train(TrainConfig.from_mapping(settings(workspace, full)), num_samples=0)
    broken = workspace / "no-optimizer"
    shutil.copytree(full / "checkpoint-4", broken / "checkpoint-4")
    (broken / "checkpoint-4" / "optimizer.pt").unlink()
    trainer, _, _ = build_trainer(TrainConfig.from_mapping(settings(workspace, broken)))
    trainer.train(resume_from_checkpoint=str(broken / "checkpoint-4"))  # plain Trainer silently goes on
    after = [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e and e["step"] > 4]
    assert len(after) == 4 and after != [x for x in logged(full)[0] if x[0] > 4]


# -- killed processes -------------------------------------------------------------------------------
DRIVER = """
import os, signal, sys, time
from transformers import TrainerCallback
from softprompt.train.config import TrainConfig, parse_overrides
from softprompt.train.trainer import SoftPromptTrainer, train

mode = sys.argv[1]

class Slow(TrainerCallback):  # leaves time to be killed between steps
    def on_step_end(self, args, state, control, **kwargs):
        time.sleep(0.4)

if mode.startswith("die-in-save:"):  # SIGKILL itself after the adapter files, before the optimizer's
    step = int(mode.split(":")[1])
    original = SoftPromptTrainer._save_optimizer_and_scheduler
    def dying(self, output_dir):
        if self.state.global_step == step:
            os.kill(os.getpid(), signal.SIGKILL)
        return original(self, output_dir)
    SoftPromptTrainer._save_optimizer_and_scheduler = dying
train(TrainConfig.from_mapping(parse_overrides(sys.argv[2:])), callbacks=[Slow()] if mode == "slow" else [], num_samples=0)
"""


def _args(config: dict) -> list[str]:
    return [f"--{k}={v}" for k, v in config.items()]


def _env() -> dict:
    # One thread, as conftest sets for the reference run in this process: a sum split over two threads
    # rounds differently, which is not what these tests are about.
    return dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def reference(workspace) -> tuple[list, list]:
    out = workspace / "reference"
    train(TrainConfig.from_mapping(settings(workspace, out, max_steps=12, save_steps=3)), num_samples=0)
    return logged(out)


def _resume_with_cli(workspace: Path, out: Path) -> None:
    cmd = [sys.executable, "-m", "softprompt", "train",
           *_args(settings(workspace, out, max_steps=12, save_steps=3, resume_from_checkpoint="true"))]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=workspace)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resuming from" in proc.stdout


def _driver(workspace: Path, out: Path) -> tuple[Path, dict]:
    """The training driver script, and the 12-step run (checkpoints every 3) it is killed in."""
    script = workspace / "driver.py"
    script.write_text(DRIVER)
    return script, settings(workspace, out, max_steps=12, save_steps=3)


@pytest.mark.slow
def test_sigkill_part_way_then_resume_matches_uninterrupted_run(workspace, reference):
    out = workspace / "killed"
    script, config = _driver(workspace, out)
    proc = subprocess.Popen([sys.executable, str(script), "slow", *_args(config)], env=_env(), cwd=workspace,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoint-6").is_dir():
            assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read()[-2000:]}"
            assert time.time() < deadline, "no checkpoint-6 within 240 s"
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "checkpoint-12").exists() and not (out / "adapter_config.json").exists()  # killed part-way
    _resume_with_cli(workspace, out)
    assert logged(out) == reference


@pytest.mark.slow
def test_sigkill_while_a_checkpoint_is_written_leaves_no_half_folder(workspace, reference):
    out = workspace / "killed-in-save"
    script, config = _driver(workspace, out)
    proc = subprocess.run([sys.executable, str(script), "die-in-save:6", *_args(config)], env=_env(), cwd=workspace,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    # The half-written checkpoint is only in the staging folder; every checkpoint-N there is whole.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    assert (out / STAGING_DIR / "checkpoint-6" / "adapter_model.safetensors").is_file()
    assert not (out / STAGING_DIR / "checkpoint-6" / "optimizer.pt").exists()
    _resume_with_cli(workspace, out)
    assert logged(out) == reference
    assert not (out / STAGING_DIR).exists()  # the next save cleared what the kill left


def test_plain_transformers_trainer_resumes_exactly(workspace, tmp_path):
    """The seed's own loop (a plain Trainer on get_peft_model) also resumes exactly: Trainer loads the adapter's
    model.safetensors through PeftModel.load_state_dict, encoder included."""
    from transformers import Trainer, TrainingArguments, set_seed

    from softprompt import PromptEncoderConfig, get_peft_model
    from softprompt.data.rows import load_rows, make_collator, tokenize
    from softprompt.io.base_models import load_base

    def run(out: Path, resume: str | None) -> list:
        set_seed(0)
        base, tokenizer = load_base(str(workspace / "model"))
        model = get_peft_model(base, PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16,
                                                         encoder_dropout=0.3))
        data, _ = tokenize(load_rows(workspace / "data.jsonl"), tokenizer)
        args = TrainingArguments(output_dir=str(out), max_steps=6, save_steps=3, logging_steps=1, learning_rate=0.05,
                                 per_device_train_batch_size=4, report_to="none", disable_tqdm=True, seed=0,
                                 dataloader_pin_memory=False)
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=make_collator(tokenizer))
        trainer.train(resume_from_checkpoint=resume)
        return [(e["step"], e["loss"]) for e in trainer.state.log_history if "loss" in e]

    full = run(tmp_path / "full", None)
    shutil.copytree(tmp_path / "full" / "checkpoint-3", tmp_path / "resumed" / "checkpoint-3")
    assert run(tmp_path / "resumed", str(tmp_path / "resumed" / "checkpoint-3")) == full
