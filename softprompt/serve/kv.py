"""`SlotStore`: the running sequences' keys and values, one slot per sequence, preallocated.

Per layer `(slots, kv_heads, capacity, head_dim)`. Slot `i` holds its sequence's keys left-aligned,
`[prefix or virtual tokens][prompt][generated]` with no padding between them: a sequence's keys do not
move while it decodes, and sequences join or leave without touching the others. A decoding step sees
the store through `SlotCache` (`hf/slot_cache.py`), a transformers `Cache` whose layers write each row's
new key at that row's own column and hand the attention the block `[:batch, :, :width]`; columns past a
row's length are masked out.

    slot 0: [P P P P p p p p g g]        P: prefix / virtual token, p: prompt, g: generated
    slot 1: [v v p p p g . . . .]        '.': masked (past this row's length)
"""

from __future__ import annotations

import torch


class SlotStore:
    def __init__(self, max_slots: int, max_length: int):
        self.max_slots = max_slots
        self.max_length = max_length
        self.keys: list[torch.Tensor] = []  # per layer (slots, H, capacity, hd)
        self.values: list[torch.Tensor] = []

    @property
    def slots(self) -> int:
        return self.keys[0].shape[0] if self.keys else 0

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2] if self.keys else 0

    def reserve(self, slots: int, length: int, like: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Room for `slots` sequences of `length` keys; grows by doubling (up to the limits), keeping contents."""
        if slots <= self.slots and length <= self.capacity:
            return
        if slots > self.max_slots or length > self.max_length:
            raise ValueError(f"the key/value store holds {self.max_slots} x {self.max_length}; asked {slots} x {length}")
        new_slots = min(self.max_slots, max(slots, 2 * self.slots))
        new_cap = min(self.max_length, max(length, 2 * self.capacity, 64))
        old_k, old_v = self.keys, self.values
        self.keys, self.values = [], []
        for i, (k, v) in enumerate(like):
            nk = k.new_zeros(new_slots, k.shape[1], new_cap, k.shape[3])
            nv = v.new_zeros(new_slots, v.shape[1], new_cap, v.shape[3])
            if old_k:
                s, c = old_k[i].shape[0], old_k[i].shape[2]
                nk[:s, :, :c] = old_k[i]
                nv[:s, :, :c] = old_v[i]
            self.keys.append(nk)
            self.values.append(nv)

    def write_prefill(self, first_slot: int, layers: list[tuple[torch.Tensor, torch.Tensor]], mask: torch.Tensor) -> list[int]:
        """Store a prefilled group's keys (`(n, H, T, hd)` per layer, masked by `mask` `(n, T)`) in slots
        `first_slot ..`, dropping the masked columns; returns each row's length."""
        n, T = mask.shape
        lengths = mask.sum(dim=1)
        cols = torch.arange(T, device=mask.device)
        width = int(lengths.max())
        order = torch.where(mask.bool(), cols, cols + T).argsort(dim=1)[:, :width]  # real columns first, in order
        self.reserve(first_slot + n, width, layers)
        for i, (k, v) in enumerate(layers):
            index = order[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[3])
            self.keys[i][first_slot : first_slot + n, :, :width] = k.gather(2, index)
            self.values[i][first_slot : first_slot + n, :, :width] = v.gather(2, index)
        return lengths.tolist()

    def move(self, src: int, dst: int, length: int) -> None:
        for k, v in zip(self.keys, self.values):
            k[dst, :, :length] = k[src, :, :length]
            v[dst, :, :length] = v[src, :, :length]
