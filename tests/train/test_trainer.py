"""softprompt/train/trainer.py and train_config.py: config keys, defaults, a real Trainer run, atomic checkpoints."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import transformers
from safetensors import safe_open

from softprompt.hf.trainer import STAGING_DIR
from softprompt.methods.config import format_rate
from softprompt.train.config import DEFAULT_LEARNING_RATES, TrainConfig, parse_overrides
from softprompt.train.trainer import (
    STOP_FILE_NAME,
    TRAINER_LOG_NAME,
    SoftPromptTrainer,
    build_trainer,
    check_checkpoint,
    last_checkpoint,
    plot_losses,
    resolve_resume,
    train,
)
from tiny_lm import make_workspace


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("train"), 40)


def settings(root: Path, out: str, **extra) -> dict:
    base = dict(model=str(root / "model"), data=str(root / "data.jsonl"), output_dir=str(root / out), max_steps=6,
                save_steps=3, logging_steps=1, per_device_train_batch_size=4, disable_tqdm=True,
                dataloader_pin_memory=False)
    return {**base, **extra}


# -- config keys ------------------------------------------------------------------------------------
def test_keys_are_sorted_into_method_and_training_arguments():
    c = TrainConfig.from_mapping({"data": "d.json", "method": "P_TUNING", "num_virtual_tokens": "12",
                                  "encoder_hidden_size": 64, "learning_rate": "1e-3", "bf16": "false",
                                  "per_device_train_batch_size": "4", "max_length": "128", "val_size": "0.1"})
    assert c.method == "p_tuning" and c.max_length == 128 and c.val_size == 0.1
    assert c.peft == {"num_virtual_tokens": 12, "encoder_hidden_size": 64}
    assert c.training["learning_rate"] == 1e-3 and c.training["bf16"] is False
    assert c.training["per_device_train_batch_size"] == 4
    assert c.training["output_dir"] == "runs/p_tuning"  # a default output folder per method


def test_unknown_key_lists_near_matches():
    with pytest.raises(ValueError, match=r"num_virtual_token'.*did you mean num_virtual_tokens") as err:
        TrainConfig.from_mapping({"data": "d.json", "num_virtual_token": 5})
    assert "TrainingArguments" in str(err.value)
    with pytest.raises(ValueError, match=r"did you mean learning_rate"):
        TrainConfig.from_mapping({"data": "d.json", "learning_rte": 0.1})


def test_key_of_another_method_is_refused():
    with pytest.raises(ValueError, match=r"prefix_projection is a prefix_tuning option.*method='prompt_tuning'"):
        TrainConfig.from_mapping({"data": "d.json", "method": "prompt_tuning", "prefix_projection": True})
    with pytest.raises(ValueError, match=r"method='lora' is not valid"):
        TrainConfig.from_mapping({"data": "d.json", "method": "lora"})


def test_default_learning_rates_per_method():
    for method, rate in DEFAULT_LEARNING_RATES.items():
        args = TrainConfig.from_mapping({"data": "d", "method": method, "output_dir": "x"}).training_arguments(False)
        assert args.learning_rate == rate and rate > 1e-3  # far above Trainer's 5e-5
    projected = TrainConfig.from_mapping({"data": "d", "method": "prefix_tuning", "prefix_projection": True,
                                          "output_dir": "x"})
    assert projected.training_arguments(False).learning_rate == 3e-3
    given = TrainConfig.from_mapping({"data": "d", "learning_rate": 5e-5, "output_dir": "x"})
    assert given.training_arguments(False).learning_rate == 5e-5
    assert given.learning_rate() == (5e-5, "learning_rate 5e-5 (given; softprompt's default for prompt tuning, "
                                           "RANDOM init would be 3e-1)")


@pytest.mark.parametrize("keys, variant", [
    ({"method": "prompt_tuning"}, "prompt tuning, RANDOM init"),
    ({"method": "prompt_tuning", "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Hi"}, "prompt tuning, TEXT init"),
    ({"method": "prompt_tuning", "prompt_tuning_init": "SAMPLE_VOCAB"}, "prompt tuning, SAMPLE_VOCAB init"),
    ({"method": "p_tuning"}, "P-tuning, MLP encoder"),
    ({"method": "p_tuning", "encoder_reparameterization_type": "LSTM"}, "P-tuning, LSTM encoder"),
    ({"method": "prefix_tuning"}, "prefix tuning without projection"),
    ({"method": "prefix_tuning", "prefix_projection": True}, "prefix tuning with projection"),
])
def test_each_variant_has_its_default_rate_and_says_why(keys, variant):
    config = TrainConfig.from_mapping({"data": "d", "output_dir": "x", **keys})
    default = config.method_config.default_learning_rate()
    assert default.variant == variant and default.rule
    rate, why = config.learning_rate()
    assert rate == default.value == config.training_arguments(False).learning_rate
    assert why.startswith(f"learning_rate {format_rate(rate)} (softprompt's default for {variant}; rule: ")
    assert why.endswith("); give --learning_rate to override")


def test_p_tuning_mlp_rate_is_a_rule_of_the_encoder_width():
    from softprompt.methods.config import ModelShape, PromptEncoderConfig

    def rate(**keys):
        return PromptEncoderConfig(num_virtual_tokens=10, **keys).default_learning_rate()

    assert rate(encoder_hidden_size=128).value == 1e-2  # the demo's encoder: the demo sweep's best
    assert rate(token_dim=576).value == pytest.approx(3e-3, rel=1e-3)  # SmolLM2's width: the Alpaca sweep's best
    assert "1e-2 x (128 / encoder width 576)^0.8" in rate(token_dim=576).rule
    assert rate(token_dim=2048, encoder_hidden_size=256).value == pytest.approx(1e-2 * 0.5 ** 0.8)  # its own width
    assert rate(encoder_reparameterization_type="LSTM", token_dim=576).value == 1e-2  # no rule for the LSTM
    shape = ModelShape.from_model_config(transformers.LlamaConfig(hidden_size=64, num_hidden_layers=2,
                                                                  num_attention_heads=4, vocab_size=100))
    assert PromptEncoderConfig(num_virtual_tokens=4).resolve(shape).default_learning_rate().value == \
        pytest.approx(1e-2 * 2 ** 0.8)


def test_train_takes_the_rule_at_the_models_width(workspace, capsys):
    """The tiny model is 32 wide: P-tuning's MLP default is 1e-2 x 4^0.8 = 3.03e-2, printed and used."""
    config = TrainConfig.from_mapping(settings(workspace, "rule", method="p_tuning", val_size=0))
    trainer, _, _ = build_trainer(config)
    assert trainer.args.learning_rate == pytest.approx(1e-2 * 4 ** 0.8)
    assert ("learning_rate 3.03e-2 (softprompt's default for P-tuning, MLP encoder; rule: 1e-2 x (128 / encoder "
            "width 32)^0.8") in capsys.readouterr().out


