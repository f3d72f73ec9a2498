"""Decoding with virtual tokens and prefixes: greedy or sampled, with or without a KV cache.

Our own loop rather than `transformers.generate`: peft bends `generate` through
`prepare_inputs_for_generation` and breaks whenever transformers changes it (peft #1352, #2140,
transformers #32060). The settings mean what they mean in transformers (`max_length` counts the input
ids, `max_new_tokens` the new ones, `do_sample`/`temperature`/`top_k`/`top_p` in transformers' order,
so a seeded sample equals transformers' own), and rows may use different adapters.
"""

from __future__ import annotations

import torch
from transformers import GenerationConfig
from transformers.generation.logits_process import LogitsProcessorList

from softprompt.core.decoding import decode_step, prefill
from softprompt.hf.generation import eos_tensor, logits_processors, resolve_generation_config


def select(logits: torch.Tensor, ids: torch.Tensor, procs: LogitsProcessorList, do_sample: bool) -> torch.Tensor:
    """Next tokens `(B,)` from last-position logits `(B, vocab)`, as transformers picks them."""
    scores = procs(ids, logits.float())
    if do_sample:
        return torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
    return scores.argmax(dim=-1)


def generate(model, input_ids=None, attention_mask=None, adapter_names=None, inputs_embeds=None,
             generation_config: GenerationConfig | None = None, **kwargs) -> torch.Tensor:
    """`(B, L + new)` token ids: the input ids then the generated ones (only the new ones for `inputs_embeds`)."""
    base = model.base_model
    for name in ("streamer", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn"):
        if kwargs.get(name) is not None:
            raise ValueError(f"generate(): {name} is not supported by softprompt")
        kwargs.pop(name, None)
    # transformers: with no max_length anywhere, the default (20) counts *new* tokens, capped by the context
    default_length = (
        kwargs.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and getattr(getattr(base, "generation_config", None), "max_length", None) is None
    )
    config = resolve_generation_config(base, generation_config, kwargs)
    if input_ids is None and inputs_embeds is None:
        raise ValueError("generate() needs input_ids (or inputs_embeds)")
    if input_ids is not None and input_ids.dim() != 2:
        raise ValueError(f"input_ids must be 2-D (batch, length), got shape {tuple(input_ids.shape)}")
    ref = input_ids if input_ids is not None else inputs_embeds
    B, L = ref.shape[:2]
    device = ref.device
    if config.num_return_sequences > 1:
        n = config.num_return_sequences
        input_ids = input_ids.repeat_interleave(n, 0) if input_ids is not None else None
        inputs_embeds = inputs_embeds.repeat_interleave(n, 0) if inputs_embeds is not None else None
        attention_mask = attention_mask.repeat_interleave(n, 0) if attention_mask is not None else None
        if adapter_names is not None and not isinstance(adapter_names, str):
            adapter_names = [a for a in adapter_names for _ in range(n)]
        B *= n
    if attention_mask is None:
        attention_mask = torch.ones(B, L, dtype=torch.long, device=device)
    max_length = L + config.max_new_tokens if config.max_new_tokens is not None else config.max_length
    if config.max_new_tokens is None and default_length:
        max_length = min(L + config.max_length, getattr(model.config, "max_position_embeddings", None) or 1 << 62)
    if max_length <= L:
        raise ValueError(
            f"the input is {L} tokens and max_length={max_length}: nothing to generate; raise max_length "
            "or set max_new_tokens"
        )
    eos = eos_tensor(config, device)
    pad = config.pad_token_id if config.pad_token_id is not None else (int(eos[0]) if eos is not None else 0)
    procs = logits_processors(config, L, eos, device)
    ids = input_ids if input_ids is not None else torch.empty(B, 0, dtype=torch.long, device=device)
    unfinished = torch.ones(B, dtype=torch.bool, device=device)
    names = model.row_adapters(adapter_names, B)

    if config.use_cache:
        logits, cache, arranged = prefill(model, input_ids, attention_mask, inputs_embeds, names)
        mask = arranged.attention_mask
        position = arranged.position_ids.max(dim=1).values  # (B,) last position per row
    else:
        logits = model(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       adapter_names=names).logits[:, -1]
    new_tokens = []
    step_mask = attention_mask
    while True:
        history = torch.cat([ids] + [t[:, None] for t in new_tokens], dim=1)
        token = select(logits, history, procs, config.do_sample)
        token = torch.where(unfinished, token, torch.full_like(token, pad))
        new_tokens.append(token)
        if eos is not None:
            unfinished &= ~torch.isin(token, eos)
        if not bool(unfinished.any()) or L + len(new_tokens) >= max_length:
            break
        if config.use_cache:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
            position = position + 1
            logits, cache = decode_step(base, token[:, None], mask, cache, position[:, None])
        else:
            step_mask = torch.cat([step_mask, step_mask.new_ones(B, 1)], dim=1)
            full = torch.cat([ids, torch.stack(new_tokens, dim=1)], dim=1) if input_ids is not None else None
            if full is None:
                raise ValueError("use_cache=False needs input_ids")
            logits = model(input_ids=full, attention_mask=step_mask, adapter_names=names).logits[:, -1]
    return torch.cat([ids, torch.stack(new_tokens, dim=1)], dim=1)
