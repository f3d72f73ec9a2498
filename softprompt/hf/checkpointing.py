"""Gradient checkpointing of a base model whose layers read a frozen prefix cache.

transformers drops the cache of checkpointed layers unless they declare they only read it (a private flag on
`GradientCheckpointingLayer`); ours does (`FrozenPrefixCache` never stores: the backward replay sees the same
keys), and decoding runs without grad, where layers are not checkpointed.
"""

from __future__ import annotations

from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer


def keep_prefix_cache(base: nn.Module) -> None:
    """Let `base`'s checkpointed layers take the prefix cache. The layers checkpoint themselves; a flag left on
    the backbone only drops the cache (GPT-2) or use_cache, so it is cleared."""
    layers = [m for m in base.modules() if isinstance(m, GradientCheckpointingLayer)]
    for module in base.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module._can_checkpoint_with_cache = True
        elif layers and getattr(module, "gradient_checkpointing", False):
            module.gradient_checkpointing = False
