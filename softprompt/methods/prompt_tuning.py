"""Prompt Tuning (Lester et al., 2021, https://arxiv.org/abs/2104.08691).

V learned embeddings go before the text's token embeddings; the frozen model reads them as words:

    [v1 v2 ... vV] [Human: ... Assistant: ...]   -> frozen decoder
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from softprompt.methods.adapter import PromptAdapter, register
from softprompt.methods.config import DEMO_SWEEP, DefaultLearningRate, ModelShape, PromptLearningConfig, coerce_enum


class PromptTuningInit(str, enum.Enum):
    RANDOM = "RANDOM"  # N(0, 1), as peft
    TEXT = "TEXT"  # the embeddings of a text's tokens, repeated or cut to V
    SAMPLE_VOCAB = "SAMPLE_VOCAB"  # the embeddings of V random vocabulary tokens


@register
@dataclass(frozen=True)
class PromptTuningConfig(PromptLearningConfig):
    peft_type = "PROMPT_TUNING"
    learning_rate = 3e-1

    prompt_tuning_init: PromptTuningInit | str = PromptTuningInit.RANDOM
    prompt_tuning_init_text: str | None = None
    tokenizer_name_or_path: str | None = None
    tokenizer_kwargs: dict | None = field(default=None, hash=False)

    def __post_init__(self) -> None:
        super().__post_init__()
        init = coerce_enum(PromptTuningInit, self.prompt_tuning_init, "prompt_tuning_init")
        object.__setattr__(self, "prompt_tuning_init", init)
        if init is PromptTuningInit.TEXT and not self.inference_mode:
            if not self.prompt_tuning_init_text:
                raise ValueError("prompt_tuning_init_text is required when prompt_tuning_init='TEXT'")
        if self.tokenizer_kwargs is not None and not isinstance(self.tokenizer_kwargs, dict):
            raise ValueError(f"tokenizer_kwargs={self.tokenizer_kwargs!r} is not valid; it must be a dict")
        if self.tokenizer_kwargs and init is not PromptTuningInit.TEXT:
            raise ValueError("tokenizer_kwargs is only used with prompt_tuning_init='TEXT'; remove it")

    @property
    def variant(self) -> str:
        return f"prompt tuning, {self.prompt_tuning_init.value} init"

    def default_learning_rate(self) -> DefaultLearningRate:
        rates = {PromptTuningInit.RANDOM: 3e-1, PromptTuningInit.TEXT: 3e-1, PromptTuningInit.SAMPLE_VOCAB: 3e-1}
        return DefaultLearningRate(rates[self.prompt_tuning_init], self.variant, DEMO_SWEEP)

    @classmethod
    def for_training(cls, keys: dict[str, Any], model: str, tokenizer=None) -> "PromptTuningConfig":
        """TEXT init: the tokenizer is the base model's, and with no num_virtual_tokens there is one virtual
        token per token of the text (the seed's script)."""
        kwargs = dict(keys)
        if str(kwargs.get("prompt_tuning_init", "")).upper().endswith(PromptTuningInit.TEXT.value):
            kwargs.setdefault("tokenizer_name_or_path", model)
            text = kwargs.get("prompt_tuning_init_text")
            if "num_virtual_tokens" not in kwargs and text and tokenizer is not None:
                kwargs["num_virtual_tokens"] = len(tokenizer(text)["input_ids"])
        return super().for_training(kwargs, model, tokenizer)

    def build(self, shape: ModelShape, word_embeddings: nn.Embedding, tokenizer=None) -> "PromptEmbedding":
        return PromptEmbedding(self, shape, word_embeddings, tokenizer)


def _init_token_ids(config: PromptTuningConfig, vocab_size: int, tokenizer) -> torch.Tensor | None:
    n = config.num_virtual_tokens
    if config.prompt_tuning_init is PromptTuningInit.SAMPLE_VOCAB:
        return torch.randint(0, vocab_size, (n,), dtype=torch.long)
    if config.prompt_tuning_init is PromptTuningInit.TEXT:
        if tokenizer is None:
            from transformers import AutoTokenizer

            source = config.tokenizer_name_or_path or config.base_model_name_or_path
            if not source:
                raise ValueError(
                    "prompt_tuning_init='TEXT' needs the model's tokenizer: set tokenizer_name_or_path"
                )
            kwargs = dict(config.tokenizer_kwargs or {})
            kwargs.pop("trust_remote_code", None)  # never run remote code from an adapter config
            tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        ids = tokenizer(config.prompt_tuning_init_text)["input_ids"]
        if not ids:
            raise ValueError("prompt_tuning_init_text tokenizes to no tokens; give a non-empty text")
        ids = (ids * math.ceil(n / len(ids)))[:n]
        return torch.tensor(ids, dtype=torch.long)
    return None


class PromptEmbedding(PromptAdapter):
    """`embedding.weight` `(V, hidden)` is the prompt itself."""

    def __init__(self, config: PromptTuningConfig, shape: ModelShape, word_embeddings: nn.Embedding | None, tokenizer=None):
        super().__init__(config, shape)
        self.embedding = nn.Embedding(config.num_virtual_tokens, config.token_dim or shape.hidden_size)
        if config.inference_mode or word_embeddings is None:
            return
        ids = _init_token_ids(config, word_embeddings.num_embeddings, tokenizer)
        if ids is not None:
            with torch.no_grad():
                weight = word_embeddings(ids.to(word_embeddings.weight.device)).detach().float()
                self.embedding.weight.copy_(weight.to(self.embedding.weight.device))

    def compute(self) -> torch.Tensor:
        return self.embedding.weight  # (V, D)

    def input_embeddings(self) -> torch.Tensor:
        return self.prompt()

    def load_exported(self, prompt_embeddings: torch.Tensor) -> None:
        with torch.no_grad():
            self.embedding.weight.copy_(prompt_embeddings)
