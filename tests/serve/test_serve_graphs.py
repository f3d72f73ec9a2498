"""The CUDA-graph decoding step, as far as a CPU can check it.

Capture itself needs a GPU (bench/bench_serve.py runs it on the H200). Here: the step the graphs replay
(padded to a batch bucket and a width bucket, padding rows writing into free slots)
gives every request its answer alone, and the forward a graph records makes no host round trip in any
family of the parity grid: a `torch.tensor(...)` on the device, `.item()`, `.tolist()` or `bool()` of a
tensor would make the capture fail on the GPU (transformers 5.17's eager mask, BLOOM's, does the first:
this test fails there without `capturable_masks()`).
"""

from __future__ import annotations

import pytest
import torch
from _serve_fixtures import EOS, tiny_peft
from conftest import FAMILIES, make_base
from test_serve_engine import alone, requests
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

import softprompt as sp
from softprompt.hf.masks import capturable_masks, eager_mask
from softprompt.serve import Engine, SamplingParams
from softprompt.serve.graphs import DecodeGraphs, buckets, widths


def graph_engine(model, **kwargs) -> Engine:
    engine = Engine(model, **kwargs)
    engine.graphs = DecodeGraphs(engine.base, engine.store, capture=False)
    return engine


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2"])
def test_padded_bucketed_step_equals_each_request_alone(family):
    model = tiny_peft(family)
    # 6 slots, buckets 1, 2, 4, 6: most steps run padding rows into the free slots.
    engine = graph_engine(model, max_num_seqs=6, max_model_len=96, eos_token_ids=[EOS])
    engine.graphs.widths = [16, 32, 64, 96]  # finer than the default (64, 96) so that these short requests use several
    reqs = requests(20, seed=3)
    seqs = engine.generate([p for p, _, _ in reqs], [SamplingParams(max_tokens=m, temperature=0) for *_, m in reqs],
                           [a for _, a, _ in reqs])
    assert engine.store.slots == 6 and engine.store.capacity == 96  # reserved whole, as the graphs need
    assert max(s.length for s in seqs) > 32  # three width buckets ran
    for (prompt, adapter, max_tokens), seq in zip(reqs, seqs):
        assert seq.output_ids == alone(model, prompt, adapter, max_tokens), (adapter, prompt)


def test_buckets_cover_every_batch_size_and_width():
    for top in (1, 5, 64, 100):
        sizes = buckets(top)
        assert sizes[-1] == top and sizes == sorted(set(sizes))
        assert all(any(b >= n for b in sizes) for n in range(1, top + 1))
    assert widths(96) == [64, 96] and widths(2048) == [64, 128, 256, 512, 1024, 2048] and widths(10) == [10]


def test_eager_mask_equals_transformers_and_is_restored():
    original = ALL_MASK_ATTENTION_FUNCTIONS["eager"]
    attention = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    for dtype in (torch.float32, torch.bfloat16):
        kwargs = dict(batch_size=2, q_length=1, kv_length=5, q_offset=4, attention_mask=attention.bool(), dtype=dtype)
        theirs, ours = original(**kwargs), eager_mask(**kwargs)
        assert ours.dtype == theirs.dtype == dtype and torch.equal(ours, theirs)
    with capturable_masks():
        assert ALL_MASK_ATTENTION_FUNCTIONS["eager"] is eager_mask
    assert ALL_MASK_ATTENTION_FUNCTIONS["eager"] is original


@pytest.mark.parametrize("family", list(FAMILIES))
def test_decode_forward_has_no_host_round_trip(family, monkeypatch):
    base = make_base(family).eval()
    model = sp.PeftModel.empty(base).eval()
    model.add_adapter("prefix", sp.PrefixTuningConfig(num_virtual_tokens=1))
    model.add_adapter("prompt", sp.PromptTuningConfig(num_virtual_tokens=1))
    engine = graph_engine(model, max_num_seqs=4, eos_token_ids=[])  # mistral: 3 tokens of context (window 8)
    engine.generate([[5], [8]], SamplingParams(max_tokens=1, temperature=0), ["prefix", "prompt"])
    graphs = engine.graphs
    graphs._buffers()
    graphs.tokens[:3, 0] = torch.tensor([3, 4, 5])
    graphs.columns[:3] = torch.tensor([2, 1, 0])
    with torch.inference_mode():
        expected = graphs._forward(4, 3)

    calls: list[str] = []

    def spy(owner, name):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            calls.append(name)
            return inner(*args, **kwargs)

        monkeypatch.setattr(owner, name, wrapper)

    for name in ("item", "tolist", "__bool__", "cpu", "nonzero", "__int__", "__float__", "__index__"):
        spy(torch.Tensor, name)
    for name in ("tensor", "as_tensor"):
        spy(torch, name)
    with torch.inference_mode(), capturable_masks():
        logits = graphs._forward(4, 3)
    monkeypatch.undo()
    assert calls == [], f"{family}'s decoding forward does a host round trip ({calls}): a CUDA graph could not capture it"
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


def test_a_store_too_large_is_refused_at_start_with_the_flags_to_lower(monkeypatch):
    engine = graph_engine(tiny_peft("llama"), max_num_seqs=4, max_model_len=64, eos_token_ids=[])

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 80.00 GiB")

    monkeypatch.setattr(engine.store, "reserve", out_of_memory)
    with pytest.raises(MemoryError, match="4 sequences x 64 tokens.*--max-num-seqs or --max-model-len.*--no-cuda-graphs"):
        engine.warm_up()
    monkeypatch.undo()
    assert engine.graphs is None  # the engine stays usable, growing its store as needed
    seq, = engine.generate([[5, 6]], SamplingParams(max_tokens=3, temperature=0), [None])
    assert len(seq.output_ids) == 3


def test_warm_up_fills_the_store_and_answers_stay_the_same():
    model = tiny_peft("bloom")
    engine = graph_engine(model, max_num_seqs=4, max_model_len=64, eos_token_ids=[EOS])
    engine.warm_up()
    assert (engine.store.slots, engine.store.capacity) == (4, 64) and not engine.has_work()
    reqs = requests(6, seed=5)
    seqs = engine.generate([p for p, _, _ in reqs], [SamplingParams(max_tokens=m, temperature=0) for *_, m in reqs],
                           [a for _, a, _ in reqs])
    for (prompt, adapter, max_tokens), seq in zip(reqs, seqs):
        assert seq.output_ids == alone(model, prompt, adapter, max_tokens)
