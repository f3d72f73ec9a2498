"""The seed's three scripts, run end to end with softprompt in place of peft.

The scripts are read from ../shared/seed/ at run time (never copied into the repo). Only what a CPU-only,
hub-less machine forces is changed: the import line, the model and data paths, the output folder, a
few training steps instead of an epoch (and the checkpoint number that follows), and `.cuda()`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[2] / "shared"
SEED = SHARED / "seed" / "000_95d6480dea8ffc4c.txt"
ZH_DEMO = SHARED / "data" / "llama-factory" / "alpaca_zh_demo.json"


def _need_shared() -> None:
    if not (SEED.is_file() and ZH_DEMO.is_file()):
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SHARED} is missing: CI must run with ../shared beside the checkout")
        pytest.skip(f"{SHARED} is not beside this checkout")


def seed_scripts() -> list[str]:
    text = SEED.read_text(encoding="utf-8")
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny BLOOM with a byte-level BPE tokenizer trained on the data, and the data saved with save_to_disk."""
    _need_shared()
    from datasets import Dataset
    from tokenizers import Tokenizer, models, pre_tokenizers, decoders, trainers
    from transformers import BloomConfig, BloomForCausalLM, PreTrainedTokenizerFast

    root = tmp_path_factory.mktemp("seed")
    rows = json.loads(ZH_DEMO.read_text(encoding="utf-8"))
    Dataset.from_list(rows).save_to_disk(str(root / "alpaca_data_zh"))

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    texts = [r["instruction"] + r["input"] + r["output"] for r in rows[:300]]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=600, special_tokens=["<pad>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    model_dir = root / "bloom-tiny"
    fast.save_pretrained(model_dir)
    import torch

    torch.manual_seed(0)
    config = BloomConfig(vocab_size=len(fast), hidden_size=32, n_layer=2, n_head=4, eos_token_id=1, pad_token_id=0)
    BloomForCausalLM(config).save_pretrained(model_dir)
    return root


@pytest.mark.parametrize("index,name", [(0, "prompt_tuning"), (1, "p_tuning"), (2, "prefix_tuning")])
def test_seed_script_runs_with_softprompt(workspace: Path, index: int, name: str):
    code = seed_scripts()[index]
    out_dir = workspace / f"out_{name}"
    code = code.replace("from peft import", "from softprompt import")
    code = code.replace('"Langboat/bloom-1b4-zh"', repr(str(workspace / "bloom-tiny")))
    code = code.replace('"./PEFT/data/alpaca_data_zh"', repr(str(workspace / "alpaca_data_zh")))
    code = code.replace('"/tmp_1203/checkpoint-500/"', repr(str(out_dir / "checkpoint-4")))
    code = code.replace('"/tmp_1203"', repr(str(out_dir)))
    code = code.replace("num_train_epochs = 1", "max_steps = 4, save_steps = 2, report_to = 'none', use_cpu = True")
    code = code.replace(".cuda()", ".to('cpu')")
    assert "from peft" not in code and "Langboat" not in code and "/tmp_1203" not in code
    script = workspace / f"{name}.py"
    script.write_text(code, encoding="utf-8")
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, env=env, timeout=600, cwd=workspace)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    if name != "prefix_tuning":  # the seed comments out this print in its prefix script
        assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: \d+\.\d{4}", proc.stdout)
    for step in (2, 4):
        ckpt = out_dir / f"checkpoint-{step}"
        assert (ckpt / "adapter_config.json").is_file() and (ckpt / "adapter_model.safetensors").is_file()
        assert (ckpt / "trainer_state.json").is_file() and (ckpt / "optimizer.pt").is_file()
        from safetensors import safe_open

        with safe_open(str(ckpt / "adapter_model.safetensors"), "pt") as f:
            assert list(f.keys()) == ["prompt_embeddings"]
        with safe_open(str(ckpt / "model.safetensors"), "pt") as f:  # the adapter's full state, no base weights
            keys = list(f.keys())
        assert keys and all(k.startswith("prompt_encoder.default.") for k in keys), keys
    # The last line is the generated answer, starting with the prompt the script built.
    assert "Human: 考试有哪些技巧？" in proc.stdout and "Assistant:" in proc.stdout
