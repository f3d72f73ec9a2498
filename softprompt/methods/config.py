"""What a user sets for each method: the configs, the registry of methods, and the base model's shape.

Configs are frozen dataclasses with peft's field names, so that peft's `adapter_config.json` reads into
them and theirs into peft. Values that depend on the base model are filled by `resolve(model_config)`,
which returns a new config; nothing mutates a config in place.

No torch here: `softprompt train` reads and checks a run's config (a bad option fails at once) before torch
loads. Each method's module lives in `methods/<method_name>.py`, which its config's `build()` imports.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from torch import nn

    from softprompt.methods.p_tuning import PromptEncoder
    from softprompt.methods.prefix_tuning import PrefixEncoder
    from softprompt.methods.prompt_tuning import PromptEmbedding


class TaskType(str, enum.Enum):
    """peft's task types; softprompt trains causal language models only."""

    CAUSAL_LM = "CAUSAL_LM"
    SEQ_2_SEQ_LM = "SEQ_2_SEQ_LM"
    SEQ_CLS = "SEQ_CLS"
    TOKEN_CLS = "TOKEN_CLS"
    QUESTION_ANS = "QUESTION_ANS"
    FEATURE_EXTRACTION = "FEATURE_EXTRACTION"


def coerce_enum(cls: type[enum.Enum], value: Any, name: str) -> enum.Enum:
    """`value` as a member of `cls`, accepting the member, its value or its name."""
    if isinstance(value, cls):
        return value
    for member in cls:
        if value == member.value or value == member.name:
            return member
    allowed = ", ".join(repr(m.value) for m in cls)
    raise ValueError(f"{name}={value!r} is not valid; allowed values: {allowed}")


def check_positive_int(value: Any, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name}={value!r} is not valid; it must be a positive integer")


