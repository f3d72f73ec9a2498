"""The same `softprompt train` run packed and padded: the loss of every optimizer step side by side.

Two processes of `softprompt train CONFIG` with the same overrides, one with `packing: true` (the default) and
one with `packing: false` (Trainer's padded micro-batches), each writing its `trainer_log.jsonl`; then the
logged loss of every step compared (the step's mean token loss in both: the packed step divides by the whole
step's label tokens, as Trainer does with `num_items_in_batch`). Also each run's training seconds.

    python bench/packed_vs_padded.py examples/prompt_tuning.yaml --model builtin:smollm2-135m \\
        --data ../shared/data/llama-factory/alpaca_en_demo.json --max_steps 200 [--out results.json]

Any `--key value` after the config goes to both runs (`logging_steps 1`, `save_strategy no` and `val_size 0` are
added unless given). `--noise key=value,...` adds a third run, padded with those keys changed (say
`per_device_train_batch_size=2,gradient_accumulation_steps=4`: the same rows a step, padded differently), compared
with the padded run the same way: how far two runs apart only in rounding drift, the noise to judge packing by.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def run(config: str, overrides: list[str], packing: bool, out_dir: Path) -> dict:
    cmd = [sys.executable, "-m", "softprompt", "train", config, *overrides, "--output_dir", str(out_dir),
           "--packing", "true" if packing else "false"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    log = [json.loads(line) for line in (out_dir / "trainer_log.jsonl").read_text().splitlines()]
    steps = [r for r in log if "loss" in r]
    return {"train_s": round(steps[-1]["elapsed_s"], 1), "losses": [r["loss"] for r in steps]}


def compare(a: list[float], b: list[float]) -> dict:
    """How far the losses `a` are from `b`, step by step (relative to `b`)."""
    if len(a) != len(b):
        raise SystemExit(f"one run logged {len(a)} steps, the other {len(b)}")
    rel = [abs(x - y) / abs(y) for x, y in zip(a, b)]
    worst = max(range(len(rel)), key=rel.__getitem__)
    tenth = max(1, len(a) // 10)
    return {"max_rel_diff": rel[worst], "at_step": worst + 1, "mean_rel_diff": sum(rel) / len(rel),
            "steps_within_1e-5": next((i for i, r in enumerate(rel) if r > 1e-5), len(rel)),
            "rel_diff_first_tenth": max(rel[:tenth]), "rel_diff_last_tenth": max(rel[-tenth:]),
            "mean_loss": [sum(a) / len(a), sum(b) / len(b)],
            "mean_loss_last_tenth": [sum(a[-tenth:]) / tenth, sum(b[-tenth:]) / tenth]}


def main() -> None:
    p = argparse.ArgumentParser(usage=__doc__)
    p.add_argument("config")
    p.add_argument("--out")
    p.add_argument("--noise", default="")
    args, overrides = p.parse_known_args()  # the rest goes to `softprompt train`
    config = args.config
    for key, value in (("logging_steps", "1"), ("save_strategy", "no"), ("val_size", "0")):
        if f"--{key}" not in overrides:
            overrides += [f"--{key}", value]
    noise_overrides = [x for kv in args.noise.split(",") if kv for x in ("--" + kv.partition("=")[0], kv.partition("=")[2])]
    with tempfile.TemporaryDirectory() as tmp:
        packed = run(config, overrides, True, Path(tmp) / "packed")
        padded = run(config, overrides, False, Path(tmp) / "padded")
        other = run(config, overrides + noise_overrides, False, Path(tmp) / "noise") if args.noise else None
    a, b = packed["losses"], padded["losses"]
    summary = {
        "command": " ".join(["python", "bench/packed_vs_padded.py", *sys.argv[1:]]),
        "steps": len(a),
        "packed_vs_padded": compare(a, b),
        "noise_vs_padded": compare(other["losses"], b) if other else None,
        "train_s": {"packed": packed["train_s"], "padded": padded["train_s"], "noise": other and other["train_s"]},
        "speedup": padded["train_s"] / packed["train_s"],
        "losses": {"packed": a, "padded": b, "noise": other and other["losses"]},
    }
    brief = {k: v for k, v in summary.items() if k != "losses"}
    print(json.dumps(brief, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1) + "\n")


if __name__ == "__main__":
    main()
