"""P-Tuning (Liu et al., 2021, https://arxiv.org/abs/2103.10385).

Like Prompt Tuning, V virtual embeddings go before the text, but they are reparameterised: a small
encoder (MLP, or bidirectional LSTM + MLP head) maps V learned inputs to the V embeddings.

    e (V, D) -> encoder -> [v1 ... vV] [text]   -> frozen decoder
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from torch import nn

from softprompt.methods.adapter import PromptAdapter, register
from softprompt.methods.config import (
    DEMO_SWEEP,
    DefaultLearningRate,
    ModelShape,
    PromptLearningConfig,
    check_positive_int,
    coerce_enum,
)


class PromptEncoderReparameterizationType(str, enum.Enum):
    MLP = "MLP"
    LSTM = "LSTM"


@register
@dataclass(frozen=True)
class PromptEncoderConfig(PromptLearningConfig):
    peft_type = "P_TUNING"
    learning_rate = 1e-2

    encoder_reparameterization_type: PromptEncoderReparameterizationType | str = PromptEncoderReparameterizationType.MLP
    encoder_hidden_size: int | None = None
    encoder_num_layers: int = 2
    encoder_dropout: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = coerce_enum(
            PromptEncoderReparameterizationType, self.encoder_reparameterization_type, "encoder_reparameterization_type"
        )
        object.__setattr__(self, "encoder_reparameterization_type", kind)
        if self.encoder_hidden_size is not None:
            check_positive_int(self.encoder_hidden_size, "encoder_hidden_size")
        check_positive_int(self.encoder_num_layers, "encoder_num_layers")
        if isinstance(self.encoder_dropout, bool) or not isinstance(self.encoder_dropout, (int, float)) or not (
            0.0 <= self.encoder_dropout < 1.0
        ):
            raise ValueError(f"encoder_dropout={self.encoder_dropout!r} is not valid; it must be in [0, 1)")

    @property
    def variant(self) -> str:
        return f"P-tuning, {self.encoder_reparameterization_type.value} encoder"

    def default_learning_rate(self) -> DefaultLearningRate:
        rates = {PromptEncoderReparameterizationType.MLP: 1e-2, PromptEncoderReparameterizationType.LSTM: 1e-2}
        return DefaultLearningRate(rates[self.encoder_reparameterization_type], self.variant, DEMO_SWEEP)

    def resolve(self, shape: ModelShape) -> "PromptEncoderConfig":
        resolved = super().resolve(shape)
        import dataclasses

        return dataclasses.replace(resolved, encoder_hidden_size=self.encoder_hidden_size or resolved.token_dim)

    def build(self, shape: ModelShape, word_embeddings: nn.Embedding | None = None, tokenizer=None) -> "PromptEncoder":
        return PromptEncoder(self, shape)


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