def test_vocabulary_init_rate_is_a_rule_of_the_embeddings_scale():
    """TEXT / SAMPLE_VOCAB init: 0.22 x the embeddings' RMS (SmolLM2's 0.135 -> 3e-2, Gemma's 1.03 -> 2.3e-1)."""
    from softprompt.methods.config import ModelShape, PromptTuningConfig

    shape = ModelShape(576, 30, 9, 3, 64, 49152)
    text = PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="Hi")
    assert text.default_learning_rate(dataclasses.replace(shape, embedding_rms=0.135)).value == 3e-2
    gemma = PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="SAMPLE_VOCAB").default_learning_rate(
        dataclasses.replace(shape, embedding_rms=1.031))
    assert gemma.value == 2.3e-1 and "0.22 x the RMS 1.03 of the model's word embeddings" in gemma.rule
    unmeasured = text.default_learning_rate(shape)
    assert unmeasured.value == 3e-2 and "not measured yet" in unmeasured.rule
    random = PromptTuningConfig(num_virtual_tokens=4).default_learning_rate(dataclasses.replace(shape, embedding_rms=9.0))
    assert random.value == 3e-1  # a random prompt starts at N(0, 1) whatever the model


def test_embedding_rms_reads_the_embeddings_as_the_model_does():
    """Gemma multiplies its table by sqrt(hidden) in the embedding module: the RMS the prompt starts at counts it."""
    from softprompt.train.trainer import embedding_rms

    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2))
    with torch.no_grad():
        llama.get_input_embeddings().weight.fill_(0.5)
    assert embedding_rms(llama) == pytest.approx(0.5)
    gemma = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, head_dim=8))
    with torch.no_grad():
        gemma.get_input_embeddings().weight.fill_(0.5)
    assert embedding_rms(gemma) == pytest.approx(0.5 * 16 ** 0.5)


