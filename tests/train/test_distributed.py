"""Data-parallel training on CPU (gloo): `torchrun -m softprompt train` and `accelerate launch -m softprompt train`.

Two processes with 2 rows each per step take half the steps of one process over the same epoch, log the same
losses as one process with 4 rows per step (the same rows in each step, the loss a token mean over both
processes' rows), write one adapter (rank 0) that loads in softprompt and peft, and one RNG state per rank into
each checkpoint; killed after a checkpoint, they resume to the losses of an uninterrupted run; a STOP file
stops both after the same step. `shard_base: fsdp` is checked as the arguments it makes (FSDP runs on GPUs only).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from softprompt.train.config import TrainConfig
from softprompt.train.trainer import check_checkpoint, train
from tiny_lm import REPO, make_tiny_lm, row_texts, toy_rows, write_rows

ROWS = 36  # 32 train + 4 validation
SETTINGS = {"method": "p_tuning", "encoder_hidden_size": 16, "encoder_dropout": 0.3, "num_train_epochs": 1,
            "save_steps": 4, "logging_steps": 1, "val_size": 4, "disable_tqdm": True, "dataloader_pin_memory": False}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ddp")
    rows = toy_rows(ROWS)
    for i, row in enumerate(rows):
        # answers of 1 to 5 words: the two processes' label tokens differ in most steps, so a loss divided by
        # each process's own count (not the step's) shows in the losses
        row["output"] = " ".join([row["output"]] * (1 + i % 5))
    make_tiny_lm(root / "model", row_texts(rows))
    write_rows(root / "data.jsonl", rows)
    return root


def _settings(root: Path, out: Path, batch: int, **extra) -> dict:
    return {"model": str(root / "model"), "data": str(root / "data.jsonl"), "output_dir": str(out),
            "per_device_train_batch_size": batch, **SETTINGS, **extra}


def _options(root: Path, out: Path, **extra) -> list[str]:
    """The run's keys as `--key=value`: 2 rows per process and step, packed (the default)."""
    return [f"--{k}={v}" for k, v in _settings(root, out, batch=2, **extra).items()]


def _train_args(root: Path, out: Path, **extra) -> list[str]:
    return ["-m", "softprompt", "train", "--num_samples", "0", *_options(root, out, **extra)]


def _free_port() -> str:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return str(sock.getsockname()[1])


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _torchrun(*args: str) -> list[str]:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    return [torchrun, "--nproc_per_node", "2", "--master_port", _free_port(), *args]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300, cwd=cwd)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def logged(folder: Path) -> tuple[list, list]:
    """(step, train loss) and (step, eval loss) pairs from a run's trainer_state.json."""
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return ([(e["step"], e["loss"]) for e in history if "loss" in e],
            [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e])


def _check_data_parallel(out: Path) -> None:
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 32 // (2 * 2)  # one process alone would take 16 steps
    assert any("eval_loss" in e for e in state["log_history"])
    checkpoint = check_checkpoint(out / "checkpoint-8")
    assert sorted(p.name for p in checkpoint.glob("rng_state*.pth")) == ["rng_state_0.pth", "rng_state_1.pth"]
    assert (out / "adapter_model.safetensors").is_file() and (out / "loss.png").is_file()


@pytest.fixture(scope="module")
def ddp_run(workspace) -> Path:
    """torchrun, 2 CPU processes x 2 rows a step, packed: 8 steps, checkpoints at 4 and 8."""
    out = workspace / "torchrun"
    proc = _run(_torchrun(*_train_args(workspace, out)), workspace)
    assert proc.stdout.count("adapter saved to") == 1  # only rank 0 saves and reports
    return out


@pytest.fixture(scope="module")
def one_process_run(workspace) -> Path:
    """The same run in one process with 4 rows a step (this process: one thread, as the two above)."""
    out = workspace / "one-process"
    train(TrainConfig.from_mapping(_settings(workspace, out, batch=4)), num_samples=0)
    return out


@pytest.mark.slow
def test_torchrun_two_cpu_processes(ddp_run):
    _check_data_parallel(ddp_run)


