"""`Scheduler`: which waiting sequences join the running batch, and which slot each one holds.

First come, first served. Sequences join between decoding steps while slots are free and the joining
group's prompts fit the prefill budget. Running sequences always hold slots `0 .. n-1`, so a decoding
step reads one contiguous block of the key/value store; when sequences leave, the last ones move into
the holes (`retire` says which, for the engine to move their keys).
"""

from __future__ import annotations

from collections import deque

from softprompt.serve.sequence import Sequence, Status


class Scheduler:
    def __init__(self, max_num_seqs: int, max_prefill_tokens: int):
        if max_num_seqs < 1:
            raise ValueError(f"max_num_seqs={max_num_seqs!r} is not valid; it must be a positive integer")
        if max_prefill_tokens < 1:
            raise ValueError(f"max_prefill_tokens={max_prefill_tokens!r} is not valid; it must be a positive integer")
        self.max_num_seqs = max_num_seqs
        self.max_prefill_tokens = max_prefill_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # running[i].slot == i

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def take_aborted_waiting(self) -> list[Sequence]:
        """Waiting sequences whose client went away: they never get a slot."""
        gone = [s for s in self.waiting if s.aborted]
        if gone:
            self.waiting = deque(s for s in self.waiting if not s.aborted)
        return gone

    def admit(self) -> list[Sequence]:
        """The waiting sequences that join now, each given the next free slot."""
        joined: list[Sequence] = []
        longest = 0
        while self.waiting and len(self.running) + len(joined) < self.max_num_seqs:
            seq = self.waiting[0]
            width = max(longest, seq.num_virtual + len(seq.prompt_ids))
            if joined and width * (len(joined) + 1) > self.max_prefill_tokens:
                break  # the padded group would pass the budget; the first one always goes
            self.waiting.popleft()
            longest = width
            seq.slot = len(self.running) + len(joined)
            joined.append(seq)
        self.running.extend(joined)
        return joined

    def retire(self) -> list[tuple[Sequence, int]]:
        """Drop finished sequences; returns `(sequence, its old slot)` for those moved into holes."""
        alive = [s for s in self.running if s.status is not Status.FINISHED]
        if len(alive) == len(self.running):
            return []
        n = len(alive)
        taken = {s.slot for s in alive}
        holes = [i for i in range(n) if i not in taken]
        movers = sorted((s for s in alive if s.slot >= n), key=lambda s: s.slot)
        moves = []
        for hole, seq in zip(holes, movers):
            moves.append((seq, seq.slot))
            seq.slot = hole
        self.running = sorted(alive, key=lambda s: s.slot)
        assert all(s.slot == i for i, s in enumerate(self.running))
        return moves
