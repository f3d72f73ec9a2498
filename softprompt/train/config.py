"""What `softprompt train` reads: one flat mapping of keys, from a YAML file and `--key value` overrides.

Keys are named as the seed scripts name them: the method's config fields (`num_virtual_tokens`,
`prompt_tuning_init_text`, `encoder_hidden_size`, `prefix_projection`, ...), every `TrainingArguments`
field (`learning_rate`, `per_device_train_batch_size`, `save_steps`, ...), and softprompt's own
(`model`, `data`, `method`, `max_length`, `template`, ...). An unknown key is an error that lists the
nearest known ones; a key of another method is an error that names its method.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from softprompt.data.conversations import FORMATS, LOSS_ON
from softprompt.data.registry import DataSource, resolve
from softprompt.methods.config import ModelShape, PromptLearningConfig, format_rate, methods

if TYPE_CHECKING:
    from transformers import TrainingArguments

METHODS: dict[str, type[PromptLearningConfig]] = methods()  # prompt_tuning, p_tuning, prefix_tuning
# Each method's base learning rate; a run takes its variant's: `PromptLearningConfig.default_learning_rate()`
DEFAULT_LEARNING_RATES = {name: cls.learning_rate for name, cls in METHODS.items()}
BASE_DTYPES = ("auto", "float32", "bfloat16", "float16")  # the seed's P-Tuning and prefix scripts
SHARD_BASE = ("no", "fsdp")
# `shard_base: fsdp`: FSDP2 over the base's decoder layers (filled in from the model), the rest (embeddings, head,
# the adapter) sharded as one root unit; a full state dict gathered to save. A given `fsdp_config` goes on top.
FSDP_SETTINGS = {"version": 2, "auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "reshard_after_forward": True,
                 "state_dict_type": "FULL_STATE_DICT"}

# Config fields that softprompt sets itself (or that causal LMs fix); not user keys.
_INTERNAL = {
    "task_type", "inference_mode", "peft_version", "auto_mapping", "modules_to_save", "num_transformer_submodules",
    "base_model_name_or_path", "revision", "token_dim", "num_attention_heads", "num_layers", "tokenizer_kwargs",
}


def method_keys(method: str) -> list[str]:
    return [f.name for f in dataclasses.fields(METHODS[method]) if f.name not in _INTERNAL]


ALL_METHOD_KEYS = sorted({k for m in METHODS for k in method_keys(m)})


@functools.cache
def _training_arguments() -> type[TrainingArguments]:
    """transformers' `TrainingArguments`, imported when first needed: the import takes seconds (accelerate,
    the Trainer's modules), and a bad method option is refused before it."""
    from transformers import TrainingArguments

    return TrainingArguments


@functools.cache
def training_keys() -> list[str]:
    return [f.name for f in dataclasses.fields(_training_arguments()) if f.init]


