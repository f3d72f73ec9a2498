"""Adapter files: peft's format both ways, resuming training, and clear errors on bad input.

- softprompt save -> peft `PeftModel.from_pretrained` -> same logits and greedy tokens (peft's tokens from
  a forward-argmax loop: peft's own `generate` is broken with transformers 5.2x, see test_generation);
- peft save -> softprompt `PeftModel.from_pretrained` -> same;
- save, load with `is_trainable=True`, train on: the losses equal an uninterrupted run's, for every method
  (peft cannot resume P-tuning or a prefix projection: it saves only their output);
- an adapter loaded onto a base model of another shape, and missing or corrupt files, raise errors that
  name the shapes or the file;
- the files are peft's: same config keys and values, one fp32 `prompt_embeddings` of peft's shape.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import peft
import pytest
import torch
import transformers
from conftest import (
    ONE_PER_METHOD, VARIANTS, Pair, Variant, _common, build_ours, build_pair, forward_greedy, make_base,
    make_batch, trainable,
)
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import softprompt

PROMPT = torch.tensor([[5, 17, 42, 99, 7, 64, 23], [88, 12, 5, 31, 77, 120, 9]])


def text_logits(model, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits[:, -ids.shape[1] :]


def perturb(model) -> None:
    """Move the adapter off its initial weights, so that a round trip cannot pass by re-initialising."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for p in trainable(model).values():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


# -- round trips ------------------------------------------------------------------------------------
def test_softprompt_file_loads_in_peft(pair: Pair, tmp_path):
    perturb(pair.ours)
    pair.ours.eval().save_pretrained(str(tmp_path))
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(pair.base), str(tmp_path)).eval()
    torch.testing.assert_close(text_logits(loaded), text_logits(pair.ours), atol=1e-5, rtol=0)
    assert torch.equal(forward_greedy(loaded, PROMPT, 5), pair.ours.generate(input_ids=PROMPT, max_new_tokens=5, eos_token_id=None))


def test_peft_file_loads_in_softprompt(pair: Pair, tmp_path):
    perturb(pair.peft)
    pair.peft.eval().save_pretrained(str(tmp_path))
    loaded = softprompt.PeftModel.from_pretrained(copy.deepcopy(pair.base), str(tmp_path))
    assert not loaded.training
    assert not any(p.requires_grad for p in loaded.parameters())
    torch.testing.assert_close(text_logits(loaded), text_logits(pair.peft), atol=1e-5, rtol=0)
    assert torch.equal(loaded.generate(input_ids=PROMPT, max_new_tokens=5, eos_token_id=None), forward_greedy(pair.peft, PROMPT, 5))


def test_files_match_peft_format(pair: Pair, tmp_path):
    perturb(pair.peft)
    pair.ours.prompt_encoder["default"].load_state_dict(pair.peft.prompt_encoder["default"].state_dict())
    pair.peft.save_pretrained(str(tmp_path / "peft"))
    pair.ours.save_pretrained(str(tmp_path / "ours"))
    theirs = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    ours = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    assert {k: v for k, v in ours.items() if k != "peft_version"} == {
        k: v for k, v in theirs.items() if k != "peft_version"
    }
    assert ours["inference_mode"] is True
    shape = softprompt.ModelShape.from_model_config(pair.base.config)
    if pair.variant.is_prefix:  # the key/value width: kv_heads * head_dim (GQA, Gemma's explicit head_dim)
        assert ours["token_dim"] == shape.num_key_value_heads * shape.head_dim
        assert ours["num_attention_heads"] == shape.num_key_value_heads

    with safe_open(str(tmp_path / "ours" / "adapter_model.safetensors"), "pt") as f:
        assert f.metadata() == {"format": "pt"}
        assert list(f.keys()) == ["prompt_embeddings"]
        mine = f.get_tensor("prompt_embeddings")
    reference = load_file(str(tmp_path / "peft" / "adapter_model.safetensors"))["prompt_embeddings"]
    assert mine.dtype == torch.float32 == reference.dtype
    assert mine.shape == reference.shape
    torch.testing.assert_close(mine, reference, atol=1e-6, rtol=0)


