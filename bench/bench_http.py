"""The server end to end: 64 concurrent OpenAI clients over HTTP, 8 adapters mixed, against one adapter.

`bench_serve.py` times the engine alone; this times what a user of `softprompt serve` gets: the FastAPI app
and its engine thread behind uvicorn on 127.0.0.1, and, in another process (as clients are), the `openai`
client's `AsyncOpenAI` sending 64 `/v1/completions` requests at once (32 prompt token ids, 64 new tokens,
greedy, `ignore_eos`). Same model shape and 8 adapters as `bench_serve.py`. Each round runs mixed, then
single; one warm-up round first.

    python bench/bench_http.py                 # CUDA: writes $OUT/bench_http.json (or ./bench_http.json)
    python bench/bench_http.py --tiny          # a CPU smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import socket
import statistics
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import torch

sys.path.insert(0, os.path.dirname(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench_serve import EIGHT, PEFT_TOKENS_PER_S, build  # noqa: E402

from softprompt.serve import Engine, SamplingParams  # noqa: E402
from softprompt.serve.app import create_app  # noqa: E402


def tokenizer():
    """A byte-level BPE of 400 tokens trained on the spot (ids fit any vocabulary; nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<pad>", "<eos>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["Human: a question\n\nAssistant: an answer. " * 20], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def serve_in_thread(app):
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.05)
    return server, thread, f"http://127.0.0.1:{port}/v1"


async def fire(client, prompts, adapters, new_tokens: int) -> tuple[float, list[str]]:
    async def one(prompt, adapter):
        r = await client.completions.create(model=adapter, prompt=prompt, max_tokens=new_tokens, temperature=0,
                                            extra_body={"ignore_eos": True})
        assert r.usage.completion_tokens == new_tokens, r.usage
        return r.choices[0].text

    start = time.perf_counter()
    texts = await asyncio.gather(*(one(p, a) for p, a in zip(prompts, adapters)))
    return time.perf_counter() - start, list(texts)


def clients(url: str, prompts, cases: dict[str, list[str]], repeats: int, new_tokens: int):
    """In the client process: every case once per round, after a warm-up round; (seconds, first texts) per case."""
    from openai import AsyncOpenAI

    async def rounds():
        client = AsyncOpenAI(base_url=url, api_key="unused", max_retries=0, timeout=600)
        runs = {k: [] for k in cases}
        texts = {}
        for r in range(repeats + 1):
            for key, adapters in cases.items():
                seconds, answer = await fire(client, prompts, adapters, new_tokens)
                if r:
                    runs[key].append(seconds)
                    texts.setdefault(key, answer)
        return runs, texts

    return asyncio.run(rounds())


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--shape", default=None)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-graphs", action="store_true")
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    device = "cpu" if args.tiny or not torch.cuda.is_available() else "cuda"
    shape = args.shape or ("tiny" if args.tiny else "bloom-1b4-zh")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    model = build(shape, device, dtype)
    tok = tokenizer()
    names = list(EIGHT)
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(5, len(tok), (64, 32), generator=g).tolist()
    mixed = [names[i % len(names)] for i in range(64)]
    single = [names[0]] * 64
    new_tokens = 64
    limit = 32 + new_tokens + max(c().num_virtual_tokens for c in EIGHT.values())
    engine = Engine(model, tok, max_num_seqs=64, max_model_len=limit, eos_token_ids=[tok.eos_token_id],
                    cuda_graphs=not args.no_graphs)
    engine.warm_up()
    expected = [s.output_ids for s in engine.generate(
        prompts, SamplingParams(max_tokens=new_tokens, temperature=0, ignore_eos=True), mixed)]
    app = create_app(engine, tok, model_name="base")
    steps: list[tuple[float, float, int]] = []  # (start, end, rows queued or running) of each step
    prefills_before = engine.stats["prefills"]
    inner_step = engine.step

    def traced_step():
        before = len(engine.scheduler.running) + len(engine.scheduler.waiting) + engine._inbox.qsize()
        start = time.perf_counter()
        inner_step()
        steps.append((start, time.perf_counter(), before))

    engine.step = traced_step
    server, thread, url = serve_in_thread(app)
    try:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
            runs, answers = pool.submit(clients, url, prompts, {"mixed": mixed, "single": single}, args.repeats,
                                        new_tokens).result()
    finally:
        server.should_exit = True
        thread.join(timeout=15)
    total = 64 * new_tokens
    busy = sum(b - a for a, b, *_ in steps)
    span = steps[-1][1] - steps[0][0] if steps else 0.0
    trace = {"steps": len(steps), "engine_busy_s": busy, "first_to_last_step_s": span,
             "mean_rows_per_step": statistics.mean(r for *_, r in steps) if steps else 0,
             "prefills": engine.stats["prefills"] - prefills_before}
    results = {k: {"runs": v, "tokens_per_s": total / statistics.median(v), "best_tokens_per_s": total / min(v)}
               for k, v in runs.items()}
    same = sum(text == tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
               for text, ids in zip(answers["mixed"], expected))
    report = {
        "bench": "bench_http",
        "device": torch.cuda.get_device_name(0) if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": __import__("transformers").__version__,
        "shape": shape, "dtype": str(dtype).removeprefix("torch."), "cuda_graphs": engine.graphs is not None,
        "clients": 64, "prompt_tokens": 32, "new_tokens": new_tokens, "repeats": args.repeats,
        "results": results, "engine_trace_all_rounds": trace,
        "mixed_over_single": results["mixed"]["tokens_per_s"] / results["single"]["tokens_per_s"],
        "mixed_over_peft_381": results["mixed"]["tokens_per_s"] / PEFT_TOKENS_PER_S,
        "mixed_answers_equal_to_the_engine_alone_of_64": same,
    }
    for k, r in results.items():
        print(f"{k:>8}: {r['tokens_per_s']:9.1f} tokens/s median, {r['best_tokens_per_s']:9.1f} best", flush=True)
    print(json.dumps({k: v for k, v in report.items() if k != "results"}, indent=1), flush=True)
    out = args.out or os.path.join(os.environ.get("OUT", "."), "bench_http.json")
    with open(out, "w") as f:
        json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
