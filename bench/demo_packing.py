"""`make demo`'s batches, forward and backward: padded, packed in rows of `pack_length`, packed as planned.

The demo's model, data, method and batch (softprompt/demo.py's defaults through `build_trainer`): the same 16
random batches of 8 rows in each of three layouts, each batch run `--repeats` times per layout, the fastest kept
(the CPU machine is shared: the minimum is the least disturbed), then summed. Reports seconds per batch and slots
(text and padding; P-tuning's virtual tokens are slots too in packed rows, and are added inside the model for
padded rows).

    python bench/demo_packing.py [--batches 16] [--repeats 3] [--out bench/results/demo_packing_cpu.json]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from softprompt.data.demo import write_demo_dataset  # noqa: E402
from softprompt.demo import DEFAULTS, LANG_CHOICES  # noqa: E402
from softprompt.train.config import TrainConfig  # noqa: E402
from softprompt.train.trainer import build_trainer  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    langs, model = LANG_CHOICES[DEFAULTS["lang"]]
    with tempfile.TemporaryDirectory() as tmp:
        train_file, _ = write_demo_dataset(Path(tmp) / "data", DEFAULTS["n_train"], DEFAULTS["n_eval"], 0, langs=langs)
        base = {"model": model, "data": str(train_file), "method": DEFAULTS["method"], "max_steps": 1,
                "num_virtual_tokens": DEFAULTS["num_virtual_tokens"], "output_dir": str(Path(tmp) / "out"),
                "per_device_train_batch_size": DEFAULTS["batch_size"], "max_length": 64, "encoder_hidden_size": 128,
                "save_strategy": "no", "eval_strategy": "no", "val_size": 0, "report_to": "none",
                "dataloader_pin_memory": False}
        packed, _, _ = build_trainer(TrainConfig.from_mapping({**base, "packing": True}))
        padded, _, _ = build_trainer(TrainConfig.from_mapping({**base, "packing": False}))
    layouts = {"padded": (padded, padded.data_collator),
               "rows of pack_length": (packed, dataclasses.replace(packed.data_collator, attention_cost=0.0)),
               "planned": (packed, packed.data_collator)}
    data = packed.train_dataset
    rng = random.Random(0)
    batches = [[{k: data[i][k] for k in ("input_ids", "labels")} for i in rng.sample(range(len(data)), DEFAULTS["batch_size"])]
               for _ in range(args.batches)]
    for trainer in (packed, padded):
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which this bench skips
    seconds = dict.fromkeys(layouts, 0.0)
    slots = dict.fromkeys(layouts, 0)
    for batch in batches:
        for name, (trainer, collate) in layouts.items():
            inputs = collate(batch)
            slots[name] += sum(pack["input_ids"].numel() for pack in inputs.get("packs", [inputs]))
            best = float("inf")
            for _ in range(args.repeats):
                start = time.perf_counter()
                trainer.training_step(trainer.model, inputs)
                best = min(best, time.perf_counter() - start)
            seconds[name] += best
    result = {name: {"s_per_batch": round(seconds[name] / args.batches, 4), "slots_per_batch": slots[name] / args.batches,
                     "speed_up_over_padded": round(seconds["padded"] / seconds[name], 3)} for name in layouts}
    result["meta"] = {"model": model, "batches": args.batches, "repeats": args.repeats}
    print(json.dumps(result, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