# -- resuming training ----------------------------------------------------------------------------------
def _train(model, opt, steps: range) -> list[float]:
    model.train()
    losses = []
    for step in steps:
        loss = model(**make_batch(pad="right", seed=step)).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return losses


def test_resume_training_equals_uninterrupted_run(family, variant: Variant, tokenizer_dir, tmp_path):
    base = make_base(family)
    torch.manual_seed(5)
    model = build_ours(base, variant, tokenizer_dir)
    opt = torch.optim.AdamW(list(trainable(model).values()), lr=1e-2)
    _train(model, opt, range(3))
    model.save_pretrained(str(tmp_path))
    opt_state = copy.deepcopy(opt.state_dict())
    uninterrupted = _train(model, opt, range(3, 6))

    resumed = softprompt.PeftModel.from_pretrained(copy.deepcopy(base), str(tmp_path), is_trainable=True)
    assert sorted(trainable(resumed)) == sorted(trainable(model))  # P-tuning encoder, prefix projection too
    opt2 = torch.optim.AdamW(list(trainable(resumed).values()), lr=1e-2)
    opt2.load_state_dict(opt_state)
    assert _train(resumed, opt2, range(3, 6)) == uninterrupted


def test_peft_cannot_resume_prompt_learning(tmp_path):
    """What softprompt adds: peft refuses `is_trainable=True` for prompt learning (documented, not fixed)."""
    pair = build_pair("llama", VARIANTS["ptune_mlp"])
    pair.peft.save_pretrained(str(tmp_path))
    with pytest.raises(ValueError, match="trainable"):
        peft.PeftModel.from_pretrained(copy.deepcopy(pair.base), str(tmp_path), is_trainable=True)
    # softprompt loads peft's file for training too; P-tuning's encoder is gone from it, so the prompt
    # itself becomes the trainable parameter
    loaded = softprompt.PeftModel.from_pretrained(copy.deepcopy(pair.base), str(tmp_path), is_trainable=True)
    assert sorted(trainable(loaded)) == ["embedding.weight"]
    torch.testing.assert_close(text_logits(loaded), text_logits(pair.peft.eval()), atol=1e-5, rtol=0)


# -- bad input ------------------------------------------------------------------------------------------
def _llama(**changes) -> transformers.PreTrainedModel:
    kwargs = dict(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=8, max_position_embeddings=256,
    )
    kwargs.update(changes)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(transformers.LlamaConfig(**_common(), **kwargs)).eval()


# changes to the base model, and by method the field whose (adapter value, model value) the message must show
MISMATCHES = {
    "hidden": (dict(hidden_size=64, head_dim=16), "token_dim", {"prompt": (32, 64), "ptune": (32, 64), "prefix": (16, 32)}),
    "layers": (dict(num_hidden_layers=3), "num_layers", {"prompt": (2, 3), "ptune": (2, 3), "prefix": (2, 3)}),
    "heads": (
        dict(num_attention_heads=8, num_key_value_heads=4), "num_attention_heads",
        {"prompt": (4, 8), "ptune": (4, 8), "prefix": (2, 4)},  # prefix: key/value heads
    ),
}


@pytest.mark.parametrize("writer", ["softprompt", "peft"])
@pytest.mark.parametrize("mismatch", list(MISMATCHES))
@pytest.mark.parametrize("name", ONE_PER_METHOD)
def test_adapter_for_another_shape_raises_with_both_shapes(name, mismatch, writer, tmp_path):
    variant = VARIANTS[name]
    base = _llama()
    if writer == "softprompt":
        build_ours(base, variant).save_pretrained(str(tmp_path))
    else:
        peft.get_peft_model(copy.deepcopy(base), variant.config(peft)).save_pretrained(str(tmp_path))
    changes, field, expected = MISMATCHES[mismatch]
    other = _llama(**changes)
    adapter_value, model_value = expected[variant.method]
    with pytest.raises(ValueError, match=rf"{field}\b[^;)]*\b{adapter_value}\b[^;)]*\b{model_value}\b"):
        softprompt.PeftModel.from_pretrained(other, str(tmp_path))


