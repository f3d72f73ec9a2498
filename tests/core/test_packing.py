"""Packed rows compute what each row computes alone: loss and gradients, every family x variant, mixed adapters."""

from __future__ import annotations

import copy

import pytest
import torch

import softprompt
from softprompt.core.packing import PackingCollator, PromptWidths, plan

from conftest import FAMILIES, VARIANTS, VOCAB, _common, build_ours, make_base

LENGTHS = (5, 9, 3, 7, 6)


@pytest.fixture(autouse=True)
def _dynamo_switch_restored():
    """`compile_layers` sets dynamo's module-integer switch for the process: each test starts from torch's."""
    yield
    torch._dynamo.config.allow_unspec_int_on_nn_module = False


def rows(lengths=LENGTHS, seed: int = 0, prompt: int = 2) -> list[dict]:
    """Rows of random ids whose first `prompt` tokens carry no label (the masked prompt)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(4, VOCAB, (n,), generator=g).tolist()
        out.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})
    return out


def alone_loss(model, features: list[dict]) -> torch.Tensor:
    """The token-mean loss over all rows, each row run alone (no padding): the oracle."""
    total, count = 0.0, 0
    for f in features:
        out = model(input_ids=torch.tensor([f["input_ids"]]), labels=torch.tensor([f["labels"]]),
                    adapter_names=[f.get("adapter_names", model.active_adapter)])
        n = sum(label != -100 for label in f["labels"][1:])
        total = total + out.loss * n
        count += n
    return total / count


def packed_loss(model, features: list[dict], row_length: int = 16, token_budget: int = 16,
                fixed_shapes: bool = False) -> torch.Tensor:
    batch = PackingCollator(PromptWidths.of(model), row_length=row_length, token_budget=token_budget,
                            fixed_shapes=fixed_shapes)(features)
    assert len(batch["packs"]) > 1  # several micro-batches, several segments a row: the hard case
    return sum(model(**pack, num_items_in_batch=batch["num_items"]).loss for pack in batch["packs"])


def grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad and p.grad is not None}


def assert_packed_equals_alone(model, features: list[dict], what: str, fixed_shapes: bool = False) -> None:
    """Loss and every trainable gradient of the packed rows equal those of each row run alone (1e-5)."""
    ref = alone_loss(model, features)
    ref.backward()
    ref_grads = grads(model)
    model.zero_grad()
    loss = packed_loss(model, features, fixed_shapes=fixed_shapes)
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    got = grads(model)
    assert got.keys() == ref_grads.keys(), what
    for name, g in got.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=f"{what}: {name}")


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_equals_rows_alone(family, variant, tokenizer_dir):
    base = make_base(family)
    torch.manual_seed(1)
    model = build_ours(base, VARIANTS[variant], tokenizer_dir).train()
    assert_packed_equals_alone(model, rows(), f"{family}/{variant}")


@pytest.mark.parametrize("family", ["bloom", "llama", "gpt2"])
def test_mixed_adapters_in_one_pack(family, tokenizer_dir):
    """Prompt tuning, P-tuning and prefix tuning rows (and a bare-base row) share packed rows."""
    base = make_base(family)
    torch.manual_seed(2)
    model = build_ours(base, VARIANTS["prompt_random"], tokenizer_dir).train()
    model.add_adapter("pt", VARIANTS["ptune_mlp"].config(softprompt))
    model.add_adapter("px", VARIANTS["prefix_proj"].config(softprompt))
    model.add_adapter("px2", VARIANTS["prefix"].config(softprompt, num_virtual_tokens=2))
    features = rows(lengths=(5, 9, 3, 7, 6, 4, 8))
    for f, name in zip(features, ["default", "pt", "px", "px2", "pt", "default", None]):
        f["adapter_names"] = name
    assert_packed_equals_alone(model, features, f"{family}/mixed")
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)  # every adapter had rows


@pytest.mark.parametrize("family", ["bloom", "llama"])
@pytest.mark.parametrize("variant", ["prompt_random", "prefix_proj"])
def test_fixed_shapes_change_nothing_computed(family, variant, tokenizer_dir):
    """The GPU's stable shapes (rows as long as row_length, loss positions padded to 64) give the same loss and
    gradients as the rows alone."""
    torch.manual_seed(4)
    model = build_ours(make_base(family), VARIANTS[variant], tokenizer_dir).train()
    assert_packed_equals_alone(model, rows(), f"{family}/{variant}", fixed_shapes=True)


def test_fixed_shapes_layout(tokenizer_dir):
    model = build_ours(make_base("llama"), VARIANTS["prompt_random"], tokenizer_dir)  # 4 virtual tokens
    features = [{"input_ids": [11, 12, 13], "labels": [-100, 12, 13]}, {"input_ids": [21, 22], "labels": [21, 22]}]
    batch = PackingCollator(PromptWidths.of(model), row_length=50, fixed_shapes=True)(features)
    (pack,) = batch["packs"]
    p = pack["packing"]
    assert pack["input_ids"].shape == (1, 56)  # row_length, rounded up to a multiple of 8
    assert p["loss_index"].shape == p["loss_targets"].shape == (64,)
    assert (p["loss_targets"] != -100).sum() == 4 == batch["num_items"]  # the padding carries no target
    assert p["loss_targets"][4:].eq(-100).all()
    assert p["virtual_index"].tolist() == [0, 1, 2, 3, 7, 8, 9, 10]
    assert p["virtual_rows"].tolist() == [0, 1, 2, 3] * 2


@pytest.mark.parametrize("family", ["bloom", "llama"])
@pytest.mark.parametrize("variant", ["prompt_random", "prefix_proj"])
def test_packed_with_gradient_checkpointing(family, variant, tokenizer_dir):
    base = make_base(family)
    torch.manual_seed(3)
    model = build_ours(base, VARIANTS[variant], tokenizer_dir).train()
    features = rows()
    ref = packed_loss(model, features)
    ref.backward()
    ref_grads = grads(model)
    model.zero_grad()
    model.gradient_checkpointing_enable()
    loss = packed_loss(model, features)
    loss.backward()
    torch.testing.assert_close(loss, ref)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], msg=name)


def test_plan_rows_and_budget():
    sizes = [10, 3, 7, 9, 1, 12, 4]
    micro = plan(sizes, row_length=12, token_budget=24)
    placed = sorted(i for mb in micro for row in mb for i in row)
    assert placed == list(range(len(sizes)))  # every segment once
    for mb in micro:
        width = max(-(-sum(sizes[i] for i in row) // 8) * 8 for row in mb)
        assert len(mb) * width <= 24 or len(mb) == 1
        for row in mb:
            assert sum(sizes[i] for i in row) <= 12 or len(row) == 1
    assert plan([30], row_length=12, token_budget=8) == [[[0]]]  # too long for a row: a row of its own


def test_rows_longer_than_row_length_where_they_cost_less(tokenizer_dir):
    """Rows about half `row_length` long leave much of each packed row as padding: with an attention cost the
    collator tries longer rows and keeps the cheapest plan, computing the same loss and gradients; a dear
    attention keeps `row_length`, and fixed shapes ignore it."""
    model = build_ours(make_base("llama"), VARIANTS["prompt_random"], tokenizer_dir)  # 4 virtual tokens
    features = rows((5, 4, 6, 5, 4, 5))  # 8-10 slots each, row_length 12: one a row
    widths = PromptWidths.of(model)

    def slots(**keys) -> int:
        batch = PackingCollator(widths, row_length=12, token_budget=256, **keys)(features)
        return sum(p["input_ids"].numel() for p in batch["packs"])

    assert slots() == 6 * 16  # six rows padded to 16
    assert slots(attention_cost=1 / (6 * 32)) == 56  # one row of 53 slots, padded to 56
    assert slots(attention_cost=1.0) == 6 * 16  # attention this dear: the short rows stay
    assert slots(attention_cost=1 / (6 * 32), fixed_shapes=True) == slots(fixed_shapes=True)
    batch = PackingCollator(widths, row_length=12, token_budget=256, attention_cost=1 / (6 * 32))(features)
    ref = alone_loss(model, features)
    ref.backward()
    expected = grads(model)
    model.zero_grad()
    loss = sum(model(**pack, num_items_in_batch=batch["num_items"]).loss for pack in batch["packs"])
    loss.backward()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], atol=1e-5, rtol=1e-5)
    assert PackingCollator.for_model(model, _Tokenizer(), 10).attention_cost == 1 / (6 * model.shape.hidden_size)
    with pytest.raises(ValueError, match="attention_cost=-1"):
        PackingCollator(widths, attention_cost=-1)


class _Tokenizer:
    pad_token_id = 0


def test_collator_layout(tokenizer_dir):
    """Slot by slot: virtual slots, positions restarting per segment, targets inside each segment only."""
    base = make_base("llama")
    model = build_ours(base, VARIANTS["prompt_random"], tokenizer_dir)  # 4 virtual tokens
    features = [{"input_ids": [11, 12, 13], "labels": [-100, 12, 13]}, {"input_ids": [21, 22], "labels": [21, 22]}]
    batch = PackingCollator(PromptWidths.of(model), row_length=64)(features)
    (pack,) = batch["packs"]
    p = pack["packing"]
    assert pack["input_ids"].shape == (1, 16)  # 7 + 6 slots, padded to a multiple of 8
    assert p["segment_ids"][0].tolist() == [1] * 7 + [2] * 6 + [0] * 3
    assert p["position_ids"][0, :13].tolist() == list(range(7)) + list(range(6))
    assert p["virtual_slot"][0, :13].tolist() == [0, 1, 2, 3, -1, -1, -1, 0, 1, 2, 3, -1, -1]
    targets = torch.full((16,), -100)
    targets[p["loss_index"]] = p["loss_targets"]
    # the last virtual token predicts the first text token; the last text token predicts nothing
    assert targets.tolist() == [-100, -100, -100, -100, 12, 13, -100, -100, -100, -100, 21, 22, -100, -100, -100, -100]
    assert batch["num_items"] == 4 and batch["num_tokens"] == 5  # text tokens: no virtual slot, no padding


def test_unknown_adapter_is_a_clear_error(tokenizer_dir):
    model = build_ours(make_base("llama"), VARIANTS["prompt_random"], tokenizer_dir)
    collate = PackingCollator(PromptWidths.of(model))
    with pytest.raises(ValueError, match="adapter 'nope'.*adapters: default"):
        collate([{"input_ids": [5, 6], "labels": [5, 6], "adapter_names": "nope"}])


@pytest.mark.parametrize("family", ["bloom", "llama"])
def test_compiled_layers_give_the_same_packed_loss(family, tokenizer_dir):
    """`compile_layers` (dynamo on the CPU, no inductor) changes nothing in what a packed step computes."""
    from softprompt.hf.backbone import compile_layers

    torch._dynamo.reset()
    model = build_ours(make_base(family), VARIANTS["prefix_proj"], tokenizer_dir).train()
    features = rows()
    ref = packed_loss(model, features)
    assert compile_layers(model.base_model, backend="eager") is None
    torch._dynamo.config.suppress_errors = False  # a layer that fails to compile fails the test
    torch._dynamo.utils.counters.clear()
    for seed in (0, 1):  # two different packed shapes: dynamic shapes, no failure on the second
        loss = packed_loss(model, rows(seed=seed))
        if seed == 0:
            torch.testing.assert_close(loss, ref)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    torch._dynamo.reset()


def test_compile_says_why_it_is_skipped_without_a_gpu(tokenizer_dir):
    from softprompt.hf.backbone import compile_layers

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    model = build_ours(make_base("llama"), VARIANTS["prompt_random"], tokenizer_dir)
    assert compile_layers(model.base_model) == "no CUDA device (compiling pays on a GPU)"


def gemma3(window: int):
    """A tiny Gemma 3: a sliding-window layer (of `window` positions) and a full-attention layer."""
    import transformers

    torch.manual_seed(0)
    config = transformers.Gemma3TextConfig(
        **_common(), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=window, layer_types=["sliding_attention", "full_attention"],
        max_position_embeddings=256, attn_implementation="sdpa",
    )
    return transformers.AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_packed_equals_rows_alone_on_mixed_sliding_and_full_layers(variant, tokenizer_dir):
    """Gemma 3 mixes sliding-window and full layers; with every segment (prompt included) inside the window, the one
    packed mask is exact for both, also when a packed row is longer than the window."""
    model = build_ours(gemma3(window=18), VARIANTS[variant], tokenizer_dir).train()  # longest: 9 text + 9 virtual
    assert_packed_equals_alone(model, rows(), f"gemma3/{variant}")
    model.zero_grad()
    features = rows()
    long_rows = PackingCollator(PromptWidths.of(model), row_length=48, token_budget=48)(features)
    assert any(int((p["packing"]["segment_ids"] > 0).sum(-1).max()) > 18 for p in long_rows["packs"])
    loss = sum(model(**p, num_items_in_batch=long_rows["num_items"]).loss for p in long_rows["packs"])
    torch.testing.assert_close(loss, alone_loss(model, features), atol=1e-5, rtol=1e-5)


def test_mixed_layers_refuse_rows_longer_than_the_window(tokenizer_dir):
    model = build_ours(gemma3(window=8), VARIANTS["prompt_random"], tokenizer_dir)  # 4 virtual tokens
    batch = PackingCollator(PromptWidths.of(model), row_length=16)(rows())  # a segment of 4 + 9 slots
    with pytest.raises(ValueError, match=r"window 8.*rows of up to 13 slots.*lower max_length.*packing=false"):
        model(**batch["packs"][0], num_items_in_batch=batch["num_items"])
    with pytest.raises(ValueError, match=r"window 8.*rows of up to 12 slots"):
        PackingCollator.for_model(model, _Tok(), longest_row=8)
    PackingCollator.for_model(model, _Tok(), longest_row=4)  # 4 + 4 slots fit


class _Tok:
    pad_token_id = 0


def test_models_packing_cannot_run_are_refused_clearly(tokenizer_dir):
    import transformers

    from softprompt.hf.backbone import check_packable

    config = transformers.Gemma2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=4, num_key_value_heads=2, head_dim=8, sliding_window=4)
    gemma2 = transformers.AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match="mixes sliding-window .window 4. and full-attention layers.*packing=false"):
        check_packable(gemma2)
    llama = make_base("llama")
    llama.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="attn_implementation 'sdpa' or 'eager'.*packing=false"):
        check_packable(llama)


@pytest.mark.parametrize("family", ["bloom", "llama"])
@pytest.mark.parametrize("variant", ["prompt_random", "prefix_proj"])
def test_chunked_loss_equals_the_whole_logits(family, variant, tokenizer_dir, monkeypatch):
    """Past HEAD_CHUNK_ELEMENTS logits the packed loss runs a few rows of logits at a time (gradients taken
    in the forward): the same loss and gradients, and no logits kept."""
    import softprompt.hf.backbone as backbone

    torch.manual_seed(5)
    model = build_ours(make_base(family), VARIANTS[variant], tokenizer_dir).train()
    batch = PackingCollator(PromptWidths.of(model), row_length=64)(rows(lengths=(9, 12, 7, 11)))
    (pack,) = batch["packs"]
    out = model(**pack)
    out.loss.backward()
    ref_grads = grads(model)
    assert out.logits is not None
    model.zero_grad()
    monkeypatch.setattr(backbone, "HEAD_CHUNK_ELEMENTS", 5 * VOCAB)  # chunks of 5 positions
    chunked = model(**pack)
    chunked.loss.backward()
    assert chunked.logits is None
    torch.testing.assert_close(chunked.loss, out.loss, atol=1e-6, rtol=1e-6)
    for name, g in grads(model).items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-5, msg=name)


# -- CUDA graphs of the packed stack (core/packed_graphs.py) ----------------------------------------
def _stand_in_recorder(monkeypatch, recorded: list, fail: bool = False):
    """`make_graphed_callables` replaced by one that records the sample shapes and returns the function itself
    (a CPU has no CUDA graphs): what `PackedGraphs` decides, keys, copies and hands on is then testable here.
    Like the real one, it runs the function on the samples first, under the recording's autocast state."""

    def record(fn, samples, num_warmup_iters, pool):
        if fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        recorded.append(tuple(tuple(s.shape) for s in samples))
        assert all(not s.requires_grad or s.is_leaf for s in samples)  # samples detached from the step's graph
        # a CUDA graph cannot record autocast's weight cache
        assert not (torch.is_autocast_enabled("cpu") and torch.is_autocast_cache_enabled())
        fn(*samples).float().sum().backward()
        return fn

    monkeypatch.setattr(torch.cuda, "make_graphed_callables", record)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: "pool")