@dataclass(frozen=True)
class ModelShape:
    """What a prompt method needs to know about the frozen model it is attached to."""

    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    # The root-mean-square of the word embeddings as the model reads them (Gemma scales its table by
    # sqrt(hidden)); measured from the loaded weights (`train.trainer.embedding_rms`), None when not measured.
    # A prompt initialised from the vocabulary starts at this scale, and its default rate is a rule of it.
    embedding_rms: float | None = None

    @property
    def kv_dim(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @classmethod
    def from_model_config(cls, config: Any) -> "ModelShape":
        config = config.get_text_config() if hasattr(config, "get_text_config") else config

        def first(*names: str) -> int | None:
            for n in names:
                v = getattr(config, n, None)
                if v is not None:
                    return v
            return None

        hidden = first("hidden_size", "n_embd", "d_model")
        layers = first("num_hidden_layers", "n_layer", "num_layers")
        heads = first("num_attention_heads", "n_head")
        if hidden is None or layers is None or heads is None:
            raise ValueError(
                f"cannot read hidden size, layer count and head count from {type(config).__name__}; "
                "softprompt supports decoder-only Hugging Face models that expose them"
            )
        kv_heads = first("num_key_value_heads", "multi_query_group_num") or heads
        head_dim = first("head_dim") or hidden // heads
        return cls(hidden, layers, heads, kv_heads, head_dim, first("vocab_size") or 0)


@dataclass(frozen=True)
class DefaultLearningRate:
    """The learning rate a run takes when the user gives none, and why: which variant of the method it is for,
    and the rule that gave it (a constant from a sweep, or a formula of what the run knows)."""

    value: float
    variant: str  # e.g. "prompt tuning, TEXT init"
    rule: str

    def __str__(self) -> str:
        return (f"learning_rate {format_rate(self.value)} (softprompt's default for {self.variant}; rule: "
                f"{self.rule}); give --learning_rate to override")


def format_rate(value: float) -> str:
    """3e-1, 1.5e-4: a learning rate as people write it."""
    mantissa, exponent = f"{value:.2e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


# Where the constants come from (docs/TRAINING.md has both sweeps)
DEMO_SWEEP = "the best of a sweep on the demo data with SmolLM2-135M (docs/TRAINING.md)"
ALPACA_SWEEP = ("the best of bench/sweep_lr.py's sweeps on Alpaca rows, English with SmolLM2-135M and Chinese "
                "with Gemma 3 270M (docs/TRAINING.md)")
# P-tuning's MLP encoder: the best rate falls as the encoder widens (Adam moves each weight of a hidden layer by
# about the rate, so the output moves more the wider the layer). A power law through both sweeps' best rates:
# 1e-2 at width 128 (the demo) and 3e-3 at 576 (SmolLM2 on Alpaca rows, on the GPU and on the CPU).
def mlp_encoder_rate(width: int) -> float:
    return 1e-2 * (128 / width) ** 0.8

# Prompt tuning from the vocabulary (TEXT, SAMPLE_VOCAB init): the prompt starts as token embeddings, and Adam
# moves each entry by about the rate a step, so what a rate does depends on the embeddings' scale: SmolLM2's are
# 0.135 (RMS) and its best rate 3e-2; Gemma's, scaled by sqrt(640) as it reads them, 1.03 and 1e-1 to 3e-1.
# The default keeps the step relative to that scale (docs/TRAINING.md has both sweeps).
VOCAB_INIT_RATE_PER_RMS = 0.22


def vocab_init_rate(rms: float) -> float:
    return float(f"{VOCAB_INIT_RATE_PER_RMS * rms:.2g}")  # two digits: 3e-2, 2.3e-1


DEFAULT_NUM_VIRTUAL_TOKENS = 10  # a training run's, when the user gives none (peft requires the field)


@dataclass(frozen=True)
class PromptLearningConfig:
    """Fields common to Prompt Tuning, P-Tuning and Prefix-Tuning (peft's names and defaults)."""

    peft_type: ClassVar[str] = ""
    # What the rest of softprompt asks of a method, declared here so that no one branches on its name:
    # the learning rate a run uses when the user gives none (`default_learning_rate()`, per variant; Trainer's
    # 5e-5 barely moves a soft prompt), and whether the prompt lives in the word-embedding space (so that its
    # nearest vocabulary tokens mean something).
    learning_rate: ClassVar[float] = 1e-2
    prompt_in_vocabulary: ClassVar[bool] = True

    num_virtual_tokens: int | None = None
    task_type: TaskType | str | None = TaskType.CAUSAL_LM
    token_dim: int | None = None
    num_transformer_submodules: int | None = None
    num_attention_heads: int | None = None
    num_layers: int | None = None
    inference_mode: bool = False
    base_model_name_or_path: str | None = None
    revision: str | None = None
    modules_to_save: list[str] | None = None
    auto_mapping: dict | None = None
    peft_version: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.num_virtual_tokens is None:
            raise ValueError("num_virtual_tokens is required: the number of virtual tokens, e.g. 10")
        check_positive_int(self.num_virtual_tokens, "num_virtual_tokens")
        task = coerce_enum(TaskType, TaskType.CAUSAL_LM if self.task_type is None else self.task_type, "task_type")
        if task is not TaskType.CAUSAL_LM:
            raise ValueError(f"task_type={task.value!r} is not supported; softprompt supports 'CAUSAL_LM' only")
        object.__setattr__(self, "task_type", task)
        if self.num_transformer_submodules not in (None, 1):
            raise ValueError(
                f"num_transformer_submodules={self.num_transformer_submodules!r} is not valid; "
                "causal language models have 1"
            )
        if self.modules_to_save:
            raise ValueError(
                f"modules_to_save={self.modules_to_save!r} is not supported with prompt methods; "
                "leave it unset (train only the prompt)"
            )
        for name in ("token_dim", "num_attention_heads", "num_layers"):
            value = getattr(self, name)
            if value is not None:
                check_positive_int(value, name)

    @classmethod
    def method_name(cls) -> str:
        """The name `softprompt train` takes (`method: p_tuning`): peft's type in lower case."""
        return cls.peft_type.lower()

    @classmethod
    def for_training(cls, keys: dict[str, Any], model: str, tokenizer=None) -> "PromptLearningConfig":
        """The config a training run builds from the user's keys (`num_virtual_tokens` defaults to
        `DEFAULT_NUM_VIRTUAL_TOKENS`). `tokenizer` is None when the run config is first read, before any model
        is loaded: the config is then checked, and built again with the tokenizer where a method needs it."""
        kwargs = dict(keys)
        kwargs.setdefault("num_virtual_tokens", DEFAULT_NUM_VIRTUAL_TOKENS)
        return cls(base_model_name_or_path=model, **kwargs)

    @property
    def variant(self) -> str:
        """The method and the options that change how it learns, in words ("P-tuning, LSTM encoder")."""
        return self.method_name().replace("_", " ")

    def default_learning_rate(self, shape: ModelShape | None = None) -> DefaultLearningRate:
        """The rate for this variant when the user gives none. A method overrides it per variant; a rule may use
        the config's own fields (num_virtual_tokens, and token_dim once resolved) and the model's `shape`."""
        return DefaultLearningRate(self.learning_rate, self.variant, DEMO_SWEEP)

    def resolve(self, shape: ModelShape) -> "PromptLearningConfig":
        """This config with the model-dependent fields filled from `shape` (peft's rules)."""
        return dataclasses.replace(
            self,
            token_dim=self.token_dim or shape.hidden_size,
            num_layers=self.num_layers or shape.num_layers,
            num_attention_heads=self.num_attention_heads or shape.num_attention_heads,
            num_transformer_submodules=1,
        )

    def check_fits(self, shape: ModelShape) -> None:
        """Raise if this (resolved) config was made for a model of another shape."""
        expected = self.resolve_fresh(shape)
        mismatched = [
            f"{name}: adapter {getattr(self, name)} vs model {getattr(expected, name)}"
            for name in ("token_dim", "num_layers", "num_attention_heads")
            if getattr(self, name) is not None and getattr(self, name) != getattr(expected, name)
        ]
        if mismatched:
            raise ValueError(
                "this adapter was trained for a base model of another shape ("
                + "; ".join(mismatched)
                + f"); load it onto the model it was trained with ({self.base_model_name_or_path or 'unknown'})"
            )

    def resolve_fresh(self, shape: ModelShape) -> "PromptLearningConfig":
        cleared = dataclasses.replace(self, token_dim=None, num_layers=None, num_attention_heads=None)
        return cleared.resolve(shape)

    def to_dict(self) -> dict[str, Any]:
        """peft's `adapter_config.json` content (enums as their values)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else value
        out["peft_type"] = self.peft_type
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "PromptLearningConfig":
        """Build from `adapter_config.json` content; keys this config does not know are ignored (like peft)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# -- the registry: peft's type -> the method's config class ----------------------------------------------
_REGISTRY: dict[str, type[PromptLearningConfig]] = {}


def register(config_class: type[PromptLearningConfig]) -> type[PromptLearningConfig]:
    _REGISTRY[config_class.peft_type] = config_class
    return config_class


def methods() -> dict[str, type[PromptLearningConfig]]:
    """Every registered method by the name `softprompt train` takes (`prompt_tuning`), in registration order."""
    return {cls.method_name(): cls for cls in _REGISTRY.values()}


def config_class_for(peft_type: str) -> type[PromptLearningConfig]:
    if peft_type not in _REGISTRY:
        allowed = ", ".join(sorted(_REGISTRY))
        raise ValueError(f"peft_type={peft_type!r} is not supported by softprompt; supported: {allowed}")
    return _REGISTRY[peft_type]


# -- each method's options, in the order `softprompt train` lists them. Its module (torch) is in
# `methods/<method_name>.py`; `build()` imports it, so reading a config never loads torch.
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

    def default_learning_rate(self, shape: ModelShape | None = None) -> DefaultLearningRate:
        if self.prompt_tuning_init is PromptTuningInit.RANDOM:
            return DefaultLearningRate(3e-1, self.variant, DEMO_SWEEP + ", and of both Alpaca sweeps")
        rms = shape.embedding_rms if shape is not None else None
        if rms is None:  # the model not loaded yet: SmolLM2's value
            return DefaultLearningRate(3e-2, self.variant, f"{VOCAB_INIT_RATE_PER_RMS:g} x the RMS of the model's "
                                       "word embeddings, not measured yet (3e-2 at SmolLM2's 0.135)")
        return DefaultLearningRate(vocab_init_rate(rms), self.variant, f"{VOCAB_INIT_RATE_PER_RMS:g} x the RMS "
                                   f"{rms:.3g} of the model's word embeddings, through both Alpaca sweeps' best rates")

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

    def build(self, shape: ModelShape, word_embeddings: nn.Embedding, tokenizer=None) -> PromptEmbedding:
        from softprompt.methods.prompt_tuning import PromptEmbedding

        return PromptEmbedding(self, shape, word_embeddings, tokenizer)


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

    def default_learning_rate(self, shape: ModelShape | None = None) -> DefaultLearningRate:
        if self.encoder_reparameterization_type is PromptEncoderReparameterizationType.LSTM:
            return DefaultLearningRate(1e-2, self.variant, ALPACA_SWEEP + ", and of the demo sweep")
        width = self.encoder_hidden_size or self.token_dim
        if width is None:  # the model is not known yet: the demo's width-128 rate
            return DefaultLearningRate(self.learning_rate, self.variant, "1e-2 x (128 / encoder width)^0.8, the width unknown yet")
        return DefaultLearningRate(mlp_encoder_rate(width), self.variant,
                                   f"1e-2 x (128 / encoder width {width})^0.8, through the sweeps' best rates")

    def resolve(self, shape: ModelShape) -> "PromptEncoderConfig":
        resolved = super().resolve(shape)
        return dataclasses.replace(resolved, encoder_hidden_size=self.encoder_hidden_size or resolved.token_dim)

    def build(self, shape: ModelShape, word_embeddings: nn.Embedding | None = None, tokenizer=None) -> PromptEncoder:
        from softprompt.methods.p_tuning import PromptEncoder

        return PromptEncoder(self, shape)


@register
@dataclass(frozen=True)
class PrefixTuningConfig(PromptLearningConfig):
    peft_type = "PREFIX_TUNING"
    learning_rate = 1e-1
    prompt_in_vocabulary = False  # keys and values inside attention, not word embeddings

    encoder_hidden_size: int | None = None
    prefix_projection: bool = False
    init_weights: str | None = None  # None: random (peft's default), "zero": the prefix starts at zero

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.encoder_hidden_size is not None:
            check_positive_int(self.encoder_hidden_size, "encoder_hidden_size")
        if not isinstance(self.prefix_projection, bool):
            raise ValueError(f"prefix_projection={self.prefix_projection!r} is not valid; it must be true or false")
        if self.init_weights not in (None, "zero"):
            raise ValueError(f"init_weights={self.init_weights!r} is not valid; allowed values: None, 'zero'")

    @property
    def variant(self) -> str:
        return f"prefix tuning {'with' if self.prefix_projection else 'without'} projection"

    def default_learning_rate(self, shape: ModelShape | None = None) -> DefaultLearningRate:
        if self.prefix_projection:  # both sweeps, both seeds each; the demo trains at it with its 5% warm-up
            return DefaultLearningRate(3e-3, self.variant, ALPACA_SWEEP + ", two seeds each; the English rows diverge at 3e-2")
        return DefaultLearningRate(self.learning_rate, self.variant, ALPACA_SWEEP)

    def resolve(self, shape: ModelShape) -> "PrefixTuningConfig":
        # The prefix lives in key/value space: with grouped-query attention that is kv_heads * head_dim,
        # whatever the user passed (peft's rule too, so the files agree).
        return dataclasses.replace(
            super().resolve(shape),
            token_dim=shape.kv_dim,
            num_attention_heads=shape.num_key_value_heads,
            encoder_hidden_size=self.encoder_hidden_size or shape.kv_dim,
        )

    def build(self, shape: ModelShape, word_embeddings: nn.Embedding | None = None, tokenizer=None) -> PrefixEncoder:
        from softprompt.methods.prefix_tuning import PrefixEncoder

        return PrefixEncoder(self, shape)
