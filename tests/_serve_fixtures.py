"""Tiny models, a tiny offline tokenizer and a real server on 127.0.0.1 for the serving tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BloomConfig,
    BloomForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
)

from softprompt import PeftModel, PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

# Tiny models gain nothing from intra-op threads, and on small CI machines OpenMP's wake-ups cost
# milliseconds per op (measured: ~20 ms per attention call with 2 threads, 0.02 ms with 1).
torch.set_num_threads(1)

PAD, EOS, BOS = 0, 1, 2
CORPUS = [
    "Human: What is the capital of France?\n\nAssistant: Paris is the capital of France.",
    "Human: 考试有哪些技巧？\n\nAssistant: 认真复习，合理安排时间。",
    "The quick brown fox jumps over the lazy dog. Prompt tuning trains a few virtual tokens.",
    "Prefix tuning learns keys and values for every layer; P-tuning reparameterizes the prompt.",
] * 4

# Adapters of all three methods, with different numbers of virtual tokens.
ADAPTERS = {
    "pt4": PromptTuningConfig(num_virtual_tokens=4),
    "pt9": PromptTuningConfig(num_virtual_tokens=9),
    "ptune6": PromptEncoderConfig(num_virtual_tokens=6, encoder_hidden_size=16),
    "prefix3": PrefixTuningConfig(num_virtual_tokens=3),
    "prefix8": PrefixTuningConfig(num_virtual_tokens=8, prefix_projection=True, encoder_hidden_size=16),
}


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE of about 400 tokens trained here: any text encodes, nothing is downloaded."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<pad>", "<eos>", "<bos>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>", bos_token="<bos>")
    fast.chat_template = (
        "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}"
    )
    return fast


def tiny_base(family: str = "llama", vocab_size: int = 400, seed: int = 0):
    """A random 2-layer model; wide weights so that greedy choices are far from ties."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab_size, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    if family == "llama":
        config = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, max_position_embeddings=256, initializer_range=0.2, **common)
        model = LlamaForCausalLM(config)
    elif family == "bloom":
        model = BloomForCausalLM(BloomConfig(hidden_size=32, n_layer=2, n_head=4, initializer_range=0.2, **common))
    elif family == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2, **common))
    else:
        raise ValueError(family)
    return model.eval()


def tiny_peft(family: str = "llama", adapters: dict | None = None, seed: int = 0):
    """The tiny base with the adapters of `ADAPTERS` (or `adapters`), random prompts, eval mode."""
    model = PeftModel.empty(tiny_base(family, seed=seed)).eval()
    torch.manual_seed(seed + 1)
    for name, config in (ADAPTERS if adapters is None else adapters).items():
        model.add_adapter(name, config)
    for p in model.prompt_encoder.parameters():  # trained prompts are far from init: make them matter
        p.data.normal_(0, 1.0)
        p.requires_grad_(False)
    return model.eval()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_server(app, timeout: float = 30.0) -> Iterator[str]:
    """Serve `app` with uvicorn on 127.0.0.1 in a thread; yields the base URL; always stops."""
    import uvicorn

    port = free_port()
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            server.should_exit = True
            raise RuntimeError("the test server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
