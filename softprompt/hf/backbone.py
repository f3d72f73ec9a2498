"""Running the frozen base model on packed rows: the transformers seams that packing needs.

Two routes, both through public modules and forward arguments (nothing is patched):

- most families (Llama, Qwen2, Mistral, Gemma, GPT-2, GPT-NeoX, ...): the backbone (`model.base_model`) takes
  a 4-D mask, which transformers' `create_causal_mask` passes through as given, and `position_ids`;
- BLOOM takes only a 2-D mask, from which it builds its ALiBi bias, so no mask can keep packed rows apart.
  Its blocks are called here in the order `BloomModel.forward` calls them, with the block-diagonal mask and
  the ALiBi bias of each key's own position (`slope * position`, as BLOOM computes it from a 2-D mask).

The LM head then runs on the positions that carry a loss only (`head_logits`).
"""

from __future__ import annotations

import torch
from torch import nn

from softprompt.hf.cache import accepts, cache_kwarg


def _window_and_layers(config) -> tuple[int | None, bool]:
    """(the attention window, whether the model mixes sliding-window and full-attention layers)."""
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        sliding = {"sliding" in str(t) for t in layer_types}
        if len(sliding) > 1:
            return window, True
        return (window if sliding == {True} else None), False
    if getattr(config, "use_sliding_window", None) is not None:
        return (window if config.use_sliding_window else None), False
    return (window or None), False


def sliding_window(config) -> int | None:
    """The window the packed mask applies: every layer's window, None for full attention.

    A model that mixes sliding-window and full layers (Gemma 2/3) gets None too: its packed segments must fit
    inside the window (`check_packable`), and then the one full-attention mask is exact for both layer kinds.
    """
    window, mixed = _window_and_layers(config)
    return None if mixed else window


