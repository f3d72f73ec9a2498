"""Training on `transformers.Trainer`: softprompt adds only what Trainer lacks.

    TrainConfig -> base model + tokenizer -> tokenized rows (train / validation) -> get_peft_model
        -> SoftPromptTrainer(...).train(resume_from_checkpoint=...) -> adapter + loss.png + samples

While it runs, `<output_dir>/trainer_log.jsonl` gets a line per log (step, total, loss, tokens/s, ETA: what
the server's training page draws), and a file `<output_dir>/STOP` ends it after the current step, the
adapter saved as at a normal end (`RunLogCallback`).

`SoftPromptTrainer` is `Trainer` with one change: a checkpoint is written under `<output_dir>/.incomplete/`
and renamed into place once every file (adapter, optimizer, scheduler, RNG states, trainer state) is
there, so a kill mid-save never leaves a `checkpoint-N` that loads half. The adapter-only files are
`PeftModel.save_pretrained`'s; Trainer restores them (and the encoders) from `model.safetensors`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import TrainerCallback, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from softprompt.core.model import get_peft_model
from softprompt.core.packed_graphs import PackedGraphs
from softprompt.core.packing import PackingCollator
from softprompt.data.rows import ColumnMap, load_rows, make_collator, split
from softprompt.data.registry import DataSource
from softprompt.data.token_cache import tokenized_rows
from softprompt.hf.backbone import compile_layers, decoder_layer_classes, packed_layers_unshardable
from softprompt.hf.trainer import StagedCheckpointTrainer
from softprompt.inference.evaluate import generate_answers
from softprompt.io.base_models import load_base
from softprompt.io.files import STOP_FILE_NAME, TRAINER_LOG_NAME
from softprompt.methods.config import ModelShape
from softprompt.train.config import TrainConfig, base_dtype

logger = logging.getLogger(__name__)

RUN_CONFIG_NAME = "softprompt_train.yaml"  # the run's whole config, beside the adapter
LOSS_PLOT_NAME = "loss.png"


class SoftPromptTrainer(StagedCheckpointTrainer):
    """`Trainer` whose checkpoints appear whole or not at all (`StagedCheckpointTrainer`), and that runs packed batches.

    A packed batch (`PackingCollator`: `{"packs": [...], "num_items": n}`) is one optimizer step's rows as
    one or more packed micro-batches: each is a forward and a backward of its own (memory stays that of one
    micro-batch), with the loss of every micro-batch divided by the label tokens of the whole step. So the
    step's loss is the token mean over all its rows, as Trainer computes it over accumulated micro-batches.
    Evaluation runs on `eval_collator` (padded rows) when given, so eval loss means what it always meant.
    """
    eval_collator = None

    def training_step(self, model, inputs, num_items_in_batch=None):
        if self.args.include_num_input_tokens_seen in ("no", False):  # Trainer does not count: count text tokens
            self.state.num_input_tokens_seen += _text_tokens(inputs)
        packs = inputs.get("packs")
        if packs is None:
            return super().training_step(model, inputs, num_items_in_batch)
        num_items = inputs["num_items"]  # a Python int: dividing by it needs no copy to the device
        if self.args.average_tokens_across_devices and self.args.world_size > 1:
            # the loss is scaled back by the world size in compute_loss
            num_items = self.accelerator.gather(torch.tensor(num_items, device=self.args.device)).sum()
        total = None
        for i, pack in enumerate(packs):
            last = i == len(packs) - 1
            # gradients are reduced across processes once, after the last micro-batch
            sync = contextlib.nullcontext() if last else self.accelerator.no_sync(model)
            with sync:
                loss = super().training_step(model, _to_device(pack, self.args.device), num_items_in_batch=num_items)
            total = loss if total is None else total + loss
        return total

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        packs = inputs.get("packs")
        if packs is None:  # a padded batch: the LM head only where a label follows (the same loss, less work)
            return super().compute_loss(model, {**inputs, "loss_only": True}, return_outputs, num_items_in_batch)
        loss = sum(model(**pack, num_items_in_batch=inputs["num_items"]).loss for pack in packs)
        return (loss, None) if return_outputs else loss

    def get_eval_dataloader(self, eval_dataset=None):
        if self.eval_collator is None:
            return super().get_eval_dataloader(eval_dataset)
        collator, self.data_collator = self.data_collator, self.eval_collator
        try:
            return super().get_eval_dataloader(eval_dataset)
        finally:
            self.data_collator = collator


def _text_tokens(inputs) -> int:
    """Tokens of text in a batch: the packing collator's count, or the padded batch's mask when it is still
    on the CPU (never a device sync for a progress number)."""
    if "num_tokens" in inputs:
        return inputs["num_tokens"]
    mask = inputs.get("attention_mask")
    return int(mask.sum()) if isinstance(mask, torch.Tensor) and mask.device.type == "cpu" else 0


def _to_device(data, device):
    """Tensors (in nested dicts and lists) moved without waiting: Trainer's own `.to(device)` blocks the host
    until the GPU has caught up, for every tensor of every step, so the next step is never queued ahead."""
    if isinstance(data, torch.Tensor):
        return data.to(device, non_blocking=True)
    if isinstance(data, dict):
        return {k: _to_device(v, device) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_to_device(v, device) for v in data)
    return data


# -- checkpoints ----------------------------------------------------------------------------------
def missing_checkpoint_files(folder: str | Path) -> list[str]:
    """What a checkpoint folder lacks to resume exactly (adapter, optimizer, scheduler, RNG, state).

    Only names are checked; nothing is read. `training_args.bin` (a pickle) is never loaded here: a planted
    folder could run code through it. A `save_only_model` checkpoint lacks the optimizer and cannot be
    resumed (as transformers documents), so it counts as incomplete. What Trainer itself reads on resume is
    safetensors, JSON, and `optimizer.pt` / `scheduler.pt` / `rng_state*.pth` through
    `torch.load(weights_only=True)`, whose unpickler builds tensors and plain containers only and runs no code.
    """
    folder = Path(folder)
    needed = ["adapter_config.json", "adapter_model.safetensors", "model.safetensors", "trainer_state.json",
              "optimizer.pt", "scheduler.pt"]
    missing = [n for n in needed if not (folder / n).is_file()]
    if not glob.glob(glob.escape(str(folder)) + "/rng_state*.pth"):
        missing.append("rng_state.pth")
    return missing


def check_checkpoint(folder: str | Path) -> Path:
    """`folder` if it is a complete checkpoint; a clear error otherwise."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    missing = missing_checkpoint_files(folder)
    if missing:
        raise ValueError(
            f"{folder} is an incomplete checkpoint (missing {', '.join(missing)}): its save was interrupted, or it "
            "was saved with save_only_model=true, which cannot be resumed. Resume from an earlier checkpoint, or "
            "with resume_from_checkpoint=true to take the last complete one"
        )
    return folder