def _saved(tmp_path: Path, name: str = "ptune_lstm1") -> tuple[transformers.PreTrainedModel, Path]:
    base = make_base("qwen2")
    model = build_ours(base, VARIANTS[name])
    model.save_pretrained(str(tmp_path))
    return base, tmp_path


def test_missing_config_names_the_file(tmp_path):
    base, folder = _saved(tmp_path)
    (folder / "adapter_config.json").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        softprompt.PeftModel.from_pretrained(base, str(folder))


def test_missing_folder_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        softprompt.PeftModel.from_pretrained(make_base("qwen2"), str(tmp_path / "nowhere"))


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"peft_type": "LORA"}', '{"peft_type": "P_TUNING", "num_virtual_tokens": -3}'])
def test_corrupt_config_names_the_file(tmp_path, content):
    base, folder = _saved(tmp_path)
    (folder / "adapter_config.json").write_text(content)
    with pytest.raises(ValueError, match="adapter_config.json"):
        softprompt.PeftModel.from_pretrained(base, str(folder))


@pytest.mark.parametrize("file", ["adapter_model.safetensors", "model.safetensors"])
@pytest.mark.parametrize("damage", ["garbage", "truncated", "wrong_key"])
def test_corrupt_weights_name_the_file(tmp_path, file, damage):
    base, folder = _saved(tmp_path)
    path = folder / file
    if file == "adapter_model.safetensors":
        (folder / "model.safetensors").unlink()  # peft's folder: the exported prompt is all there is
    if damage == "garbage":
        path.write_bytes(b"\x00\x01 not a safetensors file" * 10)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:-20])
    else:
        save_file({"something_else": torch.zeros(3, 32)}, str(path))
    with pytest.raises(ValueError, match=file.replace(".", r"\.")):
        softprompt.PeftModel.from_pretrained(base, str(folder))


def test_missing_weights_name_the_file(tmp_path):
    base, folder = _saved(tmp_path)
    (folder / "model.safetensors").unlink()
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="adapter_model.safetensors"):
        softprompt.PeftModel.from_pretrained(base, str(folder))


def test_wrong_prompt_shape_in_file_names_both_shapes(tmp_path):
    base, folder = _saved(tmp_path, "prompt_random")
    (folder / "model.safetensors").unlink()
    save_file({"prompt_embeddings": torch.zeros(7, 32)}, str(folder / "adapter_model.safetensors"), {"format": "pt"})
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors.*\(7, 32\).*\(4, 32\)"):
        softprompt.PeftModel.from_pretrained(base, str(folder))


def test_stale_softprompt_state_is_not_loaded_silently(tmp_path):
    """peft (or anything else) rewrote the adapter in a softprompt folder: the leftover model.safetensors
    no longer matches adapter_model.safetensors and must not win silently."""
    pair = build_pair("llama", VARIANTS["prefix_proj"])
    pair.ours.save_pretrained(str(tmp_path))
    perturb(pair.peft)
    pair.peft.save_pretrained(str(tmp_path))  # overwrites config + adapter_model.safetensors only
    try:
        loaded = softprompt.PeftModel.from_pretrained(copy.deepcopy(pair.base), str(tmp_path))
    except ValueError as err:
        assert "model.safetensors" in str(err)
    else:  # if it loads, it must be peft's new adapter
        torch.testing.assert_close(text_logits(loaded), text_logits(pair.peft.eval()), atol=1e-5, rtol=0)


# -- issue #9: nothing unpickled, configs checked before allocating, weights and configs that disagree ----
def _edit_config(folder: Path, **changes) -> None:
    path = folder / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _rewrite_state(path: Path, change) -> None:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    change(tensors, meta)
    save_file(tensors, str(path), meta)


