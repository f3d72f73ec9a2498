"""Running the frozen base model on packed rows: the transformers seams that packing needs.

Two routes, both through public modules and forward arguments (nothing is patched):

- most families (Llama, Qwen2, Mistral, Gemma, GPT-2, GPT-NeoX, ...): the backbone (`model.base_model`) takes
  a 4-D mask, which transformers' `create_causal_mask` passes through as given, and `position_ids`;
- BLOOM takes only a 2-D mask, from which it builds its ALiBi bias, so no mask can keep packed rows apart.
  Its blocks run here in the order `BloomModel.forward` runs them (`bloom_block`: the block's own modules, its
  attention through `scaled_dot_product_attention`), with the block-diagonal mask and the ALiBi bias of each
  key's own position (`slope * position`, as BLOOM computes it from a 2-D mask) as one additive bias.

The LM head then runs on the positions that carry a loss only (`head_logits`).
"""

from __future__ import annotations

import weakref
from functools import partial

import torch
from torch import nn

from softprompt.hf.cache import accepts, build_prefix_cache, cache_kwarg


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


def decoder_layer_classes(model: nn.Module) -> list[str]:
    """The class names of `model`'s decoder layers (transformers' `_no_split_modules` that it holds): the units
    FSDP shards and gathers one at a time."""
    present = {type(m).__name__ for m in model.modules()}
    return [name for name in getattr(model, "_no_split_modules", None) or [] if name in present]


def packed_layers_unshardable(model: nn.Module) -> str | None:
    """Why FSDP cannot shard the layers of `model`'s packed forward; None when it can. FSDP gathers a layer's
    weights when the layer is called; packed BLOOM calls its blocks' modules one by one (`bloom_block`)."""
    if is_bloom(model):
        return "packed BLOOM runs its blocks' own modules one by one (bloom_block), so FSDP never gathers a block"
    return None


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


def packed_stack(
    model: nn.Module,
    inputs_embeds: torch.Tensor,  # (R, T, D)
    segment_ids: torch.Tensor,  # (R, T)
    position_ids: torch.Tensor,  # (R, T)
    token_adapter: torch.Tensor,  # (R, T)
    prefix_owner: torch.Tensor,  # (K,)
    prefix_positions: torch.Tensor,  # (K,)
    key_values: torch.Tensor | None = None,  # (layers, 2, kv_heads, K, head_dim): every adapter's prefix
) -> torch.Tensor:
    """The backbone's last hidden states `(R, T, D)` for the collator's packed layout: the mask, the prefix
    cache, the layers and the final norm. Tensors in, a tensor out, and no host-device sync: a CUDA graph can
    hold it whole (`core/packed_graphs.py`). `check_packable` is the caller's, once per batch."""
    mask = packed_mask(segment_ids, position_ids, token_adapter, prefix_owner, prefix_positions,
                       sliding_window(model.config))
    cache = None
    if key_values is not None:  # every packed row sees every prefix slot; the mask keeps its adapter's only
        rows = key_values[:, :, None].expand(-1, -1, inputs_embeds.shape[0], -1, -1, -1)
        cache = build_prefix_cache(model.config, rows, frozen=True)
    return packed_hidden_states(model, inputs_embeds, mask, position_ids, prefix_positions, cache)


