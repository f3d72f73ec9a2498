"""`AsyncEngine`: the engine stepping on its own thread, each request an async stream of `Delta`s.

The HTTP handlers run on asyncio; the model runs on one background thread that steps whenever there
is work. The deltas of a step cross over together, one `call_soon_threadsafe` per step and event loop,
not one per request (the engine thread shares the interpreter with the event loop: every wake-up there
slows the steps); a client that goes away aborts its sequence, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator

import torch

from softprompt.serve.engine import Engine
from softprompt.serve.params import SamplingParams
from softprompt.serve.sequence import Delta, Sequence

log = logging.getLogger("softprompt.serve")


class AsyncEngine:
    def __init__(self, engine: Engine):
        self.engine = engine
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._threads = torch.get_num_threads()  # OpenMP's setting is per thread: carry the caller's over
        self._pending: list[tuple[asyncio.AbstractEventLoop, asyncio.Queue, Delta]] = []  # this step's deltas

    def start(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="softprompt-engine", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _run(self) -> None:
        torch.set_num_threads(self._threads)
        while not self._stop.is_set():
            self._wake.clear()
            if not self.engine.has_work():
                self._wake.wait(timeout=1.0)
                continue
            try:
                self.engine.step()
            except Exception as err:  # e.g. out of memory: fail these requests, keep serving
                log.exception("engine step failed")
                self.engine.fail_all(f"the engine failed on this batch: {type(err).__name__}: {err}")
            self._deliver()

    def _deliver(self) -> None:
        """Hand this step's deltas to their event loops, one call per loop."""
        pending, self._pending = self._pending, []
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Delta]]] = {}
        for loop, queue, delta in pending:
            by_loop.setdefault(loop, []).append((queue, delta))
        for loop, items in by_loop.items():
            try:
                loop.call_soon_threadsafe(_put_all, items)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                pass

    def submit(self, prompt_ids: list[int], params: SamplingParams, adapter: str | None,
               stream: bool = True) -> "RequestStream":
        """Queue one request (raises now what `Engine.add` raises for an invalid one); iterate the result.

        `stream=False`: one delta at the end holding the whole answer (what a non-streaming response needs;
        the event loop then does nothing per token).
        """
        loop = asyncio.get_running_loop()
        deltas: asyncio.Queue[Delta] = asyncio.Queue()
        pieces: list[Delta] = []

        def on_output(delta: Delta) -> None:
            if not stream:
                pieces.append(delta)
                if not delta.finished:
                    return
                delta = Delta("".join(d.text for d in pieces), [t for d in pieces for t in d.token_ids], True,
                              delta.finish_reason, delta.error)
            if threading.current_thread() is self._thread:
                self._pending.append((loop, deltas, delta))  # delivered at the end of the step
            else:
                loop.call_soon_threadsafe(deltas.put_nowait, delta)

        seq = self.engine.add(prompt_ids, params, adapter, on_output)
        self.start()  # normally running since the app's startup; a no-op then
        self._wake.set()
        return RequestStream(self, seq, deltas)

    def abort(self, seq: Sequence) -> None:
        if not seq.finished:
            seq.aborted = True
            self._wake.set()


def _put_all(items: list[tuple[asyncio.Queue, Delta]]) -> None:
    for queue, delta in items:
        queue.put_nowait(delta)


class RequestStream:
    """A submitted request's deltas, until the finishing one; leaving early aborts the request."""

    def __init__(self, engine: AsyncEngine, seq: Sequence, deltas: asyncio.Queue):
        self.engine, self.seq, self._deltas = engine, seq, deltas

    async def __aiter__(self) -> AsyncIterator[Delta]:
        try:
            while True:
                delta = await self._deltas.get()
                yield delta
                if delta.finished:
                    return
        finally:
            self.engine.abort(self.seq)