def last_checkpoint(output_dir: str | Path) -> Path | None:
    """The highest-numbered complete `checkpoint-N` in `output_dir` (incomplete ones are skipped, with a warning)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return None
    steps = []
    for path in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*"):
        suffix = path.name[len(PREFIX_CHECKPOINT_DIR) + 1 :]
        if path.is_dir() and suffix.isdigit():
            steps.append((int(suffix), path))
    for _, path in sorted(steps, reverse=True):
        missing = missing_checkpoint_files(path)
        if not missing:
            return path
        logger.warning("skipping %s: incomplete checkpoint (missing %s)", path, ", ".join(missing))
    return None


def resolve_resume(value: Any, output_dir: str | Path) -> str | None:
    """`resume_from_checkpoint` as given (a folder, true/"last", or nothing) -> a checked folder or None."""
    if value in (None, False, "", "false", "False", "no"):
        return None
    if value is True or str(value).lower() in ("true", "last", "latest", "yes"):
        found = last_checkpoint(output_dir)
        if found is None:
            raise FileNotFoundError(f"resume_from_checkpoint={value!r}, but {output_dir} has no complete checkpoint-N")
        return str(found)
    return str(check_checkpoint(value))


# -- the loss curve -------------------------------------------------------------------------------
def plot_losses(log_history: list[dict], path: str | Path) -> Path | None:
    """Training (and eval) loss against step, as a PNG; None when nothing was logged."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e and "step" in e]
    if not train:  # a run shorter than logging_steps: its mean loss, at its last step
        train = [(e["step"], e["train_loss"]) for e in log_history if "train_loss" in e and "step" in e]
    if not train and not evals:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), "o-" if len(train) == 1 else "-", label="train loss", color="tab:blue")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", color="tab:orange")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


class LossPlotCallback(TrainerCallback):
    """Writes `loss.png` into the output folder when training ends (main process only)."""
    def on_train_end(self, args, state, control, **kwargs):
        if state.is_world_process_zero:
            plot_losses(state.log_history, Path(args.output_dir) / LOSS_PLOT_NAME)