def packed_hidden_states(
    model: nn.Module,
    inputs_embeds: torch.Tensor,  # (R, T, D)
    mask: torch.Tensor,  # (R, 1, T, K + T) bool
    position_ids: torch.Tensor,  # (R, T)
    prefix_positions: torch.Tensor,  # (K,)
    cache,
) -> torch.Tensor:
    """The backbone's last hidden states `(R, T, D)` (after its final norm) for packed rows."""
    if is_bloom(model):
        return _bloom_hidden_states(model.transformer, inputs_embeds, mask, position_ids, prefix_positions, cache)
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
    R, T, _ = inputs_embeds.shape
    H = transformer.num_heads
    key_positions = torch.cat([prefix_positions[None].expand(R, -1), position_ids], dim=1)  # (R, K + T)
    alibi = _alibi_slopes(transformer, inputs_embeds.device)[None, :, None] * key_positions[:, None, :].float()
    if not _sdpa_blocks(transformer):  # BLOOM's own blocks: alibi (R * H, 1, K + T), fp32 as BLOOM computes it
        alibi = alibi.reshape(R * H, 1, -1).to(inputs_embeds.dtype)
        bias = _additive(mask, inputs_embeds.dtype)
        hidden = transformer.word_embeddings_layernorm(inputs_embeds)
        for block in transformer.h:
            hidden = block(hidden, alibi=alibi, attention_mask=bias, layer_past=cache, use_cache=False)[0]
        return transformer.ln_f(hidden)
    # ALiBi and the packed mask as one additive bias (R, H, T, K + T), shared by every layer
    bias = (alibi[:, :, None, :] + _additive(mask, torch.float32)).to(inputs_embeds.dtype)
    run = _compiled_blocks.get(transformer, bloom_block)
    hidden = transformer.word_embeddings_layernorm(inputs_embeds)
    for i, block in enumerate(transformer.h):
        # the layer's prefix as tensors: the compiled block then serves every layer (no layer index inside)
        prefix = None if cache is None else (cache.layers[i].keys, cache.layers[i].values)
        if block.gradient_checkpointing and block.training and torch.is_grad_enabled():
            hidden = block._gradient_checkpointing_func(partial(run, block, bias=bias, prefix=prefix), hidden)
        else:
            hidden = run(block, hidden, bias=bias, prefix=prefix)
    return transformer.ln_f(hidden)


def bloom_block(block: nn.Module, hidden: torch.Tensor, bias: torch.Tensor,
                prefix: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """`BloomBlock.forward` with its attention through `scaled_dot_product_attention` (fused kernels, no
    (T, T) probabilities kept per layer), on the block's own modules and weights. BLOOM's eager attention is
    `softmax(alibi + q.k / sqrt(d) + mask) v`; `bias` is alibi + mask. hidden (R, T, D) -> (R, T, D)."""
    attn = block.self_attention
    post_norm = block.apply_residual_connection_post_layernorm
    normed = block.input_layernorm(hidden)
    residual = normed if post_norm else hidden
    q, k, v = attn._reshape(attn.query_key_value(normed))  # 3 x (R, H, T, head_dim), views of one tensor
    if prefix is not None:  # the prefix in front: (R, H, K + T, head_dim)
        k, v = torch.cat([prefix[0], k], dim=-2), torch.cat([prefix[1], v], dim=-2)
    dropout = attn.attention_dropout.p if attn.training else 0.0
    context = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout,
                                                         scale=attn.inv_norm_factor)  # (R, H, T, head_dim)
    context = context.transpose(1, 2).flatten(2)  # (R, T, H * head_dim)
    out = nn.functional.dropout(attn.dense(context), attn.hidden_dropout, attn.training) + residual
    normed = block.post_attention_layernorm(out)
    return block.mlp(normed, normed if post_norm else out)


def _sdpa_blocks(transformer) -> bool:
    """Whether `bloom_block` computes what the blocks do: not with BLOOM's exact tensor-parallel slicing."""
    config = transformer.config
    return not (getattr(config, "pretraining_tp", 1) > 1 and getattr(config, "slow_but_exact", False))


_compiled_blocks: "weakref.WeakKeyDictionary[nn.Module, object]" = weakref.WeakKeyDictionary()
_slopes: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()


def _alibi_slopes(transformer, device) -> torch.Tensor:
    """BLOOM's ALiBi slopes (H,), fp32, read off its own function once per device: the bias of position 1 is
    the slope. (Computing them every step copies a scalar to the device, which waits for the GPU.)"""
    per_device = _slopes.setdefault(transformer, {})
    if device not in per_device:
        alibi = transformer.build_alibi_tensor(torch.ones(1, 2), transformer.num_heads, torch.float32)
        per_device[device] = alibi[:, 0, 1].to(device)
    return per_device[device]


