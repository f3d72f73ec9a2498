"""softprompt vs peft on one GPU, in one process: training tokens/s and peak memory, and generation.

Same protocol as the baseline `shared/bench/peft_anchor.py` (random-weight models shaped like
bloom-1b4-zh and Qwen2-0.5B, bf16, batch 8 x 256, AdamW, 10 timed steps after 3 warm-ups; generation:
batch 32, 32-token prompts, 64 new tokens, greedy), with both libraries measured side by side.

    python bench/bench_gpu.py            # writes $OUT/bench_gpu.json (or ./bench_gpu.json)
"""

from __future__ import annotations

import gc
import json
import os
import sys
import time
import traceback

import torch
from transformers import AutoModelForCausalLM, BloomConfig, Qwen2Config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import softprompt as sp  # noqa: E402

DEV = "cuda"
SHAPES = {
    "bloom-1b4-zh": BloomConfig(vocab_size=46145, hidden_size=2048, n_layer=24, n_head=16),
    "qwen2-0.5b": Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                              num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
}


def method_config(lib, method: str):
    T = lib.TaskType.CAUSAL_LM
    R = lib.PromptEncoderReparameterizationType
    return {
        "prompt-tuning": lambda: lib.PromptTuningConfig(task_type=T, num_virtual_tokens=10),
        "p-tuning-mlp": lambda: lib.PromptEncoderConfig(task_type=T, num_virtual_tokens=10,
                                                        encoder_reparameterization_type=R.MLP, encoder_hidden_size=1024),
        "p-tuning-lstm": lambda: lib.PromptEncoderConfig(task_type=T, num_virtual_tokens=10, encoder_dropout=0.1,
                                                         encoder_reparameterization_type=R.LSTM, encoder_num_layers=1,
                                                         encoder_hidden_size=1024),
        "prefix-proj": lambda: lib.PrefixTuningConfig(task_type=T, num_virtual_tokens=10, prefix_projection=True),
        "prefix": lambda: lib.PrefixTuningConfig(task_type=T, num_virtual_tokens=10),
    }[method]()


def time_train(model, vocab: int, B=8, L=256, steps=10, warm=3, **forward_kwargs):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    ids = torch.randint(5, vocab, (B, L), device=DEV)
    am = torch.ones_like(ids)
    labels = ids.clone()
    labels[:, : L // 2] = -100

    def step():
        model(input_ids=ids, attention_mask=am, labels=labels, **forward_kwargs).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    model.train()
    for _ in range(warm):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()  # peak of the timed steps: the model, its copy of the base, activations
    t = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    dt = (time.perf_counter() - t) / steps
    return B * L / dt, torch.cuda.max_memory_allocated() / 2**30


def time_generate(model, vocab: int, B=32, P=32, N=64):
    ids = torch.randint(5, vocab, (B, P), device=DEV)
    am = torch.ones_like(ids)
    kw = dict(max_new_tokens=N, min_new_tokens=N, do_sample=False, pad_token_id=0)
    model.eval()
    with torch.no_grad():
        model.generate(input_ids=ids, attention_mask=am, **dict(kw, max_new_tokens=4, min_new_tokens=4))
        torch.cuda.synchronize()
        t = time.perf_counter()
        out = model.generate(input_ids=ids, attention_mask=am, **kw)
        torch.cuda.synchronize()
    return B * (out.shape[1] - P) / (time.perf_counter() - t)


def main() -> None:
    import peft

    torch.backends.cuda.matmul.allow_tf32 = True
    rows = []
    only = os.environ.get("BENCH_SHAPES", ",".join(SHAPES)).split(",")
    for name in only:
        cfg = SHAPES[name]
        for method in ["prompt-tuning", "p-tuning-mlp", "p-tuning-lstm", "prefix-proj", "prefix"]:
            # softprompt+loss_only: as softprompt's trainer runs it (the LM head only where a label follows)
            for lib_name, lib in (("peft", peft), ("softprompt", sp), ("softprompt+loss_only", sp)):
                row = {"shape": name, "method": method, "lib": lib_name}
                model = base = None
                try:
                    torch.manual_seed(0)  # a fresh base per row: the peak is one model's, as in the baseline
                    with torch.device(DEV):
                        base = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
                    base.eval().requires_grad_(False)
                    model = lib.get_peft_model(base, method_config(lib, method))
                    loss_only = lib_name.endswith("loss_only")
                    extra = {"loss_only": True} if loss_only else {}
                    row["train_tok_s"], row["peak_gib"] = time_train(model, cfg.vocab_size, **extra)
                    if not loss_only:
                        row["generate_tok_s"] = time_generate(model, cfg.vocab_size)
                except Exception:
                    row["error"] = traceback.format_exc()[-800:]
                rows.append(row)
                print(json.dumps(row), flush=True)
                del model, base
                gc.collect()  # peft's and our wrappers hold reference cycles: free the copy before the next peak
                torch.cuda.empty_cache()
    out = os.path.join(os.environ.get("OUT", "."), "bench_gpu.json")
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
            "transformers": __import__("transformers").__version__, "peft": peft.__version__}
    json.dump({"meta": meta, "rows": rows}, open(out, "w"), indent=1)


if __name__ == "__main__":
    main()
