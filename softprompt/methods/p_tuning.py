"""P-Tuning (Liu et al., 2021, https://arxiv.org/abs/2103.10385).

Like Prompt Tuning, V virtual embeddings go before the text, but they are reparameterised: a small
encoder (MLP, or bidirectional LSTM + MLP head) maps V learned inputs to the V embeddings.

    e (V, D) -> encoder -> [v1 ... vV] [text]   -> frozen decoder
"""

from __future__ import annotations

import torch
from torch import nn

from softprompt.methods.adapter import PromptAdapter
from softprompt.methods.config import ModelShape, PromptEncoderConfig, PromptEncoderReparameterizationType

__all__ = ["PromptEncoder", "PromptEncoderConfig", "PromptEncoderReparameterizationType"]


class PromptEncoder(PromptAdapter):
    """`embedding` `(V, D)` -> MLP or LSTM+MLP -> `(V, D)`.

    The MLP has `encoder_num_layers` hidden layers (peft's fixed shape is 2, the default);
    `encoder_dropout` applies between the LSTM's layers (torch's meaning) and, beyond peft, after each
    hidden ReLU of the MLP. In inference mode (loaded from a peft file) only `embedding` exists and
    holds the encoder's output.
    """

    def __init__(self, config: PromptEncoderConfig, shape: ModelShape):
        super().__init__(config, shape)
        dim = config.token_dim or shape.hidden_size
        hidden = config.encoder_hidden_size or dim
        self.embedding = nn.Embedding(config.num_virtual_tokens, dim)
        self.lstm_head: nn.LSTM | None = None
        self.mlp_head: nn.Sequential | None = None
        if config.inference_mode:
            return
        kind = config.encoder_reparameterization_type
        if kind is PromptEncoderReparameterizationType.LSTM:
            self.lstm_head = nn.LSTM(
                input_size=dim,
                hidden_size=hidden,
                num_layers=config.encoder_num_layers,
                dropout=config.encoder_dropout if config.encoder_num_layers > 1 else 0.0,
                bidirectional=True,
                batch_first=True,
            )
            self.mlp_head = nn.Sequential(nn.Linear(2 * hidden, 2 * hidden), nn.ReLU(), nn.Linear(2 * hidden, dim))
        else:
            layers: list[nn.Module] = [nn.Linear(dim, hidden), nn.ReLU()]
            for _ in range(config.encoder_num_layers - 1):
                if config.encoder_dropout:
                    layers.append(nn.Dropout(config.encoder_dropout))
                layers += [nn.Linear(hidden, hidden), nn.ReLU()]
            layers.append(nn.Linear(hidden, dim))
            self.mlp_head = nn.Sequential(*layers)

    def has_encoder(self) -> bool:
        return self.mlp_head is not None

    def compute(self) -> torch.Tensor:
        x = self.embedding.weight  # (V, D)
        if self.lstm_head is not None:
            x = self.lstm_head(x[None])[0][0]  # (V, 2H)
        if self.mlp_head is not None:
            x = self.mlp_head(x)  # (V, D)
        return x

    def input_embeddings(self) -> torch.Tensor:
        return self.prompt()

    def load_exported(self, prompt_embeddings: torch.Tensor) -> None:
        if self.has_encoder():
            raise ValueError("a P-Tuning encoder cannot be rebuilt from its output alone; load it in inference mode")
        with torch.no_grad():
            self.embedding.weight.copy_(prompt_embeddings)
