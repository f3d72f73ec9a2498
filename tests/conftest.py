"""Shared fixtures: tiny random models of every supported family, every method variant, and a builder
that puts peft (the oracle) and softprompt on identical copies of one base with identical adapter weights.

Everything is built offline from configs: hidden 32, 2 layers, vocabulary 128, so the whole grid runs
in seconds on a laptop CPU.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Callable

import peft
import pytest
import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers, processors

import softprompt

# Tiny models gain nothing from intra-op threads, and on a shared CPU thread pools spin-wait: one thread is
# 10-40x faster there.
torch.set_num_threads(1)

VOCAB = 128
PAD, BOS, EOS, UNK = 0, 1, 2, 3
_SPECIAL = {"<pad>": PAD, "<s>": BOS, "</s>": EOS, "<unk>": UNK}
WORDS = "classify the sentiment of this review as positive or negative answer question please".split()
INIT_TEXT = "classify the sentiment of this review"  # 7 ids with BOS: repeated/cut to V in TEXT init


# -- model families -------------------------------------------------------------------------------
def _common(tied: bool = False) -> dict[str, Any]:
    # initializer_range 0.2 (not 0.02): a tiny model initialised at 0.02 mostly repeats its last input
    # token under greedy decoding, which would let a wrong position or prefix go unnoticed.
    return dict(
        vocab_size=VOCAB, pad_token_id=PAD, bos_token_id=BOS, eos_token_id=EOS, initializer_range=0.2,
        tie_word_embeddings=tied,
    )


FAMILIES: dict[str, Callable[[], transformers.PretrainedConfig]] = {
    "bloom": lambda: transformers.BloomConfig(
        **_common(), hidden_size=32, n_layer=2, n_head=4, hidden_dropout=0.0, attention_dropout=0.0
    ),
    # GQA: 4 query heads, 2 key/value heads
    "llama": lambda: transformers.LlamaConfig(
        **_common(), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, max_position_embeddings=256,
    ),
    "qwen2": lambda: transformers.Qwen2Config(
        **_common(), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256,
    ),
    # tied input/output embeddings: parameter counts must not count them twice
    "gpt2": lambda: transformers.GPT2Config(
        **_common(tied=True), n_embd=32, n_layer=2, n_head=4, n_positions=256,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    ),
    "gpt_neox": lambda: transformers.GPTNeoXConfig(
        **_common(), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=256, hidden_dropout=0.0, attention_dropout=0.0,
    ),
    # sliding window shorter than virtual tokens + text: the window really cuts attention
    "mistral": lambda: transformers.MistralConfig(
        **_common(), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=8, sliding_window=8, max_position_embeddings=256,
    ),
    # head_dim 16 != hidden / heads = 8, and multi-query attention (1 kv head)
    "gemma": lambda: transformers.GemmaConfig(
        **_common(), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, max_position_embeddings=256,
    ),
}
SLIDING_WINDOW_FAMILIES = ("mistral",)

# Known softprompt bug (reported to the lead, not fixed here): the key/value prefix sits in the cache, before
# every input slot, so left pads or mixed-batch fill slots land *between* a row's prefix and its text.
# transformers' sliding-window mask counts slots, not positions, so on a sliding-window model the prefix
# leaves the window that many tokens early and the row differs from its solo run. (peft's left padding has
# the same gap.) Full-attention families are exact. Not strict: whether a row crosses the window depends on
# its length; test_generation.test_known_bug_sliding_window_prefix_gap is the strict one.
PREFIX_GAP_XFAIL = pytest.mark.xfail(
    strict=False, reason="sliding window counts the pad/fill slots between a KV prefix and its text"
)


def xfail_if_prefix_gap(request, family: str, prefix_row_has_gap: bool) -> None:
    if family in SLIDING_WINDOW_FAMILIES and prefix_row_has_gap:
        request.applymarker(PREFIX_GAP_XFAIL)


def make_base(family: str, seed: int = 0) -> transformers.PreTrainedModel:
    """A tiny random causal LM of `family`, fp32, deterministic for a given seed."""
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(FAMILIES[family]())
    model.generation_config.pad_token_id = PAD
    return model.eval()


# -- an offline tokenizer matching the models' vocabulary ------------------------------------------
@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> str:
    vocab = dict(_SPECIAL)
    for w in WORDS:
        vocab[w] = len(vocab)
    while len(vocab) < VOCAB:
        vocab[f"w{len(vocab)}"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", BOS)])
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    path = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(str(path))
    return str(path)


# -- method variants --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Variant:
    name: str
    method: str  # "prompt" | "ptune" | "prefix"
    kwargs: tuple  # ((field, value), ...), enum values as strings

    @property
    def is_prefix(self) -> bool:
        return self.method == "prefix"

    @property
    def zero_init(self) -> bool:
        return dict(self.kwargs).get("init_weights") == "zero"

    def config(self, lib, tokenizer_dir: str | None = None, **overrides):
        """This variant's config in `lib` (the `peft` or `softprompt` module)."""
        cls = {"prompt": lib.PromptTuningConfig, "ptune": lib.PromptEncoderConfig, "prefix": lib.PrefixTuningConfig}
        kwargs = dict(self.kwargs, task_type=lib.TaskType.CAUSAL_LM, **overrides)
        if "prompt_tuning_init" in kwargs:
            kwargs["prompt_tuning_init"] = lib.PromptTuningInit(kwargs["prompt_tuning_init"])
            if kwargs["prompt_tuning_init"].value == "TEXT":
                kwargs["tokenizer_name_or_path"] = tokenizer_dir
        if "encoder_reparameterization_type" in kwargs:
            kwargs["encoder_reparameterization_type"] = lib.PromptEncoderReparameterizationType(
                kwargs["encoder_reparameterization_type"]
            )
        return cls[self.method](**kwargs)


