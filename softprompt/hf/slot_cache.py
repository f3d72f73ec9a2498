"""`SlotCache`: the serving engine's slot store (`serve/kv.py::SlotStore`) seen as a transformers `Cache`.

One decoding step, one new token per row: layer `l`'s `update()` writes row `i`'s new key and value at column
`columns[i]` of slot `i` in place, and hands the attention the block `[:batch, :, :width]`; the caller's mask
hides the columns past each row's length. It implements transformers' `CacheLayerMixin` (what a layer must
answer for the mask and the attention), so it is checked here on a transformers bump.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


class SlotLayer(CacheLayerMixin):
    """One layer's view of the store for a decoding step (one new token per row)."""

    is_sliding = False
    is_compileable = True  # tells transformers to build the mask without inspecting it (no host sync)

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, columns: torch.Tensor, width: int):
        super().__init__()
        self.store_k, self.store_v = keys, values
        self.rows, self.columns, self.width = rows, columns, width
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        assert key_states.shape[2] == 1, "SlotCache decodes one token per row"
        B = key_states.shape[0]
        self.store_k[self.rows, :, self.columns] = key_states[:, :, 0]  # (B, H, hd) at (row, column)
        self.store_v[self.rows, :, self.columns] = value_states[:, :, 0]
        self.keys = self.store_k[:B, :, : self.width]
        self.values = self.store_v[:B, :, : self.width]
        return self.keys, self.values

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.width, 0

    def get_seq_length(self) -> int:
        return self.width - 1

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The store's first `batch` slots as a transformers `Cache`: row `i` writes its new key at `columns[i]`."""

    def __init__(self, store, batch: int, columns: torch.Tensor, width: int):
        rows = torch.arange(batch, device=columns.device)
        layers = [SlotLayer(k, v, rows, columns, width) for k, v in zip(store.keys, store.values)]
        super().__init__(layers=layers)