@pytest.mark.parametrize("variant", ["prompt_text", "prefix_proj"])
def test_packed_graphs_record_once_per_shape_and_change_nothing_computed(variant, tokenizer_dir, monkeypatch):
    from softprompt.core.packed_graphs import PackedGraphs

    recorded: list = []
    _stand_in_recorder(monkeypatch, recorded)
    model = build_ours(make_base("llama"), VARIANTS[variant], tokenizer_dir).train()
    ref = packed_loss(model, rows())
    ref.backward()
    ref_grads = grads(model)
    model.zero_grad()
    model.packed_graphs = graphs = PackedGraphs(model.base_model, device_type="cpu")
    loss = packed_loss(model, rows())
    loss.backward()
    torch.testing.assert_close(loss, ref, rtol=0, atol=0)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, ref_grads[name], rtol=0, atol=0, msg=name)
    shapes, replays = len(recorded), graphs.replays
    assert shapes >= 1 and replays >= 2  # several micro-batches, some of one shape
    assert len(set(recorded)) == len(recorded)  # a shape is recorded once
    packed_loss(model, rows()).backward()
    assert len(recorded) == shapes and graphs.replays == 2 * replays  # the same shapes replay
    with torch.no_grad():  # no gradient, no graph
        packed_loss(model, rows())
    assert graphs.replays == 2 * replays