def packed_mask(
    segment_ids: torch.Tensor,  # (R, T)
    position_ids: torch.Tensor,  # (R, T)
    token_adapter: torch.Tensor,  # (R, T)
    prefix_owner: torch.Tensor,  # (K,)
    prefix_positions: torch.Tensor,  # (K,)
    window: int | None,
) -> torch.Tensor:
    """`(R, 1, T, K + T)` bool, True where a query may attend: its adapter's prefix, then the earlier slots of
    its own segment. A padding slot sees itself only (a row with nothing to attend to would give NaN)."""
    R, T = segment_ids.shape
    device = segment_ids.device
    causal = torch.ones(T, T, dtype=torch.bool, device=device).tril()
    text = (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal  # (R, T, T)
    text = text & (segment_ids[:, :, None] > 0) | torch.eye(T, dtype=torch.bool, device=device)
    if window:
        text = text & (position_ids[:, :, None] - position_ids[:, None, :] < window)
    if prefix_owner.numel():
        prefix = token_adapter[:, :, None] == prefix_owner[None, None, :]  # (R, T, K)
        if window:
            prefix = prefix & (position_ids[:, :, None] - prefix_positions[None, None, :] < window)
        text = torch.cat([prefix, text], dim=-1)
    return text[:, None]


def _additive(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as the float bias eager attention adds: 0 where allowed, the dtype's minimum elsewhere."""
    zero = torch.zeros((), dtype=dtype, device=mask.device)
    return torch.where(mask, zero, torch.finfo(dtype).min)


def is_bloom(model: nn.Module) -> bool:
    backbone = getattr(model, "transformer", None)
    return backbone is not None and hasattr(backbone, "build_alibi_tensor") and hasattr(backbone, "h")


def check_packable(model: nn.Module, longest: int | None = None) -> None:
    """A clear error, before training starts, for a base model that packed rows cannot run on.

    `longest`: the most slots one packed segment spans (its prefix, virtual tokens and text). A model that mixes
    sliding-window and full-attention layers takes one mask for all layers; inside a segment no key is then
    `window` positions or more behind its query, so the block-diagonal mask is exact for both kinds of layer
    when `longest <= window`, and is refused otherwise.
    """
    window, mixed = _window_and_layers(model.config)
    if mixed and (longest is None or longest > window):
        reach = "rows of unknown length" if longest is None else f"rows of up to {longest} slots (prompt included)"
        raise ValueError(
            f"this model mixes sliding-window (window {window}) and full-attention layers, and packing gives every "
            f"layer one mask, which is exact only while each row and its prompt fit in the window; this run packs "
            f"{reach}: lower max_length so that max_length plus the prompt is at most {window}, or train with "
            "packing=false"
        )
    implementation = getattr(model.config, "_attn_implementation", "eager")
    if not is_bloom(model) and implementation not in ("eager", "sdpa"):
        raise ValueError(
            f"packing runs with attn_implementation 'sdpa' or 'eager', and this model uses {implementation!r}; "
            "load it with attn_implementation='sdpa', or train with packing=false"
        )


def packed_hidden_states(
    model: nn.Module,
    inputs_embeds: torch.Tensor,  # (R, T, D)
    mask: torch.Tensor,  # (R, 1, T, K + T) bool
    position_ids: torch.Tensor,  # (R, T)
    prefix_positions: torch.Tensor,  # (K,)
    cache,
    longest: int | None = None,  # slots of the longest segment (`check_packable`)
) -> torch.Tensor:
    """The backbone's last hidden states `(R, T, D)` (after its final norm) for packed rows."""
    if is_bloom(model):
        return _bloom_hidden_states(model.transformer, inputs_embeds, mask, position_ids, prefix_positions, cache)
    check_packable(model, longest)
    backbone = model.base_model
    implementation = getattr(model.config, "_attn_implementation", "eager")
    kwargs = {"inputs_embeds": inputs_embeds, "use_cache": False}
    kwargs["attention_mask"] = mask if implementation == "sdpa" else _additive(mask, inputs_embeds.dtype)
    if accepts(backbone, "position_ids"):
        kwargs["position_ids"] = position_ids
    if cache is not None:
        kwargs[cache_kwarg(backbone)] = cache
    return backbone(**kwargs).last_hidden_state


def _bloom_hidden_states(transformer, inputs_embeds, mask, position_ids, prefix_positions, cache) -> torch.Tensor:
    R = inputs_embeds.shape[0]
    key_positions = torch.cat([prefix_positions[None].expand(R, -1), position_ids], dim=1)  # (R, K + T)
    # BLOOM's slopes, read off its own function: the bias of position 1 is the slope.
    slopes = transformer.build_alibi_tensor(
        torch.ones(1, 2, device=inputs_embeds.device), transformer.num_heads, torch.float32
    )[:, 0, 1]  # (H,)
    alibi = slopes[None, :, None] * key_positions[:, None, :].float()  # (R, H, K + T), fp32 as BLOOM does
    alibi = alibi.reshape(R * transformer.num_heads, 1, -1).to(inputs_embeds.dtype)
    bias = _additive(mask, inputs_embeds.dtype)
    hidden = transformer.word_embeddings_layernorm(inputs_embeds)
    for block in transformer.h:
        hidden = block(hidden, alibi=alibi, attention_mask=bias, layer_past=cache, use_cache=False)[0]
    return transformer.ln_f(hidden)


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on some hidden states `(N, D)` -> `(N, vocab)`, with the final soft-capping of Gemma 2/3."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


def compile_layers(model: nn.Module, backend: str = "inductor") -> str | None:
    """`torch.compile` each decoder layer of the frozen base in place (one graph serves every layer); the
    reason when it is skipped. Shapes are dynamic (packed micro-batches vary in rows and length), and a
    layer dynamo cannot compile runs eagerly with a warning instead of stopping the run."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    if backend == "inductor":
        if not torch.cuda.is_available():
            return "no CUDA device (compiling pays on a GPU)"
        try:
            import triton  # noqa: F401
        except ImportError:
            return "triton is not installed"
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    if not layers:
        return f"{type(model).__name__} has no decoder layers that transformers marks (GradientCheckpointingLayer)"
    from torch._dynamo import config as dynamo_config

    dynamo_config.suppress_errors = True  # fall back to eager, with dynamo's warning, never stop training
    dynamo_config.cache_size_limit = max(dynamo_config.cache_size_limit, 64)
    for layer in layers:
        layer.compile(backend=backend, dynamic=True)
    return None
