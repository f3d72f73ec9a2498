"""The key/value prefix as a transformers `Cache`: the one place that knows the Cache API.

peft's prefix tuning has broken with each change of transformers' cache classes (peft #1962, #2821,
transformers #38301). softprompt builds the cache only here, through the public `DynamicCache`
(`config=` to get sliding-window layers right, `update()` per layer), and this module is tested
against every supported model family.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import DynamicCache


class FrozenPrefixCache(DynamicCache):
    """A cache that holds the prefix and never grows.

    `update()` returns prefix + new keys without storing them, so a layer run twice (gradient
    checkpointing recomputes in backward) sees the same keys both times; peft's mutable cache makes
    that a size mismatch, which is why peft refuses gradient checkpointing with prefix tuning.
    """

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def build_prefix_cache(model_config, key_values: torch.Tensor, *, frozen: bool) -> DynamicCache:
    """A cache holding `key_values` `(layers, 2, B, kv_heads, P, head_dim)` as every layer's past.

    `frozen=True` for a single forward (training, scoring); `frozen=False` to keep decoding on it.
    """
    cache = (FrozenPrefixCache if frozen else DynamicCache)(config=model_config)
    for layer_idx in range(key_values.shape[0]):
        DynamicCache.update(cache, key_values[layer_idx, 0], key_values[layer_idx, 1], layer_idx)
    return cache


@lru_cache(maxsize=None)
def _forward_params(model_class: type) -> frozenset[str]:
    return frozenset(inspect.signature(model_class.forward).parameters)


def cache_kwarg(model) -> str:
    """The name of the forward argument that takes the cache: `cache` (transformers >= 5.2x) or `past_key_values`."""
    params = _forward_params(type(model))
    return "cache" if "cache" in params else "past_key_values"


def accepts(model, name: str) -> bool:
    """Whether the model's forward takes `name` (BLOOM has no `position_ids`, for instance)."""
    return name in _forward_params(type(model))


def output_cache(outputs):
    """The cache a forward returned, under either name."""
    cache = getattr(outputs, "cache", None)
    return cache if cache is not None else getattr(outputs, "past_key_values", None)
