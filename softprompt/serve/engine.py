"""`Engine`: continuous batching over one frozen model and many adapters, any adapter on any row.

Each `step()`:
  1. the sequences already running decode one token each: one base-model forward over slots `0..B-1`
     through `SlotCache` (no re-arranging, no cache rebuilt: each row writes its new key in place),
     replayed from a CUDA graph when `cuda_graphs=True` (`graphs.py`);
  2. sequences that arrived join: their prompts are prefilled together (`core/decoding.py::prefill`, as
     `generate` prefills: virtual tokens and prefixes laid out per row, as in training) and their keys are copied,
     padding dropped, into free slots of the `SlotStore`; each gets its first token;
  3. finished sequences leave, and the last slots move into their holes.

One request's error never reaches another: requests are checked when they arrive (`check`), and if a
prefill still raises, the group is split until the sequences that fail alone are found; only those end
(finish reason "invalid"), the others run as they would alone. A row whose sampling fails ends alone too.

After the prefill an adapter plays no further part (its prompt lives in the keys), so prefix rows and
prompt rows decode in the same forward, and an adapter can be unloaded while its requests still run.
Every row computes what it computes alone: same keys, same positions, padding masked.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Sequence as Seq

import torch

from softprompt.core.decoding import decode_step, prefill
from softprompt.hf.slot_cache import SlotCache
from softprompt.serve.graphs import DecodeGraphs
from softprompt.serve.kv import SlotStore
from softprompt.serve.params import SamplingParams
from softprompt.serve.sampler import select_tokens
from softprompt.serve.scheduler import Scheduler
from softprompt.serve.sequence import Delta, Sequence

log = logging.getLogger("softprompt.serve")


class UnknownAdapter(LookupError):
    """The request names an adapter that is not loaded."""


class ContextTooLong(ValueError):
    """Virtual tokens + prompt + max_tokens pass the server's context limit."""


class InvalidTokenId(ValueError):
    """A prompt's token id the model's embedding cannot look up."""