@pytest.mark.slow
def test_two_processes_log_the_losses_of_one_at_the_same_global_batch(ddp_run, one_process_run):
    """Each step's rows are the same set (the seeded shuffle, dealt to the processes 2 rows at a time) and its
    loss is divided by the label tokens of both processes: only fp32 summation order differs. The rows' label
    counts differ between the processes, so dividing by each process's own count would miss by ~1e-3."""
    train_two, eval_two = logged(ddp_run)
    train_one, eval_one = logged(one_process_run)
    assert [s for s, _ in train_two] == [s for s, _ in train_one] == list(range(1, 9))
    for (step, two), (_, one) in zip(train_two + eval_two, train_one + eval_one):
        assert two == pytest.approx(one, rel=1e-5, abs=0), f"step {step}"
    from safetensors.torch import load_file

    weights_two = load_file(ddp_run / "adapter_model.safetensors")
    weights_one = load_file(one_process_run / "adapter_model.safetensors")
    initial = load_file(ddp_run / "checkpoint-4" / "adapter_model.safetensors")
    assert weights_two.keys() == weights_one.keys()
    for name in weights_two:
        torch.testing.assert_close(weights_two[name], weights_one[name], rtol=0, atol=1e-5)
        assert (weights_two[name] - initial[name]).abs().max() > 1e-3  # trained on after step 4: a real comparison


@pytest.mark.slow
def test_adapter_of_two_processes_loads_and_generates_as_one_process(workspace, ddp_run, one_process_run):
    import peft

    from softprompt import PeftModel
    from softprompt.data.templates import prompt_text
    from softprompt.inference.evaluate import generate_answers
    from softprompt.io.base_models import load_base

    base, tokenizer = load_base(str(workspace / "model"))
    two = PeftModel.from_pretrained(copy.deepcopy(base), str(ddp_run))
    one = PeftModel.from_pretrained(copy.deepcopy(base), str(one_process_run))
    prompts = [prompt_text(tokenizer, "alpaca", r["instruction"], r["input"]) for r in toy_rows(4)]
    assert generate_answers(two, tokenizer, prompts, max_new_tokens=8) == \
        generate_answers(one, tokenizer, prompts, max_new_tokens=8)
    ids = tokenizer(prompts[0], return_tensors="pt").input_ids
    theirs = peft.PeftModel.from_pretrained(copy.deepcopy(base), str(ddp_run)).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=ids).logits, two(input_ids=ids).logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(one(input_ids=ids).logits, two(input_ids=ids).logits, atol=1e-4, rtol=0)


SLOW_DRIVER = """
import sys, time
from transformers import TrainerCallback
from softprompt.train.config import TrainConfig, parse_overrides
from softprompt.train.trainer import train

class Slow(TrainerCallback):  # leaves time to be killed between checkpoint-4 and checkpoint-8
    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= 4:
            time.sleep(0.4)

train(TrainConfig.from_mapping(parse_overrides(sys.argv[1:])), callbacks=[Slow()], num_samples=0)
"""


@pytest.mark.slow
def test_two_processes_killed_after_a_checkpoint_resume_to_the_same_losses(workspace, ddp_run):
    """SIGKILL to torchrun and both its processes once checkpoint-4 is written; `--resume_from_checkpoint true`
    then takes both processes' RNG states, the optimizer and the data position from it."""
    out = workspace / "killed"
    driver = workspace / "slow_driver.py"
    driver.write_text(SLOW_DRIVER)
    proc = subprocess.Popen(_torchrun(str(driver), *_options(workspace, out)), env=_env(), cwd=workspace,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not (out / "checkpoint-4").is_dir():
            assert proc.poll() is None, f"training ended before the kill: {proc.stderr.read()[-3000:]}"
            assert time.time() < deadline, "no checkpoint-4 within 240 s"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # torchrun's agent and both training processes
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert not (out / "checkpoint-8").exists() and not (out / "adapter_config.json").exists()  # killed part-way
    proc = _run(_torchrun(*_train_args(workspace, out, resume_from_checkpoint="true")), workspace)
    assert "resuming from" in proc.stdout
    assert logged(out) == logged(ddp_run)  # exact: the same floats, steps 1-4 from the checkpoint, 5-8 resumed


STOP_DRIVER = """
import sys
from pathlib import Path
from types import SimpleNamespace
import torch.distributed as dist
from transformers import TrainerControl
from softprompt.io.files import STOP_FILE_NAME
from softprompt.train.trainer import RunLogCallback

dist.init_process_group("gloo")
rank = dist.get_rank()
out = Path(sys.argv[1]) / f"rank{rank}"  # a folder each: only rank 1 finds STOP, as when it appears between checks
out.mkdir(parents=True)
if rank == 1:
    (out / STOP_FILE_NAME).touch()
args = SimpleNamespace(output_dir=str(out), world_size=2)
state = SimpleNamespace(global_step=3, max_steps=8, num_input_tokens_seen=0, is_world_process_zero=rank == 0)
callback, control = RunLogCallback(), TrainerControl()
callback.on_train_begin(args, state, control)
callback.on_step_end(args, state, control)
(out / "stops").write_text(str(control.should_training_stop))  # a file each: two processes' prints interleave
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_a_stop_file_one_process_sees_stops_both_after_the_same_step(tmp_path):
    """Else the other process goes on into the next step's all-reduce and waits there for ever."""
    driver = tmp_path / "stop_driver.py"
    driver.write_text(STOP_DRIVER)
    _run(_torchrun(str(driver), str(tmp_path / "out")), tmp_path)
    assert [(tmp_path / "out" / f"rank{rank}" / "stops").read_text() for rank in (0, 1)] == ["True", "True"]


@pytest.mark.slow
def test_accelerate_launch_two_cpu_processes(workspace):
    out = workspace / "accelerate"
    # `--multi_gpu` is accelerate's torchrun-style launcher; it works on CPU too (softprompt then sets
    # use_cpu, so Trainer takes gloo). accelerate's `--cpu` starts a single process unless MPI is set up.
    _run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", _free_port(),
          *_train_args(workspace, out)], workspace)
    _check_data_parallel(out)


