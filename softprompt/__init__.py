"""softprompt: Prompt Tuning, P-Tuning and Prefix-Tuning for causal language models.

peft's names, so that `from softprompt import ...` replaces `from peft import ...` in existing scripts.
"""

from softprompt.core.model import PeftModel, PeftModelForCausalLM, get_peft_model
from softprompt.methods.adapter import PromptAdapter
from softprompt.methods.config import ModelShape, PromptLearningConfig, TaskType
from softprompt.methods.p_tuning import PromptEncoder, PromptEncoderConfig, PromptEncoderReparameterizationType
from softprompt.methods.prefix_tuning import PrefixEncoder, PrefixTuningConfig
from softprompt.methods.prompt_tuning import PromptEmbedding, PromptTuningConfig, PromptTuningInit

__version__ = "0.1.0"

__all__ = [
    "PeftModel", "PeftModelForCausalLM", "get_peft_model", "TaskType", "PromptLearningConfig", "ModelShape",
    "PromptAdapter", "PromptTuningConfig", "PromptTuningInit", "PromptEmbedding", "PromptEncoderConfig",
    "PromptEncoderReparameterizationType", "PromptEncoder", "PrefixTuningConfig", "PrefixEncoder",
]
