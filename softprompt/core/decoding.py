"""The two base-model calls every decoder makes: the prefill of a group of prompts, and one decoding step.

`generate` (`generation.py`) and the serving engine (`serve/engine.py`, its CUDA graphs in `serve/graphs.py`)
both decode through these, so the arguments the base model gets (the cache's keyword, positions where the
model takes them, the last position's logits only) are built in one place.
"""

from __future__ import annotations

import torch

from softprompt.hf.cache import accepts, cache_kwarg, empty_cache, output_cache


def prefill(model, input_ids: torch.Tensor | None, attention_mask: torch.Tensor | None,
            inputs_embeds: torch.Tensor | None, adapter_names) -> tuple[torch.Tensor, object, object]:
    """The prompts, laid out with each row's adapter (`PeftModel.prepare`), through the base model.

    Returns the last position's logits `(B, vocab)`, the cache that holds every position's keys (virtual
    tokens and prefixes included) and the arranged inputs (their `attention_mask` and `position_ids` say
    where each row's keys are).
    """
    base = model.base_model
    arranged, cache = model.prepare(input_ids, attention_mask, inputs_embeds, None, adapter_names, frozen_cache=False)
    kwargs = model.base_kwargs(arranged, cache if cache is not None else empty_cache(model.config))
    if accepts(base, "logits_to_keep"):
        kwargs["logits_to_keep"] = 1
    out = base(**kwargs, use_cache=True)
    return out.logits[:, -1], output_cache(out), arranged


def decode_step(base, tokens: torch.Tensor, attention_mask: torch.Tensor, cache,
                positions: torch.Tensor) -> tuple[torch.Tensor, object]:
    """One new token per row (`tokens`, `positions`: `(B, 1)`) through `base` on `cache`.

    Returns the logits `(B, vocab)` and the cache the model returned (the same object for softprompt's caches).
    """
    kwargs = {"input_ids": tokens, "attention_mask": attention_mask, cache_kwarg(base): cache}
    if accepts(base, "position_ids"):
        kwargs["position_ids"] = positions
    out = base(**kwargs, use_cache=True)
    return out.logits[:, -1], output_cache(out)