def test_a_huge_config_is_refused_before_any_tensor_is_allocated(tmp_path, monkeypatch):
    """500,000 virtual tokens allocated 1.1 GB before the old shape check refused them; 20 over weights of 10
    loaded."""
    base, folder = _saved(tmp_path, "prompt_random")
    built_on = []  # where each module the loader builds lives: only on meta (no memory) until the checks pass
    original = softprompt.io.files._build
    monkeypatch.setattr(softprompt.io.files, "_build", lambda c, s: built_on.append(torch.empty(0).device.type) or original(c, s))
    _edit_config(folder, num_virtual_tokens=500_000)
    with pytest.raises(ValueError, match=r"says 500000 virtual tokens, but .*model\.safetensors holds 4; the files disagree"):
        softprompt.PeftModel.from_pretrained(base, str(folder))
    (folder / "model.safetensors").unlink()  # peft's folder: the config against the model, then the file's header
    with pytest.raises(ValueError, match=r"adapter_config\.json: num_virtual_tokens=500000 fills the model's whole context"):
        softprompt.PeftModel.from_pretrained(base, str(folder))
    _edit_config(folder, num_virtual_tokens=200)
    with pytest.raises(ValueError, match=r"adapter_model\.safetensors: prompt_embeddings has shape \(4, 32\), but .*\(200, 32\)"):
        softprompt.PeftModel.from_pretrained(base, str(folder))
    assert built_on == ["meta"]


@pytest.mark.parametrize("writer", ["softprompt", "peft"])
def test_a_config_of_20_virtual_tokens_over_weights_of_10_is_refused(tmp_path, writer):
    base = make_base("qwen2")
    if writer == "softprompt":
        softprompt.get_peft_model(base, softprompt.PromptTuningConfig(num_virtual_tokens=10)).save_pretrained(str(tmp_path))
    else:
        peft.get_peft_model(copy.deepcopy(base), peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10)
                            ).save_pretrained(str(tmp_path))
    _edit_config(tmp_path, num_virtual_tokens=20)
    message = {"softprompt": r"says 20 virtual tokens, but .*model\.safetensors holds 10; the files disagree",
               "peft": r"adapter_model\.safetensors: prompt_embeddings has shape \(10, 32\), but .*\(20, 32\)"}[writer]
    with pytest.raises(ValueError, match=message):
        softprompt.PeftModel.from_pretrained(base, str(tmp_path))


@pytest.mark.parametrize("file", ["model.safetensors", "adapter_model.safetensors"])
def test_weights_that_are_not_finite_are_refused(tmp_path, file):
    base, folder = _saved(tmp_path, "prompt_random")
    if file == "adapter_model.safetensors":
        (folder / "model.safetensors").unlink()
    _rewrite_state(folder / file, lambda tensors, meta: [t.fill_(float("nan")) for t in tensors.values()])
    with pytest.raises(ValueError, match=rf"{file.replace('.', '[.]')}: \S+ holds values that are not finite"):
        softprompt.PeftModel.from_pretrained(base, str(folder))


def test_broken_metadata_names_the_file(tmp_path):
    base, folder = _saved(tmp_path)
    _rewrite_state(folder / "model.safetensors", lambda tensors, meta: meta.update(softprompt_config="{broken"))
    with pytest.raises(ValueError, match=r"model\.safetensors: its metadata 'softprompt_config' is not a valid adapter"):
        softprompt.PeftModel.from_pretrained(base, str(folder))


def test_a_changed_peft_type_says_the_files_disagree(tmp_path):
    base, folder = _saved(tmp_path, "prompt_random")
    _edit_config(folder, peft_type="PREFIX_TUNING")
    with pytest.raises(ValueError, match=r"adapter_config\.json says peft_type 'PREFIX_TUNING', but .*model\.safetensors "
                                         r"was saved by a 'PROMPT_TUNING' adapter; the files disagree"):
        softprompt.PeftModel.from_pretrained(base, str(folder))


class _Planted:
    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code from the adapter folder ran"))


def test_a_pickled_adapter_is_refused_with_the_way_to_convert_it(tmp_path):
    base, folder = _saved(tmp_path, "prompt_random")
    (folder / "model.safetensors").unlink()
    (folder / "adapter_model.safetensors").unlink()
    marker = tmp_path / "pwned"
    torch.save(_Planted(marker), folder / "adapter_model.bin")
    with pytest.raises(ValueError, match=r"adapter_model\.bin is a pickle, and softprompt never unpickles.*save_file\("):
        softprompt.PeftModel.from_pretrained(base, str(folder))
    assert not marker.exists()
