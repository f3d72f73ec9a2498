"""Where a training step's time goes: torch.profiler over a few steps of `softprompt train`, as bench_epoch runs it.

    python bench/profile_step.py --data .bench/alpaca_chinese_52k.jsonl.gz --tokenizer .bench/smollm2-tokenizer \
        --shape bloom-1b4-zh --method prompt_tuning --batch 32 [--seed-recipe] [--steps 5]

Prints the operators that take the most device time (CPU time on a machine without a GPU), and the wall time of
a step against the device time the profiler saw: a step whose device time is far below its wall time is bound
by the host (launches, Python, syncs), not by the GPU. Writes $OUT/profile_step.json (a Chrome trace).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from transformers import TrainerCallback

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_epoch import CUDA, SHAPES, make_model_folder, softprompt_run, sync  # noqa: E402


class Profiler(TrainerCallback):
    """Starts the profiler after `warm` steps and stops it `steps` steps later."""

    def __init__(self, warm: int, steps: int):
        self.warm, self.steps, self.prof, self.t0, self.wall = warm, steps, None, None, None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warm:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
            self.prof = profile(activities=activities)
            sync()
            self.prof.__enter__()
            self.t0 = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and self.wall is None and state.global_step == self.warm + self.steps:
            sync()
            self.wall = (time.perf_counter() - self.t0) / self.steps
            self.prof.__exit__(None, None, None)


class PythonProfiler(Profiler):
    """The same steps under cProfile: host time by Python function (the profiler's own cost included)."""

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.warm:
            import cProfile

            sync()
            self.prof = cProfile.Profile()
            self.t0 = time.perf_counter()
            self.prof.enable()

    def on_step_end(self, args, state, control, **kwargs):
        if self.prof is not None and self.wall is None and state.global_step == self.warm + self.steps:
            self.prof.disable()
            sync()
            self.wall = (time.perf_counter() - self.t0) / self.steps


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", required=True)
    ap.add_argument("--tokenizer", required=True)
    ap.add_argument("--shape", default="bloom-1b4-zh", choices=list(SHAPES))
    ap.add_argument("--method", default="prompt_tuning")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seed-recipe", action="store_true", help="examples/<method>.yaml as shipped (batch 1 x 8)")
    ap.add_argument("--warm", type=int, default=20)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--models", default="/tmp/bench-models")
    ap.add_argument("--compile", default="auto")
    ap.add_argument("--cuda-graphs", default="auto")
    ap.add_argument("--cprofile", action="store_true",
                    help="Python's profiler over the same steps instead: where the host's time goes, by function")
    ap.add_argument("--no-cudnn-sdp", action="store_true", help="attention without cuDNN's kernels (an experiment)")
    args = ap.parse_args()
    if args.no_cudnn_sdp:
        torch.backends.cuda.enable_cudnn_sdp(False)
    folder = make_model_folder(args.shape, args.tokenizer, Path(args.models))
    out = Path("/tmp/profile-step")
    total = args.warm + args.steps
    keys = {"compile": args.compile, "cuda_graphs": args.cuda_graphs}
    if args.seed_recipe:
        trainer, _ = softprompt_run(f"{args.method}.yaml", args.method, folder, args.data, out, total, **keys)
    else:
        keys.update(per_device_train_batch_size=args.batch, gradient_accumulation_steps=1)
        trainer, _ = softprompt_run(None, args.method, folder, args.data, out, total, **keys)
    profiler = (PythonProfiler if args.cprofile else Profiler)(args.warm, args.steps)
    trainer.add_callback(profiler)
    trainer.train()
    if args.cprofile:
        import pstats

        pstats.Stats(profiler.prof).sort_stats("cumulative").print_stats(45)
        pstats.Stats(profiler.prof).sort_stats("tottime").print_stats(25)
        print(f"wall {1000 * profiler.wall:.1f} ms/step under cProfile")
        return
    prof = profiler.prof
    sort = "self_cuda_time_total" if CUDA else "self_cpu_time_total"
    print(prof.key_averages().table(sort_by=sort, row_limit=25), flush=True)
    if CUDA:  # and where the host's time goes, by operator
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25), flush=True)
    events = prof.key_averages()
    device_us = sum(e.self_device_time_total for e in events) if CUDA else 0
    print(f"wall {1000 * profiler.wall:.1f} ms/step; device busy {device_us / 1000 / args.steps:.1f} ms/step "
          f"({args.shape}, {args.method}, {'seed recipe' if args.seed_recipe else f'batch {args.batch}'})")
    out_dir = Path(os.environ.get("OUT", "."))
    out_dir.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out_dir / "profile_step.json"))


if __name__ == "__main__":
    main()
