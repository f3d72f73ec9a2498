"""`SamplingParams`: how one request picks its tokens and when it stops."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

# Below this a temperature divides logits past float32's range (inf, then NaN probabilities): it means greedy.
GREEDY_BELOW = 1e-5
SEED_RANGE = (-(2**63), 2**64)  # what torch.Generator.manual_seed takes


@dataclass(frozen=True)
class SamplingParams:
    """Greedy when `temperature` is 0 (or below `GREEDY_BELOW`); otherwise temperature, then top-k, then top-p (transformers' order).

    `seed` makes a sampled answer reproducible whatever else shares its batch (each sequence draws from
    its own generator). Generation stops at the tokenizer's eos token (unless `ignore_eos`), at the first
    of the `stop` strings (left out of the text), or after `max_tokens` new tokens.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: off
    seed: int | None = None
    stop: tuple[str, ...] = field(default=())
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens={self.max_tokens!r} is not valid; it must be a positive integer")
        if not _number(self.temperature) or not 0 <= self.temperature <= 100:
            raise ValueError(f"temperature={self.temperature!r} is not valid; it must be a number in [0, 100]")
        if not _number(self.top_p) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p!r} is not valid; it must be a number in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k={self.top_k!r} is not valid; it must be -1 or 0 (off) or a positive integer")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not SEED_RANGE[0] <= self.seed < SEED_RANGE[1]):
            raise ValueError(f"seed={self.seed!r} is not valid; it must be an integer in [-2**63, 2**64)")
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop={self.stop!r} is not valid; it must be a non-empty string or a list of them")
        object.__setattr__(self, "stop", stop)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


def _number(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
