"""Tiny offline models for the training, CLI and resume tests (not a test module).

A byte-level BPE tokenizer trained in well under a second on the texts given (so Chinese and English
both tokenize compactly), and a random LLaMA or BLOOM of hidden size 32 saved beside it: a folder that
`softprompt.io.base_models.load_base` reads like any hub model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
ZH_DEMO = SHARED / "data" / "llama-factory" / "alpaca_zh_demo.json"
EN_DEMO = SHARED / "data" / "llama-factory" / "alpaca_en_demo.json"
REPO = Path(__file__).resolve().parents[1]


def need_shared(*paths: Path) -> None:
    """Skip when ../shared is not beside the checkout; under CI=true that is a failure."""
    for path in paths or (ZH_DEMO,):
        if not path.exists():
            if os.environ.get("CI") == "true":
                pytest.fail(f"{path} is missing: CI must run with ../shared beside the checkout")
            pytest.skip(f"{path} is not there ({SHARED} is not beside this checkout)")


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def toy_rows(n: int = 24) -> list[dict]:
    """Short English/Chinese rows with checkable answers."""
    words = ["apple", "house", "river", "green", "music", "table", "water", "bread", "stone", "cloud", "plant", "tiger"]
    rows = []
    for i in range(n):
        w = words[i % len(words)]
        if i % 2:
            rows.append({"instruction": "把这个单词改写成大写字母。", "input": w, "output": w.upper()})
        else:
            rows.append({"instruction": "Write this word in capital letters.", "input": w, "output": w.upper()})
    return rows


def make_tiny_lm(folder: Path, texts: list[str], family: str = "llama", vocab_size: int = 400, seed: int = 0) -> Path:
    """Save a tiny random causal LM and a BPE tokenizer trained on `texts` into `folder`."""
    import torch
    import transformers
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    folder.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(folder)
    common = dict(vocab_size=len(fast), pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if family == "bloom":
        config = transformers.BloomConfig(**common, hidden_size=32, n_layer=2, n_head=4)
    else:
        config = transformers.LlamaConfig(**common, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    model.generation_config.pad_token_id = 0
    model.generation_config.eos_token_id = 1
    model.save_pretrained(folder)
    return folder


def row_texts(rows: list[dict]) -> list[str]:
    return [r["instruction"] + "\n" + r.get("input", "") + "\n" + r["output"] for r in rows] + [
        "Human: Assistant: "
    ]


def make_workspace(root: Path, n_rows: int = 40) -> Path:
    """`root/model` (a tiny LLaMA and its tokenizer) and `root/data.jsonl` (`toy_rows(n_rows)`)."""
    rows = toy_rows(n_rows)
    make_tiny_lm(root / "model", row_texts(rows))
    write_rows(root / "data.jsonl", rows)
    return root