def test_packed_graphs_leave_large_micro_batches_and_failed_recordings_to_the_eager_stack(
        tokenizer_dir, monkeypatch, caplog):
    from softprompt.core.packed_graphs import PackedGraphs

    recorded: list = []
    _stand_in_recorder(monkeypatch, recorded)
    model = build_ours(make_base("llama"), VARIANTS["prompt_random"], tokenizer_dir).train()
    ref = packed_loss(model, rows())
    model.packed_graphs = graphs = PackedGraphs(model.base_model, max_slots=8, device_type="cpu")
    assert graphs.applies(torch.zeros(1, 16, 4, requires_grad=True), None).startswith("more than 8 slots")
    torch.testing.assert_close(packed_loss(model, rows()), ref)
    assert recorded == [] and graphs.replays == 0
    model.base_model.gradient_checkpointing_enable()
    assert "gradient checkpointing" in PackedGraphs(model.base_model, device_type="cpu").applies(
        torch.zeros(1, 4, 4, requires_grad=True), None)
    model.base_model.gradient_checkpointing_disable()

    _stand_in_recorder(monkeypatch, recorded, fail=True)
    model.packed_graphs = graphs = PackedGraphs(model.base_model, device_type="cpu")
    with caplog.at_level("WARNING", logger="softprompt.core.packed_graphs"):
        torch.testing.assert_close(packed_loss(model, rows()), ref)
        packed_loss(model, rows())
    failed = [r for r in caplog.records if "recording the packed stack failed" in r.getMessage()]
    assert len(failed) == len(graphs.graphs) >= 1  # once per shape, not once per step
    assert graphs.replays == 0 and all(g is None for g in graphs.graphs.values())


