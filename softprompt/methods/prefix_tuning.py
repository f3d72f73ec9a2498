"""Prefix-Tuning (Li & Liang, 2021, https://arxiv.org/abs/2101.00190).

V learned key/value vectors are prepended in every attention layer; the text's tokens attend to them
but the sequence itself is unchanged:

    layer l:  K = [Pk_l ; K_text]   V = [Pv_l ; V_text]

Optionally (`prefix_projection`) the prefix is an MLP of V learned embeddings, as in the paper.
"""

from __future__ import annotations

import torch
from torch import nn

from softprompt.methods.adapter import PromptAdapter
from softprompt.methods.config import ModelShape, PrefixTuningConfig

__all__ = ["PrefixEncoder", "PrefixTuningConfig"]


class PrefixEncoder(PromptAdapter):
    """`(V, layers*2*kv_dim)` prefix, either learned directly or projected from `(V, kv_dim)` embeddings.

    Flat layout (peft's): row index `2*l` of the `layers*2` axis is layer l's keys, `2*l+1` its values.
    """

    placement = "prefix"

    def __init__(self, config: PrefixTuningConfig, shape: ModelShape):
        super().__init__(config, shape)
        kv_dim = config.token_dim or shape.kv_dim
        out_dim = shape.num_layers * 2 * kv_dim
        self.transform: nn.Sequential | None = None
        if config.prefix_projection and not config.inference_mode:
            hidden = config.encoder_hidden_size or kv_dim
            self.embedding = nn.Embedding(config.num_virtual_tokens, kv_dim)
            self.transform = nn.Sequential(nn.Linear(kv_dim, hidden), nn.Tanh(), nn.Linear(hidden, out_dim))
            last = self.transform[-1]
        else:
            self.embedding = nn.Embedding(config.num_virtual_tokens, out_dim)
            last = self.embedding
        if config.init_weights == "zero" and not config.inference_mode:
            with torch.no_grad():
                last.weight.zero_()
                if getattr(last, "bias", None) is not None:
                    last.bias.zero_()

    def has_encoder(self) -> bool:
        return self.transform is not None

    def compute(self) -> torch.Tensor:
        x = self.embedding.weight
        return self.transform(x) if self.transform is not None else x  # (V, layers*2*kv_dim)

    def key_values(self) -> torch.Tensor:
        s = self.shape
        flat = self.prompt()  # (V, 2L*H*hd)
        v = flat.shape[0]
        kv = flat.view(v, 2 * s.num_layers, s.num_key_value_heads, s.head_dim).permute(1, 2, 0, 3)
        return kv.reshape(s.num_layers, 2, s.num_key_value_heads, v, s.head_dim)

    def load_exported(self, prompt_embeddings: torch.Tensor) -> None:
        if self.has_encoder():
            raise ValueError("a prefix projection cannot be rebuilt from its output alone; load it in inference mode")
        with torch.no_grad():
            self.embedding.weight.copy_(prompt_embeddings)