def test_train_takes_the_vocabulary_init_rule_at_the_models_scale(workspace, capsys):
    from softprompt.methods.config import vocab_init_rate
    from softprompt.train.trainer import embedding_rms

    config = TrainConfig.from_mapping(settings(workspace, "vocab-rule", prompt_tuning_init="SAMPLE_VOCAB", val_size=0))
    trainer, _, _ = build_trainer(config)
    rms = embedding_rms(trainer.model.base_model)
    assert trainer.args.learning_rate == vocab_init_rate(rms) == trainer.learning_rate_choice[0]
    assert f"rule: 0.22 x the RMS {rms:.3g} of the model's word embeddings" in capsys.readouterr().out


def test_format_rate():
    assert [format_rate(r) for r in (3e-1, 1e-3, 5e-5, 1.5e-4, 2.0)] == ["3e-1", "1e-3", "5e-5", "1.5e-4", "2e0"]
    with_eval = TrainConfig.from_mapping({"data": "d", "save_steps": 7, "output_dir": "x"}).training_arguments(True)
    assert with_eval.eval_strategy.value == "steps" and with_eval.eval_steps == 7


def test_parse_overrides():
    assert parse_overrides(["--learning_rate", "1e-2", "--prefix_projection", "--report_to=none",
                            "--prompt_tuning_init_text", "下面是一段人与机器人的对话。", "--max-steps", "3"]) == {
        "learning_rate": "1e-2", "prefix_projection": "true", "report_to": "none",
        "prompt_tuning_init_text": "下面是一段人与机器人的对话。", "max_steps": "3"}
    with pytest.raises(ValueError, match="expected --key value"):
        parse_overrides(["learning_rate", "3"])


def test_text_init_takes_one_virtual_token_per_init_token(workspace):
    from softprompt.io.base_models import load_base

    _, tokenizer = load_base(str(workspace / "model"))
    text = "Write this word in capital letters."
    c = TrainConfig.from_mapping({"data": "d", "prompt_tuning_init": "TEXT", "prompt_tuning_init_text": text})
    config = c.peft_config(tokenizer)
    assert config.num_virtual_tokens == len(tokenizer(text)["input_ids"])
    assert config.tokenizer_name_or_path == c.model


# -- a real run -------------------------------------------------------------------------------------
def test_train_writes_adapter_checkpoints_loss_plot_and_learns(workspace):
    result = train(TrainConfig.from_mapping(settings(workspace, "run", learning_rate=0.3, max_steps=12,
                                                     save_steps=4, save_total_limit=2, val_size=8,
                                                     report_to="tensorboard")),
                   num_samples=1)
    out = result.output_dir
    assert list(out.rglob("events.out.tfevents.*"))  # report_to: tensorboard works
    for name in ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "softprompt_train.yaml"):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Checkpoints: rotated to the last two, adapter-only (no base weight anywhere), staging folder gone.
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-8"]
    assert not (out / STAGING_DIR).exists()
    with safe_open(str(out / "checkpoint-8" / "model.safetensors"), "pt") as f:
        assert list(f.keys()) == ["prompt_encoder.default.embedding.weight"]
    check_checkpoint(out / "checkpoint-8")
    # Eval loss on the validation split was logged and went down: the soft prompt learned.
    state = json.loads((out / "trainer_state.json").read_text())
    evals = [e["eval_loss"] for e in state["log_history"] if "eval_loss" in e]
    losses = [e["loss"] for e in state["log_history"] if "loss" in e]
    assert len(evals) >= 3 and evals[-1] < evals[0] - 0.005, evals
    assert len(losses) == 12
    assert result.metrics["eval_loss"] == pytest.approx(evals[-1])
    assert len(result.samples) == 1 and result.samples[0][0].endswith("Assistant: ")
    # The live log (what the training page draws): the same losses, step by step, with speed and ETA.
    log = [json.loads(line) for line in (out / TRAINER_LOG_NAME).read_text().splitlines()]
    assert log[0] == {"event": "begin", "step": 0, "total_steps": 12}
    assert {"event": "end", "step": 12, "total_steps": 12, "stopped": False} in log
    assert log[-1]["eval_loss"] == pytest.approx(result.metrics["eval_loss"])  # train() evaluates after the end
    steps = [e for e in log if "loss" in e]
    assert [e["step"] for e in steps] == list(range(1, 13)) and {e["total_steps"] for e in steps} == {12}
    assert [e["loss"] for e in steps] == pytest.approx(losses)
    assert all(e["tokens_per_s"] > 0 for e in steps) and steps[-1]["eta_s"] == 0 < steps[0]["eta_s"]


