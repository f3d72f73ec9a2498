"""Serving many adapters at once: softprompt's engine against one adapter, and against peft's way.

Protocol of `shared/bench/peft_anchor.py`: a random-weight model shaped like bloom-1b4-zh (vocab 46145,
hidden 2048, 24 layers, 16 heads), bf16, 32-token prompts, 64 new tokens, greedy (eos ignored, so every
request makes exactly 64 tokens).

    mixed          8 adapters x 8 requests, one stream through the engine (all three methods, 8-30 tokens)
    single         the same 64 prompts, all for one adapter, through the engine
    *_graphs       the same, decoding steps replayed from CUDA graphs (CUDA only)
    peft_style     one adapter per batch: 8 sequential `PeftModel.generate` batches of 8 (what peft must do)
    one_generate   the 64 mixed requests as one `PeftModel.generate` call (the core's mixed batch, no engine)
    *_1000         single and mixed again with 1,000 adapters loaded (in the same rounds: 8, then 1,000)

Targets (issue 4, H200): mixed >= 0.85 x single, mixed >= 8 x peft's 381 tokens/s, 1,000 adapters cost <= 5%.

    python bench/bench_serve.py                  # CUDA: writes $OUT/bench_serve.json (or ./bench_serve.json)
    python bench/bench_serve.py --tiny           # a CPU smoke test of the same protocol on a tiny model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, BloomConfig, Qwen2Config

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import softprompt as sp  # noqa: E402
from softprompt.serve import Engine, SamplingParams  # noqa: E402

PEFT_TOKENS_PER_S = 381.0  # peft 0.21.2, H200, 8 adapters x 8 requests in per-adapter batches
SHAPES = {
    "bloom-1b4-zh": lambda: BloomConfig(vocab_size=46145, hidden_size=2048, n_layer=24, n_head=16),
    "qwen2-0.5b": lambda: Qwen2Config(vocab_size=151936, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                      num_attention_heads=14, num_key_value_heads=2, tie_word_embeddings=True),
    "tiny": lambda: BloomConfig(vocab_size=1000, hidden_size=64, n_layer=2, n_head=4),
}
# The 8 adapters of the mixed stream: all three methods, 8 to 30 virtual tokens.
EIGHT = {
    "pt10": lambda: sp.PromptTuningConfig(num_virtual_tokens=10),
    "pt20": lambda: sp.PromptTuningConfig(num_virtual_tokens=20),
    "mlp10": lambda: sp.PromptEncoderConfig(num_virtual_tokens=10, encoder_hidden_size=256),
    "lstm16": lambda: sp.PromptEncoderConfig(num_virtual_tokens=16, encoder_reparameterization_type="LSTM",
                                             encoder_hidden_size=256, encoder_num_layers=1),
    "prefix10": lambda: sp.PrefixTuningConfig(num_virtual_tokens=10),
    "proj20": lambda: sp.PrefixTuningConfig(num_virtual_tokens=20, prefix_projection=True, encoder_hidden_size=256),
    "prefix30": lambda: sp.PrefixTuningConfig(num_virtual_tokens=30),
    "pt8": lambda: sp.PromptTuningConfig(num_virtual_tokens=8),
}


def build(shape: str, device: str, dtype: torch.dtype):
    torch.manual_seed(0)
    with torch.device(device):
        base = AutoModelForCausalLM.from_config(SHAPES[shape](), dtype=dtype)
    model = sp.PeftModel.empty(base.eval()).eval()
    for name, make in EIGHT.items():
        model.add_adapter(name, make())
    return freeze(model)


def freeze(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def add_many(model, total: int) -> float:
    """Load adapters up to `total` (a third each: prompt tuning, P-tuning MLP, prefix; 5-20 tokens)."""
    start = time.perf_counter()
    kinds = [lambda n: sp.PromptTuningConfig(num_virtual_tokens=n),
             lambda n: sp.PromptEncoderConfig(num_virtual_tokens=n, encoder_hidden_size=128),
             lambda n: sp.PrefixTuningConfig(num_virtual_tokens=n)]
    i = 0
    while len(model.peft_config) < total:
        model.add_adapter(f"extra{i}", kinds[i % 3](5 + i % 16))
        i += 1
    freeze(model)
    return time.perf_counter() - start


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def instrument(engine: Engine, spent: dict) -> None:
    """Time the engine's prefills and decoding steps (each ends in a host sync already: `tolist`)."""
    for key in ("prefill", "decode"):
        inner = getattr(engine, f"_{key}")

        def timed_part(seqs, inner=inner, key=key):
            start = time.perf_counter()
            inner(seqs)
            spent[key] += time.perf_counter() - start
            spent["decode_steps"] += key == "decode"

        setattr(engine, f"_{key}", timed_part)


