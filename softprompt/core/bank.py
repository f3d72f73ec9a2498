"""`AdapterBank`: the adapters a `PeftModel` holds, by name, and each row's prompt gathered from them.

A mixin of `PeftModel` (peft's names: `add_adapter`, `delete_adapter`, `set_adapter`, `disable_adapter`,
`load_adapter`); it keeps the adapters in `prompt_encoder` (a `ModuleDict`, so that state-dict keys read
`prompt_encoder.<name>.…` as softprompt's files expect) and their configs in `peft_config`.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence

import torch

from softprompt.io import files
from softprompt.methods.adapter import PromptAdapter
from softprompt.methods.config import PromptLearningConfig


class AdapterBank:
    """Needs `prompt_encoder`, `peft_config`, `active_adapter`, `_adapters_disabled`, `shape`, `config`,
    `base_model` and `get_input_embeddings()` on the model (`PeftModel._wrap` sets them)."""

    def add_adapter(self, adapter_name: str, peft_config: PromptLearningConfig, tokenizer=None) -> None:
        """Add a new trainable adapter (any method, any number of virtual tokens)."""
        if not isinstance(peft_config, PromptLearningConfig):
            raise TypeError(
                f"peft_config must be a PromptTuningConfig, PromptEncoderConfig or PrefixTuningConfig, "
                f"got {type(peft_config).__name__}"
            )
        if adapter_name in self.prompt_encoder:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name")
        if peft_config.base_model_name_or_path is None:
            peft_config = dataclasses.replace(
                peft_config, base_model_name_or_path=getattr(self.config, "name_or_path", None) or None
            )
        config = peft_config.resolve(self.shape)
        adapter = config.build(self.shape, self.get_input_embeddings(), tokenizer)
        self._attach(adapter_name, adapter)

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs) -> None:
        if adapter_name in self.prompt_encoder:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name")
        adapter = files.load_adapter(self.base_model, model_id, adapter_name=adapter_name, **kwargs)
        self._attach(adapter_name, adapter)
        adapter.requires_grad_(is_trainable)

    def _attach(self, adapter_name: str, adapter: PromptAdapter) -> None:
        weight = self.get_input_embeddings().weight
        adapter.to(weight.device)
        self.prompt_encoder[adapter_name] = adapter
        self.peft_config[adapter_name] = adapter.config
        if self.active_adapter is None:
            self.active_adapter = adapter_name

    def delete_adapter(self, adapter_name: str) -> None:
        self._check_adapter(adapter_name)
        del self.prompt_encoder[adapter_name]
        del self.peft_config[adapter_name]
        if self.active_adapter == adapter_name:
            self.active_adapter = next(iter(self.peft_config), None)

    def set_adapter(self, adapter_name: str) -> None:
        self._check_adapter(adapter_name)
        self.active_adapter = adapter_name

    @property
    def active_adapters(self) -> list[str]:
        return [self.active_adapter] if self.active_adapter else []

    def _check_adapter(self, name: str) -> None:
        if name not in self.prompt_encoder:
            known = ", ".join(self.prompt_encoder) or "none"
            raise ValueError(f"no adapter named {name!r}; loaded adapters: {known}")

    @contextlib.contextmanager
    def disable_adapter(self) -> Iterator[None]:
        """Within the block, rows without an explicit adapter run on the bare base model."""
        previous, self._adapters_disabled = self._adapters_disabled, True
        try:
            yield
        finally:
            self._adapters_disabled = previous

    # -- each row's prompt ------------------------------------------------------------------------
    def row_adapters(self, adapter_names: Sequence[str | None] | str | None, batch_size: int) -> list[str | None]:
        """Each row's adapter name (None: the bare base model)."""
        if adapter_names is None:
            name = None if self._adapters_disabled else self.active_adapter
            return [name] * batch_size
        if isinstance(adapter_names, str):
            adapter_names = [adapter_names] * batch_size
        names = list(adapter_names)
        if len(names) != batch_size:
            raise ValueError(f"adapter_names has {len(names)} entries for a batch of {batch_size} rows; give one per row")
        for n in set(names):
            if n is not None:
                self._check_adapter(n)
        return names

    def row_prompts(self, names: list[str | None], dtype: torch.dtype, device: torch.device):
        """Per-row virtual embeddings `(B, V, D)` and prefix `(layers, 2, B, H, P, hd)`, right-aligned.

        Returns (virtual, virtual_lens, prefix, prefix_lens, P); each adapter computes its prompt once,
        whatever the number of rows using it.
        """
        unique = list(dict.fromkeys(names))
        B = len(names)
        embeds = {n: self.prompt_encoder[n].input_embeddings() if n else None for n in unique}
        kvs = {n: self.prompt_encoder[n].key_values() if n else None for n in unique}
        virtual, v_lens, _ = _rows(names, embeds, seq_dim=0, dtype=dtype, device=device)
        prefix, p_lens, width = _rows(names, kvs, seq_dim=3, dtype=dtype, device=device)
        if virtual is not None:
            virtual = virtual.expand(B, -1, -1) if virtual.shape[0] == 1 else virtual  # (B, V, D)
        if prefix is not None:
            prefix = prefix.permute(1, 2, 0, 3, 4, 5)  # (B|1, L, 2, H, P, hd) -> (L, 2, B|1, H, P, hd)
            prefix = prefix.expand(-1, -1, B, -1, -1, -1) if prefix.shape[2] == 1 else prefix
        if p_lens is None:
            p_lens = torch.zeros(B, dtype=torch.long, device=device)
        return virtual, v_lens, prefix, p_lens, width


def _rows(names: list[str | None], parts: dict, seq_dim: int, dtype: torch.dtype, device: torch.device):
    """Stack each row's prompt (right-aligned along `seq_dim`, zero-filled): `(B or 1, ...)`, lengths, width."""
    lens = {n: 0 if t is None else t.shape[seq_dim] for n, t in parts.items()}
    width = max(lens.values())
    if width == 0:
        return None, None, 0
    row_lens = torch.tensor([lens[n] for n in names], device=device)
    if len(parts) == 1:  # one adapter for the whole batch: a broadcast view, no per-row copies
        return next(iter(parts.values())).to(dtype)[None], row_lens, width
    template = next(t for t in parts.values() if t is not None)
    stacked = []
    for n, t in parts.items():
        shape = list(template.shape)
        shape[seq_dim] = width - lens[n]
        fill = template.new_zeros(shape)
        stacked.append(fill if t is None else torch.cat([fill, t], dim=seq_dim))
    index = torch.tensor([list(parts).index(n) for n in names], device=device)
    return torch.stack(stacked).to(dtype)[index], row_lens, width
