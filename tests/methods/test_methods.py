"""The three methods on their own: config validation, initialisation, training hazards.

- invalid config values raise ValueError naming the field and the allowed values;
- TEXT init is the word embeddings of the text's token ids repeated/cut to num_virtual_tokens (and equals
  peft's init); SAMPLE_VOCAB rows are rows of the vocabulary;
- no gradient trap: a `no_grad` forward (eval or train mode) before a training step leaves every
  trainable parameter with a non-zero gradient, two optimizer steps in a row work, and a `no_grad`
  forward after a step sees the updated weights (litgpt's cached-prefix bug, STYLE.md item 6);
- gradient checkpointing (reentrant and not) gives the same loss and gradients as without, for all
  three methods (peft refuses prefix tuning with gradient checkpointing).
"""

from __future__ import annotations

import copy
import dataclasses
import math

import peft
import pytest
import torch
import transformers
from conftest import (
    INIT_TEXT, VARIANTS, Variant, build_ours, make_base, make_batch, trainable,
)

import softprompt
from softprompt import PrefixTuningConfig, PromptEncoderConfig, PromptTuningConfig

# -- config validation ------------------------------------------------------------------------------
INVALID = [
    # (config class, kwargs, regex the message must match: the field, then the allowed values)
    (PromptTuningConfig, dict(num_virtual_tokens=None), r"num_virtual_tokens.*required"),
    (PromptTuningConfig, dict(num_virtual_tokens=0), r"num_virtual_tokens=0.*positive integer"),
    (PromptTuningConfig, dict(num_virtual_tokens=-2), r"num_virtual_tokens=-2.*positive integer"),
    (PromptTuningConfig, dict(num_virtual_tokens="8"), r"num_virtual_tokens='8'.*positive integer"),
    (PromptTuningConfig, dict(num_virtual_tokens=True), r"num_virtual_tokens=True.*positive integer"),
    (PromptTuningConfig, dict(num_virtual_tokens=4, task_type="SEQ_2_SEQ_LM"), r"task_type='SEQ_2_SEQ_LM'.*'CAUSAL_LM'"),
    (PromptTuningConfig, dict(num_virtual_tokens=4, task_type="CHAT"), r"task_type='CHAT'.*'CAUSAL_LM'"),
    (PromptTuningConfig, dict(num_virtual_tokens=4, prompt_tuning_init="WORDS"),
     r"prompt_tuning_init='WORDS'.*'RANDOM'.*'TEXT'.*'SAMPLE_VOCAB'"),
    (PromptTuningConfig, dict(num_virtual_tokens=4, prompt_tuning_init="TEXT"), r"prompt_tuning_init_text.*required"),
    (PromptTuningConfig, dict(num_virtual_tokens=4, tokenizer_kwargs={"use_fast": True}), r"tokenizer_kwargs.*TEXT"),
    (PromptTuningConfig, dict(num_virtual_tokens=4, token_dim=0), r"token_dim=0.*positive integer"),
    (PromptTuningConfig, dict(num_virtual_tokens=4, num_transformer_submodules=2), r"num_transformer_submodules=2.*1"),
    (PromptTuningConfig, dict(num_virtual_tokens=4, modules_to_save=["lm_head"]), r"modules_to_save.*not supported"),
    (PromptEncoderConfig, dict(num_virtual_tokens=4, encoder_reparameterization_type="GRU"),
     r"encoder_reparameterization_type='GRU'.*'MLP'.*'LSTM'"),
    (PromptEncoderConfig, dict(num_virtual_tokens=4, encoder_dropout=1.0), r"encoder_dropout=1.0.*\[0, 1\)"),
    (PromptEncoderConfig, dict(num_virtual_tokens=4, encoder_dropout=-0.1), r"encoder_dropout=-0.1.*\[0, 1\)"),
    (PromptEncoderConfig, dict(num_virtual_tokens=4, encoder_num_layers=0), r"encoder_num_layers=0.*positive integer"),
    (PromptEncoderConfig, dict(num_virtual_tokens=4, encoder_hidden_size=0), r"encoder_hidden_size=0.*positive integer"),
    (PrefixTuningConfig, dict(num_virtual_tokens=4, init_weights="gaussian"), r"init_weights='gaussian'.*None.*'zero'"),
    (PrefixTuningConfig, dict(num_virtual_tokens=4, prefix_projection="yes"), r"prefix_projection='yes'.*true or false"),
    (PrefixTuningConfig, dict(num_virtual_tokens=4, encoder_hidden_size=-1), r"encoder_hidden_size=-1.*positive integer"),
]


