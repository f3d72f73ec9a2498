"""`PeftModel`: a frozen Hugging Face causal LM plus a bank of prompt adapters, one chosen per row.

The wrapper asks each row's adapter for virtual-token embeddings and a key/value prefix (`adapter.py`),
lays them out with the text (`layout.py`), builds the prefix cache (`cache.py`) and calls the base
model through its public seams (`inputs_embeds=`, `attention_mask=`, `position_ids=`, the cache).

It subclasses `PreTrainedModel` only so that `transformers.Trainer` calls our `save_pretrained` (adapter
files, never the base weights) instead of dumping the full state dict; `PreTrainedModel.__init__` is not
run, so the base model's config is left untouched.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator, Sequence

import torch
from torch import nn
from torch.nn.modules.module import _IncompatibleKeys
from transformers import PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from softprompt.core.generation import generate
from softprompt.core.layout import Arranged, arrange
from softprompt.hf.backbone import head_logits, packed_hidden_states, packed_mask, sliding_window
from softprompt.hf.cache import accepts, build_prefix_cache, cache_kwarg, reentrant_checkpointing, route_prefix_grad
from softprompt.hf.checkpointing import keep_prefix_cache
from softprompt.io import files
from softprompt.methods.adapter import PromptAdapter
from softprompt.methods.config import ModelShape, PromptLearningConfig

ENCODER_PREFIX = "prompt_encoder."


class PeftModel(PreTrainedModel):
    """A causal LM with prompt adapters. peft's name, so that seed scripts run unchanged."""

    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules: list[str] = []

    def __init__(self, model: nn.Module, peft_config: PromptLearningConfig, adapter_name: str = "default", tokenizer=None):
        self._wrap(model)
        self.active_adapter = adapter_name
        self.add_adapter(adapter_name, peft_config, tokenizer=tokenizer)

    @classmethod
    def empty(cls, model: nn.Module) -> "PeftModel":
        """`model` frozen and wrapped with no adapter yet (a server adds adapters as they are loaded)."""
        wrapper = cls.__new__(cls)
        wrapper._wrap(model)
        return wrapper

    def _wrap(self, model: nn.Module) -> None:
        """Freeze `model` and hold it, with an empty adapter bank."""
        nn.Module.__init__(self)  # not PreTrainedModel.__init__: see the module docstring
        if isinstance(model, PeftModel):
            raise ValueError("the model already is a PeftModel; add another adapter with add_adapter()")
        self.base_model = model
        self.config = model.config
        self.shape = ModelShape.from_model_config(model.config)
        self.prompt_encoder = nn.ModuleDict()
        self.peft_config: dict[str, PromptLearningConfig] = {}
        self.active_adapter: str | None = None
        self._adapters_disabled = False
        for p in model.parameters():
            p.requires_grad_(False)

    # -- PreTrainedModel's name for the wrapped model is a property; ours is the submodule itself.
    @property
    def base_model(self) -> nn.Module:
        return self._modules["base_model"]

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_model", "prompt_encoder", "_modules") or "_modules" not in self.__dict__:
                raise
            return getattr(self._modules["base_model"], name)

    def get_base_model(self) -> nn.Module:
        return self.base_model

    def get_input_embeddings(self) -> nn.Module:
        return self.base_model.get_input_embeddings()

    # -- adapters ---------------------------------------------------------------------------------
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
            import dataclasses

            peft_config = dataclasses.replace(
                peft_config, base_model_name_or_path=getattr(self.config, "name_or_path", None) or None
            )
        config = peft_config.resolve(self.shape)
        adapter = config.build(self.shape, self.get_input_embeddings(), tokenizer)
        self._attach(adapter_name, adapter)

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

    # -- parameters -------------------------------------------------------------------------------
    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Checkpoint the base model's layers; works with all three methods (peft refuses prefix tuning)."""
        base = self.base_model
        if hasattr(base, "activation_checkpointing_enable"):
            base.activation_checkpointing_enable(activation_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        else:
            base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=gradient_checkpointing_kwargs, **kwargs)
        # Reentrant checkpointing only back-propagates if a layer input needs grad; the prefix comes in
        # through the cache, so make the text embeddings require grad (cheap: no weight grads).
        base.enable_input_require_grads()
        keep_prefix_cache(base)  # the checkpointed layers would drop our prefix cache otherwise

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        self.gradient_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def gradient_checkpointing_disable(self) -> None:
        base = self.base_model
        (getattr(base, "activation_checkpointing_disable", None) or base.gradient_checkpointing_disable)()

    activation_checkpointing_disable = gradient_checkpointing_disable

    @property
    def is_activation_checkpointing(self) -> bool:
        return any(getattr(m, "gradient_checkpointing", False) for m in self.base_model.modules())

    is_gradient_checkpointing = is_activation_checkpointing

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Accept an adapter-only state dict (what `save_pretrained` writes as `model.safetensors`).

        That is how a plain `Trainer` resumes from a checkpoint: it loads `model.safetensors` here.
        """
        keys = list(state_dict)
        if keys and all(k.startswith(ENCODER_PREFIX) for k in keys):
            result = super().load_state_dict(state_dict, strict=False, assign=assign)
            missing = [k for k in result.missing_keys if k.startswith(ENCODER_PREFIX)]
            if strict and (missing or result.unexpected_keys):
                raise RuntimeError(f"adapter state mismatch: missing {missing}, unexpected {result.unexpected_keys}")
            return _IncompatibleKeys(missing, result.unexpected_keys)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # -- forward ----------------------------------------------------------------------------------
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

    def _prompts(self, names: list[str | None], dtype: torch.dtype, device: torch.device):
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

    def prepare(
        self,
        input_ids: torch.Tensor | None,
        attention_mask: torch.Tensor | None,
        inputs_embeds: torch.Tensor | None,
        labels: torch.Tensor | None,
        adapter_names,
        frozen_cache: bool,
    ) -> tuple[Arranged, object | None]:
        """The base model's inputs for these rows: arranged embeddings, mask, positions, labels, cache."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("pass exactly one of input_ids and inputs_embeds")
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        B, L = inputs_embeds.shape[:2]
        device = inputs_embeds.device
        if attention_mask is None:
            attention_mask = torch.ones(B, L, dtype=torch.long, device=device)
        elif attention_mask.dim() != 2 or attention_mask.shape != (B, L):
            raise ValueError(
                f"attention_mask must be 2-D (batch, length) = {(B, L)}, got {tuple(attention_mask.shape)}"
            )
        names = self.row_adapters(adapter_names, B)
        virtual, v_lens, kv, p_lens, width = self._prompts(names, inputs_embeds.dtype, device)
        arranged = arrange(inputs_embeds, attention_mask, labels, virtual, v_lens, p_lens, width)
        if kv is not None and frozen_cache and kv.requires_grad and reentrant_checkpointing(self.base_model):
            kv, arranged.inputs_embeds = route_prefix_grad(kv, arranged.inputs_embeds)
        cache = build_prefix_cache(self.config, kv, frozen=frozen_cache) if kv is not None else None
        return arranged, cache

    def base_kwargs(self, arranged: Arranged, cache) -> dict:
        kwargs = {"inputs_embeds": arranged.inputs_embeds, "attention_mask": arranged.attention_mask}
        if accepts(self.base_model, "position_ids"):
            kwargs["position_ids"] = arranged.position_ids
        if cache is not None:
            kwargs[cache_kwarg(self.base_model)] = cache
        return kwargs

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        adapter_names: Sequence[str | None] | str | None = None,
        position_ids: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        use_cache: bool | None = None,
        packing: dict[str, torch.Tensor] | None = None,
        **kwargs,
    ):
        """Logits over `V + L` positions (the first `V` are the virtual tokens'), and the loss on `labels`.

        With `packing=` (what `PackingCollator` makes), the rows are packed segments: the loss is over every
        segment's labels, and `logits` cover only the positions that carry a loss.
        """
        if packing is not None:
            return self._packed_forward(input_ids, inputs_embeds, packing, adapter_names, kwargs)
        if position_ids is not None:
            raise ValueError("softprompt computes position_ids from attention_mask; do not pass position_ids")
        if token_type_ids is not None and bool(token_type_ids.any()):
            raise ValueError("token_type_ids are not supported with prompt methods; drop them from the batch")
        for name in ("past_key_values", "cache"):
            if kwargs.get(name) is not None:
                raise ValueError(f"forward() builds its own {name}; use generate() to decode with a cache")
            kwargs.pop(name, None)
        arranged, cache = self.prepare(input_ids, attention_mask, inputs_embeds, labels, adapter_names, frozen_cache=True)
        base_kwargs = self.base_kwargs(arranged, cache)
        if arranged.labels is not None and kwargs.get("logits_to_keep") in (None, 0) and self.loss_only:
            return self._loss_only_forward(base_kwargs, arranged.labels, kwargs)
        return self.base_model(**base_kwargs, labels=arranged.labels, use_cache=False, **kwargs)

    # Set True (softprompt's trainer does) to skip the LM head where no label follows: the virtual tokens
    # and the masked prompt. Same loss and gradients; `logits` then cover only the kept last positions.
    loss_only: bool = False

    def _loss_only_forward(self, base_kwargs: dict, labels: torch.Tensor, kwargs: dict):
        base = self.base_model
        if not accepts(base, "logits_to_keep"):
            return base(**base_kwargs, labels=labels, use_cache=False, **kwargs)
        shift_labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), -100)], dim=1)  # (B, T)
        has_label = (shift_labels != -100).any(dim=0).nonzero()
        T = labels.shape[1]
        keep = T - int(has_label[0]) if has_label.numel() else 1
        kwargs = dict(kwargs, logits_to_keep=keep)
        num_items = kwargs.pop("num_items_in_batch", None)
        out = base(**base_kwargs, use_cache=False, **kwargs)
        out.loss = base.loss_function(
            logits=out.logits, labels=None, shift_labels=shift_labels[:, T - keep :].contiguous(),
            vocab_size=out.logits.shape[-1], num_items_in_batch=num_items,
        )
        return out

    def _packed_forward(self, input_ids, inputs_embeds, packing: dict, adapter_names, kwargs: dict):
        """One forward over packed rows (see `packing.py`); no host-device sync."""
        if isinstance(adapter_names, str) or adapter_names is None:
            adapter_names = [adapter_names if adapter_names is not None else self.active_adapter]
        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)  # (R, T, D)
        dtype = inputs_embeds.dtype
        names = list(adapter_names)
        for n in names:
            if n is not None:
                self._check_adapter(n)
        adapters = [self.prompt_encoder[n] if n is not None else None for n in names]
        virtual = [a.input_embeddings() for a in adapters if a is not None and a.placement == "input"]
        if virtual:  # each segment's virtual slots take rows of the adapters' prompts, stacked in `names` order
            table = torch.cat(virtual).to(dtype)  # (sum V, D)
            slot = packing["virtual_slot"]
            inputs_embeds = torch.where((slot >= 0)[..., None], table[slot.clamp(min=0)], inputs_embeds)
        cache = None
        kvs = [a.key_values() for a in adapters if a is not None and a.placement == "prefix"]
        if kvs:
            kv = torch.cat(kvs, dim=3).to(dtype)  # (layers, 2, kv_heads, K, head_dim)
            kv = kv[:, :, None].expand(-1, -1, inputs_embeds.shape[0], -1, -1, -1)
            if kv.requires_grad and reentrant_checkpointing(self.base_model):
                kv, inputs_embeds = route_prefix_grad(kv, inputs_embeds)
            cache = build_prefix_cache(self.config, kv, frozen=True)
        mask = packed_mask(
            packing["segment_ids"], packing["position_ids"], packing["token_adapter"], packing["prefix_owner"],
            packing["prefix_positions"], sliding_window(self.config),
        )
        hidden = packed_hidden_states(
            self.base_model, inputs_embeds, mask, packing["position_ids"], packing["prefix_positions"], cache,
            packing.get("longest"),
        )
        index, targets = packing["loss_index"], packing["loss_targets"]
        logits = head_logits(self.base_model, hidden.reshape(-1, hidden.shape[-1]).index_select(0, index))
        num_items = kwargs.get("num_items_in_batch")
        if num_items is None:
            num_items = max(int(index.numel()), 1)
        loss = nn.functional.cross_entropy(logits.float(), targets, reduction="sum") / num_items
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    # -- generation and files (kept in their own modules) -----------------------------------------
    @torch.no_grad()
    def generate(self, input_ids=None, attention_mask=None, adapter_names=None, **kwargs) -> torch.Tensor:
        return generate(self, input_ids=input_ids, attention_mask=attention_mask, adapter_names=adapter_names, **kwargs)

    def save_pretrained(self, save_directory: str, selected_adapters: list[str] | None = None, **_trainer_kwargs) -> None:
        """peft's layout: `default` in the folder, other adapters in `<name>/` subfolders.

        Keyword arguments that `Trainer` passes (`state_dict`, `safe_serialization`, ...) are accepted
        and not needed: the adapter's own parameters are what is saved.
        """
        if _trainer_kwargs.get("is_main_process", True) is False:
            return
        files.save_adapters(self, save_directory, selected_adapters)

    @classmethod
    def from_pretrained(
        cls,
        model: nn.Module,
        model_id: str,
        adapter_name: str = "default",
        is_trainable: bool = False,
        config: PromptLearningConfig | None = None,
        **kwargs,
    ) -> "PeftModel":
        """Load an adapter folder (softprompt's or peft's) or hub id onto `model`.

        `is_trainable=True` loads it for further training, for every method: the P-Tuning encoder and the
        prefix projection come back from `model.safetensors` when present (peft raises here).
        """
        adapter = files.load_adapter(model, model_id, adapter_name=adapter_name, config=config, **kwargs)
        wrapper = cls.__new__(cls)
        wrapper._wrap(model)
        wrapper._attach(adapter_name, adapter)
        adapter.requires_grad_(is_trainable)
        if not is_trainable:
            wrapper.eval()
        return wrapper

    def load_adapter(self, model_id: str, adapter_name: str, is_trainable: bool = False, **kwargs) -> None:
        if adapter_name in self.prompt_encoder:
            raise ValueError(f"an adapter named {adapter_name!r} already exists; pick another name")
        adapter = files.load_adapter(self.base_model, model_id, adapter_name=adapter_name, **kwargs)
        self._attach(adapter_name, adapter)
        adapter.requires_grad_(is_trainable)


PeftModelForCausalLM = PeftModel


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


def get_peft_model(model: nn.Module, peft_config: PromptLearningConfig, adapter_name: str = "default", tokenizer=None) -> PeftModel:
    """Wrap `model` (frozen) with a new trainable adapter: peft's entry point."""
    if isinstance(model, PeftModel):
        warnings.warn("get_peft_model() got a PeftModel; adding the adapter to it instead of wrapping twice")
        model.add_adapter(adapter_name, peft_config, tokenizer=tokenizer)
        return model
    return PeftModel(model, peft_config, adapter_name=adapter_name, tokenizer=tokenizer)
