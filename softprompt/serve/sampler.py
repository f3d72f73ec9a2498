"""Next tokens for a batch whose rows each have their own `SamplingParams`.

Greedy rows take the argmax (one op for the whole batch). A sampled row is warped by transformers' own
warpers, as `generate` warps (`hf/generation.py::sampling_warpers`: temperature, top-k, top-p), and drawn
from its own generator, so a seeded answer does not depend on what else shares the batch, and equals
`generate`'s for a batch of one under `torch.manual_seed` of the same seed.

What stays `generate`'s alone: the options that read the history (repetition penalty, no-repeat n-grams,
minimum lengths) and min-p / typical-p, which the OpenAI API does not take; and one generator for the whole
batch, transformers' semantics, where the engine needs one per row.
"""

from __future__ import annotations

import functools

import torch

from softprompt.hf.generation import sampling_warpers
from softprompt.serve.sequence import Sequence


def select_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[torch.Tensor, dict[int, str]]:
    """`(B,)` next tokens from last-position logits `(B, vocab)`, and `{row: why}` for rows that could not
    sample (the caller ends those alone; their entry in the tokens is meaningless)."""
    tokens = logits.argmax(dim=-1)
    failed: dict[int, str] = {}
    for i, seq in enumerate(seqs):
        if not seq.params.greedy:
            try:
                tokens[i] = sample_row(logits[i : i + 1].float(), seq)
            except RuntimeError as err:  # e.g. "probability tensor contains either inf, nan or element < 0"
                failed[i] = f"sampling failed: {err}"
    return tokens, failed


@functools.lru_cache(maxsize=1024)
def _warpers(temperature: float, top_k: int, top_p: float) -> tuple:
    return tuple(sampling_warpers(temperature, top_k, top_p))  # stateless: shared by every row with these params


def sample_row(logits: torch.Tensor, seq: Sequence) -> torch.Tensor:
    """One token drawn from a row's logits `(1, vocab)` with its own params and generator."""
    p = seq.params
    x = logits
    for warp in _warpers(float(p.temperature), max(p.top_k, 0), float(p.top_p)):  # top_k -1 or 0: off
        x = warp(None, x)
    return torch.multinomial(x.softmax(dim=-1), 1, generator=seq.generator)[0, 0]
