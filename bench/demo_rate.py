"""The demo's training (`softprompt demo`'s data, steps, batch, warm-up) for any method and rate: exact match after.

Unlike the demo, encoders keep the method's default width (the projection as wide as the keys and values), as
`softprompt train` builds them: what is checked is the training default, not the demo's small 128-wide encoder.

`make demo` trains P-tuning; this trains what the demo would train with another method, rate or warm-up, to check a
default there (docs/TRAINING.md: prefix tuning with projection at 3e-3 against the demo sweep's divergence).

    python bench/demo_rate.py --method prefix_tuning --prefix_projection --learning_rate 3e-3 [--warmup 0.05] [--steps 200]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from softprompt.core.model import PeftModel  # noqa: E402
from softprompt.data.demo import write_demo_dataset  # noqa: E402
from softprompt.data.rows import load_rows  # noqa: E402
from softprompt.demo import DEFAULTS, LANG_CHOICES  # noqa: E402
from softprompt.inference.evaluate import evaluate  # noqa: E402
from softprompt.io.base_models import load_base  # noqa: E402
from softprompt.train.config import TrainConfig  # noqa: E402
from softprompt.train.trainer import train  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--method", default=DEFAULTS["method"])
    p.add_argument("--prefix_projection", action="store_true")
    p.add_argument("--learning_rate", type=float, help="default: softprompt's for the method")
    p.add_argument("--warmup", type=float, default=0.05, help="the demo's warm-up share (0.05)")
    p.add_argument("--steps", type=int, default=DEFAULTS["max_steps"])
    p.add_argument("--lang", choices=list(LANG_CHOICES), default=DEFAULTS["lang"])
    p.add_argument("--out", help="append the result as a JSON line here")
    args = p.parse_args()
    langs, model = LANG_CHOICES[args.lang]
    with tempfile.TemporaryDirectory() as tmp:
        train_file, eval_file = write_demo_dataset(Path(tmp) / "data", DEFAULTS["n_train"], DEFAULTS["n_eval"], 0,
                                                   langs=langs)
        settings = {"model": model, "data": str(train_file), "method": args.method,
                    "num_virtual_tokens": DEFAULTS["num_virtual_tokens"], "output_dir": str(Path(tmp) / "adapter"),
                    "max_steps": args.steps, "per_device_train_batch_size": DEFAULTS["batch_size"],
                    "logging_steps": 10, "save_strategy": "no", "eval_strategy": "no", "seed": 0, "max_length": 64,
                    "dataloader_pin_memory": False, "warmup_steps": args.warmup, "packing": True}
        if args.prefix_projection:
            settings["prefix_projection"] = True
        if args.learning_rate is not None:
            settings["learning_rate"] = args.learning_rate
        start = time.time()
        result = train(TrainConfig.from_mapping(settings), num_samples=0)
        base, tokenizer = load_base(model)
        after = evaluate(PeftModel.from_pretrained(base, settings["output_dir"]), tokenizer, load_rows(eval_file),
                         loss=False)
    row = {**{k: v for k, v in vars(args).items() if k != "out"}, "train_loss": result.metrics.get("train_loss"),
           "exact_match": after.exact_match, "seconds": round(time.time() - start)}
    print(json.dumps(row), flush=True)
    if args.out:
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
