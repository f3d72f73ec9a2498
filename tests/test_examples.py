"""examples/*.yaml: the seed's three scripts as configs. Pointed at a tiny local BLOOM and the shared
alpaca_zh_demo.json, each trains, checkpoints, reloads from the checkpoint and generates."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from softprompt.cli import main
from softprompt.train.config import TrainConfig
from softprompt.train.trainer import check_checkpoint
from tiny_lm import REPO, ZH_DEMO, make_tiny_lm, need_shared

EXAMPLES = REPO / "examples"
INIT_TEXT = "下面是一段人与机器人的对话。"


def test_examples_read_as_the_seed_wrote_them():
    prompt = TrainConfig.load(EXAMPLES / "prompt_tuning.yaml")
    assert prompt.model == "Langboat/bloom-1b4-zh" and prompt.method == "prompt_tuning" and prompt.max_length == 256
    assert prompt.peft == {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": INIT_TEXT}
    ptune = TrainConfig.load(EXAMPLES / "p_tuning.yaml")
    assert ptune.peft == {"num_virtual_tokens": 10, "encoder_reparameterization_type": "LSTM", "encoder_dropout": 0.1,
                          "encoder_num_layers": 1, "encoder_hidden_size": 1024}
    prefix = TrainConfig.load(EXAMPLES / "prefix_tuning.yaml")
    assert prefix.peft == {"num_virtual_tokens": 10, "prefix_projection": True}
    for config in (prompt, ptune, prefix):
        assert config.training["per_device_train_batch_size"] == 1
        assert config.training["gradient_accumulation_steps"] == 8
        assert config.training["logging_steps"] == 10 and config.training["num_train_epochs"] == 1


@pytest.fixture(scope="module")
def tiny_bloom(tmp_path_factory) -> Path:
    need_shared(ZH_DEMO)
    rows = json.loads(ZH_DEMO.read_text(encoding="utf-8"))
    texts = [r["instruction"] + r["input"] + r["output"] for r in rows[:300]] + ["Human: Assistant: " + INIT_TEXT]
    return make_tiny_lm(tmp_path_factory.mktemp("bloom") / "bloom-tiny", texts, family="bloom", vocab_size=600)


@pytest.mark.parametrize("name", ["prompt_tuning", "p_tuning", "prefix_tuning"])
def test_example_trains_checkpoints_reloads_and_generates(name, tiny_bloom, tmp_path, capsys):
    out = tmp_path / name
    overrides = ["--model", str(tiny_bloom), "--data", str(ZH_DEMO), "--output_dir", str(out), "--max_steps", "4",
                 "--save_steps", "2", "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "2",
                 "--disable_tqdm", "true", "--dataloader_pin_memory", "false", "--num_samples", "1"]
    if name == "p_tuning":
        overrides += ["--encoder_hidden_size", "64"]  # the seed's 1024 is slow for a 32-wide model
    assert main(["train", str(EXAMPLES / f"{name}.yaml"), *overrides]) == 0
    printed = capsys.readouterr().out
    assert "kept" in printed and "--- generated:" in printed
    for step in (2, 4):
        check_checkpoint(out / f"checkpoint-{step}")
    saved = json.loads((out / "checkpoint-4" / "adapter_config.json").read_text())
    assert saved["peft_type"] == {"prompt_tuning": "PROMPT_TUNING", "p_tuning": "P_TUNING",
                                  "prefix_tuning": "PREFIX_TUNING"}[name]
    if name == "prompt_tuning":
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(tiny_bloom)
        assert saved["num_virtual_tokens"] == len(tokenizer(INIT_TEXT)["input_ids"])  # as the seed computes it
    assert (out / "loss.png").is_file()
    # Reload the checkpoint on a fresh base model (the seed's PeftModel.from_pretrained step) and generate.
    assert main(["generate", "--adapter", str(out / "checkpoint-4"), "--model", str(tiny_bloom), "考试有哪些技巧？",
                 "--do-sample", "--seed", "0", "--max-new-tokens", "12"]) == 0
    assert capsys.readouterr().out.strip()
