"""`softprompt train` on conversations and on datasets by name: a multi-turn messages file trains with labels on
the assistant's tokens only; a file of no known format exits 2; registry names and `hub:` datasets read offline."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest
from transformers import AutoTokenizer

from softprompt.cli import main
from softprompt.data.readers import read_hub
from softprompt.data.rows import ColumnMap, DataError, load_rows
from softprompt.data.token_cache import tokenized_rows
from softprompt.train.config import TrainConfig
from softprompt.train.trainer import build_trainer, load_data
from tiny_lm import make_tiny_lm, toy_rows, write_rows

datasets.disable_progress_bars()


def chat(word: str) -> list[dict]:
    return [{"role": "system", "content": "Answer in capitals."},
            {"role": "user", "content": f"Write {word}."}, {"role": "assistant", "content": word.upper()},
            {"role": "user", "content": f"And {word} again?"}, {"role": "assistant", "content": word.upper() + "!"}]


WORDS = ["apple", "house", "river", "green", "music", "table", "water", "bread"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sources")
    texts = [m["content"] for w in WORDS for m in chat(w)] + ["Human: Assistant: "]
    make_tiny_lm(root / "model", texts + [r["instruction"] + r["input"] + r["output"] for r in toy_rows(12)])
    write_rows(root / "chats.jsonl", [{"messages": chat(w)} for w in WORDS])
    return root


def run_args(root: Path, out: str, *extra: str) -> list[str]:
    return ["train", "--model", str(root / "model"), "--output_dir", str(root / out), "--max_steps", "2",
            "--per_device_train_batch_size", "4", "--num_virtual_tokens", "4", "--val_size", "0",
            "--logging_steps", "1", "--disable_tqdm", "true", "--num_samples", "0", "--cache_tokenized", "false",
            *extra]


def test_a_multi_turn_messages_file_trains_on_the_assistant_tokens_only(workspace, capsys):
    tok = AutoTokenizer.from_pretrained(workspace / "model")
    config = TrainConfig.from_mapping({"model": str(workspace / "model"), "data": str(workspace / "chats.jsonl"),
                                       "output_dir": str(workspace / "unused"), "val_size": 0})
    trainer, _, _ = build_trainer(config)
    ids = lambda text: tok(text)["input_ids"]  # noqa: E731
    for row, word in zip(trainer.train_dataset, WORDS):
        masked = [ids(f"Answer in capitals.\n\nHuman: Write {word}.\n\nAssistant: "),
                  ids(f"\n\nHuman: And {word} again?\n\nAssistant: ")]
        answers = [ids(word.upper() + "</s>"), ids(word.upper() + "!</s>")]
        assert row["input_ids"] == masked[0] + answers[0] + masked[1] + answers[1]
        assert row["labels"] == [-100] * len(masked[0]) + answers[0] + [-100] * len(masked[1]) + answers[1]
    # the packed micro-batch the model is given carries those labels, and nothing else
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    labels = [t for pack in batch["packs"] for t in pack["labels"].flatten().tolist() if t != -100]
    expected = sum((ids(w.upper() + "</s>") + ids(w.upper() + "!</s>") for w in WORDS[:4]), [])
    assert sorted(labels) == sorted(expected) and batch["num_items"] == len(expected)  # packing reorders rows

    assert main(run_args(workspace, "chat_run", "--data", str(workspace / "chats.jsonl"))) == 0
    out = capsys.readouterr().out
    assert "kept 8 of 8 rows" in out and "packing:" in out
    state = json.loads((workspace / "chat_run" / "trainer_state.json").read_text())
    assert state["global_step"] == 2 and all(0 < log["loss"] < 100 for log in state["log_history"] if "loss" in log)
    assert (workspace / "chat_run" / "adapter_model.safetensors").is_file()


def test_a_file_of_no_known_format_exits_2_with_one_line(workspace, capsys):
    pairs = write_rows(workspace / "pairs.jsonl", [{"prompt": "a", "completion": "b"}] * 3)
    assert main(run_args(workspace, "refused", "--data", str(pairs))) == 2
    err = capsys.readouterr().err
    line = err.splitlines()[-1]  # before it: the model's loading bar, no traceback
    assert line.startswith(f"softprompt train: error: {pairs}: matches no data format: its columns are prompt, "
                           "completion; the formats accepted are alpaca (instruction, input, output), sharegpt")
    assert "Traceback" not in err
    assert not (workspace / "refused").exists()


def test_a_registry_name_reads_its_file_format_and_columns(workspace, tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    write_rows(folder / "dialogs.jsonl", [{"dialog": [{"from": "human", "value": m[1]["content"]},
                                                      {"from": "gpt", "value": m[2]["content"]}], "sys": m[0]["content"]}
                                          for m in map(chat, WORDS)])
    (folder / "pairs.json").write_text(json.dumps([{"q": r["instruction"], "a": r["output"]} for r in toy_rows(8)]))
    registry = folder / "dataset_info.json"
    registry.write_text(json.dumps({
        "support": {"path": "dialogs.jsonl", "format": "sharegpt", "columns": {"messages": "dialog", "system": "sys"}},
        "caps": {"file_name": "pairs.json", "formatting": "alpaca", "columns": {"prompt": "q", "response": "a"}},
        "ranked": {"file_name": "pairs.json", "ranking": True},
        # LLaMA-Factory's entries as written: mirrors beside hf_hub_url, role/content tags, a system column
        "orca": {"hf_hub_url": "Open-Orca/OpenOrca", "ms_hub_url": "AI-ModelScope/OpenOrca",
                 "columns": {"prompt": "question", "response": "response", "system": "system_prompt"}},
        "ultrachat": {"hf_hub_url": "HuggingFaceH4/ultrachat_200k", "split": "train_sft", "formatting": "sharegpt",
                      "columns": {"messages": "messages"}, "tags": {"role_tag": "role", "content_tag": "content",
                                                                     "user_tag": "user", "assistant_tag": "assistant"}},
        "deepctrl": {"ms_hub_url": "deepctrl/deepctrl-sft-data"},
        "toolcall": {"file_name": "dialogs.jsonl", "formatting": "sharegpt",
                     "columns": {"messages": "conversations", "tools": "tools"}},
    }))
    tok = AutoTokenizer.from_pretrained(workspace / "model")
    base = {"model": str(workspace / "model"), "dataset_registry": str(registry), "val_size": 0,
            "cache_tokenized": False}
    named = load_data(TrainConfig.from_mapping({**base, "data": "support"}), tok)[0]
    plain = [{"messages": m[:3]} for m in map(chat, WORDS)]
    expected = load_data(TrainConfig.from_mapping({**base, "data": str(write_rows(tmp_path / "p.jsonl", plain))}), tok)
    assert named.to_list() == expected[0].to_list() and len(named) == 8
    caps = load_data(TrainConfig.from_mapping({**base, "data": "caps"}), tok)[0]
    assert len(caps) == 8 and tok.decode([t for t in caps[0]["labels"] if t != -100]) == "APPLE</s>"

    orca = TrainConfig.from_mapping({**base, "data": "orca"}).data_source
    assert (orca.location, orca.columns) == ("hub:Open-Orca/OpenOrca", {"instruction": "question",
                                                                       "output": "response", "system": "system_prompt"})
    ultrachat = TrainConfig.from_mapping({**base, "data": "ultrachat"}).data_source
    assert (ultrachat.location, ultrachat.format, ultrachat.split) == ("hub:HuggingFaceH4/ultrachat_200k", "sharegpt",
                                                                        "train_sft")
    with pytest.raises(ValueError, match=r"'deepctrl': give exactly one of .* \(ModelScope and Modelers copies"):
        TrainConfig.from_mapping({**base, "data": "deepctrl"})
    with pytest.raises(ValueError, match=r"'toolcall': columns 'tools' are not read"):
        TrainConfig.from_mapping({**base, "data": "toolcall"})
    with pytest.raises(ValueError, match=r"data='suport' is neither a name in .* \(did you mean support\?\)"):
        TrainConfig.from_mapping({**base, "data": "suport"})
    with pytest.raises(ValueError, match=r"dataset 'ranked': unsupported key 'ranking'"):
        TrainConfig.from_mapping({**base, "data": "ranked"})
    with pytest.raises(ValueError, match=r"format='messages', but .*'support' says 'sharegpt'"):
        TrainConfig.from_mapping({**base, "data": "support", "format": "messages"})
    with pytest.raises(ValueError, match=r"messages_column='turns', but .* says 'dialog'"):
        TrainConfig.from_mapping({**base, "data": "support", "messages_column": "turns"})
    with pytest.raises(ValueError, match="dataset_registry='nope.json': no such file"):
        TrainConfig.from_mapping({**base, "data": "support", "dataset_registry": "nope.json"})
    with pytest.raises(ValueError, match="loss_on='prompt' is not valid; allowed values: assistant, all"):
        TrainConfig.from_mapping({**base, "data": "support", "loss_on": "prompt"})


def cache_hub_dataset(cache: Path, repo_id: str, rows: list[dict], split: str = "train") -> None:
    """Put `rows` into a datasets cache as `load_dataset(repo_id)` leaves a hub dataset of JSON files there
    (`<cache>/<owner>___<name>/default/0.0.0/<commit>/<name>-<split>.arrow` + dataset_info.json), so that
    with HF_HUB_OFFLINE=1 `load_dataset(repo_id)` reads it back. Built by datasets' own JSON builder."""
    from datasets.packaged_modules.json.json import Json

    owner, name = repo_id.split("/")
    source = write_rows(cache.parent / f"{name}.jsonl", rows)
    builder = Json(cache_dir=str(cache), dataset_name=name, config_id="default", data_files={split: str(source)},
                   hash="0123456789abcdef0123456789abcdef01234567")
    builder.download_and_prepare()
    (cache / name).rename(cache / f"{owner}___{name}")  # the namespace datasets adds for a hub repository


