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

    stacked: torch.Tensor | None = None  # (layers, 2, B, kv_heads, P, head_dim): every layer's prefix

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        if self.stacked is not None:
            prefix = self.stacked[layer_idx]
            return torch.cat([prefix[0], key_states], dim=-2), torch.cat([prefix[1], value_states], dim=-2)
        layer = self.layers[layer_idx]
        return torch.cat([layer.keys, key_states], dim=-2), torch.cat([layer.values, value_states], dim=-2)


def empty_cache(model_config) -> DynamicCache:
    """A cache for decoding with no prefix (`config=` so that sliding-window layers are built as such)."""
    return DynamicCache(config=model_config)


def build_prefix_cache(model_config, key_values: torch.Tensor, *, frozen: bool) -> DynamicCache:
    """A cache holding `key_values` `(layers, 2, B, kv_heads, P, head_dim)` as every layer's past.

    `frozen=True` for a single forward (training, scoring); `frozen=False` to keep decoding on it.
    """
    cache = (FrozenPrefixCache if frozen else DynamicCache)(config=model_config)
    for layer_idx in range(key_values.shape[0]):
        DynamicCache.update(cache, key_values[layer_idx, 0], key_values[layer_idx, 1], layer_idx)
    if frozen and all(layer.keys.shape[-2] == key_values.shape[-2] for layer in cache.layers):
        # one tensor indexed by the layer: a compiled layer then serves every layer (`compile_layers`);
        # not where a sliding-window layer kept only the prefix's last keys
        cache.stacked = key_values
    return cache


class _RoutePrefixGrad(torch.autograd.Function):
    """Identity on the input embeddings; its backward hands the detached prefix's gradient to the prefix graph.

    Reentrant checkpointing back-propagates each layer in its own backward call. A prefix that enters the
    layers through the cache would then be traversed once per layer, and the second traversal finds the
    prefix graph freed. So the layers get a detached leaf; they accumulate its gradient, and this node,
    which runs after every layer (it sits below layer 0), passes the sum on in one go.
    """

    @staticmethod
    def forward(ctx, embeds: torch.Tensor, key_values: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
        ctx.leaf = leaf
        return embeds.view_as(embeds)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        leaf_grad = ctx.leaf.grad
        return grad, torch.zeros_like(ctx.leaf) if leaf_grad is None else leaf_grad, None


def route_prefix_grad(key_values: torch.Tensor, embeds: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix leaf for the cache, embeddings to feed the model) under reentrant gradient checkpointing."""
    leaf = key_values.detach().requires_grad_(True)
    return leaf, _RoutePrefixGrad.apply(embeds, key_values, leaf)


def reentrant_checkpointing(model) -> bool:
    """Whether `model`'s layers are checkpointed (training mode) with torch's reentrant checkpoint."""
    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) and module.training:
            func = getattr(module, "_gradient_checkpointing_func", None)
            if func is not None:
                return bool(getattr(func, "keywords", {}).get("use_reentrant", True))
    return False


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
