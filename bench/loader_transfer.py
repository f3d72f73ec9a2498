"""What a packed batch costs the training process when loader workers make it: one storage a micro-batch or twelve.

A DataLoader worker hands each tensor storage to the training process through a file descriptor sent over a
socket, with a handshake each. `PackingCollator` puts a micro-batch's twelve tensors in one storage
(`packing._one_storage`); this times the loader's batches as the trainer's process receives them (no model), the
seed's recipe (8 rows a step, rows of 278 slots, fixed shapes as on a GPU), both ways, on the real rows:

    python bench/loader_transfer.py --data ../shared/data/alpaca-chinese-dataset/alpaca_chinese_52k.jsonl.gz \
        --tokenizer .bench/smollm2-tokenizer [--workers 2] [--batches 400]

Prints ms per batch received (the loader's own throughput included) for: collating in the training process,
workers with one storage a micro-batch, workers with a storage per tensor.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from softprompt.core.packing import PackingCollator, PromptWidths  # noqa: E402
from softprompt.data.rows import ColumnMap  # noqa: E402
from softprompt.data.token_cache import tokenized_rows  # noqa: E402


class StoragePerTensor:
    """The collator's batches with every tensor in a storage of its own (as before `_one_storage`)."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, features):
        out = self.collator(features)
        for pack in out["packs"]:
            for d in (pack, pack["packing"]):
                for k, v in d.items():
                    if isinstance(v, torch.Tensor):
                        d[k] = v.clone()
        return out


def ms_per_batch(rows, collate, workers: int, batches: int) -> float:
    loader = DataLoader(rows, batch_size=8, shuffle=True, collate_fn=collate, num_workers=workers,
                        persistent_workers=workers > 0)
    it = iter(loader)
    for _ in range(20):
        next(it)
    t = time.perf_counter()
    for _ in range(batches):
        next(it)
    return round((time.perf_counter() - t) / batches * 1000, 3)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batches", type=int, default=400)
    args = ap.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    rows, _ = tokenized_rows(args.data, ColumnMap(), tokenizer, 256, "alpaca")
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in rows.select(range(4000))]
    widths = PromptWidths({None: 0, "default": 22}, {None: 0, "default": 0}, "default")  # the seed's TEXT init
    collator = PackingCollator(widths, row_length=278, fixed_shapes=True, pad_multiple=16)
    result = {
        "collate_in_process_ms": ms_per_batch(rows, collator, 0, args.batches),
        "workers_one_storage_ms": ms_per_batch(rows, collator, args.workers, args.batches),
        "workers_storage_per_tensor_ms": ms_per_batch(rows, StoragePerTensor(collator), args.workers, args.batches),
        "workers": args.workers, "torch": torch.__version__,
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