@pytest.mark.parametrize("cls, kwargs, message", INVALID, ids=lambda x: x.__name__ if isinstance(x, type) else None)
def test_invalid_config_raises_naming_field_and_allowed_values(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_configs_are_frozen_and_resolve_returns_a_new_object():
    config = PrefixTuningConfig(num_virtual_tokens=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.num_virtual_tokens = 8
    shape = softprompt.ModelShape.from_model_config(make_base("llama").config)
    resolved = config.resolve(shape)
    assert resolved is not config and config.token_dim is None
    assert (resolved.token_dim, resolved.num_attention_heads, resolved.num_layers) == (16, 2, 2)  # GQA: kv size
    model = softprompt.get_peft_model(make_base("llama"), config)
    assert config.token_dim is None and model.peft_config["default"].token_dim == 16


def test_enum_values_and_names_are_accepted():
    a = PromptEncoderConfig(num_virtual_tokens=4, encoder_reparameterization_type="LSTM", task_type="CAUSAL_LM")
    b = PromptEncoderConfig(
        num_virtual_tokens=4, encoder_reparameterization_type=softprompt.PromptEncoderReparameterizationType.LSTM,
        task_type=softprompt.TaskType.CAUSAL_LM,
    )
    assert a == b


def test_peft_config_field_names_match():
    """Every field of peft's configs exists in ours (files and scripts carry over)."""
    for ours, theirs in [
        (PromptTuningConfig, peft.PromptTuningConfig), (PromptEncoderConfig, peft.PromptEncoderConfig),
        (PrefixTuningConfig, peft.PrefixTuningConfig),
    ]:
        theirs_fields = {f.name for f in dataclasses.fields(theirs)} - {"peft_type", "runtime_config"}
        ours_fields = {f.name for f in dataclasses.fields(ours)}
        missing = sorted(theirs_fields - ours_fields)
        assert not missing, f"{ours.__name__} lacks {missing}"


# -- initialisation ---------------------------------------------------------------------------------
@pytest.mark.parametrize("num_virtual_tokens", [3, 7, 16])  # cut, exact (7 ids with BOS), repeated
def test_text_init_is_the_texts_word_embeddings(family, num_virtual_tokens, tokenizer_dir):
    base = make_base(family)
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = tokenizer(INIT_TEXT)["input_ids"]
    assert len(ids) == 7 and ids[0] == tokenizer.bos_token_id
    expected_ids = (ids * math.ceil(num_virtual_tokens / len(ids)))[:num_virtual_tokens]
    # the embedding module's output: what the model reads for these ids (Gemma's module scales by sqrt(hidden))
    expected = base.get_input_embeddings()(torch.tensor(expected_ids)).detach()

    variant = VARIANTS["prompt_text"]
    ours = build_ours(base, variant, tokenizer_dir, num_virtual_tokens=num_virtual_tokens)
    torch.testing.assert_close(ours.prompt_encoder["default"].embedding.weight, expected, atol=0, rtol=0)
    # a tokenizer object works as well as a path
    by_object = softprompt.get_peft_model(
        copy.deepcopy(base), variant.config(softprompt, None, num_virtual_tokens=num_virtual_tokens), tokenizer=tokenizer
    )
    torch.testing.assert_close(by_object.prompt_encoder["default"].embedding.weight, expected, atol=0, rtol=0)
    # and peft agrees
    theirs = peft.get_peft_model(copy.deepcopy(base), variant.config(peft, tokenizer_dir, num_virtual_tokens=num_virtual_tokens))
    torch.testing.assert_close(theirs.prompt_encoder["default"].embedding.weight, expected, atol=0, rtol=0)
    if num_virtual_tokens == len(ids):
        # so the untrained prompt acts exactly as the text written before the input
        text = make_batch(batch=2)["input_ids"]
        with torch.no_grad():
            got = ours(input_ids=text).logits[:, -text.shape[1] :]
            written = base(input_ids=torch.cat([torch.tensor([ids] * 2), text], dim=1)).logits[:, -text.shape[1] :]
        torch.testing.assert_close(got, written, atol=1e-5, rtol=0)


def test_text_init_without_tokenizer_source_raises():
    config = PromptTuningConfig(num_virtual_tokens=4, prompt_tuning_init="TEXT", prompt_tuning_init_text="hello")
    with pytest.raises(ValueError, match="tokenizer_name_or_path"):
        softprompt.get_peft_model(make_base("gpt2"), config)


def test_sample_vocab_rows_are_vocabulary_rows():
    base = make_base("qwen2")
    model = build_ours(base, VARIANTS["prompt_sample_vocab"])
    vocab = base.get_input_embeddings().weight.detach()
    for row in model.prompt_encoder["default"].embedding.weight.detach():
        assert ((vocab - row).abs().amax(dim=1) == 0).any()


def test_random_init_is_peft_scale():
    """RANDOM is torch's N(0, 1) embedding init, like peft (not the word embeddings' scale)."""
    torch.manual_seed(0)
    model = softprompt.get_peft_model(make_base("llama"), PromptTuningConfig(num_virtual_tokens=200))
    std = model.prompt_encoder["default"].embedding.weight.std().item()
    assert 0.9 < std < 1.1


@pytest.mark.parametrize("name", ["prefix_zero", "prefix_proj_zero"])
def test_zero_init_prefix_is_zero(name):
    model = build_ours(make_base("gemma"), VARIANTS[name])
    kv = model.prompt_encoder["default"].key_values()
    assert kv.shape == (2, 2, 1, VARIANTS[name].config(softprompt).num_virtual_tokens, 16)  # (L, 2, kv heads, V, hd)
    assert torch.count_nonzero(kv) == 0


# -- training hazards ---------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_no_grad_pass_then_two_training_steps(family, variant: Variant, tokenizer_dir):
    model = build_ours(make_base(family), variant, tokenizer_dir)
    params = trainable(model)
    opt = torch.optim.AdamW(list(params.values()), lr=1e-2)
    batch = make_batch(pad="right")
    before = {n: p.detach().clone() for n, p in params.items()}
    zero_init = variant.zero_init

    for step in range(2):
        for mode in ("eval", "train"):  # a no-grad pass in either mode must not leave a graph-less cache behind
            getattr(model, mode)()
            with torch.no_grad():
                cached = model(**batch).logits
        model.train()
        out = model(**batch)
        # the no-grad result was computed from the current weights
        torch.testing.assert_close(cached, out.logits.detach(), atol=1e-5, rtol=0)  # LSTM: no-grad kernel
        out.loss.backward()
        for name, p in params.items():
            assert p.grad is not None, f"step {step}: {name} got no gradient"
            if step == 1 or not zero_init:  # a zeroed last layer blocks the gradient upstream at step 0 only
                assert p.grad.abs().sum() > 0, f"step {step}: {name} got a zero gradient"
        opt.step()
        opt.zero_grad()
        with torch.no_grad():  # same mode as the last no-grad pass: its cached prompt is stale now
            after = model(**batch).logits
        torch.testing.assert_close(after, model(**batch).logits.detach(), atol=1e-5, rtol=0)
    for name, p in params.items():
        assert not torch.equal(p.detach(), before[name]), f"{name} did not change"


def test_cached_prompt_follows_weight_changes(variant: Variant, tokenizer_dir):
    """Inference caches the computed prompt; editing or loading weights must invalidate it."""
    model = build_ours(make_base("qwen2"), variant, tokenizer_dir).eval()
    adapter = model.prompt_encoder["default"]
    ids = make_batch()["input_ids"]
    with torch.no_grad():
        first = model(input_ids=ids).logits
        for p in adapter.parameters():
            p.add_(0.5)
        edited = model(input_ids=ids).logits
    assert (edited - first).abs().max() > 1e-3
    fresh = copy.deepcopy(model)  # a new module: no cache
    with torch.no_grad():
        torch.testing.assert_close(edited, fresh(input_ids=ids).logits, atol=1e-6, rtol=0)
    # a frozen adapter (loaded for inference) caches under grad mode too
    adapter.requires_grad_(False)
    state = {k: v + 0.25 for k, v in adapter.state_dict().items()}
    model(input_ids=ids)
    adapter.load_state_dict(state)
    fresh.prompt_encoder["default"].load_state_dict(state)
    torch.testing.assert_close(model(input_ids=ids).logits, fresh(input_ids=ids).logits, atol=1e-6, rtol=0)


# -- gradient checkpointing -----------------------------------------------------------------------------
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing_same_loss_and_grads(family, variant: Variant, use_reentrant, tokenizer_dir):
    base = make_base(family)
    plain = build_ours(base, variant, tokenizer_dir).train()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    assert checkpointed.is_gradient_checkpointing and not plain.is_gradient_checkpointing
    batch = make_batch(pad="right")

    losses, calls = [], []
    for model in (plain, checkpointed):
        # count runs of layer 0's attention: checkpointing re-runs it in backward
        attention = next(m for n, m in model.base_model.named_modules() if n.endswith("0.self_attention") or
                         n.endswith("0.self_attn") or n.endswith("0.attn") or n.endswith("0.attention"))
        count = []
        handle = attention.register_forward_hook(lambda *_: count.append(1))
        loss = model(**batch).loss
        loss.backward()
        handle.remove()
        losses.append(loss.item())
        calls.append(len(count))
    assert calls == [1, 2], "checkpointing did not recompute the layer"
    assert abs(losses[0] - losses[1]) < 1e-6
    g_plain, g_ckpt = trainable(plain), trainable(checkpointed)
    for n in g_plain:
        assert g_ckpt[n].grad is not None, n
        if not variant.zero_init:  # a zeroed last layer blocks the gradient upstream at the first step
            assert g_ckpt[n].grad.abs().sum() > 0, n
        torch.testing.assert_close(g_ckpt[n].grad, g_plain[n].grad, atol=1e-6, rtol=1e-5)
    # the base model stays frozen (enable_input_require_grads must not make its weights trainable)
    assert not any(p.requires_grad for p in checkpointed.base_model.parameters())

    # and training runs: two more steps, the same as without checkpointing
    steps = []
    for model in (plain, checkpointed):
        model.zero_grad()
        opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
        run = []
        for step in range(2):
            loss = model(**make_batch(pad="right", seed=step + 1)).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            run.append(loss.item())
        steps.append(run)
    assert steps[0] == pytest.approx(steps[1], abs=1e-5)


def test_peft_refuses_prefix_with_gradient_checkpointing():
    """What softprompt adds (documented, asserts the pinned peft): peft raises at creation, and enabling
    checkpointing afterwards breaks its forward with a size mismatch (transformers drops the cache)."""
    base = make_base("llama")
    base.gradient_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        peft.get_peft_model(base, VARIANTS["prefix"].config(peft))


# -- a bf16 base under autocast (the GPU default) ------------------------------------------------------
@pytest.mark.parametrize("family", ["bloom", "llama"])
@pytest.mark.parametrize("name, overrides", [("ptune_mlp", {}), ("ptune_mlp", {"encoder_reparameterization_type": "LSTM"}),
                                             ("prefix_proj", {})])
def test_encoders_run_in_fp32_under_bf16_autocast(family, name, overrides):
    """The encoder's output and gradients stay fp32 and autocast keeps no bf16 copy of its weights for the
    backward (a 2048-wide, 24-layer prefix projection's copy was 411 MB); the bf16 base still trains it."""
    variant = VARIANTS[name]
    model = build_ours(make_base(family).to(torch.bfloat16), variant, **overrides)
    params = trainable(model)
    weights = {p.untyped_storage().data_ptr() for p in params.values()}
    saved: list[int] = []

    def keep(t):
        if t.untyped_storage().data_ptr() not in weights and t.dim() == 2 and t.shape in {
                tuple(p.shape) for p in params.values() if p.dim() == 2}:
            saved.append(t.numel())  # a copy of a weight matrix
        return t

    model.train()
    batch = make_batch(pad="right")
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
        out = model(**batch)
    assert not saved, "autocast kept bf16 copies of the encoder's weights for the backward"
    assert torch.isfinite(out.loss)
    out.loss.backward()
    for n, p in params.items():
        assert p.dtype == torch.float32 and p.grad is not None and p.grad.dtype == torch.float32, n
        assert p.grad.abs().sum() > 0, f"{n} got a zero gradient"
