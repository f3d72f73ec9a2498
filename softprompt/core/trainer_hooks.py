"""`TrainerHooks`: what `transformers.Trainer` calls on a `PeftModel` besides `forward` and `save_pretrained`.

A mixin of `PeftModel`: `load_state_dict` takes the adapter-only `model.safetensors` a checkpoint holds (how
Trainer resumes), and `gradient_checkpointing_enable` (Trainer's `gradient_checkpointing=True`) checkpoints
the base model's layers with the prefix cache kept (`hf/checkpointing.py`), for all three methods.
"""

from __future__ import annotations

from torch.nn.modules.module import _IncompatibleKeys

from softprompt.hf.checkpointing import keep_prefix_cache

ENCODER_PREFIX = "prompt_encoder."  # the state-dict keys of the adapters (`AdapterBank.prompt_encoder`)


class TrainerHooks:
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
