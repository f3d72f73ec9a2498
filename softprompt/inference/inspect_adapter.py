"""What an adapter folder holds: its config, files, parameter count and, for prompts that live in the
model's word-embedding space (Prompt Tuning, P-Tuning), the vocabulary tokens nearest to each virtual
token by cosine similarity: a rough reading of what the learned prompt "says".
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open

from softprompt.io.base_models import load_base
from softprompt.io.files import CONFIG_NAME, EXPORT_KEY, STATE_NAME, WEIGHTS_NAME, read_config


@dataclass
class AdapterReport:
    folder: str
    config: dict
    files: dict[str, int]  # name -> bytes
    exported_shape: tuple[int, ...]
    exported_parameters: int  # what peft's file holds
    trainable_parameters: int | None  # the whole trainable state (encoders included), when model.safetensors is there
    neighbours: list[list[tuple[str, float]]] = field(default_factory=list)  # per virtual token
    note: str = ""

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}

    def text(self) -> str:
        lines = [f"adapter: {self.folder}", f"method: {self.config.get('peft_type')}"]
        for key in sorted(self.config):
            if self.config[key] is not None and key != "peft_type":
                lines.append(f"  {key}: {self.config[key]}")
        lines.append("files:")
        for name, size in self.files.items():
            lines.append(f"  {name}: {_size(size)}")
        lines.append(f"prompt_embeddings: shape {tuple(self.exported_shape)}, {self.exported_parameters:,d} values")
        if self.trainable_parameters is not None:
            lines.append(f"trainable parameters (encoders included): {self.trainable_parameters:,d}")
        if self.neighbours:
            lines.append("nearest vocabulary tokens (cosine similarity) of each virtual token:")
            for i, near in enumerate(self.neighbours):
                lines.append(f"  v{i}: " + "  ".join(f"{tok!r} {sim:.2f}" for tok, sim in near))
        if self.note:
            lines.append(self.note)
        return "\n".join(lines)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def inspect_adapter(folder: str | Path, model: str | None = None, top_k: int = 5) -> AdapterReport:
    """Describe the adapter in `folder`; `model` (default: the base model its config names) is loaded only
    for the nearest-token reading, and its absence is a note, not an error."""
    folder = Path(folder)
    config = read_config(folder)
    raw_config = json.loads((folder / CONFIG_NAME).read_text(encoding="utf-8"))
    files = {p.name: p.stat().st_size for p in sorted(folder.iterdir()) if p.is_file()}
    weights = folder / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} is missing: the folder has a config but no weights")
    with safe_open(str(weights), framework="pt") as f:
        exported = f.get_tensor(EXPORT_KEY).float()
    trainable = None
    if (folder / STATE_NAME).is_file():
        with safe_open(str(folder / STATE_NAME), framework="pt") as f:
            trainable = sum(_numel(f.get_slice(k).get_shape()) for k in f.keys())
    report = AdapterReport(str(folder), raw_config, files, tuple(exported.shape), exported.numel(), trainable)
    if not config.prompt_in_vocabulary:
        report.note = f"{config.method_name()} learns keys and values inside attention, not word embeddings: no nearest tokens"
        return report
    source = model or config.base_model_name_or_path
    if not source:
        report.note = "no base model named (adapter_config.json has none); pass --model for the nearest tokens"
        return report
    try:
        base, tokenizer = load_base(source)
    except Exception as err:  # a missing hub model must not stop the rest of the report
        report.note = f"nearest tokens skipped: could not load base model {source!r} ({err})"
        return report
    vocab = base.get_input_embeddings().weight.detach().float()  # (vocab, D)
    if vocab.shape[1] != exported.shape[1]:
        report.note = f"nearest tokens skipped: {source!r} has embedding width {vocab.shape[1]}, the adapter {exported.shape[1]}"
        return report
    report.neighbours = nearest_tokens(exported, vocab, tokenizer, top_k)
    return report


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def nearest_tokens(prompt: torch.Tensor, vocab: torch.Tensor, tokenizer, top_k: int = 5) -> list[list[tuple[str, float]]]:
    """For each row of `prompt` (V, D), the `top_k` tokens of `vocab` (N, D) of highest cosine similarity."""
    sims = torch.nn.functional.normalize(prompt, dim=-1) @ torch.nn.functional.normalize(vocab, dim=-1).T  # (V, N)
    values, ids = sims.topk(min(top_k, vocab.shape[0]), dim=-1)
    return [
        [(tokenizer.decode([int(i)]), round(float(v), 4)) for v, i in zip(row_v, row_i)]
        for row_v, row_i in zip(values, ids)
    ]