@dataclass(frozen=True)
class TrainConfig:
    """A whole training run. `peft` holds the method's keys, `training` the TrainingArguments keys."""

    data: str
    model: str = "builtin:smollm2-135m"
    method: str = "prompt_tuning"
    max_length: int = 256  # the seed's MAX_LENGTH
    template: str = "alpaca"  # "alpaca" (the seed's Human/Assistant template) or "chat" (the tokenizer's)
    eval_data: str | None = None  # a separate validation file; otherwise val_size rows of `data`
    val_size: float | int = 0.05  # fraction or row count held out for eval loss; 0: none
    max_skipped_fraction: float = 0.05  # more bad rows than this (skipped, reported) stops the run: exit code 2
    instruction_column: str = "instruction"
    input_column: str = "input"
    output_column: str = "output"
    # Conversations (docs/TRAINING.md, Data): the format (auto: from the columns), whose tokens are learned,
    # the column of turns (default: conversations / messages) and of the system text
    format: str = "auto"
    loss_on: str = "assistant"
    messages_column: str | None = None
    system_column: str | None = None  # default: a conversation file's `system` column; Alpaca rows: none
    data_split: str = "train"  # the split of a hub dataset (hub:owner/name) or of a DatasetDict folder
    dataset_registry: str | None = None  # a JSON file of name -> {path or hub, format, columns, split}
    # Packing (docs/TRAINING.md): the rows of one optimizer step (batch x accumulation) run as packed
    # micro-batches of at most pack_tokens slots; rows of at most pack_length slots when given (default: max_length
    # plus the prompt, longer off a GPU where that is less work). packing=false keeps Trainer's padded micro-batches.
    packing: bool = True
    pack_tokens: int = 16384
    pack_length: int | None = None
    base_dtype: str = "auto"  # the frozen base: "auto" (bfloat16 on a GPU that has it, else float32), or a dtype
    compile: str = "auto"  # torch.compile the base's layers: "auto" (on a GPU with triton), "true", "false"
    # CUDA graphs of the packed base's forward and backward (core/packed_graphs.py): "auto" (on a GPU), "true", "false"
    cuda_graphs: str = "auto"
    cache_tokenized: bool = True  # keep the tokenized rows on disk (token_cache.py); false: tokenize every run
    # "fsdp": shard the frozen base's decoder layers over the processes (a base too large for one GPU; GPUs only,
    # docs/TRAINING.md); "no": every process holds the whole base (DDP)
    shard_base: str = "no"
    peft: dict[str, Any] = field(default_factory=dict)
    training: dict[str, Any] = field(default_factory=dict)
    # The method's config, built (and so checked) when the run config is read, before any model is loaded
    method_config: PromptLearningConfig = field(init=False, repr=False, compare=False)
    # Where `data` and `eval_data` come from (a registry name resolved), also checked when the config is read
    data_source: DataSource = field(init=False, repr=False, compare=False)
    eval_source: DataSource | None = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method={self.method!r} is not valid; allowed values: {', '.join(METHODS)}")
        if self.template not in ("alpaca", "chat"):
            raise ValueError(f"template={self.template!r} is not valid; allowed values: 'alpaca', 'chat'")
        if isinstance(self.max_length, bool) or not isinstance(self.max_length, int) or self.max_length < 2:
            raise ValueError(f"max_length={self.max_length!r} is not valid; it must be an integer of at least 2")
        if isinstance(self.val_size, bool) or not isinstance(self.val_size, (int, float)) or self.val_size < 0:
            raise ValueError(f"val_size={self.val_size!r} is not valid; give a fraction in [0, 1) or a row count")
        for name in ("packing", "cache_tokenized"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; give true or false")
        for name in ("pack_tokens", "pack_length"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} is not valid; give a positive number of tokens")
        for name in ("compile", "cuda_graphs"):
            value = getattr(self, name)
            if isinstance(value, bool):  # YAML reads `compile: true` as a truth value
                object.__setattr__(self, name, value := str(value).lower())
            if value not in ("auto", "true", "false"):
                raise ValueError(f"{name}={value!r} is not valid; allowed values: auto, true, false")
        if self.shard_base not in SHARD_BASE:
            raise ValueError(f"shard_base={self.shard_base!r} is not valid; allowed values: {', '.join(SHARD_BASE)}")
        if self.shard_base != "no":
            given = [k for k in ("fsdp", "deepspeed") if self.training.get(k)]
            if given or isinstance(self.training.get("fsdp_config"), str):
                raise ValueError(f"shard_base={self.shard_base!r} fills fsdp and fsdp_config itself; remove "
                                 f"{' and '.join(given) or 'the fsdp_config file'} (give fsdp_config as a mapping "
                                 "to add settings), or remove shard_base to configure them by hand")
        if self.base_dtype not in BASE_DTYPES:
            raise ValueError(f"base_dtype={self.base_dtype!r} is not valid; allowed values: {', '.join(BASE_DTYPES)}")
        if isinstance(self.max_skipped_fraction, bool) or not isinstance(self.max_skipped_fraction, (int, float)) \
                or not 0 <= self.max_skipped_fraction <= 1:
            raise ValueError(f"max_skipped_fraction={self.max_skipped_fraction!r} is not valid; give a fraction in [0, 1]")
        if not self.data:
            raise ValueError("data is required: a .json/.jsonl/.csv/.parquet file or folder (Alpaca rows or "
                             "conversations), hub:owner/name, or a name in dataset_registry")
        for name, allowed in (("format", FORMATS), ("loss_on", LOSS_ON)):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}={getattr(self, name)!r} is not valid; allowed values: {', '.join(allowed)}")
        for name in ("messages_column", "system_column", "data_split", "dataset_registry"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or not value):
                raise ValueError(f"{name}={value!r} is not valid; give a name")
        object.__setattr__(self, "data_source", self._source(self.data))
        object.__setattr__(self, "eval_source", self._source(self.eval_data) if self.eval_data else None)
        _check_method_keys(self.method, self.peft)
        if "output_dir" not in self.training:
            raise ValueError("output_dir is required (TrainConfig.from_mapping sets a default)")
        object.__setattr__(self, "method_config", METHODS[self.method].for_training(self.peft, self.model))

    def _source(self, data: str) -> DataSource:
        defaults = {"instruction": "instruction", "input": "input", "output": "output", "messages": None,
                    "system": None}
        columns = {role: getattr(self, f"{role}_column") for role in defaults}
        given = {role: name for role, name in columns.items() if name != defaults[role]}
        return resolve(str(data), self.dataset_registry, self.format, given, self.data_split)

    # -- building ---------------------------------------------------------------------------------
    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> "TrainConfig":
        """Sort a flat mapping into softprompt's keys, the method's and TrainingArguments'."""
        values = dict(values)
        own = {f.name for f in dataclasses.fields(cls) if f.init} - {"peft", "training"}
        method = _method_name(values.get("method", "prompt_tuning"))
        values["method"] = method
        peft = {k: _coerce(k, v, _type_of(METHODS[method], k))
                for k, v in values.items() if k in ALL_METHOD_KEYS and k not in own}
        # The method's options first: they need neither a model nor transformers' TrainingArguments
        _check_method_keys(method, peft)
        METHODS[method].for_training(peft, str(values.get("model", cls.model)))
        unknown = [k for k in values if k not in own and k not in ALL_METHOD_KEYS and k not in training_keys()]
        if unknown:
            known = sorted(own) + ALL_METHOD_KEYS + training_keys()
            hints = []
            for k in unknown:
                near = difflib.get_close_matches(k, known, n=3, cutoff=0.6)
                hints.append(f"{k!r}" + (f" (did you mean {', '.join(near)}?)" if near else ""))
            raise ValueError(
                f"unknown config key{'s' if len(unknown) > 1 else ''}: {'; '.join(hints)}. Keys are softprompt's "
                f"({', '.join(sorted(own))}), the method's ({', '.join(method_keys(method))}) and any "
                "TrainingArguments field"
            )
        if not values.get("data"):
            raise ValueError("data is required: a .json/.jsonl/.csv/.parquet file or save_to_disk folder (Alpaca "
                             "rows or conversations), hub:owner/name, or a name in dataset_registry (in the YAML "
                             "config or as --data ...)")
        mine = {k: _coerce(k, v, _type_of(cls, k)) for k, v in values.items() if k in own}
        training = {k: _coerce(k, v, _type_of(_training_arguments(), k))
                    for k, v in values.items() if k in training_keys()}
        training.setdefault("output_dir", str(Path("runs") / method))
        return cls(peft=peft, training=training, **mine)

    @classmethod
    def load(cls, path: str | Path | None, overrides: dict[str, Any] | None = None) -> "TrainConfig":
        """A YAML file (or nothing), then overrides on top."""
        values: dict[str, Any] = {}
        if path is not None:
            path = Path(path)
            if not path.is_file():
                raise FileNotFoundError(f"config file {str(path)!r} does not exist")
            try:
                loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
            except yaml.YAMLError as err:
                raise ValueError(f"{path} is not valid YAML: {err}") from err
            if loaded is not None and not isinstance(loaded, dict):
                raise ValueError(f"{path} must hold a mapping of keys to values, got {type(loaded).__name__}")
            values.update(loaded or {})
        values.update(overrides or {})
        return cls.from_mapping(values)

    def to_mapping(self) -> dict[str, Any]:
        """The flat mapping again (what `softprompt_train.yaml` in the output folder holds)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
               if f.init and f.name not in ("peft", "training")}
        return {**out, **self.peft, **self.training}

    # -- what the run uses ------------------------------------------------------------------------
    def learning_rate(self, method_config: PromptLearningConfig | None = None,
                      shape: ModelShape | None = None) -> tuple[float, str]:
        """The run's learning rate, and the line that says why (given, or the variant's default and its rule).

        `method_config`: the method's config built with the tokenizer (`peft_config`) and sized for the model;
        `shape`: the loaded model's, embedding scale measured; where a rule needs them.
        """
        default = (method_config or self.method_config).default_learning_rate(shape)
        if "learning_rate" not in self.training:
            return default.value, str(default)
        given = float(self.training["learning_rate"])
        return given, (f"learning_rate {format_rate(given)} (given; softprompt's default for {default.variant} "
                       f"would be {format_rate(default.value)})")

    def training_arguments(self, has_eval: bool, method_config: PromptLearningConfig | None = None,
                           shape: ModelShape | None = None, layer_classes: list[str] | None = None) -> TrainingArguments:
        """TrainingArguments with softprompt's defaults under the user's keys (docs/TRAINING.md lists them).

        `layer_classes`: the base's decoder-layer class names (`hf/backbone.py::decoder_layer_classes`), FSDP's
        units under `shard_base: fsdp`.
        """
        args: dict[str, Any] = {
            "learning_rate": self.learning_rate(method_config, shape)[0],
            "logging_steps": 10,  # the seed's value; Trainer's 500 leaves short runs with no curve
            "report_to": "none",
            "ddp_find_unused_parameters": False,  # every trainable parameter is used in every step
            # Trainer's NaN filter reads the loss on the host every step, so the GPU drains before the next step
            # is queued; a NaN then shows in the logged loss instead of being replaced by an average.
            "logging_nan_inf_filter": False,
        }
        if _has_accelerator():
            # Use the hardware: bf16 autocast where the GPU has it, and batches made off the training loop.
            args["bf16"] = "fp16" not in self.training and _has_bf16()
            if "dataloader_num_workers" not in self.training:
                args["dataloader_num_workers"] = 2
                args["dataloader_persistent_workers"] = True
            # accelerate copies each batch to the GPU; blocking copies would wait for the previous step to finish
            # (the loader pins its batches, so these copies overlap the GPU's work)
            args["accelerator_config"] = {"non_blocking": True}
        if "use_cpu" not in self.training and int(os.environ.get("WORLD_SIZE", "1")) > 1 and not _has_accelerator():
            # torchrun / accelerate launch on a CPU-only machine: Trainer runs data-parallel over gloo only
            # with use_cpu=True; without it every process trains alone on the whole data.
            args["use_cpu"] = True
        args.update(self.training)
        if self.shard_base == "fsdp" or args.get("fsdp"):
            if not _has_accelerator():
                # accelerate builds FSDP on accelerators only: on CPU each process would train as plain DDP,
                # holding the whole base, with no word said
                raise ValueError(f"{'shard_base=fsdp' if self.shard_base == 'fsdp' else 'fsdp'} needs GPUs: "
                                 "accelerate runs FSDP on accelerators only, and on CPU the processes would train "
                                 "as plain DDP with the whole base each; remove it to train data-parallel on CPU")
        if self.shard_base == "fsdp":
            if not layer_classes:
                raise ValueError("shard_base=fsdp: the base model names no decoder-layer classes to shard "
                                 "(transformers' _no_split_modules); give fsdp and fsdp_config by hand instead")
            args["fsdp"] = True
            args["fsdp_config"] = {**FSDP_SETTINGS, "transformer_layer_cls_to_wrap": list(layer_classes),
                                   **(self.training.get("fsdp_config") or {})}
        if has_eval and "eval_strategy" not in self.training:
            args["eval_strategy"] = args.get("save_strategy", "steps")
            if "eval_steps" not in self.training and "save_steps" in self.training:
                args["eval_steps"] = self.training["save_steps"]
        return _training_arguments()(**args)

    def peft_config(self, tokenizer) -> PromptLearningConfig:
        """The method's config, built again with the base model's tokenizer (prompt tuning's TEXT init counts
        the text's tokens: one virtual token per token when num_virtual_tokens is not given, as the seed)."""
        return METHODS[self.method].for_training(self.peft, self.model, tokenizer)


def _check_method_keys(method: str, keys: dict[str, Any]) -> None:
    """Refuse a key of another method, naming its method."""
    own = set(method_keys(method))
    for key in keys:
        if key not in own:
            owners = [m for m in METHODS if key in method_keys(m)]
            raise ValueError(
                f"{key} is a {' / '.join(owners)} option, but method={method!r}; remove it or set method to {owners[0]!r}"
            )


def _has_accelerator() -> bool:
    import torch

    accelerator = getattr(torch, "accelerator", None)
    return accelerator.is_available() if accelerator is not None else torch.cuda.is_available()


def _has_bf16() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def base_dtype(name: str):
    """The torch dtype to load the frozen base in: "auto" is bfloat16 on a GPU that has it, else float32."""
    import torch

    if name == "auto":
        return torch.bfloat16 if _has_bf16() else torch.float32
    return getattr(torch, name)


def _method_name(value: Any) -> str:
    """`prompt_tuning`, also peft's `PROMPT_TUNING` or `prompt-tuning`."""
    name = str(value).strip().lower().replace("-", "_")
    if name not in METHODS:
        near = difflib.get_close_matches(name, list(METHODS), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ValueError(f"method={value!r} is not valid{hint}; allowed values: {', '.join(METHODS)}")
    return name


def _type_of(cls: type, name: str) -> str:
    for f in dataclasses.fields(cls):
        if f.name == name:
            return str(f.type)
    return ""


_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(name: str, value: Any, type_text: str) -> Any:
    """`value` as the field's type where a string says a number or a truth value (YAML reads `1e-3` as a
    string, and `--key value` overrides arrive as strings); anything else is left for the field to check."""
    if isinstance(value, str):
        text = value.strip()
        if "bool" in type_text and text.lower() in ("true", "false", "yes", "no"):
            return text.lower() in ("true", "yes")
        if "int" in type_text and re.fullmatch(r"[+-]?\d+", text):
            return int(text)
        if "float" in type_text and _FLOAT.match(text):
            return float(text)
        if text.lower() in ("null", "none", "~") and "None" in type_text and "str" not in type_text:
            return None
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        numeric = any(t in type_text for t in ("int", "float"))
        if not numeric and "str" in type_text:
            return str(value)
    return value


def parse_overrides(tokens: list[str]) -> dict[str, Any]:
    """`--key value` / `--key=value` pairs, values read as YAML scalars (`true`, `3`, `[a, b]`).

    A key with no value (`--prefix_projection`) means true.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(tokens):
        token = tokens[i]
        if not token.startswith("--") or len(token) == 2:
            raise ValueError(f"expected --key value, got {token!r}")
        key, eq, raw = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            if i + 1 < len(tokens) and not tokens[i + 1].startswith("--"):
                raw = tokens[i + 1]
                i += 1
            else:
                raw = "true"
        i += 1
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError:
            value = raw
        # Keep the text as typed where YAML would turn a name into something else ("no" -> False, "1.0" -> 1.0).
        out[key] = raw if isinstance(value, (bool, int, float)) or value is None else value
    return out
