"""`serve()` and `main(argv)`: load the base model and adapters, build the engine, run uvicorn.

    softprompt serve --model builtin:smollm2-135m --adapter zh=runs/zh --adapter en=runs/en \\
        --host 127.0.0.1 --port 8000 [--api-key KEY] [--adapter-root runs/] [--train-root runs/]
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from softprompt.core.model import PeftModel
from softprompt.io.base_models import load_base
from softprompt.serve.app import DEFAULT_MAX_REQUEST_BYTES, create_app
from softprompt.serve.engine import Engine
from softprompt.serve.protocol import SEED_TEMPLATE, TOKENIZER_TEMPLATE
from softprompt.serve.registry import AdapterRegistry
from softprompt.serve.training import TrainingRuns


def build_server(
    model: str,
    adapters: dict[str, str] | None = None,
    *,
    api_key: str | None = None,
    adapter_root: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    max_num_seqs: int = 64,
    max_model_len: int | None = None,
    chat_template: str = SEED_TEMPLATE,
    served_model_name: str | None = None,
    cuda_graphs: bool = True,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    train_root: str | None = None,
):
    """The FastAPI app serving `model` with `adapters` ({name: folder}); no socket yet. With `train_root`,
    the training page starts `softprompt train` runs there (on `model` unless the page names another)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if dtype == "auto":
        torch_dtype = torch.bfloat16 if str(device).startswith("cuda") else torch.float32
    else:
        torch_dtype = getattr(torch, dtype, None)
        if not isinstance(torch_dtype, torch.dtype):
            raise ValueError(f"dtype={dtype!r} is not valid; use auto, float32, bfloat16 or float16")
    base, tokenizer = load_base(model, dtype=torch_dtype, device=device)
    engine = Engine(PeftModel.empty(base).eval(), tokenizer, max_num_seqs=max_num_seqs, max_model_len=max_model_len,
                    cuda_graphs=cuda_graphs)
    engine.warm_up()
    name = served_model_name or model
    registry = AdapterRegistry(engine, name, adapter_root)
    for adapter_name, folder in (adapters or {}).items():
        registry.load(adapter_name, folder, trusted=True)
    training = TrainingRuns(train_root, model, registry)
    return create_app(engine, tokenizer, model_name=name, registry=registry, api_key=api_key, chat_template=chat_template,
                      max_request_bytes=max_request_bytes, training=training)


def serve(
    model: str,
    adapters: dict[str, str] | None = None,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    adapter_root: str | None = None,
    **options,
) -> None:
    """Serve until interrupted. `options`: see `build_server` (dtype, device, max_num_seqs, ...)."""
    import uvicorn

    app = build_server(model, adapters, api_key=api_key, adapter_root=adapter_root, **options)
    uvicorn.run(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5)


def parser(prog: str = "softprompt serve") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Serve a base model and its prompt adapters with OpenAI's API.")
    p.add_argument("--model", required=True, help="base model: a folder, a hub id or builtin:smollm2-135m")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=DIR", help="an adapter to load at start (repeatable)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=os.environ.get("SOFTPROMPT_API_KEY"),
                   help="require 'Authorization: Bearer KEY' (default: $SOFTPROMPT_API_KEY)")
    p.add_argument("--adapter-root", default=None,
                   help="folder under which adapters may be loaded at run time (POST /v1/adapters)")
    p.add_argument("--train-root", default=None,
                   help="folder for training runs started from the page's Train tab (POST /v1/train); off without it")
    p.add_argument("--served-model-name", default=None, help="the base model's name in the API (default: --model)")
    p.add_argument("--chat-template", choices=[SEED_TEMPLATE, TOKENIZER_TEMPLATE], default=SEED_TEMPLATE,
                   help="seed: 'Human: ...\\n\\nAssistant: ' (the training format); tokenizer: the tokenizer's own template")
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when available)")
    p.add_argument("--max-num-seqs", type=int, default=64, help="sequences decoded together at most")
    p.add_argument("--max-model-len", type=int, default=None, help="context limit per sequence: virtual + prompt + new tokens")
    p.add_argument("--max-request-bytes", type=int, default=DEFAULT_MAX_REQUEST_BYTES,
                   help=f"largest request body accepted; larger ones get 413 (default: {DEFAULT_MAX_REQUEST_BYTES})")
    p.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=True,
                   help="on CUDA, replay decoding steps from CUDA graphs (default; the key/value store for "
                        "--max-num-seqs x --max-model-len is then allocated at start). Falls back by itself where "
                        "the model cannot be captured")
    return p


def parse_adapters(specs: list[str]) -> dict[str, str]:
    adapters: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise SystemExit(f"--adapter {spec!r}: expected NAME=DIR")
        if name in adapters:
            raise SystemExit(f"--adapter {name!r} is given twice")
        adapters[name] = folder
    return adapters


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        serve(
            args.model,
            parse_adapters(args.adapter),
            host=args.host,
            port=args.port,
            api_key=args.api_key,
            adapter_root=args.adapter_root,
            train_root=args.train_root,
            dtype=args.dtype,
            device=args.device,
            max_num_seqs=args.max_num_seqs,
            max_model_len=args.max_model_len,
            chat_template=args.chat_template,
            served_model_name=args.served_model_name,
            cuda_graphs=args.cuda_graphs,
            max_request_bytes=args.max_request_bytes,
        )
    except (ValueError, TypeError, LookupError, OSError, MemoryError) as err:  # bad model, adapter or sizes
        if os.environ.get("SOFTPROMPT_DEBUG"):
            raise
        print(f"softprompt serve: error: {err}", file=sys.stderr)
        return 2
    return 0
