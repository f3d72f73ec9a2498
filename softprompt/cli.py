"""`softprompt` (also `python -m softprompt`): train, generate, chat, eval, inspect, serve, demo.

Each subcommand is one typed function; `main` only parses arguments and reports errors.

    softprompt train examples/prompt_tuning.yaml --max_steps 100 --learning_rate 3e-2
    softprompt generate --adapter runs/prompt_tuning "考试有哪些技巧？"
    softprompt chat --adapter runs/prompt_tuning
    softprompt eval --adapter runs/prompt_tuning --data eval.jsonl
    softprompt inspect runs/prompt_tuning
    softprompt demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

PROG = "softprompt"


# -- shared pieces --------------------------------------------------------------------------------
def load_for_inference(adapter: str | None, model: str | None):
    """(model, tokenizer, template): the base model named by `model` or the adapter's config, with the
    adapter on it (inference mode) when one is given; the template the adapter was trained with."""
    from softprompt.io.files import read_config
    from softprompt.io.base_models import load_base
    from softprompt.train.trainer import read_run_config

    template = "alpaca"
    if adapter is None:
        if model is None:
            raise ValueError("give --model (a base model) or --adapter (an adapter folder), or both")
        base, tokenizer = load_base(model)
        return base, tokenizer, template
    folder = Path(adapter)
    if not folder.is_dir() and (adapter.startswith((".", "/", "~")) or adapter.count("/") > 1):
        raise FileNotFoundError(f"adapter folder {adapter!r} does not exist")
    config = read_config(folder) if folder.is_dir() else None
    run = read_run_config(folder) if folder.is_dir() else {}
    template = run.get("template", template)
    source = model or run.get("model") or (config.base_model_name_or_path if config else None)
    if not source:
        raise ValueError(f"{adapter}: its config names no base model; pass --model")
    from softprompt.core.model import PeftModel

    base, tokenizer = load_base(source)
    return PeftModel.from_pretrained(base, adapter), tokenizer, template


def _generation_kwargs(args: argparse.Namespace) -> dict:
    kwargs: dict = {"do_sample": args.do_sample}
    if args.do_sample:
        kwargs.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k)
    if args.repetition_penalty != 1.0:
        kwargs["repetition_penalty"] = args.repetition_penalty
    return kwargs


def _seed(seed: int | None) -> None:
    if seed is not None:
        from transformers import set_seed

        set_seed(seed)


# -- subcommands ----------------------------------------------------------------------------------
def train_command(config: str | None, overrides: list[str]) -> int:
    """Train an adapter from a YAML config plus `--key value` overrides."""
    from softprompt.train.config import TrainConfig, parse_overrides

    values = parse_overrides(overrides)
    num_samples = int(values.pop("num_samples", 3))
    run = TrainConfig.load(config, values)  # every key checked, the method's config built: no model loaded yet
    from softprompt.train.trainer import train

    train(run, num_samples=num_samples)
    _end_process_group()
    return 0


def _end_process_group() -> None:
    """Leave torchrun / accelerate's process group before exiting: a gloo or NCCL group torn down by the
    interpreter's exit can abort the process ("terminate called without an active exception") after a run
    that finished well."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def generate_command(
    prompts: list[str], adapter: str | None, model: str | None, template: str | None, input: str, raw: bool,
    max_new_tokens: int, seed: int | None, generation: dict,
) -> int:
    """Answer each prompt (an instruction, put into the template the adapter was trained with)."""
    from softprompt.data.templates import prompt_text
    from softprompt.inference.evaluate import generate_answers

    if not prompts:
        prompts = [line.rstrip("\n") for line in sys.stdin if line.strip()]
    if not prompts:
        raise ValueError("no prompts: pass them as arguments or one per line on standard input")
    lm, tokenizer, trained_template = load_for_inference(adapter, model)
    template = template or trained_template
    texts = prompts if raw else [prompt_text(tokenizer, template, p, input) for p in prompts]
    _seed(seed)
    answers = generate_answers(lm, tokenizer, texts, max_new_tokens=max_new_tokens,
                               add_special_tokens=raw or template == "alpaca", **generation)
    for prompt, answer in zip(prompts, answers):
        if len(prompts) > 1:
            print(f">>> {prompt}")
        print(answer, flush=True)
    return 0


