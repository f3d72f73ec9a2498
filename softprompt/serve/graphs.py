"""`DecodeGraphs`: decoding steps replayed from CUDA graphs, so that a step costs one launch, not hundreds.

At batch 64 a 24-layer model's decoding step is bound by Python and kernel launches, not the GPU. Here the
base model's whole forward for one new token per row is captured once per (batch bucket, width bucket)
and replayed: batch buckets 1, 2, 4, 8, 16, 32, 48, 64, ...; width buckets 64, 128, 256, ... up to the
store's capacity, so that a step reads the keys of the longest running sequence rounded up, not the
whole store. Inputs go into static buffers; columns past a row's length are masked; rows past the real
batch are padding that write into free slots only. A model whose forward cannot be captured (a host sync inside) falls back to the
ordinary path, once, with a warning.

transformers' eager mask (BLOOM, and any model on eager attention) makes its 0 with
`torch.tensor(0.0, device=...)`, a host-to-device copy that a capture refuses; `capturable_masks()` (`hf/masks.py`) swaps
in the same mask built from device ops alone, for the capture only.
"""

from __future__ import annotations

import logging

import torch

from softprompt.core.decoding import decode_step
from softprompt.hf.masks import capturable_masks
from softprompt.hf.slot_cache import SlotCache
from softprompt.serve.kv import SlotStore

log = logging.getLogger("softprompt.serve")


def buckets(max_batch: int) -> list[int]:
    sizes = [1, 2, 4, 8, 16, 32] + list(range(48, max_batch + 16, 16))
    return sorted({min(s, max_batch) for s in sizes})


def widths(capacity: int) -> list[int]:
    sizes, w = [], 64
    while w < capacity:
        sizes.append(w)
        w *= 2
    return sizes + [capacity]


class DecodeGraphs:
    def __init__(self, base, store: SlotStore, capture: bool = True):
        self.base, self.store = base, store
        self.capture = capture  # False: run the same padded full-capacity step eagerly (CPU tests of the logic)
        self.buckets = buckets(store.max_slots)
        self.widths = widths(store.max_length)
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self.pool = None
        self.failed = False
        self._store_ptr = -1  # the store tensors the graphs were captured on

    def _buffers(self) -> None:
        device = self.store.keys[0].device
        S, C = self.store.slots, self.store.capacity
        self.tokens = torch.zeros(S, 1, dtype=torch.long, device=device)
        self.columns = torch.zeros(S, dtype=torch.long, device=device)
        self.arange = torch.arange(C, device=device)
        self.graphs.clear()
        self._store_ptr = self.store.keys[0].data_ptr()

    def _forward(self, bucket: int, width: int) -> torch.Tensor:
        columns = self.columns[:bucket]
        mask = (self.arange[None, :width] <= columns[:, None]).long()  # (bucket, width)
        cache = SlotCache(self.store, bucket, columns, width)
        return decode_step(self.base, self.tokens[:bucket], mask, cache, columns[:, None])[0]

    def _capture(self, bucket: int, width: int) -> None:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with capturable_masks():
            with torch.cuda.stream(side):  # warm-up: the same writes the real step makes, so harmless
                self._forward(bucket, width)
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            if self.pool is None:
                self.pool = torch.cuda.graph_pool_handle()
            with torch.cuda.graph(graph, pool=self.pool):
                logits = self._forward(bucket, width)
        self.graphs[bucket, width] = (graph, logits)

    def run(self, tokens: list[int], lengths: list[int]) -> torch.Tensor | None:
        """Last-position logits `(B, vocab)` for one decoding step, or None to take the ordinary path.

        Needs the store at its full size (slots and capacity), and rows `B..bucket` free.
        """
        if self.failed or self.store.slots < self.store.max_slots or self.store.capacity < self.store.max_length:
            return None
        if self._store_ptr != self.store.keys[0].data_ptr():
            self._buffers()
        B = len(tokens)
        bucket = next(b for b in self.buckets if b >= B)
        width = next(w for w in self.widths if w > max(lengths))  # the new keys go at columns `lengths`
        host = torch.zeros(2, bucket, dtype=torch.long)
        host[0, :B] = torch.tensor(tokens)
        host[1, :B] = torch.tensor(lengths)  # padding rows: token 0 at column 0 of a free slot
        host = host.to(self.tokens.device, non_blocking=False)
        self.tokens[:bucket, 0] = host[0]
        self.columns[:bucket] = host[1]
        if not self.capture:
            return self._forward(bucket, width)[:B]
        if (bucket, width) not in self.graphs:
            try:
                self._capture(bucket, width)
            except Exception as err:  # e.g. a host sync inside the model's forward
                log.warning("CUDA graph capture failed (%s: %s); decoding without graphs", type(err).__name__, err)
                self.failed = True
                self.graphs.clear()
                return None
        graph, logits = self.graphs[bucket, width]
        graph.replay()
        return logits[:B]