def test_a_stop_file_ends_the_run_after_the_step_and_saves_the_adapter(workspace):
    from transformers import TrainerCallback

    class StopAtTwo(TrainerCallback):  # what the server's Stop button does: create <output_dir>/STOP
        def on_step_begin(self, args, state, control, **kwargs):
            if state.global_step == 2:
                (Path(args.output_dir) / STOP_FILE_NAME).touch()

    result = train(TrainConfig.from_mapping(settings(workspace, "stopped", max_steps=50, val_size=0)),
                   callbacks=[StopAtTwo()], num_samples=0)
    out = result.output_dir
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 3
    assert (out / "adapter_model.safetensors").is_file() and not (out / STOP_FILE_NAME).exists()
    log = [json.loads(line) for line in (out / TRAINER_LOG_NAME).read_text().splitlines()]
    assert log[-1] == {"event": "end", "step": 3, "total_steps": 50, "stopped": True}


def test_plot_losses_empty_history_writes_nothing(tmp_path):
    assert plot_losses([], tmp_path / "loss.png") is None and not (tmp_path / "loss.png").exists()


# -- atomic checkpoints -----------------------------------------------------------------------------
def test_failure_mid_save_leaves_no_checkpoint_folder(workspace, monkeypatch):
    """A save that dies after the adapter files are written leaves only the staging folder behind."""
    original = SoftPromptTrainer._save_optimizer_and_scheduler

    def dying(self, output_dir):
        if self.state.global_step == 6:
            raise KeyboardInterrupt("killed while saving")
        return original(self, output_dir)

    monkeypatch.setattr(SoftPromptTrainer, "_save_optimizer_and_scheduler", dying)
    with pytest.raises(KeyboardInterrupt):
        train(TrainConfig.from_mapping(settings(workspace, "dying")), num_samples=0)
    out = workspace / "dying"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-3"]
    staged = out / STAGING_DIR / "checkpoint-6"
    assert (staged / "adapter_config.json").is_file() and not (staged / "optimizer.pt").exists()
    with pytest.raises(ValueError, match=r"incomplete checkpoint \(missing trainer_state.json, optimizer.pt, scheduler.pt, rng_state.pth"):
        check_checkpoint(staged)
    assert last_checkpoint(out) == out / "checkpoint-3"
    assert resolve_resume("true", out) == str(out / "checkpoint-3")
    assert resolve_resume(None, out) is None


def test_resume_skips_an_incomplete_checkpoint_of_a_plain_trainer(tmp_path):
    """Folders written by plain Trainer (not atomic) are checked before resuming from them."""
    good, bad = tmp_path / "checkpoint-2", tmp_path / "checkpoint-4"
    for folder in (good, bad):
        folder.mkdir()
        for name in ("adapter_config.json", "adapter_model.safetensors", "model.safetensors", "trainer_state.json"):
            (folder / name).write_text("{}")
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (good / name).write_text("x")
    assert last_checkpoint(tmp_path) == good
    with pytest.raises(ValueError, match="checkpoint-4 is an incomplete checkpoint"):
        resolve_resume(str(bad), tmp_path)
    with pytest.raises(FileNotFoundError, match="has no complete checkpoint"):
        resolve_resume(True, tmp_path / "empty")


