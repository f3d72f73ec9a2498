"""transformers' attention-mask registry: an eager mask that CUDA graph capture can record.

transformers 5.17's eager mask copies to the host; `capturable_masks()` swaps in `eager_mask` (the same values,
built on the device) while a decode step is captured.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask


def eager_mask(*args, dtype: torch.dtype = torch.float32, **kwargs) -> torch.Tensor | None:
    """transformers' eager mask (0 where attended, the dtype's minimum elsewhere) without a host copy."""
    kwargs.pop("allow_is_causal_skip", None)
    mask = sdpa_mask(*args, allow_is_causal_skip=False, **kwargs)
    if mask is None:
        return None
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, torch.finfo(dtype).min)


@contextmanager
def capturable_masks() -> Iterator[None]:
    """While inside, models on eager attention build their masks with `eager_mask` (this module's)."""
    previous = ALL_MASK_ATTENTION_FUNCTIONS._local_mapping.get("eager")
    ALL_MASK_ATTENTION_FUNCTIONS["eager"] = eager_mask
    try:
        yield
    finally:
        if previous is None:
            del ALL_MASK_ATTENTION_FUNCTIONS["eager"]
        else:
            ALL_MASK_ATTENTION_FUNCTIONS["eager"] = previous
