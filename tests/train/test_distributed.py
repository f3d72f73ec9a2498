"""Data-parallel training on CPU (gloo): `torchrun -m softprompt train` and `accelerate launch -m softprompt train`.

Two processes with 2 rows each per step take half the steps of one process over the same epoch, write one
adapter (rank 0) and one RNG state per rank into each checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from softprompt.train.trainer import check_checkpoint
from tiny_lm import REPO, make_tiny_lm, row_texts, toy_rows, write_rows

ROWS = 36  # 32 train + 4 validation


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    rows = toy_rows(ROWS)
    make_tiny_lm(root / "model", row_texts(rows))
    write_rows(root / "data.jsonl", rows)
    return root


def _train_args(root: Path, out: Path) -> list[str]:
    return ["-m", "softprompt", "train", "--model", str(root / "model"), "--data", str(root / "data.jsonl"),
            "--method", "p_tuning", "--encoder_hidden_size", "16", "--output_dir", str(out), "--num_train_epochs", "1",
            "--per_device_train_batch_size", "2", "--save_steps", "4", "--logging_steps", "1", "--val_size", "4",
            "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--num_samples", "0"]


def _free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _check_data_parallel(out: Path) -> None:
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 32 // (2 * 2)  # one process alone would take 16 steps
    assert any("eval_loss" in e for e in state["log_history"])
    checkpoint = check_checkpoint(out / "checkpoint-8")
    assert sorted(p.name for p in checkpoint.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


@pytest.mark.slow
def test_torchrun_two_cpu_processes(workspace):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    out = workspace / "torchrun"
    proc = _run([torchrun, "--nproc_per_node", "2", "--master_port", _free_port(), *_train_args(workspace, out)], workspace)
    assert proc.stdout.count("adapter saved to") == 1  # only rank 0 saves and reports
    _check_data_parallel(out)


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(workspace):
    out = workspace / "accelerate"
    # `--multi_gpu` is accelerate's torchrun-style launcher; it works on CPU too (softprompt then sets
    # use_cpu, so Trainer takes gloo). accelerate's `--cpu` starts a single process unless MPI is set up.
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port(),
          *_train_args(workspace, out)], workspace)
    _check_data_parallel(out)
