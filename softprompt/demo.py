"""`softprompt demo` (`make demo`): a soft prompt that visibly learns, offline, on a laptop-class CPU.

    builtin:smollm2-135m + generated bilingual exact-match tasks (softprompt.data.demo)
    (`--lang zh`: the questions in Chinese only, on builtin:gemma3-270m, which reads Chinese)
        -> exact match on held-out rows, zero-shot
        -> train a prompt-tuning adapter with softprompt's Trainer path (a few hundred steps)
        -> exact match on the same rows again, and a few answers before / after

The held-out rows ask about items (words, sums, lists) that never occur in training in either language,
so the gain measures the learned answer shape on unseen items, not memorised answers.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from softprompt.methods.config import methods

DEFAULTS = {
    "method": "p_tuning",
    "n_train": 480,
    "n_eval": 60,
    "max_steps": 200,
    "batch_size": 8,
    "num_virtual_tokens": 8,
    "learning_rate": None,  # softprompt's default for the method
    "lang": "both",
}
# The questions' languages and the model each --lang trains by default
LANG_CHOICES = {"both": (("en", "zh"), "builtin:smollm2-135m"), "en": (("en",), "builtin:smollm2-135m"),
                "zh": (("zh",), "builtin:gemma3-270m")}


def run(
    method: str = DEFAULTS["method"],
    n_train: int = DEFAULTS["n_train"],
    n_eval: int = DEFAULTS["n_eval"],
    max_steps: int = DEFAULTS["max_steps"],
    batch_size: int = DEFAULTS["batch_size"],
    num_virtual_tokens: int = DEFAULTS["num_virtual_tokens"],
    learning_rate: float | None = DEFAULTS["learning_rate"],
    output_dir: str = "runs/demo",
    model: str | None = None,
    seed: int = 0,
    show: int = 6,
    packing: bool = True,
    lang: str = DEFAULTS["lang"],
) -> dict:
    """Run the demo; returns {"before", "after", "seconds", "output_dir"} and prints the story.

    `lang`: "both" (the default: questions in English and Chinese), "en" or "zh"; `model` defaults to the
    language's built-in model (`LANG_CHOICES`)."""
    import torch  # here, not at the top: `softprompt --help` and `softprompt train` read this module's options

    from softprompt.data.rows import load_rows
    from softprompt.data.demo import write_demo_dataset
    from softprompt.inference.evaluate import evaluate
    from softprompt.io.base_models import load_base
    from softprompt.train.trainer import train
    from softprompt.train.config import TrainConfig, method_keys

    if lang not in LANG_CHOICES:
        raise ValueError(f"lang={lang!r} is not valid; allowed values: {', '.join(LANG_CHOICES)}")
    langs, default_model = LANG_CHOICES[lang]
    model = model or default_model
    start = time.time()
    out = Path(output_dir)
    train_file, eval_file = write_demo_dataset(out / "data", n_train, n_eval, seed, langs=langs)
    eval_rows = load_rows(eval_file)
    print(f"demo: {model}, {method}, {n_train} training rows, {n_eval} held-out rows, questions in "
          f"{' and '.join(langs)} ({out})", flush=True)

    base, tokenizer = load_base(model)
    before = evaluate(base, tokenizer, eval_rows, loss=False)
    print(f"[{time.time() - start:5.0f}s] before training: exact match {_pct(before)} on held-out rows", flush=True)
    del base

    settings = {
        "model": model, "data": str(train_file), "eval_data": str(eval_file), "method": method,
        "num_virtual_tokens": num_virtual_tokens, "output_dir": str(out / "adapter"), "max_steps": max_steps,
        "per_device_train_batch_size": batch_size, "logging_steps": 10, "save_strategy": "no",
        "eval_strategy": "no", "seed": seed, "max_length": 64, "dataloader_pin_memory": False,
        "warmup_steps": 0.05, "packing": packing,
    }
    if learning_rate is not None:
        settings["learning_rate"] = learning_rate
    if "encoder_hidden_size" in method_keys(method):
        settings["encoder_hidden_size"] = 128  # a small encoder trains fast on the demo's short tasks
    train_start = time.time()
    result = train(TrainConfig.from_mapping(settings), num_samples=0)
    train_seconds = time.time() - train_start
    print(f"[{time.time() - start:5.0f}s] trained in {train_seconds:.0f} s ({'packed' if packing else 'padded'} batches): final train loss {result.metrics.get('train_loss', float('nan')):.3f}",
          flush=True)

    from softprompt.core.model import PeftModel

    base, tokenizer = load_base(model)
    tuned = PeftModel.from_pretrained(base, str(out / "adapter"))
    after = evaluate(tuned, tokenizer, eval_rows, loss=False)
    seconds = time.time() - start
    print(f"[{seconds:5.0f}s] after training:  exact match {_pct(after)} on held-out rows", flush=True)
    print(f"\nexact match, {len(after.answers)} held-out rows: before {_pct(before)} -> after {_pct(after)} "
          f"({seconds:.0f} s in all, {torch.get_num_threads()} threads)\n", flush=True)
    for b, a in list(zip(before.answers, after.answers))[:show]:
        question = a["prompt"].removeprefix("Human: ").removesuffix("\n\nAssistant: ").replace("\n", " | ")
        print(f"Q: {question}\n   expected {a['reference']!r}; before {b['prediction'][:60]!r}; after {a['prediction'][:60]!r}")
    return {"before": before.exact_match, "after": after.exact_match, "seconds": seconds,
            "train_seconds": train_seconds, "output_dir": str(out)}


def _pct(result) -> str:
    correct = sum(a["correct"] for a in result.answers)
    return f"{100 * result.exact_match:.1f}% ({correct}/{len(result.answers)})"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--method", choices=list(methods()), default=DEFAULTS["method"])
    parser.add_argument("--n-train", type=int, default=DEFAULTS["n_train"], help="training rows")
    parser.add_argument("--n-eval", type=int, default=DEFAULTS["n_eval"], help="held-out rows")
    parser.add_argument("--max-steps", type=int, default=DEFAULTS["max_steps"])
    parser.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"])
    parser.add_argument("--num-virtual-tokens", type=int, default=DEFAULTS["num_virtual_tokens"])
    parser.add_argument("--learning-rate", type=float, default=None, help="default: softprompt's for the method")
    parser.add_argument("--output-dir", default="runs/demo")
    parser.add_argument("--model", help="default: builtin:smollm2-135m; with --lang zh builtin:gemma3-270m")
    parser.add_argument("--lang", choices=list(LANG_CHOICES), default=DEFAULTS["lang"],
                        help="the questions' language: both (default), en, or zh (Chinese, on builtin:gemma3-270m)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-packing", action="store_true", help="train on padded batches (to compare)")