# -- shard_base: fsdp (accelerate runs FSDP on GPUs only: its arguments are checked here, the run on GPUs) -----
def test_shard_base_fsdp_shards_each_decoder_layer_of_the_wrapped_base(workspace, monkeypatch):
    from accelerate.utils import FullyShardedDataParallelPlugin
    from accelerate.utils.fsdp_utils import fsdp2_prepare_auto_wrap_policy

    import softprompt.train.config as train_config
    from softprompt import PromptEncoderConfig, get_peft_model
    from softprompt.hf.backbone import decoder_layer_classes
    from softprompt.io.base_models import load_base

    monkeypatch.setattr(train_config, "_has_accelerator", lambda: True)  # the arguments a GPU machine gets
    base, _ = load_base(str(workspace / "model"))
    model = get_peft_model(base, PromptEncoderConfig(num_virtual_tokens=4, encoder_hidden_size=16))
    config = TrainConfig.from_mapping(_settings(workspace, workspace / "fsdp", batch=2, shard_base="fsdp",
                                                fsdp_config={"cpu_offload": True}))
    args = config.training_arguments(has_eval=False, layer_classes=decoder_layer_classes(base))
    assert args.fsdp and args.fsdp_config["transformer_layer_cls_to_wrap"] == ["LlamaDecoderLayer"]
    assert args.fsdp_plugin_args["fsdp_version"] == 2 and args.fsdp_plugin_args["cpu_offload"]  # given: on top
    # what accelerate then shards one by one inside softprompt's PeftModel: the two decoder layers (without
    # the names, it would take the wrapper's own list, empty, and gather the whole base at once)
    policy = fsdp2_prepare_auto_wrap_policy(FullyShardedDataParallelPlugin(**args.fsdp_plugin_args), model)
    assert [name for name, module in model.named_modules() if policy(module)] == \
        ["base_model.model.layers.0", "base_model.model.layers.1"]


def test_fsdp_on_cpu_is_refused_not_silently_ddp(workspace):
    """On CPU accelerate leaves out FSDP (its state stays MULTI_CPU: plain DDP, the whole base on each process)."""
    for extra in ({"shard_base": "fsdp"}, {"fsdp": "full_shard auto_wrap"}):
        config = TrainConfig.from_mapping(_settings(workspace, workspace / "fsdp-cpu", batch=2, **extra))
        with pytest.raises(ValueError, match="needs GPUs.*remove it to train data-parallel on CPU"):
            config.training_arguments(has_eval=False, layer_classes=["LlamaDecoderLayer"])


def test_shard_base_values_are_checked(workspace):
    with pytest.raises(ValueError, match="shard_base='zero3' is not valid; allowed values: no, fsdp"):
        TrainConfig.from_mapping(_settings(workspace, workspace / "x", batch=2, shard_base="zero3"))
    with pytest.raises(ValueError, match="fills fsdp and fsdp_config itself; remove fsdp"):
        TrainConfig.from_mapping(_settings(workspace, workspace / "x", batch=2, shard_base="fsdp", fsdp="full_shard"))
    with pytest.raises(ValueError, match="remove the fsdp_config file"):
        TrainConfig.from_mapping(_settings(workspace, workspace / "x", batch=2, shard_base="fsdp", fsdp_config="f.json"))


def test_packed_bloom_cannot_be_sharded():
    from conftest import make_base
    from softprompt.hf.backbone import decoder_layer_classes, packed_layers_unshardable

    assert packed_layers_unshardable(make_base("llama")) is None
    bloom = make_base("bloom")
    assert decoder_layer_classes(bloom) == ["BloomBlock"]
    assert "bloom_block" in packed_layers_unshardable(bloom)
