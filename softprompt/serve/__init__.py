"""Serving many prompt adapters from one frozen model: continuous batching and OpenAI's API.

    params.py      SamplingParams: how a request picks tokens and when it stops
    sequence.py    Sequence: one request's state, incremental detokenizing, stop rules
    scheduler.py   Scheduler: who joins the running batch, which slot each sequence holds
    kv.py          SlotStore: preallocated per-sequence keys and values (seen through hf/slot_cache.py)
    graphs.py      DecodeGraphs: decoding steps replayed from CUDA graphs (opt-in)
    sampler.py     greedy and per-row seeded sampling (generate's warpers)
    engine.py      Engine: prefill joiners, decode the batch, retire the finished
    async_engine.py  AsyncEngine: the engine on its own thread, requests as async streams
    registry.py    AdapterRegistry: adapters loaded and unloaded at run time, under a root
    protocol.py    OpenAI request bodies, error object, the seed's chat format
    app.py         FastAPI routes and the playground page (static/)
    launch.py      serve() and main(argv): `softprompt serve`
"""

from softprompt.serve.engine import ContextTooLong, Engine, InvalidTokenId, UnknownAdapter
from softprompt.serve.params import SamplingParams
from softprompt.serve.scheduler import Scheduler
from softprompt.serve.sequence import Delta, Sequence

__all__ = [
    "Engine", "Scheduler", "Sequence", "SamplingParams", "Delta", "UnknownAdapter", "ContextTooLong", "InvalidTokenId",
    "serve", "build_server", "main",
]


# The HTTP side (FastAPI, uvicorn) is imported only when a server is started: the engine runs without it.
def serve(*args, **kwargs) -> None:
    from softprompt.serve.launch import serve as _serve

    _serve(*args, **kwargs)


def build_server(*args, **kwargs):
    from softprompt.serve.launch import build_server as _build

    return _build(*args, **kwargs)


def main(argv: list[str] | None = None) -> int:
    from softprompt.serve.launch import main as _main

    return _main(argv)
