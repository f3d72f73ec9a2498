"""`Sequence`: one request's state from arrival to its last token, and the text it streams.

A sequence owns a slot of the engine's key/value store while it runs (`slot`, `length` keys stored:
the adapter's virtual tokens, the prompt, the tokens generated so far). Each new token goes through
`append`, which detokenizes incrementally, applies the stop rules and returns what may be streamed.
"""

from __future__ import annotations

import enum
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from softprompt.serve.params import SamplingParams

_ids = itertools.count()


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Delta:
    """What one step added to a sequence: sent to the request's listener."""

    text: str
    token_ids: list[int]
    finished: bool = False
    finish_reason: str | None = None  # "stop" (eos or a stop string), "length", "abort", "unloaded", "error",
    # or "invalid" (the request failed alone: its own input caused it)
    error: str | None = None


class Detokenizer:
    """Incremental decoding that never splits a character: text is released once it decodes cleanly.

    Decodes a short window (the last prompt tokens for context, then the new ones), so each step costs
    the same however long the answer grows.
    """

    def __init__(self, tokenizer, prompt_ids: list[int], context: int = 4):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-context:])
        # Context that ends inside a character (a partial UTF-8 byte sequence) would merge with the first
        # new bytes, and the answer's text would then not be the decoding of its own tokens: drop it.
        while self.ids and self._decode(self.ids).endswith("\ufffd"):
            self.ids.pop()
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token: int) -> str:
        self.ids.append(token)
        return self._release(final=False)

    def flush(self) -> str:
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        before = self._decode(self.ids[self.prefix_offset : self.read_offset])
        after = self._decode(self.ids[self.prefix_offset :])
        if len(after) > len(before) and (final or not after.endswith("\ufffd")):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
            return after[len(before) :]
        return ""


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None
    num_virtual: int = 0  # key/value slots the adapter adds (virtual tokens or prefix)
    on_output: Callable[[Delta], None] | None = None
    seq_id: str = field(default_factory=lambda: f"seq-{next(_ids)}")

    status: Status = Status.WAITING
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None
    error: str | None = None
    slot: int = -1
    length: int = 0  # keys stored in the slot
    aborted: bool = False
    generator: torch.Generator | None = None
    _detok: Detokenizer | None = None
    _sent: int = 0  # characters of `text` already streamed

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def context_needed(self) -> int:
        """Key/value slots the sequence may use at most: virtual tokens + prompt + new tokens."""
        return self.num_virtual + len(self.prompt_ids) + self.params.max_tokens

    def start(self, tokenizer, device: torch.device) -> None:
        self.status = Status.RUNNING
        if tokenizer is not None:
            self._detok = Detokenizer(tokenizer, self.prompt_ids)
        if not self.params.greedy:
            self.generator = torch.Generator(device=device)
            if self.params.seed is not None:
                self.generator.manual_seed(self.params.seed)
            else:
                self.generator.seed()

    def append(self, token: int, eos_ids: frozenset[int]) -> Delta:
        """Add one generated token; finish on eos, a stop string or `max_tokens`."""
        self.output_ids.append(token)
        if token in eos_ids and not self.params.ignore_eos:
            self.finish_reason = "stop"
        elif self._detok is not None:
            self.text += self._detok.push(token)
            self._apply_stop_strings()
        if self.finish_reason is None and len(self.output_ids) >= self.params.max_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None:
            if self._detok is not None and self.finish_reason == "length":
                self.text += self._detok.flush()
                self._apply_stop_strings()
            self.status = Status.FINISHED
        return self._delta([token])

    def _apply_stop_strings(self) -> None:
        start = max(0, self._sent - max((len(s) for s in self.params.stop), default=0))
        hits = [i for i in (self.text.find(s, start) for s in self.params.stop) if i >= 0]
        if hits:
            self.text = self.text[: min(hits)]
            self.finish_reason = "stop"

    def _delta(self, token_ids: list[int]) -> Delta:
        # Hold back a possible beginning of a stop string until it is decided.
        hold = 0 if self.finished else max((len(s) - 1 for s in self.params.stop), default=0)
        visible = len(self.text) - hold
        text = self.text[self._sent : visible] if visible > self._sent else ""
        self._sent = max(self._sent, visible)
        return Delta(text, token_ids, self.finished, self.finish_reason if self.finished else None, self.error)

    def fail(self, reason: str, error: str | None = None) -> Delta:
        """End the sequence without a new token (abort, or an engine error)."""
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error
        return Delta("", [], True, reason, error)