def chat_command(
    adapter: str | None, model: str | None, template: str | None, max_new_tokens: int, max_context: int,
    seed: int | None, generation: dict,
) -> int:
    """A conversation on the terminal (or piped standard input): /reset forgets it, /exit or end of input ends it."""
    from softprompt.data.templates import prompt_text
    from softprompt.inference.evaluate import generate_answers

    lm, tokenizer, trained_template = load_for_inference(adapter, model)
    template = template or trained_template
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {adapter or model} ({template} template); /reset to start over, /exit to leave")
    _seed(seed)
    history: list[tuple[str, str]] = []
    while True:
        try:
            line = input("you> " if interactive else "")
        except EOFError:
            break
        line = line.strip()
        if not line:
            continue
        if line in ("/exit", "/quit"):
            break
        if line == "/reset":
            history.clear()
            print("(conversation cleared)", flush=True)
            continue
        prompt = prompt_text(tokenizer, template, line, "", history)
        while history and len(tokenizer(prompt)["input_ids"]) > max_context - max_new_tokens:
            history.pop(0)  # forget the oldest turn rather than overflow the context
            prompt = prompt_text(tokenizer, template, line, "", history)
        answer = generate_answers(lm, tokenizer, [prompt], max_new_tokens=max_new_tokens,
                                  add_special_tokens=template == "alpaca", **generation)[0]
        print(f"assistant> {answer}", flush=True)
        history.append((line, answer))
    return 0


def eval_command(
    data: str, adapter: str | None, model: str | None, template: str | None, max_length: int, limit: int | None,
    batch_size: int, max_new_tokens: int | None, exact_match: bool, as_json: bool, show: int,
    generate: bool = False, predictions: str = "generated_predictions.jsonl", max_num_seqs: int = 64,
) -> int:
    """Loss, perplexity and exact-match accuracy of an adapter (or the bare model) on Alpaca rows or conversations
    (the last assistant turn is the answer); with
    `generate`, also BLEU-4 and ROUGE-1/2/L of answers decoded by the serving engine, written to `predictions`."""
    from softprompt.data.rows import load_rows
    from softprompt.inference.evaluate import evaluate

    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens {max_new_tokens} is not valid; it must be a positive integer")
    rows = load_rows(data)
    if limit is not None:
        rows = rows.select(range(min(limit, len(rows))))
    lm, tokenizer, trained_template = load_for_inference(adapter, model)
    template = template or trained_template
    decode = _engine_decoder(lm, tokenizer, template, max_num_seqs) if generate else None
    result = evaluate(lm, tokenizer, rows, template=template, max_length=max_length, exact_match=exact_match,
                      batch_size=batch_size, max_new_tokens=max_new_tokens, generate=generate, decode=decode)
    if generate:
        result.write_predictions(predictions)
    if as_json:
        print(json.dumps(result.to_dict() | ({"predictions": predictions} if generate else {})))
    else:
        print(result.summary())
        if generate:
            print(f"predictions: {predictions}")
        for a in result.answers[:show]:
            mark = "ok " if a["correct"] else "bad"
            print(f"  [{mark}] expected {a['reference']!r}, got {a['prediction']!r}")
    return 0


def _engine_decoder(lm, tokenizer, template: str, max_num_seqs: int):
    """`(prompts, max_new_tokens) -> answers` through the serving engine: continuous batching, greedy."""
    from softprompt.core.model import PeftModel
    from softprompt.serve.engine import Engine

    model = lm if isinstance(lm, PeftModel) else PeftModel.empty(lm)
    adapter = next(iter(model.peft_config), None)  # load_for_inference loads one adapter, or none
    engine = Engine(model, tokenizer, max_num_seqs=max_num_seqs)
    return lambda prompts, max_new_tokens: engine.answer(prompts, max_new_tokens, adapter,
                                                         add_special_tokens=template == "alpaca")


def inspect_command(adapter: str, model: str | None, top_k: int, as_json: bool) -> int:
    """An adapter's config, files, parameter count and nearest vocabulary tokens."""
    from softprompt.inference.inspect_adapter import inspect_adapter

    report = inspect_adapter(adapter, model=model, top_k=top_k)
    print(json.dumps(report.to_dict(), ensure_ascii=False, indent=2) if as_json else report.text())
    return 0


def demo_command(args: argparse.Namespace) -> int:
    """Train a soft prompt on the built-in model and show exact match before and after."""
    from softprompt import demo

    result = demo.run(method=args.method, n_train=args.n_train, n_eval=args.n_eval, max_steps=args.max_steps,
                      batch_size=args.batch_size, num_virtual_tokens=args.num_virtual_tokens,
                      learning_rate=args.learning_rate, output_dir=args.output_dir, model=args.model, seed=args.seed,
                      packing=not args.no_packing, lang=args.lang)
    return 0 if result["after"] > result["before"] else 1