@pytest.fixture
def offline_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hf_datasets"
    cache_hub_dataset(cache, "someone/chats", [{"messages": chat(w)} for w in WORDS])
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_a_hub_dataset_reads_offline_from_the_datasets_cache(workspace, offline_cache):
    rows = load_rows("hub:someone/chats", split="train")
    assert rows.column_names == ["messages"] and rows["messages"] == [chat(w) for w in WORDS]
    tok = AutoTokenizer.from_pretrained(workspace / "model")
    config = TrainConfig.from_mapping({"model": str(workspace / "model"), "data": "hub:someone/chats",
                                       "val_size": 0, "cache_tokenized": False})
    from_file = TrainConfig.from_mapping({"model": str(workspace / "model"), "data": str(workspace / "chats.jsonl"),
                                          "val_size": 0, "cache_tokenized": False})
    assert load_data(config, tok)[0].to_list() == load_data(from_file, tok)[0].to_list()
    with pytest.raises(DataError, match=r"hub:someone/other: not in the local datasets cache .* the hub is off "
                                        r"\(HF_HUB_OFFLINE / HF_DATASETS_OFFLINE\); load it once with network"):
        read_hub("someone/other", "train")
    with pytest.raises(DataError, match=r"hub:someone/chats: .*test.* \(data_split='test'\)"):
        read_hub("someone/chats", "test")
    with pytest.raises(DataError, match="not a hub dataset id"):
        read_hub("a/b/c", "train")