def test_resave_of_the_same_step_replaces_the_checkpoint(workspace):
    """Publishing over an existing checkpoint-N (a rerun into the same folder) swaps it whole."""
    config = TrainConfig.from_mapping(settings(workspace, "twice", max_steps=3, save_steps=3))
    train(config, num_samples=0)
    first = torch.load(workspace / "twice" / "checkpoint-3" / "optimizer.pt", weights_only=False)
    train(TrainConfig.from_mapping(settings(workspace, "twice", max_steps=3, save_steps=3, learning_rate=1e-4)),
          num_samples=0)
    second = torch.load(workspace / "twice" / "checkpoint-3" / "optimizer.pt", weights_only=False)
    assert first["param_groups"][0]["initial_lr"] != second["param_groups"][0]["initial_lr"]
    assert not (workspace / "twice" / STAGING_DIR).exists()


def test_best_checkpoint_points_at_the_published_folder(workspace):
    """Trainer records the best checkpoint while it is still in the staging folder; the path must be the final one."""
    result = train(TrainConfig.from_mapping(settings(workspace, "best", val_size=4, load_best_model_at_end=True,
                                                     save_total_limit=1, learning_rate=0.3)), num_samples=0)
    out = result.output_dir
    state = json.loads((out / "trainer_state.json").read_text())
    best = Path(state["best_model_checkpoint"])
    assert best.parent == out and best.is_dir() and STAGING_DIR not in best.parts
    inner = json.loads((best / "trainer_state.json").read_text())
    assert STAGING_DIR not in Path(inner["best_model_checkpoint"]).parts


# -- packing ---------------------------------------------------------------------------------------
def _losses(folder: Path) -> tuple[list, list]:
    history = json.loads((folder / "trainer_state.json").read_text())["log_history"]
    return ([(e["step"], e["loss"]) for e in history if "loss" in e],
            [(e["step"], e["eval_loss"]) for e in history if "eval_loss" in e])


