"""Where virtual tokens go in a batch: after each row's left padding, before its text.

peft puts the virtual tokens before the padding (`V V V <pad> <pad> text`, peft #1093), so a
left-padded row sees other positions than the same row alone. Here each row becomes

    [left pads] [fill] [v_1 .. v_n] [text ...] [right pads]

where `fill` pads rows whose adapter has fewer virtual tokens than the longest in the batch (mixed
adapters). Fill and pads are masked, and positions count only unmasked tokens, so every row computes
what it computes alone. A key/value prefix is left-padded the same way to the longest prefix.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Arranged:
    inputs_embeds: torch.Tensor  # (B, V + L, D)
    attention_mask: torch.Tensor  # (B, P + V + L): prefix slots first
    position_ids: torch.Tensor  # (B, V + L)
    labels: torch.Tensor | None  # (B, V + L)
    num_virtual: int  # V: leading slots that are not text


def leading_pads(attention_mask: torch.Tensor) -> torch.Tensor:
    """Number of masked slots before each row's first real token, `(B,)`."""
    return (attention_mask.cumsum(dim=1) == 0).sum(dim=1)


def arrange(
    token_embeds: torch.Tensor,  # (B, L, D)
    attention_mask: torch.Tensor,  # (B, L)
    labels: torch.Tensor | None,  # (B, L)
    virtual: torch.Tensor | None,  # (B, V, D), each row's n_i tokens right-aligned
    virtual_lens: torch.Tensor | None,  # (B,)
    prefix_lens: torch.Tensor | None,  # (B,), rows' prefix lengths, prefix right-aligned to P
    prefix_width: int,  # P
) -> Arranged:
    B, L, _ = token_embeds.shape
    device = token_embeds.device
    V = 0 if virtual is None else virtual.shape[1]
    if V:
        slot_is_virtual_real = torch.arange(V, device=device)[None, :] >= (V - virtual_lens)[:, None]  # (B, V)
        pads = leading_pads(attention_mask)
        if bool((pads == 0).all()):  # the common case: nothing to move
            embeds = torch.cat([virtual.to(token_embeds.dtype), token_embeds], dim=1)
            mask = torch.cat([slot_is_virtual_real.to(attention_mask.dtype), attention_mask], dim=1)
            if labels is not None:
                labels = torch.cat([labels.new_full((B, V), -100), labels], dim=1)
        else:
            # Slot j of row i takes: a token (j < k_i), a virtual slot j - k_i (j < k_i + V), else token j - V.
            src = torch.cat([virtual.to(token_embeds.dtype), token_embeds], dim=1)  # virtual at [0, V), tokens at [V, V+L)
            j = torch.arange(V + L, device=device)[None, :]
            k = pads[:, None]
            index = torch.where(j < k, V + j, torch.where(j < k + V, j - k, j))  # (B, V+L)
            embeds = src.gather(1, index[..., None].expand(-1, -1, src.shape[-1]))
            src_mask = torch.cat([slot_is_virtual_real.to(attention_mask.dtype), attention_mask], dim=1)
            mask = src_mask.gather(1, index)
            if labels is not None:
                src_labels = torch.cat([labels.new_full((B, V), -100), labels], dim=1)
                labels = src_labels.gather(1, index)
    else:
        embeds, mask = token_embeds, attention_mask
    position_ids = mask.long().cumsum(dim=1) - 1
    if prefix_lens is not None:
        position_ids = position_ids + prefix_lens[:, None]
    position_ids = position_ids.masked_fill(mask == 0, 1)
    if prefix_width:
        prefix_mask = torch.arange(prefix_width, device=device)[None, :] >= (prefix_width - prefix_lens)[:, None]
        mask = torch.cat([prefix_mask.to(mask.dtype), mask], dim=1)
    return Arranged(embeds, mask, position_ids, labels, V)
