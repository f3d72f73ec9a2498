"""The engine without HTTP: continuous batching across adapters gives each request what it gets alone."""

from __future__ import annotations

import random

import pytest
import torch
from _serve_fixtures import ADAPTERS, EOS, PAD, tiny_peft, tiny_tokenizer
from conftest import make_base

from softprompt.serve import ContextTooLong, Engine, SamplingParams, UnknownAdapter
from softprompt.serve.scheduler import Scheduler
from softprompt.serve.sequence import Detokenizer, Sequence, Status

NAMES = [*ADAPTERS, None]


def alone(model, prompt: list[int], adapter: str | None, max_tokens: int, eos: int | None = EOS) -> list[int]:
    """The core library's own greedy decoding of this one request (no engine, batch of one)."""
    out = model.generate(torch.tensor([prompt]), adapter_names=[adapter], max_new_tokens=max_tokens, do_sample=False,
                         eos_token_id=eos, pad_token_id=PAD)[0, len(prompt):].tolist()
    return out[: out.index(eos) + 1] if eos is not None and eos in out else out


def requests(n: int, seed: int = 0, vocab: int = 400):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = int(torch.randint(1, 20, (1,), generator=g))
        prompt = torch.randint(3, vocab, (length,), generator=g).tolist()
        out.append((prompt, NAMES[i % len(NAMES)], int(torch.randint(1, 40, (1,), generator=g))))
    return out


@pytest.mark.parametrize("family", ["llama", "bloom", "gpt2"])
def test_mixed_stream_equals_each_request_alone(family):
    model = tiny_peft(family)
    # 8 slots for 30 requests of different lengths: sequences leave and join between steps all along.
    engine = Engine(model, max_num_seqs=8, max_model_len=96, eos_token_ids=[EOS])
    reqs = requests(30, seed=1)
    seqs = engine.generate([p for p, _, _ in reqs], [SamplingParams(max_tokens=m, temperature=0) for *_, m in reqs],
                           [a for _, a, _ in reqs])
    for (prompt, adapter, max_tokens), seq in zip(reqs, seqs):
        assert seq.output_ids == alone(model, prompt, adapter, max_tokens), (adapter, prompt)
    assert engine.scheduler.running == [] and not engine.has_work()


def test_requests_join_between_decoding_steps():
    model = tiny_peft("llama")
    engine = Engine(model, max_num_seqs=64, max_model_len=96, eos_token_ids=[])
    reqs = requests(18, seed=2)
    seqs = []
    for i, (prompt, adapter, _) in enumerate(reqs):  # three arrive, one step runs, three more arrive...
        seqs.append(engine.add(prompt, SamplingParams(max_tokens=12, temperature=0), adapter))
        if i % 3 == 2:
            engine.step()
    while engine.has_work():
        engine.step()
    for (prompt, adapter, _), seq in zip(reqs, seqs):
        assert seq.output_ids == alone(model, prompt, adapter, 12, eos=None)


def test_seeded_sampling_does_not_depend_on_the_batch():
    model = tiny_peft("llama")
    params = SamplingParams(max_tokens=20, temperature=0.9, top_p=0.9, top_k=50, seed=7)
    prompt = [5, 6, 7, 8]
    solo = Engine(model, max_num_seqs=4, eos_token_ids=[]).generate([prompt], params, "prefix8")[0].output_ids
    engine = Engine(model, max_num_seqs=16, eos_token_ids=[])
    others = [r[0] for r in requests(6, seed=3)]
    seqs = engine.generate(others + [prompt], [SamplingParams(max_tokens=20, temperature=1.0)] * 6 + [params],
                           ["pt4"] * 6 + ["prefix8"])
    assert seqs[-1].output_ids == solo
    reseeded = Engine(model, eos_token_ids=[]).generate([prompt], SamplingParams(max_tokens=20, temperature=0.9, seed=8), "prefix8")
    assert reseeded[0].output_ids != solo