@pytest.mark.parametrize("method", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_packed_run_logs_the_losses_of_the_padded_run(workspace, method):
    """Batch 2 x accumulation 3: one packed forward per step instead of three, the same rows, the same losses."""
    common = dict(method=method, per_device_train_batch_size=2, gradient_accumulation_steps=3, max_steps=5,
                  save_steps=100, eval_steps=5, val_size=4, learning_rate=0.05)
    packed = train(TrainConfig.from_mapping(settings(workspace, f"packed-{method}", **common)), num_samples=0)
    padded = train(TrainConfig.from_mapping(settings(workspace, f"padded-{method}", packing=False, **common)),
                   num_samples=0)
    (train_packed, eval_packed), (train_padded, eval_padded) = _losses(packed.output_dir), _losses(padded.output_dir)
    assert [s for s, _ in train_packed] == [1, 2, 3, 4, 5]
    for (_, a), (_, b) in zip(train_packed + eval_packed, train_padded + eval_padded, strict=True):
        assert a == pytest.approx(b, rel=1e-5)
    assert train_packed[0][1] != train_packed[-1][1]  # it trained


def test_a_given_pack_length_caps_the_packed_rows(workspace):
    """Off a GPU packed rows may grow past max_length + prompt where that is less work; a given pack_length is a cap."""
    capped, _, _ = build_trainer(TrainConfig.from_mapping(settings(workspace, "cap", pack_length=40, val_size=0)))
    assert capped.data_collator.row_length == 40 and capped.data_collator.attention_cost == 0
    free, _, _ = build_trainer(TrainConfig.from_mapping(settings(workspace, "free", val_size=0)))
    assert free.data_collator.attention_cost == pytest.approx(1 / (6 * free.model.shape.hidden_size))


def test_a_padded_batch_runs_the_lm_head_only_where_a_label_follows(workspace):
    """The trainer asks the model for `loss_only` (nothing is set on the model): the same loss, fewer logits."""
    config = TrainConfig.from_mapping(settings(workspace, "loss-only", packing=False, val_size=0))
    trainer, _, _ = build_trainer(config)
    batch = next(iter(trainer.get_train_dataloader()))
    model = trainer.model
    loss, out = trainer.compute_loss(model, batch, return_outputs=True)
    full = model(**batch)
    torch.testing.assert_close(loss, full.loss, atol=1e-5, rtol=1e-5)
    assert out.logits.shape[1] < full.logits.shape[1] == batch["input_ids"].shape[1] + 10  # 10 virtual tokens


def test_packing_keys_are_checked():
    with pytest.raises(ValueError, match=r"pack_tokens=0 is not valid"):
        TrainConfig.from_mapping({"data": "d.json", "pack_tokens": 0})
    with pytest.raises(ValueError, match=r"base_dtype='half' is not valid; allowed values: auto"):
        TrainConfig.from_mapping({"data": "d.json", "base_dtype": "half"})
    c = TrainConfig.from_mapping({"data": "d.json", "packing": "false", "pack_length": "300"})
    assert c.packing is False and c.pack_length == 300
    with pytest.raises(ValueError, match=r"cuda_graphs='maybe' is not valid; allowed values: auto, true, false"):
        TrainConfig.from_mapping({"data": "d.json", "cuda_graphs": "maybe"})
    assert TrainConfig.from_mapping({"data": "d.json", "cuda_graphs": False}).cuda_graphs == "false"  # YAML's false


def test_cuda_graphs_asked_for_on_a_cpu_say_why_they_are_skipped(workspace, capsys):
    config = TrainConfig.from_mapping(settings(workspace, "graphs", cuda_graphs="true", val_size=0))
    trainer, _, _ = build_trainer(config)
    assert trainer.model.packed_graphs is None
    assert "CUDA graphs skipped: training runs on cpu, not CUDA" in capsys.readouterr().out


def test_cuda_graphs_are_never_used_where_a_replay_would_be_wrong(monkeypatch):
    from types import SimpleNamespace

    from softprompt.train.trainer import graphs_skipped

    gpu = dict(device=torch.device("cuda"), gradient_checkpointing=False, fsdp=[], deepspeed=None)
    assert graphs_skipped(SimpleNamespace(**gpu)) is None
    assert "recomputes" in graphs_skipped(SimpleNamespace(**{**gpu, "gradient_checkpointing": True}))
    assert "sharded" in graphs_skipped(SimpleNamespace(**{**gpu, "fsdp": ["full_shard", "auto_wrap"]}))
    assert "sharded" in graphs_skipped(SimpleNamespace(**{**gpu, "deepspeed": "ds_zero3.json"}))
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # `accelerate launch` with an FSDP config
    assert "sharded" in graphs_skipped(SimpleNamespace(**gpu))


class _Planted:
    """A pickle that, when loaded, writes a marker file: what a hostile `training_args.bin` can do."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code from the checkpoint ran"))


def test_resume_never_unpickles_training_args(workspace, tmp_path):
    """Issue #9: a planted checkpoint-998 whose training_args.bin is a crafted pickle runs nothing on resume."""
    train(TrainConfig.from_mapping(settings(workspace, "planted", max_steps=2, save_steps=2)), num_samples=0)
    out = workspace / "planted"
    marker = tmp_path / "pwned"
    planted = out / "checkpoint-998"
    planted.mkdir()
    for f in (out / "checkpoint-2").iterdir():
        planted.joinpath(f.name).write_bytes(f.read_bytes())
    torch.save(_Planted(marker), planted / "training_args.bin")
    torch.save(_Planted(marker), out / "checkpoint-2" / "training_args.bin")
    assert last_checkpoint(out) == planted and check_checkpoint(planted) == planted
    train(TrainConfig.from_mapping(settings(workspace, "planted", max_steps=4, save_steps=2,
                                            resume_from_checkpoint="true")), num_samples=0)
    assert not marker.exists()
    # A save_only_model checkpoint (no optimizer, scheduler or RNG state) cannot be resumed, and says so.
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (planted / name).unlink()
    with pytest.raises(ValueError, match="save_only_model=true, which cannot be resumed"):
        check_checkpoint(planted)
    assert not marker.exists()