class RunLogCallback(TrainerCallback):
    """Appends a JSON line to `<output_dir>/trainer_log.jsonl` at every log (`logging_steps`): step, total
    steps, epoch, loss (or eval_loss), learning rate, text tokens/s, elapsed and remaining seconds. After each
    step, a file `<output_dir>/STOP` ends the run: Trainer leaves its loop and `train` saves as at the end. With
    several processes, a stop that one of them sees after a step ends them all after that step."""

    stopped = False
    _group = None  # several processes: a gloo group of them all, to agree on a stop

    def on_train_begin(self, args, state, control, **kwargs):
        self.started, self.first_step = time.monotonic(), state.global_step
        self.stopped = False
        if args.world_size > 1 and self._group is None:
            import torch.distributed as dist

            # host tensors: a stop check never waits for a GPU (NCCL's group would sync the step's work)
            self._group = dist.new_group(backend="gloo")
        self.first_tokens = state.num_input_tokens_seen
        out = Path(args.output_dir)
        if state.is_world_process_zero:
            out.mkdir(parents=True, exist_ok=True)
            if state.global_step == 0:  # a fresh run: a log of an earlier run in this folder goes
                (out / TRAINER_LOG_NAME).unlink(missing_ok=True)
            self._write(args, {"event": "begin", "step": state.global_step, "total_steps": state.max_steps})

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs:
            return
        elapsed = time.monotonic() - self.started
        done = state.global_step - self.first_step
        line = {"step": state.global_step, "total_steps": state.max_steps, "epoch": state.epoch,
                **{k: logs[k] for k in ("loss", "eval_loss", "learning_rate", "train_loss") if k in logs},
                "tokens_per_s": (state.num_input_tokens_seen - self.first_tokens) / elapsed if elapsed > 0 else None,
                "elapsed_s": elapsed,
                "eta_s": elapsed / done * (state.max_steps - state.global_step) if done else None}
        self._write(args, line)

    def on_step_end(self, args, state, control, **kwargs):
        stop = (Path(args.output_dir) / STOP_FILE_NAME).exists()
        if self._group is not None:
            # every process stops after the same step, or the others wait in the next step's all-reduce forever:
            # the file can appear between two processes' checks
            import torch.distributed as dist

            seen = torch.tensor([int(stop)])
            dist.all_reduce(seen, op=dist.ReduceOp.MAX, group=self._group)
            stop = bool(seen.item())
        if stop:
            control.should_training_stop = self.stopped = True

    def on_train_end(self, args, state, control, **kwargs):
        stopped = self.stopped and state.global_step < state.max_steps
        (Path(args.output_dir) / STOP_FILE_NAME).unlink(missing_ok=True)  # spent: a resumed run here goes on
        if state.is_world_process_zero:
            self._write(args, {"event": "end", "step": state.global_step, "total_steps": state.max_steps,
                               "stopped": stopped})

    def _write(self, args, line: dict) -> None:
        with open(Path(args.output_dir) / TRAINER_LOG_NAME, "a", encoding="utf-8") as f:
            f.write(json.dumps(line) + "\n")


# -- one run --------------------------------------------------------------------------------------
@dataclass
class TrainResult:
    output_dir: Path
    metrics: dict[str, float]
    samples: list[tuple[str, str, str]]  # (prompt, reference, generated)


def load_data(config: TrainConfig, tokenizer):
    """Tokenized (train, validation or None, eval rows or None), with the data report printed.

    The tokenized rows are cached on disk (`token_cache.py`): a second run over the same file starts at once.
    """
    def read(source: DataSource):
        columns = ColumnMap(**source.columns)
        data, report = tokenized_rows(source.location, columns, tokenizer, max_length=config.max_length,
                                      template=config.template, cache=config.cache_tokenized, format=source.format,
                                      loss_on=config.loss_on, split=source.split, subset=source.subset)
        print(report.summary(), flush=True)
        report.check_skipped(config.max_skipped_fraction)  # DataError (exit code 2) when too many rows are bad
        return data, report

    data, report = read(config.data_source)
    if not len(data):
        raise ValueError(f"{config.data}: no row is left to train on ({report.summary()})")
    if config.eval_source is not None:
        source = config.eval_source
        val, _ = read(source)
        rows = load_rows(source.location, ColumnMap(**source.columns), source.format, source.split, source.subset)
        return data, (val if len(val) else None), rows
    if config.val_size and len(data) > 1:
        seed = int(config.training.get("data_seed") or config.training.get("seed", 42))
        train_part, val = split(data, config.val_size, seed=seed)
        return train_part, val, None
    return data, None, None


