"""`PeftModel`: a frozen Hugging Face causal LM plus a bank of prompt adapters, one chosen per row.

The wrapper asks each row's adapter for virtual-token embeddings and a key/value prefix (`bank.py`),
lays them out with the text (`layout.py`), builds the prefix cache (`hf/cache.py`) and calls the base
model through its public seams (`inputs_embeds=`, `attention_mask=`, `position_ids=`, the cache).
Beside it: the adapter bank (`bank.py`), what Trainer calls to resume and checkpoint (`trainer_hooks.py`),
the packed forward (`packing.py`) and the decoding loop (`generation.py`).

It subclasses `PreTrainedModel` only so that `transformers.Trainer` calls our `save_pretrained` (adapter
files, never the base weights) instead of dumping the full state dict; `PreTrainedModel.__init__` is not
run, so the base model's config is left untouched.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedModel

from softprompt.core.bank import AdapterBank
from softprompt.core.generation import generate
from softprompt.core.layout import Arranged, arrange
from softprompt.core.packing import packed_forward
from softprompt.core.trainer_hooks import TrainerHooks
from softprompt.hf.cache import accepts, build_prefix_cache, cache_kwarg, reentrant_checkpointing, route_prefix_grad
from softprompt.io import files
from softprompt.methods.config import ModelShape, PromptLearningConfig


class PeftModel(AdapterBank, TrainerHooks, PreTrainedModel):
    """A causal LM with prompt adapters. peft's name, so that seed scripts run unchanged."""

    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    _no_split_modules: list[str] = []
    # CUDA graphs of the packed base for training (`packed_graphs.PackedGraphs`); None: the packed base runs eagerly
    packed_graphs = None

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

    def get_nb_trainable_parameters(self) -> tuple[int, int]:
        trainable = total = 0
        for p in self.parameters():
            total += p.numel()
            trainable += p.numel() if p.requires_grad else 0
        return trainable, total

    def print_trainable_parameters(self) -> None:
        trainable, total = self.get_nb_trainable_parameters()
        print(f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}")

    # -- forward ----------------------------------------------------------------------------------
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
        virtual, v_lens, kv, p_lens, width = self.row_prompts(names, inputs_embeds.dtype, device)
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
        loss_only: bool = False,
        **kwargs,
    ):
        """Logits over `V + L` positions (the first `V` are the virtual tokens'), and the loss on `labels`.

        `loss_only=True` (softprompt's trainer passes it) skips the LM head where no label follows (the
        virtual tokens, a masked prompt): the same loss and gradients, and `logits` cover only the kept last
        positions. With `packing=` (what `PackingCollator` makes), the rows are packed segments: the loss is
        over every segment's labels, and `logits` cover only the positions that carry a loss.
        """
        if packing is not None:
            return packed_forward(self, input_ids, inputs_embeds, packing, adapter_names, kwargs)
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
        if loss_only and arranged.labels is not None and kwargs.get("logits_to_keep") in (None, 0):
            return self._loss_only_forward(base_kwargs, arranged.labels, kwargs)
        return self.base_model(**base_kwargs, labels=arranged.labels, use_cache=False, **kwargs)

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
        wrapper = cls.empty(model)
        wrapper._attach(adapter_name, adapter)
        adapter.requires_grad_(is_trainable)
        if not is_trainable:
            wrapper.eval()
        return wrapper


PeftModelForCausalLM = PeftModel


def get_peft_model(model: nn.Module, peft_config: PromptLearningConfig, adapter_name: str = "default", tokenizer=None) -> PeftModel:
    """Wrap `model` (frozen) with a new trainable adapter: peft's entry point."""
    if isinstance(model, PeftModel):
        warnings.warn("get_peft_model() got a PeftModel; adding the adapter to it instead of wrapping twice")
        model.add_adapter(adapter_name, peft_config, tokenizer=tokenizer)
        return model
    return PeftModel(model, peft_config, adapter_name=adapter_name, tokenizer=tokenizer)
