"""`softprompt eval --generate`'s decoding (the serving engine: continuous batching) vs a per-row `generate` loop.

The same greedy answers either way (checked on the rows both decode); the engine's BLEU/ROUGE recomputed with
sacrebleu and rouge-score called directly. On a slow CPU the per-row loop runs on an evenly spaced subset of
`--per-row` rows and its time is scaled to all rows (its cost per row does not depend on the other rows).

    .venv/bin/python bench/bench_eval_generate.py [--rows 200] [--per-row 24] [--max-new-tokens 32] \
        [--out bench/results/bench_eval_generate.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

from softprompt.core.model import PeftModel
from softprompt.data.templates import prompt_text
from softprompt.inference.evaluate import generate_answers
from softprompt.inference.metrics import generation_metrics
from softprompt.io.base_models import load_base
from softprompt.serve.engine import Engine

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from inference.test_metrics import package_scores  # noqa: E402  sacrebleu and rouge-score called directly

ZH = "../shared/data/llama-factory/alpaca_zh_demo.json"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="builtin:smollm2-135m")
    ap.add_argument("--data", default=ZH)
    ap.add_argument("--rows", type=int, default=200)
    ap.add_argument("--per-row", type=int, default=24, help="rows the per-row loop decodes (evenly spaced)")
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--out", default="bench/results/bench_eval_generate.json")
    args = ap.parse_args()

    rows = json.load(open(args.data, encoding="utf-8"))[: args.rows]
    base, tokenizer = load_base(args.model)
    prompts = [prompt_text(tokenizer, "alpaca", r["instruction"], r["input"]) for r in rows]
    references = [r["output"] for r in rows]
    T = args.max_new_tokens

    engine = Engine(PeftModel.empty(base).eval(), tokenizer, max_num_seqs=args.max_num_seqs)
    start, cpu = time.perf_counter(), time.process_time()
    batched = engine.answer(prompts, T)
    engine_s, engine_cpu = time.perf_counter() - start, time.process_time() - cpu
    print(f"engine: {len(rows)} rows in {engine_s:.1f} s ({engine_cpu:.1f} s of CPU)", flush=True)

    step = max(1, len(rows) // args.per_row)
    subset = list(range(0, len(rows), step))[: args.per_row]
    start, cpu = time.perf_counter(), time.process_time()
    single = [generate_answers(base, tokenizer, [prompts[i]], max_new_tokens=T, batch_size=1)[0] for i in subset]
    per_row_s, per_row_cpu = time.perf_counter() - start, time.process_time() - cpu
    per_row_all_s = per_row_s / len(subset) * len(rows)
    print(f"per-row: {len(subset)} rows in {per_row_s:.1f} s -> {per_row_all_s:.1f} s for {len(rows)}", flush=True)

    ours = generation_metrics(batched, references)
    theirs = package_scores(batched, references)
    result = {
        "model": args.model, "rows": len(rows), "max_new_tokens": T, "max_num_seqs": args.max_num_seqs,
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "engine_s": round(engine_s, 2), "per_row_rows": len(subset), "per_row_s": round(per_row_s, 2),
        "per_row_scaled_s": round(per_row_all_s, 2), "speedup": round(per_row_all_s / engine_s, 2),
        # CPU seconds of this process: less moved by other processes on a shared machine than wall time
        "engine_cpu_s": round(engine_cpu, 2), "per_row_cpu_s": round(per_row_cpu, 2),
        "cpu_speedup": round(per_row_cpu / len(subset) * len(rows) / engine_cpu, 2),
        "same_answers_on_subset": sum(batched[i] == a for i, a in zip(subset, single)), "subset": len(subset),
        "metrics": ours, "package_metrics": theirs, "metrics_equal": ours == theirs,
    }
    print(json.dumps(result, ensure_ascii=False, indent=1))
    with open(args.out, "w", encoding="utf-8") as f:
        json.dump(result, f, ensure_ascii=False, indent=1)


if __name__ == "__main__":
    main()
