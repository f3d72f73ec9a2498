"""Next tokens for a batch whose rows each have their own `SamplingParams`.

Greedy rows take the argmax (one op for the whole batch). A sampled row is warped as transformers
warps (temperature, top-k, top-p) and drawn from its own generator, so a seeded answer does not depend
on what else shares the batch.
"""

from __future__ import annotations

import torch

from softprompt.serve.sequence import Sequence


def select_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, dict[int, str]]:
    """`(B,)` next tokens from last-position logits `(B, vocab)`, and `{row: why}` for rows that could not
    sample (the caller ends those alone; their entry in the tokens is meaningless)."""
    tokens = logits.argmax(dim=-1)
    failed: dict[int, str] = {}
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            try:
                tokens[i] = sample_row(logits[i].float(), seq)
            except RuntimeError as err:  # e.g. "probability tensor contains either inf, nan or element < 0"
                failed[i] = f"sampling failed: {err}"
    return tokens, failed


def sample_row(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    p = seq.params
    x = logits / p.temperature  # (vocab,)
    if p.top_k > 0 and p.top_k < x.shape[-1]:
        kth = torch.topk(x, p.top_k).values[-1]
        x = x.masked_fill(x < kth, float("-inf"))
    if p.top_p < 1.0:
        sorted_x, order = torch.sort(x)  # ascending, as transformers' TopPLogitsWarper
        drop = sorted_x.softmax(dim=-1).cumsum(dim=-1) <= 1 - p.top_p
        drop[-1] = False  # keep at least the most likely token
        x = x.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return torch.multinomial(x.softmax(dim=-1), 1, generator=seq.generator)[0]
