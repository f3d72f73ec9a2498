"""transformers' generation settings: `GenerationConfig` resolved as `generate()` resolves it (its global
defaults included), and the subset of its logits processors softprompt supports, in its order.
"""

from __future__ import annotations

import copy

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import (
    LogitsProcessorList,
    MinLengthLogitsProcessor,
    MinNewTokensLengthLogitsProcessor,
    MinPLogitsWarper,
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

_DEFAULTS = {
    "max_length": 20, "min_length": 0, "do_sample": False, "use_cache": True, "num_beams": 1, "temperature": 1.0,
    "top_k": 50, "top_p": 1.0, "typical_p": 1.0, "repetition_penalty": 1.0, "no_repeat_ngram_size": 0,
    "num_return_sequences": 1,
}  # transformers' global defaults (GenerationConfig._get_default_generation_params)

# Settings this loop does not implement: refused when set, never ignored.
_UNSUPPORTED = {
    "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None, "guidance_scale": None, "bad_words_ids": None,
    "force_words_ids": None, "constraints": None, "sequence_bias": None, "forced_bos_token_id": None,
    "forced_eos_token_id": None, "suppress_tokens": None, "begin_suppress_tokens": None, "stop_strings": None,
    "assistant_model": None, "prompt_lookup_num_tokens": None, "watermarking_config": None,
    "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "exponential_decay_length_penalty": None, "top_h": None,
    "output_scores": False, "output_logits": False, "return_dict_in_generate": False,
}


def resolve_generation_config(base_model, generation_config: GenerationConfig | None, kwargs: dict) -> GenerationConfig:
    """User kwargs > `generation_config` > the model's generation config > transformers' defaults."""
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    model_config = getattr(base_model, "generation_config", None)
    if model_config is not None:
        config.update(**model_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    defaults = getattr(GenerationConfig, "_get_default_generation_params", lambda: _DEFAULTS)()
    config.update(**defaults, defaults_only=True)
    unknown = config.update(**kwargs)
    if unknown:
        raise TypeError(f"generate() got unknown arguments {sorted(unknown)}; see transformers' GenerationConfig")
    for name, default in _UNSUPPORTED.items():
        value = getattr(config, name, default)
        if value not in (default, None) and not (name in _DEFAULTS and value == _DEFAULTS[name]):
            raise ValueError(f"generate(): {name}={value!r} is not supported by softprompt; leave it unset")
    return config


def logits_processors(config: GenerationConfig, input_length: int, eos: torch.Tensor | None, device) -> LogitsProcessorList:
    """The subset of transformers' processors softprompt supports, in transformers' order."""
    procs = LogitsProcessorList()
    if config.repetition_penalty is not None and config.repetition_penalty != 1.0:
        procs.append(RepetitionPenaltyLogitsProcessor(penalty=config.repetition_penalty))
    if config.no_repeat_ngram_size:
        procs.append(NoRepeatNGramLogitsProcessor(config.no_repeat_ngram_size))
    if config.min_length and eos is not None:
        procs.append(MinLengthLogitsProcessor(config.min_length, eos, device=device))
    if config.min_new_tokens and eos is not None:
        procs.append(MinNewTokensLengthLogitsProcessor(input_length, config.min_new_tokens, eos, device=device))
    if config.do_sample:
        procs.extend(sampling_warpers(config.temperature, config.top_k, config.top_p))
        if config.min_p is not None:
            procs.append(MinPLogitsWarper(min_p=config.min_p, min_tokens_to_keep=1))
        if config.typical_p is not None and config.typical_p < 1.0:
            procs.append(TypicalLogitsWarper(mass=config.typical_p, min_tokens_to_keep=1))
    return procs


def sampling_warpers(temperature: float | None, top_k: int | None, top_p: float | None) -> list:
    """Temperature, then top-k, then top-p, as transformers warps (each left out when it is off: 1.0, 0, 1.0).

    `generate` and the serving engine's sampler (`serve/sampler.py`) both warp through these, so a sample means
    the same in both; each warper maps last-position scores `(B, vocab)` to warped scores, ignoring the ids.
    """
    warpers = []
    if temperature is not None and temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(temperature))
    if top_k:
        warpers.append(TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p is not None and top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    return warpers


def eos_tensor(config: GenerationConfig, device) -> torch.Tensor | None:
    eos = config.eos_token_id
    if eos is None:
        return None
    return torch.tensor([eos] if isinstance(eos, int) else list(eos), device=device)