def build_trainer(config: TrainConfig, callbacks: list[TrainerCallback] | None = None, base=None):
    """(trainer, tokenizer, eval rows or None) for `config`, ready to `.train()`.

    `base`: `(model, tokenizer)` already loaded for `config.model` (a sweep reuses one frozen base across runs;
    training leaves its weights as they were); by default `load_base` loads it.
    """
    seed = int(config.training.get("seed", 42))
    set_seed(seed)
    model, tokenizer = base if base is not None else load_base(config.model, dtype=base_dtype(config.base_dtype))
    train_data, val_data, eval_rows = load_data(config, tokenizer)
    method_config = config.peft_config(tokenizer)
    # a default rate may be a rule of the model's widths (P-tuning's MLP) or of its embeddings' scale (prompt
    # tuning from the vocabulary): ask a config sized for this model, with the measured shape
    shape = dataclasses.replace(ModelShape.from_model_config(model.config), embedding_rms=embedding_rms(model))
    sized = method_config.resolve(shape)
    rate_choice = config.learning_rate(sized, shape)
    layers = decoder_layer_classes(model) if config.shard_base == "fsdp" else None
    args = config.training_arguments(has_eval=val_data is not None, method_config=sized, shape=shape,
                                     layer_classes=layers)
    if args.fsdp and config.packing and (why := packed_layers_unshardable(model)):
        raise ValueError(f"packing under FSDP: {why}; set packing=false to shard this model")
    set_seed(args.seed)  # the adapter's initial weights depend on the seed alone
    peft_model = get_peft_model(model, method_config, tokenizer=tokenizer)
    if "prediction_loss_only" not in config.training:
        # eval reports loss; its logits are partial (compute_loss passes loss_only) and would only cost memory
        args.prediction_loss_only = True
    if args.should_log:
        peft_model.print_trainable_parameters()
        print(rate_choice[1], flush=True)
    if config.compile != "false":
        skipped = compile_layers(model)
        if args.should_log:
            if skipped is None:
                print("torch.compile: the base model's layers (compile=false to train eagerly)", flush=True)
            elif config.compile == "true":
                print(f"torch.compile skipped: {skipped}", flush=True)
    if config.packing and config.cuda_graphs != "false":
        skipped = graphs_skipped(args)
        if skipped is None:
            peft_model.packed_graphs = PackedGraphs(model)
        if args.should_log:
            if skipped is None:
                print("CUDA graphs: the base's packed forward and backward, one pair per micro-batch shape "
                      "(cuda_graphs=false to launch its kernels one by one)", flush=True)
            elif config.cuda_graphs == "true":
                print(f"CUDA graphs skipped: {skipped}", flush=True)
    padded = make_collator(tokenizer)
    collator = packing_collator(config, args, peft_model, tokenizer) if config.packing else padded
    trainer = SoftPromptTrainer(
        model=peft_model,
        args=args,
        train_dataset=train_data,
        eval_dataset=val_data,
        data_collator=collator,
        callbacks=[LossPlotCallback(), RunLogCallback(), *(callbacks or [])],
    )
    trainer.eval_collator = padded if config.packing else None
    trainer.learning_rate_choice = rate_choice  # (rate, the line that says why): `train` records it
    return trainer, tokenizer, eval_rows