def head_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on some hidden states `(N, D)` -> `(N, vocab)`, with the final soft-capping of Gemma 2/3."""
    logits = model.get_output_embeddings()(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# Above this many logits (rows x vocabulary) the loss is computed a chunk of rows at a time (`head_loss`). A
# chunk's logits, their fp32 copy and gradients, ~16 bytes a logit, sit on top of the forward's saved activations:
# the step's peak. 2^26 (run 8) took 1.36 GiB off bloom's batch-32 peak against whole logits at the same speed;
# 2^25 took bloom prefix tuning's from 13.65 GiB (0.602x peft's, run 14) to 13.28 (0.586x, run 15) at the same speed.
HEAD_CHUNK_ELEMENTS = 2**25


def head_loss(model: nn.Module, hidden: torch.Tensor, targets: torch.Tensor,
              chunk_elements: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The summed cross-entropy of the LM head on hidden states `(N, D)` against `targets` `(N,)` (-100 ignored),
    and the logits `(N, vocab)`; None for the logits when they were too many to keep.

    Batch 32 of 256-token rows has ~3,500 loss positions: with a 49k vocabulary their logits, fp32 copy and
    gradient are ~1.7 GB held from the forward to the backward. Past `chunk_elements` logits the loss runs a
    chunk of rows at a time and each chunk's gradient is taken in the forward (the loss is a sum, so the
    backward only scales it): no (N, vocab) tensor outlives its chunk. The head's weights are frozen here."""
    head = model.get_output_embeddings()
    chunk = max(1, (chunk_elements or HEAD_CHUNK_ELEMENTS) // head.weight.shape[0])  # rows of vocab logits
    if hidden.shape[0] <= chunk or not (torch.is_grad_enabled() and hidden.requires_grad) or any(
        p.requires_grad for p in head.parameters()
    ):
        logits = head_logits(model, hidden)
        return nn.functional.cross_entropy(logits.float(), targets, reduction="sum"), logits
    return _ChunkedHeadLoss.apply(hidden, targets, partial(head_logits, model), chunk), None


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, targets, head, chunk):
        grad = torch.empty_like(hidden)
        total = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            part = hidden[start : start + chunk].detach().requires_grad_(True)
            with torch.enable_grad():
                loss = nn.functional.cross_entropy(head(part).float(), targets[start : start + chunk], reduction="sum")
            (grad[start : start + chunk],) = torch.autograd.grad(loss, part)
            total += loss.detach()
        ctx.save_for_backward(grad)
        return total

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return grad * grad_output.to(grad.dtype), None, None, None


def compile_layers(model: nn.Module, backend: str = "inductor", mode: str | None = None,
                   dynamic: bool | None | str = "auto") -> str | None:
    """`torch.compile` each decoder layer of the frozen base in place (one graph serves every layer); the
    reason when it is skipped. A layer dynamo cannot compile runs eagerly with a warning instead of stopping
    the run. Packed micro-batches vary in rows and length, so sizes are dynamic, in one of two ways:

    - `dynamic=None`, dynamo's automatic dynamic with module integers allowed to turn symbolic: every size static
      until it changes. A prefix reaches each layer through `FrozenPrefixCache.update(..., layer_idx)`, and with
      `dynamic=True` dynamo specializes that integer, tracing the Llama / Qwen2 layers again for every layer; here
      `layer_idx` alone turns symbolic, after the second layer, and the traces no longer grow with the depth.
    - `dynamic=True`: every size symbolic from the first trace.

    `"auto"` (the default) takes `True` for BLOOM and `None` for every other family. Measured on the H200 (run
    14, BENCHMARKS.md; Qwen2 and bloom shapes, batch 32, a fresh process each): Qwen2 prefix tuning with `True`
    was still compiling when its 170 s ran out (run 12: 123 s), with `None` it trained 120 steps in 30 s at
    44.7% MFU; Qwen2 prompt tuning ran alike (43.7% / 44.4%). BLOOM's packed blocks run `bloom_block`, whose
    integers symbolic cost kernels: prefix tuning 46.4% MFU with `True`, 35.3% with `None`; prompt tuning 45.3%
    / 40.6%. The module-integer switch is dynamo's, for the process: the last call here sets it."""
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
    if dynamic == "auto":
        dynamic = True if is_bloom(model) else None
    elif dynamic not in (True, False, None):
        raise ValueError(f"dynamic={dynamic!r}: use True, False, None or 'auto'")
    dynamo_config.allow_unspec_int_on_nn_module = dynamic is None
    for layer in layers:
        layer.compile(backend=backend, dynamic=dynamic, mode=mode)
    if is_bloom(model):  # packed rows run the blocks through `bloom_block`
        _compiled_blocks[model.transformer] = torch.compile(bloom_block, backend=backend, dynamic=True, mode=mode)
    return None