def _v(name: str, method: str, **kwargs) -> Variant:
    return Variant(name, method, tuple(sorted(kwargs.items())))


VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in [
        _v("prompt_random", "prompt", num_virtual_tokens=4, prompt_tuning_init="RANDOM"),
        _v("prompt_text", "prompt", num_virtual_tokens=9, prompt_tuning_init="TEXT", prompt_tuning_init_text=INIT_TEXT),
        _v("prompt_sample_vocab", "prompt", num_virtual_tokens=5, prompt_tuning_init="SAMPLE_VOCAB"),
        _v("ptune_mlp", "ptune", num_virtual_tokens=4, encoder_hidden_size=24),
        _v("ptune_lstm1", "ptune", num_virtual_tokens=4, encoder_hidden_size=16,
           encoder_reparameterization_type="LSTM", encoder_num_layers=1, encoder_dropout=0.0),
        _v("ptune_lstm2", "ptune", num_virtual_tokens=3, encoder_hidden_size=16,
           encoder_reparameterization_type="LSTM", encoder_num_layers=2, encoder_dropout=0.0),
        _v("prefix", "prefix", num_virtual_tokens=4),
        _v("prefix_zero", "prefix", num_virtual_tokens=4, init_weights="zero"),
        _v("prefix_proj", "prefix", num_virtual_tokens=5, prefix_projection=True, encoder_hidden_size=24),
        _v("prefix_proj_zero", "prefix", num_virtual_tokens=3, prefix_projection=True, encoder_hidden_size=16,
           init_weights="zero"),
    ]
}
# one variant per method, for tests that need not run the whole grid
ONE_PER_METHOD = ("prompt_random", "ptune_mlp", "prefix_proj")


@pytest.fixture(params=list(FAMILIES))
def family(request) -> str:
    return request.param


@pytest.fixture(params=list(VARIANTS))
def variant(request) -> Variant:
    return VARIANTS[request.param]


# -- peft and softprompt on the same base ----------------------------------------------------------
@dataclass
class Pair:
    base: transformers.PreTrainedModel  # untouched copy
    peft: peft.PeftModel
    ours: softprompt.PeftModel
    variant: Variant


def build_ours(base, variant: Variant, tokenizer_dir: str | None = None, **overrides) -> softprompt.PeftModel:
    return softprompt.get_peft_model(copy.deepcopy(base), variant.config(softprompt, tokenizer_dir, **overrides))


def build_pair(family: str, variant: Variant, tokenizer_dir: str | None = None, seed: int = 0) -> Pair:
    """peft and softprompt on deep copies of one base; softprompt's adapter weights copied from peft's."""
    base = make_base(family, seed)
    torch.manual_seed(seed + 1)
    pm = peft.get_peft_model(copy.deepcopy(base), variant.config(peft, tokenizer_dir))
    sm = build_ours(base, variant, tokenizer_dir)
    sm.prompt_encoder["default"].load_state_dict(pm.prompt_encoder["default"].state_dict())
    return Pair(base, pm, sm, variant)


@pytest.fixture
def pair(family, variant, tokenizer_dir) -> Pair:
    return build_pair(family, variant, tokenizer_dir)


# -- data ------------------------------------------------------------------------------------------
def make_batch(batch: int = 3, length: int = 7, *, pad: str | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random ids in [4, VOCAB), mask, labels (-100 on pads). `pad` = "right" | "left" | None: rows of
    decreasing length padded on that side."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, VOCAB, (batch, length), generator=g)
    mask = torch.ones(batch, length, dtype=torch.long)
    if pad is not None:
        for i in range(batch):
            n = length - min(i * 2, length - 2)  # real tokens in row i
            if pad == "right":
                mask[i, n:] = 0
            else:
                mask[i, : length - n] = 0
        ids = ids.masked_fill(mask == 0, PAD)
    labels = ids.masked_fill(mask == 0, -100)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def forward_greedy(model, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """Greedy decoding by re-running the full forward each step (no cache, no eos): the reference for
    peft, whose own `generate` is broken with transformers 5.2x (see test_generation)."""
    for _ in range(steps):
        with torch.no_grad():
            logits = model(input_ids=ids).logits[:, -1]
        ids = torch.cat([ids, logits.argmax(-1, keepdim=True)], dim=1)
    return ids


def trainable(model) -> dict[str, torch.nn.Parameter]:
    """Trainable parameters by their name inside the default adapter (same names in peft and ours)."""
    prefix = "prompt_encoder.default."
    return {n.split(prefix, 1)[1]: p for n, p in model.named_parameters() if p.requires_grad and prefix in n}