@pytest.mark.parametrize("adapter", [*ADAPTERS, None])
@pytest.mark.parametrize("temperature, top_k, top_p", [(0.8, 20, 0.9), (1.0, 0, 0.7), (1.3, 5, 1.0)])
def test_engine_samples_what_generate_samples_for_the_same_seed(adapter, temperature, top_k, top_p):
    """One sampler: the engine warps with generate's warpers (transformers'), and its per-row generator seeded
    with `seed` draws what generate draws after `torch.manual_seed(seed)` (a batch of one)."""
    model = tiny_peft("llama")
    prompt, seed, n = [5, 6, 7, 8, 9], 11, 24
    params = SamplingParams(max_tokens=n, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    served = Engine(model, max_num_seqs=4, eos_token_ids=[]).generate([prompt], params, adapter)[0].output_ids
    torch.manual_seed(seed)
    generated = model.generate(torch.tensor([prompt]), adapter_names=[adapter], max_new_tokens=n, do_sample=True,
                               temperature=temperature, top_k=top_k, top_p=top_p, eos_token_id=None,
                               pad_token_id=PAD)[0, len(prompt):].tolist()
    assert served == generated
    assert len(set(served)) > 3  # it sampled (greedy on this tiny model repeats a token or two)


def test_stop_string_ends_the_text_and_streams_consistently():
    tok = tiny_tokenizer()
    model = tiny_peft("llama")
    prompt = tok("Human: hello\n\nAssistant: ")["input_ids"]
    full = Engine(model, tok, eos_token_ids=[]).generate([prompt], SamplingParams(max_tokens=30, temperature=0), "pt9")[0]
    stop = next(full.text[i : i + 2] for i in range(4, len(full.text) - 2) if "\ufffd" not in full.text[i : i + 2])
    streamed = []
    engine = Engine(model, tok, eos_token_ids=[])
    seq = engine.add(prompt, SamplingParams(max_tokens=30, temperature=0, stop=(stop, "never-seen")), "pt9",
                     on_output=lambda d: streamed.append(d))
    while engine.has_work():
        engine.step()
    assert seq.text == full.text[: full.text.index(stop)] and seq.finish_reason == "stop"
    assert "".join(d.text for d in streamed) == seq.text
    assert streamed[-1].finished and sum(d.finished for d in streamed) == 1


def test_eos_finishes_with_stop_and_max_tokens_with_length():
    model = tiny_peft("llama")
    prompt = [9, 10, 11]
    free = Engine(model, eos_token_ids=[]).generate([prompt], SamplingParams(max_tokens=10, temperature=0), "ptune6")[0]
    eos = free.output_ids[3]
    seq = Engine(model, eos_token_ids=[eos]).generate([prompt], SamplingParams(max_tokens=10, temperature=0), "ptune6")[0]
    first = free.output_ids.index(eos)
    assert seq.output_ids == free.output_ids[: first + 1] and seq.finish_reason == "stop"
    assert free.finish_reason == "length" and len(free.output_ids) == 10
    ignoring = Engine(model, eos_token_ids=[eos]).generate(
        [prompt], SamplingParams(max_tokens=10, temperature=0, ignore_eos=True), "ptune6")[0]
    assert ignoring.output_ids == free.output_ids


def test_abort_frees_the_slot_and_leaves_the_others_alone():
    model = tiny_peft("llama")
    engine = Engine(model, max_num_seqs=4, eos_token_ids=[])
    reqs = requests(4, seed=4)
    seqs = [engine.add(p, SamplingParams(max_tokens=15, temperature=0), a) for p, a, _ in reqs]
    engine.step()
    engine.step()
    seqs[1].aborted = True
    engine.step()
    assert seqs[1].finished and seqs[1].finish_reason == "abort"
    assert len(engine.scheduler.running) == 3
    while engine.has_work():
        engine.step()
    for i in (0, 2, 3):
        prompt, adapter, _ = reqs[i]
        assert seqs[i].output_ids == alone(model, prompt, adapter, 15, eos=None)


def test_adapter_unloaded_while_its_requests_run():
    model = tiny_peft("llama")
    expected = alone(model, [4, 5, 6], "prefix3", 12, eos=None)
    engine = Engine(model, eos_token_ids=[])
    running = engine.add([4, 5, 6], SamplingParams(max_tokens=12, temperature=0), "prefix3")
    engine.step()
    waiting = engine.add([4, 5], SamplingParams(max_tokens=12, temperature=0), "prefix3")
    model.delete_adapter("prefix3")  # its prompt already lives in the running sequence's keys
    while engine.has_work():
        engine.step()
    assert running.output_ids == expected
    assert waiting.finish_reason == "unloaded" and waiting.output_ids == []
    with pytest.raises(UnknownAdapter):
        engine.add([1, 2], SamplingParams(), "prefix3")


def test_requests_that_cannot_run_are_refused():
    engine = Engine(tiny_peft("llama"), max_model_len=32)
    with pytest.raises(ValueError, match="empty"):
        engine.add([], SamplingParams())
    with pytest.raises(ContextTooLong, match="9 virtual"):
        engine.add([3] * 10, SamplingParams(max_tokens=14), "pt9")
    engine.add([3] * 10, SamplingParams(max_tokens=13), "pt9")  # exactly fits
    with pytest.raises(ValueError, match="max_model_len"):
        Engine(tiny_peft("llama"), max_model_len=10_000)


@pytest.mark.parametrize("family, limit", [("mistral", 3), ("qwen2", 256), ("llama", 256)])
def test_context_limit_stays_inside_a_sliding_window(family, limit):
    # The slot store keeps every key, which a sliding-window layer would not attend to: a prefix and a padded
    # prompt block together stay inside the window (8 here).
    engine = Engine(make_base(family), max_num_seqs=2)
    assert engine.max_model_len == limit
    with pytest.raises(ValueError, match="more than the model supports"):
        Engine(make_base(family), max_model_len=limit + 1)


@pytest.mark.parametrize(
    "field, value", [("max_tokens", 0), ("temperature", -1), ("top_p", 0), ("top_k", -2), ("stop", [""]), ("seed", 1.5)]
)
def test_sampling_params_name_the_bad_field(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_scheduler_keeps_running_sequences_in_slots_0_to_n():
    sched = Scheduler(max_num_seqs=4, max_prefill_tokens=100)
    seqs = [Sequence([1] * 10, SamplingParams()) for _ in range(6)]
    for s in seqs:
        sched.add(s)
    assert sched.admit() == seqs[:4] and [s.slot for s in seqs[:4]] == [0, 1, 2, 3]
    seqs[0].status = seqs[2].status = Status.FINISHED
    moves = sched.retire()
    assert sorted((s.slot, old) for s, old in moves) == [(0, 3)]  # the last one fills the first hole
    assert [s.slot for s in sched.running] == [0, 1] and sched.running == [seqs[3], seqs[1]]
    budget = Scheduler(max_num_seqs=8, max_prefill_tokens=25)
    for s in [Sequence([1] * 10, SamplingParams()) for _ in range(4)]:
        budget.add(s)
    assert len(budget.admit()) == 2  # 2 x 10 tokens fit the budget of 25, a third would not


def test_streamed_text_is_the_decoding_of_the_answer_tokens():
    # Random tokens of a byte-level BPE: many are lone bytes of multi-byte characters, in the prompt's last
    # tokens too. Whatever the split, the pieces released step by step add up to the answer decoded whole.
    tok = tiny_tokenizer()
    rng = random.Random(0)
    for _ in range(300):
        prompt = [rng.randrange(3, len(tok)) for _ in range(rng.randrange(1, 8))]
        answer = [rng.randrange(3, len(tok)) for _ in range(rng.randrange(1, 30))]
        detok = Detokenizer(tok, prompt)
        text = "".join(detok.push(t) for t in answer) + detok.flush()
        assert text == tok.decode(answer, skip_special_tokens=True, clean_up_tokenization_spaces=False), (prompt, answer)