def test_graphed_and_eager_micro_batches_share_the_compiled_layers(tokenizer_dir, monkeypatch):
    """A graph records under autocast without its weight cache (a recording cannot hold the cache). Had the eager
    micro-batches kept the cache on, torch.compile would trace the layers again for the other state (dynamo
    guards on it): on the H200 a recompile inside the timed steps, seconds a shape. Both run in one state."""
    from softprompt.core.packed_graphs import PackedGraphs
    from softprompt.hf.backbone import compile_layers

    def compiles(graphs: bool) -> tuple[int, list, object]:
        count, recorded = [0], []
        _stand_in_recorder(monkeypatch, recorded)

        def backend(gm, example_inputs):
            count[0] += 1
            return gm.forward

        torch._dynamo.reset()
        model = build_ours(make_base("llama"), VARIANTS["prompt_text"], tokenizer_dir).train()
        assert compile_layers(model.base_model, backend=backend) is None
        if graphs:  # micro-batches of up to 24 slots record a graph, larger ones run the eager stack
            model.packed_graphs = PackedGraphs(model.base_model, max_slots=24, device_type="cpu")
        features = rows((5, 9, 3, 7, 6, 12, 4))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            for _ in range(2):
                packed_loss(model, features, row_length=16, token_budget=32).backward()
        return count[0], recorded, model.packed_graphs

    eager, _, _ = compiles(graphs=False)
    graphed, recorded, packed_graphs = compiles(graphs=True)
    torch._dynamo.reset()
    assert recorded and eager >= 1
    assert all(g is not None for g in packed_graphs.graphs.values())  # every recording succeeded
    # no trace more than the eager stack's (fewer: a recording's samples are fresh tensors, never views, and
    # the eager first layer's input is a view, which takes a trace of its own)
    assert graphed <= eager


