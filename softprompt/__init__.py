"""softprompt: Prompt Tuning, P-Tuning and Prefix-Tuning for causal language models.

peft's names, so that `from softprompt import ...` replaces `from peft import ...` in existing scripts.
"""

from typing import TYPE_CHECKING

# Imported on first use, so that `softprompt --help` and a bad `softprompt train` option answer before torch
# and transformers' model code are loaded.
_WHERE = {
    "PeftModel": "softprompt.core.model", "PeftModelForCausalLM": "softprompt.core.model",
    "get_peft_model": "softprompt.core.model", "PromptAdapter": "softprompt.methods.adapter",
    "PromptEncoder": "softprompt.methods.p_tuning", "PrefixEncoder": "softprompt.methods.prefix_tuning",
    "PromptEmbedding": "softprompt.methods.prompt_tuning",
    **{name: "softprompt.methods.config" for name in (  # the configs: no torch
        "ModelShape", "PromptLearningConfig", "TaskType", "PromptEncoderConfig", "PromptEncoderReparameterizationType",
        "PrefixTuningConfig", "PromptTuningConfig", "PromptTuningInit")},
}

if TYPE_CHECKING:
    from softprompt.core.model import PeftModel, PeftModelForCausalLM, get_peft_model
    from softprompt.methods.adapter import PromptAdapter
    from softprompt.methods.config import (
        ModelShape, PrefixTuningConfig, PromptEncoderConfig, PromptEncoderReparameterizationType, PromptLearningConfig,
        PromptTuningConfig, PromptTuningInit, TaskType,
    )
    from softprompt.methods.p_tuning import PromptEncoder
    from softprompt.methods.prefix_tuning import PrefixEncoder
    from softprompt.methods.prompt_tuning import PromptEmbedding


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'softprompt' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(_WHERE[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_WHERE))


__version__ = "0.1.0"

__all__ = [
    "PeftModel", "PeftModelForCausalLM", "get_peft_model", "TaskType", "PromptLearningConfig", "ModelShape",
    "PromptAdapter", "PromptTuningConfig", "PromptTuningInit", "PromptEmbedding", "PromptEncoderConfig",
    "PromptEncoderReparameterizationType", "PromptEncoder", "PrefixTuningConfig", "PrefixEncoder",
]