def test_a_hub_dataset_is_tokenized_once(workspace, offline_cache, tmp_path, monkeypatch):
    """The token cache knows a hub dataset by the arrow files datasets keeps it in."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "sp"))
    tok = AutoTokenizer.from_pretrained(workspace / "model")
    first, report = tokenized_rows("hub:someone/chats", ColumnMap(), tok, 64, "alpaca")
    assert report.kept == 8 and len(list((tmp_path / "sp" / "tokenized").iterdir())) == 1
    import softprompt.data.token_cache as token_cache

    monkeypatch.setattr(token_cache, "tokenize", lambda *a, **k: pytest.fail("tokenized again"))
    again, _ = tokenized_rows("hub:someone/chats", ColumnMap(), tok, 64, "alpaca")
    assert again.to_list() == first.to_list()


def test_a_hub_dataset_trains_from_the_cache_offline(workspace, offline_cache, capsys):
    """`softprompt train --data hub:owner/name`: offline (as HF_HUB_OFFLINE=1 sets it), from the datasets cache."""
    args = run_args(workspace, "hub_run", "--data", "hub:someone/chats")
    assert main(args) == 0
    assert "hub:someone/chats: kept 8 of 8 rows" in capsys.readouterr().out
    assert json.loads((workspace / "hub_run" / "trainer_state.json").read_text())["global_step"] == 2
    assert main(args[:-1] + ["hub:someone/missing", "--output_dir", str(workspace / "missing")]) == 2
    assert "hub:someone/missing: not in the local datasets cache" in capsys.readouterr().err.splitlines()[-1]


def test_data_split_picks_a_datasetdict_split_and_a_file_has_none(tmp_path):
    parts = {"train": [{"messages": chat("apple")}], "validation": [{"messages": chat("river")}] * 2}
    datasets.DatasetDict({k: datasets.Dataset.from_list(v) for k, v in parts.items()}).save_to_disk(str(tmp_path / "d"))
    assert load_rows(tmp_path / "d", split="validation")["messages"] == [chat("river")] * 2
    with pytest.raises(DataError, match=r"without a 'test' split \(splits: train, validation\)"):
        load_rows(tmp_path / "d", split="test")
    with pytest.raises(DataError, match="a file has no splits, so data_split='validation' cannot apply"):
        load_rows(write_rows(tmp_path / "c.jsonl", parts["train"]), split="validation")
