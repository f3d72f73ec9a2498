"""Prompt Tuning (Lester et al., 2021, https://arxiv.org/abs/2104.08691).

V learned embeddings go before the text's token embeddings; the frozen model reads them as words:

    [v1 v2 ... vV] [Human: ... Assistant: ...]   -> frozen decoder
"""

from __future__ import annotations

import math

import torch
from torch import nn

from softprompt.methods.adapter import PromptAdapter
from softprompt.methods.config import ModelShape, PromptTuningConfig, PromptTuningInit

__all__ = ["PromptEmbedding", "PromptTuningConfig", "PromptTuningInit"]


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