# -- argument parsing -----------------------------------------------------------------------------
def _add_model_args(p: argparse.ArgumentParser, adapter_required: bool = False) -> None:
    p.add_argument("--adapter", required=adapter_required, help="adapter folder (softprompt's or peft's)")
    p.add_argument("--model", help="base model: builtin:smollm2-135m, a folder or a hub id (default: the adapter's)")
    p.add_argument("--template", choices=["alpaca", "chat"], help="prompt template (default: the one trained with)")


def _add_generation_args(p: argparse.ArgumentParser, max_new_tokens: int = 128) -> None:
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens)
    p.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    from softprompt import __version__, demo

    parser = argparse.ArgumentParser(prog=PROG, description="Prompt Tuning, P-Tuning and Prefix-Tuning for causal LMs")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    # The config file and the --key value overrides are read by train_command, not argparse: the keys
    # are TrainingArguments' and the method's, too many (and too version-dependent) to declare here.
    sub.add_parser("train", help="train an adapter", usage=f"{PROG} train [CONFIG.yaml] [--key value ...]",
                   description="Train an adapter. Keys: model, data (a file or folder of Alpaca rows or "
                   "conversations, hub:owner/name, or a name in dataset_registry), eval_data, val_size, format, "
                   "loss_on, data_split, method, max_length, template, the method's config fields (num_virtual_tokens, prompt_tuning_init, ...) and every "
                   "TrainingArguments field, from CONFIG and/or as --key value overrides.")

    p = sub.add_parser("generate", help="answer prompts with an adapter")
    _add_model_args(p)
    p.add_argument("prompts", nargs="*", help="instructions (default: one per line on standard input)")
    p.add_argument("--input", default="", help="the Alpaca 'input' field for every prompt")
    p.add_argument("--raw", action="store_true", help="send the prompts as they are, without the template")
    _add_generation_args(p)

    p = sub.add_parser("chat", help="talk with an adapter on the terminal")
    _add_model_args(p)
    p.add_argument("--max-context", type=int, default=1024, help="tokens of conversation kept")
    _add_generation_args(p, 256)

    p = sub.add_parser("eval", help="loss, perplexity, exact match (and BLEU/ROUGE with --generate) on a dataset")
    _add_model_args(p)
    p.add_argument("--data", required=True, help="Alpaca-style file or save_to_disk folder")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--limit", type=int, help="score only the first N rows")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, help="default: longest reference + 8")
    p.add_argument("--no-exact-match", dest="exact_match", action="store_false", help="loss and perplexity only")
    p.add_argument("--json", dest="as_json", action="store_true")
    p.add_argument("--show", type=int, default=5, help="answers to print")
    p.add_argument("--generate", action="store_true",
                   help="also BLEU-4 and ROUGE-1/2/L (CJK-aware) of greedy answers decoded by the serving engine")
    p.add_argument("--predictions", default="generated_predictions.jsonl",
                   help="with --generate: the .jsonl file of {prompt, reference, prediction} written")
    p.add_argument("--max-num-seqs", type=int, default=64, help="with --generate: rows decoded together at most")

    p = sub.add_parser("inspect", help="describe an adapter folder")
    p.add_argument("adapter", help="adapter folder")
    p.add_argument("--model", help="base model for the nearest tokens (default: the adapter's)")
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--json", dest="as_json", action="store_true")

    sub.add_parser("serve", help="serve the model and adapters with OpenAI's API (see softprompt serve --help)",
                   add_help=False)

    p = sub.add_parser("demo", help="train a soft prompt on the built-in model; exact match before and after")
    demo.add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    if argv[:1] == ["serve"]:  # the server owns its flags (softprompt/serve/launch.py)
        from softprompt.serve.launch import main as serve_main

        return serve_main(argv[1:])
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "train":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "train":
            config = extra.pop(0) if extra and not extra[0].startswith("--") else None
            return train_command(config, extra)
        if args.command == "generate":
            return generate_command(args.prompts, args.adapter, args.model, args.template, args.input, args.raw,
                                    args.max_new_tokens, args.seed, _generation_kwargs(args))
        if args.command == "chat":
            return chat_command(args.adapter, args.model, args.template, args.max_new_tokens, args.max_context,
                                args.seed, _generation_kwargs(args))
        if args.command == "eval":
            return eval_command(args.data, args.adapter, args.model, args.template, args.max_length, args.limit,
                                args.batch_size, args.max_new_tokens, args.exact_match, args.as_json, args.show,
                                args.generate, args.predictions, args.max_num_seqs)
        if args.command == "inspect":
            return inspect_command(args.adapter, args.model, args.top_k, args.as_json)
        if args.command == "demo":
            return demo_command(args)
    except (ValueError, TypeError, FileNotFoundError, OSError) as err:
        if os.environ.get("SOFTPROMPT_DEBUG"):
            raise
        print(f"{PROG} {args.command}: error: {err}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command!r}")
    return 2