def embedding_rms(model: torch.nn.Module, sample: int = 4096) -> float | None:
    """The root-mean-square of the word embeddings as `model` reads them (its input-embedding module's output,
    so Gemma's sqrt(hidden) scale counts), over `sample` token ids drawn with a fixed seed; None where the table
    cannot be read here (weights sharded away, as under DeepSpeed ZeRO-3)."""
    embeddings = model.get_input_embeddings()
    weight = getattr(embeddings, "weight", None)
    if weight is None or weight.dim() != 2 or weight.numel() == 0 or weight.is_meta:
        return None
    ids = torch.randint(0, weight.shape[0], (sample,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = embeddings(ids.to(weight.device)).float()
    return float(out.pow(2).mean().sqrt())


def graphs_skipped(args) -> str | None:
    """Why a run with these TrainingArguments cannot replay CUDA graphs of its packed base; None when it can."""
    if args.device.type != "cuda":
        return f"training runs on {args.device.type}, not CUDA"
    if args.gradient_checkpointing:
        return "gradient checkpointing recomputes the layers during the backward"
    launched_sharded = any(os.environ.get(f"ACCELERATE_USE_{kind}", "").lower() in ("1", "true")
                           for kind in ("FSDP", "DEEPSPEED"))  # `accelerate launch` with such a config
    if args.fsdp or args.deepspeed or launched_sharded:  # a replay would reuse the gathered weights of its recording
        return "the base model is sharded (FSDP or DeepSpeed), its weights gathered anew at every forward"
    return None


def packing_collator(config: TrainConfig, args, model, tokenizer):
    """The collator of a packed run; `args` then takes one optimizer step's rows per batch, accumulation 1.

    The rows per step (`per_device_train_batch_size x gradient_accumulation_steps`), and so the number of
    steps, the schedule and the order of rows, stay what the user asked for.
    """
    collator = PackingCollator.for_model(model, tokenizer, config.max_length, config.pack_tokens)
    if config.pack_length:  # the user's cap on a packed row: no longer rows
        collator = dataclasses.replace(collator, row_length=config.pack_length, attention_cost=0.0)
    if args.device.type == "cuda":  # few distinct shapes: each new one costs host time in cuBLAS
        collator = dataclasses.replace(collator, fixed_shapes=True, pad_multiple=16)
    rows = args.per_device_train_batch_size * args.gradient_accumulation_steps
    args.per_device_train_batch_size, args.gradient_accumulation_steps = rows, 1
    if args.should_log:
        longer = ", or longer where that is less work" if collator.attention_cost and not collator.fixed_shapes else ""
        print(f"packing: {rows} rows per optimizer step in micro-batches of up to {config.pack_tokens} tokens "
              f"(rows of {collator.row_length}{longer}); packing=false for padded batches", flush=True)
    return collator


def train(config: TrainConfig, callbacks: list[TrainerCallback] | None = None, num_samples: int = 3) -> TrainResult:
    """Train an adapter as `config` says; the adapter, loss.png and the run's config land in output_dir."""
    trainer, tokenizer, _ = build_trainer(config, callbacks)
    args = trainer.args
    out = Path(args.output_dir)
    resume = resolve_resume(config.training.get("resume_from_checkpoint"), out)
    rate, why = trainer.learning_rate_choice
    if args.should_save:
        out.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(config.to_mapping(), allow_unicode=True, sort_keys=False)
        (out / RUN_CONFIG_NAME).write_text(f"# {why}\n{text}", encoding="utf-8")
    if resume:
        print(f"resuming from {resume}", flush=True)
    result = trainer.train(resume_from_checkpoint=resume)
    metrics = dict(result.metrics)
    if trainer.eval_dataset is not None:
        metrics.update(trainer.evaluate())
    trainer.save_model(str(out))
    trainer.save_state()
    samples: list[tuple[str, str, str]] = []
    if args.should_save:
        # the rate the run used and why, beside its results (the YAML above has it as a comment)
        trainer.save_metrics("all", {**metrics, "learning_rate": rate, "learning_rate_choice": why})
        # With loss_on: all every token is labelled, so the labels no longer tell where a prompt ends.
        if num_samples and trainer.eval_dataset is not None and config.loss_on == "assistant":
            samples = sample_answers(trainer.model, tokenizer, trainer.eval_dataset, num_samples, config.template)
            for prompt, reference, generated in samples:
                print(f"--- prompt:\n{prompt}\n--- reference: {reference}\n--- generated: {generated}", flush=True)
        print(f"adapter saved to {out} (loss curve: {out / LOSS_PLOT_NAME})", flush=True)
    return TrainResult(out, metrics, samples)


def sample_answers(model, tokenizer, tokenized, n: int, template: str) -> list[tuple[str, str, str]]:
    """Greedy answers to the first `n` validation prompts (recovered from their token ids: up to the first
    labelled token; the reference is that labelled run, a conversation's first assistant turn)."""
    rows = tokenized.select(range(min(n, len(tokenized))))
    prompts, references = [], []
    for ids, labels in zip(rows["input_ids"], rows["labels"]):
        cut = next((i for i, label in enumerate(labels) if label != -100), len(labels))
        end = next((i for i in range(cut, len(labels)) if labels[i] == -100), len(labels))
        prompts.append(tokenizer.decode(ids[:cut], skip_special_tokens=False))
        references.append(tokenizer.decode(labels[cut:end], skip_special_tokens=True).strip())
    was_training = model.training
    model.eval()
    try:
        # The prompts are already templated and carry their special tokens: encode them as they are.
        answers = generate_answers(model, tokenizer, prompts, max_new_tokens=64, add_special_tokens=False)
    finally:
        model.train(was_training)
    return list(zip(prompts, references, answers))


def read_run_config(adapter_dir: str | Path) -> dict[str, Any]:
    """The run config saved beside an adapter (or beside its checkpoint's parent); {} when none."""
    adapter_dir = Path(adapter_dir)
    for folder in (adapter_dir, adapter_dir.parent):
        path = folder / RUN_CONFIG_NAME
        if path.is_file():
            try:
                return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except yaml.YAMLError:
                return {}
    return {}

