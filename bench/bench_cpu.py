"""softprompt vs peft on the CPU: one training step and one generation, same model and batch, one process.

Random-weight models shaped like small real ones (weights do not change speed). Each case alternates
peft and softprompt runs and reports the median, so background load hits both alike.

    .venv/bin/python bench/bench_cpu.py [--steps 7] [--threads 1] [--out bench/results/bench_cpu.json]
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import statistics
import time

import peft
import torch
from transformers import AutoModelForCausalLM, BloomConfig, Qwen2Config

import softprompt as sp

SHAPES = {
    "bloom-small": BloomConfig(vocab_size=46145, hidden_size=256, n_layer=4, n_head=8),
    "qwen2-small-gqa": Qwen2Config(vocab_size=32000, hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                   num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
}


def configs(lib):
    T = lib.TaskType.CAUSAL_LM
    R = lib.PromptEncoderReparameterizationType
    return {
        "prompt-tuning": lib.PromptTuningConfig(task_type=T, num_virtual_tokens=10),
        "p-tuning-mlp": lib.PromptEncoderConfig(task_type=T, num_virtual_tokens=10, encoder_reparameterization_type=R.MLP,
                                                encoder_hidden_size=256),
        "p-tuning-lstm": lib.PromptEncoderConfig(task_type=T, num_virtual_tokens=10, encoder_reparameterization_type=R.LSTM,
                                                 encoder_num_layers=1, encoder_hidden_size=256),
        "prefix": lib.PrefixTuningConfig(task_type=T, num_virtual_tokens=10),
        "prefix-proj": lib.PrefixTuningConfig(task_type=T, num_virtual_tokens=10, prefix_projection=True),
    }


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=7)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--length", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--out", default="bench/results/bench_cpu.json")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared 2-core box)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    rows = []
    for shape_name, cfg in SHAPES.items():
        base = AutoModelForCausalLM.from_config(cfg).eval()
        ids = torch.randint(5, cfg.vocab_size, (args.batch, args.length))
        am = torch.ones_like(ids)
        labels = ids.clone()
        labels[:, : args.length // 2] = -100
        gen_ids = ids[:, :32]
        for method in configs(sp):
            models = {"peft": peft.get_peft_model(copy.deepcopy(base), configs(peft)[method]),
                      "softprompt": sp.get_peft_model(copy.deepcopy(base), configs(sp)[method]),
                      "softprompt_loss_only": sp.get_peft_model(copy.deepcopy(base), configs(sp)[method])}
            for k in ("softprompt", "softprompt_loss_only"):
                models[k].prompt_encoder["default"].load_state_dict(models["peft"].prompt_encoder["default"].state_dict())
            opts = {k: torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-3) for k, m in models.items()}

            def train_step(k):
                m = models[k]
                m.train()
                # softprompt_loss_only: as softprompt's trainer calls it (the LM head only where a label follows)
                extra = {"loss_only": True} if k == "softprompt_loss_only" else {}
                m(input_ids=ids, attention_mask=am, labels=labels, **extra).loss.backward()
                opts[k].step()
                opts[k].zero_grad(set_to_none=True)

            def gen(k):
                m = models[k]
                m.eval()
                with torch.no_grad():
                    m.generate(input_ids=gen_ids, attention_mask=am[:, :32], max_new_tokens=args.new_tokens,
                               min_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)

            res = {k: {"train": [], "generate": []} for k in models}
            for k in models:  # warm-up
                train_step(k)
                gen(k)
            gc.collect()
            for _ in range(args.steps):
                for k in models:
                    res[k]["train"] += timed(lambda: train_step(k), 1)
                    if k != "softprompt_loss_only":  # generation does not use labels
                        res[k]["generate"] += timed(lambda: gen(k), 1)
            row = {"shape": shape_name, "method": method}
            for k in models:
                row[f"{k}_train_ms"] = round(1e3 * statistics.median(res[k]["train"]), 1)
                if res[k]["generate"]:
                    row[f"{k}_generate_ms"] = round(1e3 * statistics.median(res[k]["generate"]), 1)
            row["train_speedup"] = round(row["peft_train_ms"] / row["softprompt_train_ms"], 3)
            row["generate_speedup"] = round(row["peft_generate_ms"] / row["softprompt_generate_ms"], 3)
            row["train_speedup_loss_only"] = round(row["peft_train_ms"] / row["softprompt_loss_only_train_ms"], 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads",
            "torch": torch.__version__, "peft": peft.__version__, "batch": args.batch, "length": args.length,
            "new_tokens": args.new_tokens, "steps": args.steps}
    with open(args.out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