class Engine:
    def __init__(
        self,
        model,
        tokenizer=None,
        *,
        max_num_seqs: int = 64,
        max_model_len: int | None = None,
        max_prefill_tokens: int = 8192,
        eos_token_ids: Seq[int] | None = None,
        cuda_graphs: bool = False,
    ):
        self.model = model.eval()
        self.base = model.base_model
        self.tokenizer = tokenizer
        self.device = model.get_input_embeddings().weight.device
        self.vocab_size = model.get_input_embeddings().weight.shape[0]  # token ids the embedding can look up
        self.max_model_len = _context_limit(model.config, max_model_len)
        self.scheduler = Scheduler(max_num_seqs, max_prefill_tokens)
        self.store = SlotStore(max_num_seqs, self.max_model_len)
        self.eos_ids = frozenset(eos_token_ids if eos_token_ids is not None else _eos_ids(self.base, tokenizer))
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = pad if pad is not None else (min(self.eos_ids) if self.eos_ids else 0)
        self.lock = threading.RLock()  # held for a whole step; adapter changes take it too
        self._inbox: queue.SimpleQueue[Sequence] = queue.SimpleQueue()
        self.stats = {"steps": 0, "prefills": 0, "tokens": 0, "peak_batch": 0}
        self.graphs = None
        if cuda_graphs and self.device.type == "cuda":
            self.graphs = DecodeGraphs(self.base, self.store)

    # -- requests ---------------------------------------------------------------------------------
    def num_virtual_tokens(self, adapter: str | None) -> int:
        if adapter is None:
            return 0
        config = self.model.peft_config.get(adapter)
        if config is None:
            raise UnknownAdapter(f"no adapter named {adapter!r} is loaded")
        return config.num_virtual_tokens

    def add(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        adapter: str | None = None,
        on_output: Callable[[Delta], None] | None = None,
    ) -> Sequence:
        """Queue a request (thread-safe); it joins the batch at the next step."""
        seq = self.check(prompt_ids, params, adapter)
        seq.on_output = on_output
        self._inbox.put(seq)
        return seq

    def check(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None = None) -> Sequence:
        """The sequence this request would be; raises `ValueError`, `UnknownAdapter` or `ContextTooLong`."""
        if not prompt_ids:
            raise ValueError("the prompt is empty; give at least one token")
        if len(prompt_ids) > self.max_model_len:  # before looking at each id: a cheap bound on the work
            raise ContextTooLong(
                f"the prompt is {len(prompt_ids)} tokens, more than the server's context limit of "
                f"{self.max_model_len}; shorten the prompt"
            )
        bad = next((t for t in prompt_ids if isinstance(t, bool) or not isinstance(t, int)
                    or not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidTokenId(f"token id {bad!r} is not valid; token ids must be integers in [0, {self.vocab_size})")
        seq = Sequence(list(prompt_ids), params, adapter, self.num_virtual_tokens(adapter))
        if seq.context_needed > self.max_model_len:
            raise ContextTooLong(
                f"this request needs {seq.context_needed} tokens of context ({seq.num_virtual} virtual + "
                f"{len(prompt_ids)} prompt + {params.max_tokens} max_tokens), but the server's limit is "
                f"{self.max_model_len}; shorten the prompt or lower max_tokens"
            )
        return seq

    def warm_up(self) -> None:
        """With CUDA graphs: allocate the key/value store at full size now and capture the first graph, so
        that a store too large for the GPU fails at start, with the way out, not at the first request."""
        if self.graphs is None:
            return
        try:
            seq = self.generate([[self.pad_id]], SamplingParams(max_tokens=2, temperature=0, ignore_eos=True))[0]
            if seq.finish_reason == "error":  # its prefill ran out of memory (a prefill failure ends the sequence)
                raise torch.OutOfMemoryError(seq.error)
            if seq.finish_reason == "invalid":
                raise RuntimeError(f"the engine cannot run a one-token request: {seq.error}")
        except torch.OutOfMemoryError as err:
            self.fail_all("out of memory while warming up")
            self.store = SlotStore(self.store.max_slots, self.max_model_len)
            self.graphs = None
            torch.cuda.empty_cache()
            raise MemoryError(
                f"the key/value store for {self.store.max_slots} sequences x {self.max_model_len} tokens does not fit "
                f"on {self.device}; lower --max-num-seqs or --max-model-len, or serve with --no-cuda-graphs "
                f"(the store then grows as needed)"
            ) from err

    def has_work(self) -> bool:
        return not self._inbox.empty() or self.scheduler.has_work()

    def generate(
        self,
        prompts: list[list[int]],
        params: SamplingParams | list[SamplingParams] = SamplingParams(),
        adapters: list[str | None] | str | None = None,
    ) -> list[Sequence]:
        """Run these requests to the end (for scripts and benchmarks; the server uses `add`/`step`)."""
        params = params if isinstance(params, list) else [params] * len(prompts)
        adapters = adapters if isinstance(adapters, list) else [adapters] * len(prompts)
        seqs = [self.add(p, sp, a) for p, sp, a in zip(prompts, params, adapters)]
        while not all(s.finished for s in seqs):
            self.step()
        return seqs

    # -- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> None:
        with self.lock:
            while not self._inbox.empty():
                self.scheduler.add(self._inbox.get())
            self._drop_gone()
            joined = self.scheduler.admit()
            decoding = self.scheduler.running[: len(self.scheduler.running) - len(joined)]
            if decoding:  # first: graph padding rows may write into the slots the joiners are about to fill
                self._decode(decoding)
            if joined:
                self._prefill_isolated(joined)
            self.stats["steps"] += 1
            self.stats["prefills"] += bool(joined)
            self.stats["tokens"] += len(joined) + len(decoding)
            self.stats["peak_batch"] = max(self.stats["peak_batch"], len(joined) + len(decoding))
            self._retire()

    def _drop_gone(self) -> None:
        for seq in self.scheduler.take_aborted_waiting():
            self._emit(seq, seq.fail("abort"))
        for seq in self.scheduler.running:
            if seq.aborted and not seq.finished:
                self._emit(seq, seq.fail("abort"))
        for seq in list(self.scheduler.waiting):
            if seq.adapter is not None and seq.adapter not in self.model.peft_config:
                seq.aborted = True
                self._emit(seq, seq.fail("unloaded", f"adapter {seq.adapter!r} was unloaded before the request ran"))
        self.scheduler.take_aborted_waiting()
        self._retire()

    def _prefill_isolated(self, seqs: list[Sequence]) -> None:
        """Prefill `seqs` (consecutive slots); if that raises, halve the group until the sequences that fail
        alone are found, and end only those. Rows compute what they compute alone, so halving changes no
        answer. Running out of memory is the server's trouble, not the request's: it ends as "error"."""
        try:
            self._prefill(seqs)
        except Exception as err:
            if len(seqs) > 1:
                log.warning("prefill of %d sequences failed (%s: %s); retrying in halves", len(seqs),
                            type(err).__name__, err)
                half = len(seqs) // 2
                self._prefill_isolated(seqs[:half])
                self._prefill_isolated(seqs[half:])
                return
            seq = seqs[0]
            log.warning("request %s failed alone: %s: %s", seq.seq_id, type(err).__name__, err)
            server_side = isinstance(err, (MemoryError, torch.OutOfMemoryError))
            reason = "error" if server_side else "invalid"
            self._emit(seq, seq.fail(reason, f"this request could not be run: {type(err).__name__}: {err}"))

    def _prefill(self, seqs: list[Sequence]) -> None:
        n, L = len(seqs), max(len(s.prompt_ids) for s in seqs)
        ids = torch.full((n, L), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, L), dtype=torch.long)
        for i, s in enumerate(seqs):  # left padding: the last prompt token ends every row
            ids[i, L - len(s.prompt_ids) :] = torch.tensor(s.prompt_ids)
            mask[i, L - len(s.prompt_ids) :] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        logits, cache, arranged = prefill(self.model, ids, mask, None, [s.adapter for s in seqs])
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        if self.graphs is not None:  # graphs need the store at its full size, allocated once
            self.store.reserve(self.store.max_slots, self.store.max_length, layers)
        lengths = self.store.write_prefill(seqs[0].slot, layers, arranged.attention_mask)
        for seq, length in zip(seqs, lengths):
            seq.length = length
            seq.start(self.tokenizer, self.device)
        self._append(seqs, *select_tokens(logits, seqs))

    def _decode(self, seqs: list[Sequence]) -> None:
        B = len(seqs)
        lengths = [s.length for s in seqs]
        last = [s.output_ids[-1] for s in seqs]
        logits = self.graphs.run(last, lengths) if self.graphs is not None else None
        if logits is None:
            width = max(lengths) + 1
            self.store.reserve(B, width, list(zip(self.store.keys, self.store.values)))
            columns = torch.tensor(lengths, device=self.device)  # (B,) where each row's new key goes
            tokens = torch.tensor(last, device=self.device)[:, None]  # (B, 1)
            mask = (torch.arange(width, device=self.device)[None, :] <= columns[:, None]).long()  # (B, width)
            logits, _ = decode_step(self.base, tokens, mask, SlotCache(self.store, B, columns, width), columns[:, None])
        for seq in seqs:
            seq.length += 1
        self._append(seqs, *select_tokens(logits, seqs))

    def _append(self, seqs: list[Sequence], tokens: torch.Tensor, failed: dict[int, str]) -> None:
        for i, (seq, token) in enumerate(zip(seqs, tokens.tolist())):
            if i in failed:  # this row's own sampling failed (e.g. its logits are not finite): it ends alone
                self._emit(seq, seq.fail("invalid", f"this request could not be run: {failed[i]}"))
            else:
                self._emit(seq, seq.append(token, self.eos_ids))

    def _retire(self) -> None:
        for seq, src in self.scheduler.retire():
            self.store.move(src, seq.slot, seq.length)

    def _emit(self, seq: Sequence, delta: Delta) -> None:
        if seq.on_output is None:
            return
        try:
            seq.on_output(delta)
        except Exception:  # a listener that went away must not stop the batch
            log.exception("output listener of %s failed", seq.seq_id)

    def fail_all(self, message: str) -> None:
        """After an error inside a step: end every queued and running sequence, keep the engine usable."""
        with self.lock:
            while not self._inbox.empty():
                self.scheduler.add(self._inbox.get())
            for seq in list(self.scheduler.waiting) + self.scheduler.running:
                if not seq.finished:
                    self._emit(seq, seq.fail("error", message))
            self.scheduler.waiting.clear()
            self.scheduler.running.clear()


def _context_limit(config, requested: int | None) -> int:
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    limit = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:  # Gemma 2/3, Qwen2 in transformers 5: the layers say
        sliding = any("sliding" in t for t in layer_types)
    elif getattr(config, "use_sliding_window", None) is not None:
        sliding = bool(config.use_sliding_window)
    else:  # Mistral: a window is set, so every layer uses it
        sliding = True
    if window and sliding:
        # The slot store keeps every key, and a mixed prefill lays a prefix (up to the limit) before a padded
        # prompt block (up to the limit): within half the window no key ever slides out, so every row
        # attends to what it attends to alone.
        limit = min(limit or window, max(1, (window - 1) // 2))
    if requested is None:
        return min(limit or 2048, 2048)
    if isinstance(requested, bool) or not isinstance(requested, int) or requested < 1:
        raise ValueError(f"max_model_len={requested!r} is not valid; it must be a positive integer")
    if limit and requested > limit:
        raise ValueError(f"max_model_len={requested} is more than the model supports ({limit}); lower it")
    return requested


def _eos_ids(base, tokenizer) -> set[int]:
    ids: set[int] = set()
    eos = getattr(getattr(base, "generation_config", None), "eos_token_id", None)
    for value in [eos, getattr(tokenizer, "eos_token_id", None)]:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    config = base.config.get_text_config() if hasattr(base.config, "get_text_config") else base.config
    vocab = getattr(config, "vocab_size", None)
    return {i for i in ids if vocab is None or 0 <= i < vocab}