@pytest.mark.parametrize("variant", ["prompt_text", "ptune_mlp"])
def test_every_layer_gets_hidden_states_of_one_kind(variant, tokenizer_dir):
    """torch.compile guards on whether a layer's input is a view: the first layer's input, where the virtual
    tokens are written, must be a plain tensor as every other layer's is, or the layer is traced twice."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    model = build_ours(make_base("llama"), VARIANTS[variant], tokenizer_dir).train()
    seen = []

    def hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        seen.append(hidden._is_view())

    layers = [m for m in model.base_model.modules() if isinstance(m, GradientCheckpointingLayer)]
    handles = [layer.register_forward_pre_hook(hook, with_kwargs=True) for layer in layers]
    try:
        ref = alone_loss(model, rows())
        loss = packed_loss(model, rows())
    finally:
        for handle in handles:
            handle.remove()
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)  # written in place, the same loss
    assert len(seen) > len(layers) and not any(seen)


def test_automatic_dynamic_compiles_a_prefix_once_for_all_layers(tokenizer_dir):
    """Each layer's prefix comes through `FrozenPrefixCache.update(..., layer_idx)`; with `dynamic=True` dynamo
    specializes `layer_idx` and traces the layer again for each layer (minutes for 24 on a GPU).
    `compile_layers(dynamic=None)` lets it turn symbolic: the traces no longer grow with the depth. The default
    (`"auto"`) takes it for every family but BLOOM."""
    import transformers

    from softprompt.hf.backbone import compile_layers

    def traces(layers: int, dynamic, family: str = "qwen2") -> int:
        count = [0]

        def backend(gm, example_inputs):
            count[0] += 1
            return gm.forward

        torch._dynamo.reset()
        torch.manual_seed(0)
        config = FAMILIES[family]()
        if family == "bloom":
            config.n_layer = layers
        else:
            config.num_hidden_layers, config.layer_types = layers, [config.layer_types[0]] * layers
        base = transformers.AutoModelForCausalLM.from_config(config).eval()
        model = build_ours(base, VARIANTS["prefix_proj"], tokenizer_dir).train()
        kwargs = {} if dynamic == "default" else {"dynamic": dynamic}
        assert compile_layers(model.base_model, backend=backend, **kwargs) is None
        symbolic_module_ints = torch._dynamo.config.allow_unspec_int_on_nn_module
        for _ in range(2):
            packed_loss(model, rows((5, 9, 3, 7, 6, 12, 4)), row_length=16, token_budget=32).backward()
        torch._dynamo.reset()
        assert symbolic_module_ints == (dynamic is None or (dynamic == "default" and family != "bloom"))
        return count[0]

    per_layer = traces(3, True)  # each call sets dynamo's module-integer switch for the process
    shallow, deep, default = traces(2, None), traces(3, None), traces(3, "default")
    assert shallow == deep == default >= 1
    assert per_layer > deep  # the per-layer traces this option removes
    traces(2, "default", family="bloom")  # BLOOM keeps every size symbolic, module integers static


def test_compile_layers_refuses_an_unknown_dynamic(tokenizer_dir):
    from softprompt.hf.backbone import compile_layers

    model = build_ours(make_base("llama"), VARIANTS["prompt_text"], tokenizer_dir)
    with pytest.raises(ValueError, match="dynamic='yes'"):
        compile_layers(model.base_model, backend="eager", dynamic="yes")


def test_a_micro_batch_travels_as_one_storage(tokenizer_dir):
    """A loader worker sends each storage through its own file descriptor: a micro-batch's tensors share one."""
    model = build_ours(make_base("llama"), VARIANTS["prefix_proj"], tokenizer_dir)
    batch = PackingCollator(PromptWidths.of(model), row_length=16, token_budget=16)(rows())
    for pack in batch["packs"]:
        tensors = [pack["input_ids"], pack["labels"]] + [v for v in pack["packing"].values() if torch.is_tensor(v)]
        assert len(tensors) == 12
        assert len({t.untyped_storage().data_ptr() for t in tensors}) == 1
        flat = pack["input_ids"].untyped_storage().nbytes() // 8
        assert flat == sum(t.numel() for t in tensors)  # no room beyond the views