def run_engine(engine: Engine, prompts, adapters, new_tokens: int, device: str):
    params = SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True)
    sync(device)
    start = time.perf_counter()
    seqs = engine.generate(prompts, params, adapters)
    sync(device)
    seconds = time.perf_counter() - start
    assert all(len(s.output_ids) == new_tokens for s in seqs)
    return seconds, [s.output_ids for s in seqs]


def run_generate_batches(model, prompts, adapters, new_tokens: int, device: str, per_batch: int):
    """`PeftModel.generate` over consecutive batches of `per_batch` rows (each batch one adapter or mixed)."""
    outs = []
    sync(device)
    start = time.perf_counter()
    for i in range(0, len(prompts), per_batch):
        ids = torch.tensor(prompts[i : i + per_batch], device=device)
        out = model.generate(ids, adapter_names=adapters[i : i + per_batch], max_new_tokens=new_tokens,
                             do_sample=False, eos_token_id=None, pad_token_id=0)
        outs.extend(out[:, ids.shape[1]:].tolist())
    sync(device)
    return time.perf_counter() - start, outs


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="CPU smoke test on a tiny model")
    p.add_argument("--shape", default=None, choices=sorted(SHAPES))
    p.add_argument("--device", default=None)
    p.add_argument("--requests-per-adapter", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--adapters-loaded", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--dtype", default=None, choices=["bfloat16", "float32"], help="default: bfloat16 on CUDA")
    p.add_argument("--no-graphs", action="store_true", help="on CUDA, measure only the plain decoding step")
    p.add_argument("--out", default=None, help="JSON path (default: $OUT/bench_serve.json or ./bench_serve.json)")
    args = p.parse_args(argv)

    device = args.device or ("cpu" if args.tiny or not torch.cuda.is_available() else "cuda")
    shape = args.shape or ("tiny" if args.tiny else "bloom-1b4-zh")
    dtype = getattr(torch, args.dtype) if args.dtype else torch.bfloat16 if device.startswith("cuda") else torch.float32
    repeats = args.repeats or 5
    if device == "cpu":
        torch.set_num_threads(1 if shape == "tiny" else torch.get_num_threads())
    model = build(shape, device, dtype)
    vocab = model.config.vocab_size
    names = list(EIGHT)
    n = args.requests_per_adapter
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(5, vocab, (len(names) * n, args.prompt_tokens), generator=g).tolist()
    mixed_adapters = [name for name in names for _ in range(n)]  # peft-style batches: consecutive rows share one
    single_adapters = [names[0]] * len(prompts)
    total = len(prompts) * args.new_tokens
    limit = args.prompt_tokens + args.new_tokens + max(c().num_virtual_tokens for c in EIGHT.values())
    # Engine variants: the plain decoding step, and on CUDA the same step replayed from CUDA graphs.
    engines = {"": Engine(model, max_num_seqs=len(prompts), max_model_len=limit, eos_token_ids=[])}
    if device.startswith("cuda") and not args.no_graphs:
        engines["_graphs"] = Engine(model, max_num_seqs=len(prompts), max_model_len=limit, eos_token_ids=[],
                                    cuda_graphs=True)
    spent = {"prefill": 0.0, "decode": 0.0, "decode_steps": 0}
    for engine in engines.values():
        instrument(engine, spent)
        # Warm-up: kernels, the key/value store at full size, graphs for every batch size, prompt caches.
        for size in (len(prompts), len(prompts) - 1, n, 1):
            engine.generate(prompts[:size], SamplingParams(max_tokens=args.new_tokens, temperature=0, ignore_eos=True),
                            mixed_adapters[:size])
    if "_graphs" in engines and engines["_graphs"].graphs.failed:
        print("CUDA graphs could not be captured: the *_graphs rows measure the plain step", flush=True)
    run_generate_batches(model, prompts[:n], mixed_adapters[:n], 4, device, n)

    results: dict[str, dict] = {}
    outputs: dict[str, list] = {}
    out = args.out or os.path.join(os.environ.get("OUT", "."), "bench_serve.json")

    def measure(rounds: int, phases: list[tuple[str, dict, callable]], warmup: bool = False) -> None:
        """Every case once per round, in turn, so that drift (clocks, other load) hits all cases alike.

        `phases`: (name, cases, set_up) run in order within each round; `set_up` runs before its cases
        (loading or dropping the extra adapters). With `warmup`, one more round first, not counted.
        """
        cases = {k: fn for _, group, _ in phases for k, fn in group.items()}
        runs: dict[str, list[float]] = {k: [] for k in cases}
        split = {k: {"prefill": 0.0, "decode": 0.0, "decode_steps": 0} for k in cases}
        for round_ in range(rounds + warmup):
            for _, group, set_up in phases:
                set_up()
                for key, fn in group.items():
                    if key in results:  # failed before
                        continue
                    before = dict(spent)
                    try:
                        seconds, outs = fn()
                    except Exception as err:  # keep measuring the rest; the error goes into the JSON
                        results[key] = {"error": f"{type(err).__name__}: {err}"[:500]}
                        print(f"{key:>20}: FAILED {results[key]['error']}", flush=True)
                        continue
                    if warmup and round_ == 0:
                        continue
                    runs[key].append(seconds)
                    outputs.setdefault(key, outs)
                    for part in split[key]:
                        split[key][part] += spent[part] - before[part]
        for key, times in runs.items():
            if not times:
                continue
            median = statistics.median(times)
            r = {"seconds": median, "runs": times, "tokens": total, "tokens_per_s": total / median,
                 "best_tokens_per_s": total / min(times)}
            extra = ""
            if split[key]["decode_steps"]:  # an engine run: where its time went
                r["prefill_s"] = split[key]["prefill"] / len(times)
                r["decode_ms_per_step"] = 1e3 * split[key]["decode"] / split[key]["decode_steps"]
                extra = f", prefill {r['prefill_s']:.3f} s, {r['decode_ms_per_step']:.2f} ms/step"
            results[key] = r
            print(f"{key:>20}: {r['tokens_per_s']:9.1f} tokens/s median, {r['best_tokens_per_s']:9.1f} best "
                  f"({median:.3f} s{extra})", flush=True)
        with open(out + ".partial", "w") as f:
            json.dump(results, f, indent=1)

    def engine_cases(suffix: str) -> dict:
        cases = {}
        for tag, engine in engines.items():
            cases["mixed" + suffix + tag] = lambda e=engine: run_engine(e, prompts, mixed_adapters, args.new_tokens, device)
            cases["single" + suffix + tag] = lambda e=engine: run_engine(e, prompts, single_adapters, args.new_tokens, device)
        return cases

    load_times: list[float] = []

    def load_many() -> None:
        load_times.append(add_many(model, args.adapters_loaded))

    def drop_many() -> None:
        for name in [a for a in model.peft_config if a not in EIGHT]:
            model.delete_adapter(name)

    # Each round: the 8 adapters alone, then with 1,000 loaded (added, measured, removed), so the cost of
    # 1,000 adapters is read between neighbouring runs, not across the whole benchmark's drift.
    measure(repeats, [("eight", engine_cases(""), drop_many), ("thousand", engine_cases("_1000"), load_many)],
            warmup=True)
    loaded = args.adapters_loaded
    load_seconds = statistics.median(load_times)
    drop_many()
    print(f"loading {loaded} adapters took {load_seconds:.1f} s (median)", flush=True)
    measure(min(repeats, 3), [("peft", {
        "peft_style": lambda: run_generate_batches(model, prompts, mixed_adapters, args.new_tokens, device, n),
        "one_generate": lambda: run_generate_batches(model, prompts, mixed_adapters, args.new_tokens, device, len(prompts)),
    }, lambda: None)])

    # How often the engine's greedy answer is token for token the core's `generate` (one adapter per batch).
    # fp32 on CPU: always; bf16 on a GPU rounds differently at other batch shapes, so long answers may part.
    def same(a: str, b: str) -> int | None:
        if a not in outputs or b not in outputs:
            return None
        return sum(x == y for x, y in zip(outputs[a], outputs[b]))

    def first_difference(a: str, b: str) -> list[int]:
        """For each answer that parts from the other, the index of its first differing token."""
        if a not in outputs or b not in outputs:
            return []
        return [next(i for i, (p, q) in enumerate(zip(x, y)) if p != q) for x, y in zip(outputs[a], outputs[b]) if x != y]

    agreement = {f"mixed{tag}_vs_generate": same("mixed" + tag, "peft_style") for tag in engines}
    agreement["first_difference_at"] = first_difference("mixed" + ("_graphs" if "_graphs" in engines else ""), "peft_style")
    if "_graphs" in engines:
        agreement["graphs_vs_plain"] = same("mixed_graphs", "mixed")
    tps = {k: v.get("tokens_per_s", float("nan")) for k, v in results.items()}
    tag = "_graphs" if "_graphs" in engines else ""  # the engine as it runs on this device
    ratios = {
        "engine": "cuda_graphs" if tag else "plain",
        "mixed_over_single": tps["mixed" + tag] / tps["single" + tag],
        "mixed_over_peft_381": tps["mixed" + tag] / PEFT_TOKENS_PER_S,
        "mixed_over_peft_style_here": tps["mixed" + tag] / tps["peft_style"],
        "cost_of_1000_adapters_single": 1 - tps["single_1000" + tag] / tps["single" + tag],
        "cost_of_1000_adapters_mixed": 1 - tps["mixed_1000" + tag] / tps["mixed" + tag],
    }
    report = {
        "bench": "bench_serve",
        "device": torch.cuda.get_device_name(0) if device.startswith("cuda") else platform.processor() or "cpu",
        "torch": torch.__version__,
        "transformers": __import__("transformers").__version__,
        "shape": shape,
        "dtype": str(dtype).removeprefix("torch."),
        "requests": len(prompts),
        "adapters_in_stream": names,
        "prompt_tokens": args.prompt_tokens,
        "new_tokens": args.new_tokens,
        "adapters_loaded_for_1000": loaded,
        "seconds_to_add_adapters": load_seconds,
        "repeats": repeats,
        "results": results,
        "ratios": ratios,
        "same_greedy_answers_of_64": agreement,
        "targets": {
            "mixed_over_single>=0.85": ratios["mixed_over_single"] >= 0.85,
            "mixed>=8x_peft_381": tps["mixed" + tag] >= 8 * PEFT_TOKENS_PER_S,
            "cost_of_1000_adapters<=0.05": max(ratios["cost_of_1000_adapters_single"],
                                               ratios["cost_of_1000_adapters_mixed"]) <= 0.05,
        },
    }
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps({"ratios": ratios, "targets": report["targets"], "same_greedy_answers_of_64": agreement}, indent=1))
    if os.path.exists(out + ".partial"):
        os.remove(out + ".partial")
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
