"""Adapter files in peft's format, plus the full trainable state that peft drops.

A folder holds:
- `adapter_config.json`: peft's keys, `inference_mode: true` (what peft writes);
- `adapter_model.safetensors`: one tensor, `prompt_embeddings` (fp32), what peft reads;
- `model.safetensors`: softprompt's extra, the adapter's whole state (`prompt_encoder.<name>.*`,
  P-Tuning encoder and prefix projection included) and its training-time config in the metadata. peft
  ignores it; softprompt resumes training from it, and a plain `Trainer` resumes from it too.

Every file is written to a temporary name and renamed into place, config last: a folder that has
`adapter_config.json` has the tensors it describes.

Loading reads JSON and safetensors only: nothing is ever unpickled (a peft `adapter_model.bin` is refused,
with the command that converts it). Before any tensor is allocated, the config is checked against the base
model and the files' headers against the config; then weights that are not finite are refused. Every
error names the file.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from softprompt.methods.adapter import PromptAdapter
from softprompt.methods.config import config_class_for
from softprompt.methods.config import ModelShape, PromptLearningConfig

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
STATE_NAME = "model.safetensors"
EXPORT_KEY = "prompt_embeddings"


_UMASK = os.umask(0)
os.umask(_UMASK)


def _atomic_write(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; adapters are ordinary files
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _write_text(path: Path, text: str) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)

    _atomic_write(path, write)


def save_adapter(adapter: PromptAdapter, name: str, folder: str | os.PathLike) -> None:
    """Write one adapter's three files into `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    config = adapter.config
    exported = {EXPORT_KEY: adapter.exported()}
    state = {f"prompt_encoder.{name}.{k}": v.detach().float().cpu().contiguous() for k, v in adapter.state_dict().items()}
    meta = {"format": "pt", "adapter_name": name, "softprompt_config": json.dumps(config.to_dict())}
    _atomic_write(folder / WEIGHTS_NAME, lambda tmp: save_file(exported, tmp, metadata={"format": "pt"}))
    _atomic_write(folder / STATE_NAME, lambda tmp: save_file(state, tmp, metadata=meta))
    peft_view = dict(config.to_dict(), inference_mode=True)
    _write_text(folder / CONFIG_NAME, json.dumps(peft_view, indent=2, sort_keys=True))


def save_adapters(model, save_directory: str | os.PathLike, selected: list[str] | None = None) -> None:
    names = list(selected) if selected is not None else list(model.prompt_encoder)
    root = Path(save_directory)
    if root.exists() and not root.is_dir():
        raise ValueError(f"save_directory {str(root)!r} is a file; give a folder path")
    for name in names:
        model._check_adapter(name)
        save_adapter(model.prompt_encoder[name], name, root if name == "default" else root / name)


def _resolve_folder(model_id: str | os.PathLike, subfolder: str | None, **hub_kwargs) -> Path:
    """A local folder as is; otherwise a hub id, downloaded (only the adapter's own files)."""
    path = Path(model_id)
    if subfolder:
        path = path / subfolder
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{str(path)!r} is a file; give the adapter's folder (the one holding {CONFIG_NAME})")
    if os.path.isabs(str(model_id)) or str(model_id).startswith("."):
        raise FileNotFoundError(f"adapter folder {str(path)!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            str(model_id), allow_patterns=[f"{subfolder + '/' if subfolder else ''}*"], **hub_kwargs
        )
    except Exception as err:  # no hub access, unknown repo, ...
        raise FileNotFoundError(
            f"adapter {str(model_id)!r} is neither a local folder nor a reachable hub repository ({err})"
        ) from err
    return Path(local) / (subfolder or "")


def read_config(folder: Path) -> PromptLearningConfig:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: the folder is not a saved adapter (no {CONFIG_NAME})")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err}); the adapter config is corrupt") from err
    if not isinstance(data, dict) or "peft_type" not in data:
        raise ValueError(f"{path} has no peft_type; it is not an adapter config")
    try:
        return config_class_for(data["peft_type"]).from_dict(data)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def _read_header(path: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """A safetensors file's tensor shapes and metadata, without reading (or allocating) any tensor."""
    try:
        with safe_open(str(path), framework="pt") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); the adapter is corrupt") from err


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); the adapter is corrupt") from err
    for key, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise ValueError(f"{path}: {key} holds values that are not finite (NaN or inf); the adapter is broken: "
                             "train it again or take an earlier checkpoint")
    return tensors


def _refuse_pickle(folder: Path) -> None:
    raise ValueError(
        f"{folder / LEGACY_WEIGHTS_NAME} is a pickle, and softprompt never unpickles files (loading one can run "
        f"code); convert it where you trust it: python -c \"import torch; from safetensors.torch import save_file; "
        f"save_file(torch.load('{LEGACY_WEIGHTS_NAME}', weights_only=True), '{WEIGHTS_NAME}')\" in that folder"
    )


def _read_prompt_embeddings(folder: Path, expected: tuple[int, ...], shape: ModelShape) -> torch.Tensor:
    """peft's exported prompt, its shape checked against `expected` before it is read."""
    path = folder / WEIGHTS_NAME
    if not path.is_file():
        if (folder / LEGACY_WEIGHTS_NAME).is_file():
            _refuse_pickle(folder)
        raise FileNotFoundError(f"{path} is missing: the adapter folder has a config but no weights")
    shapes, _ = _read_header(path)
    if EXPORT_KEY not in shapes:
        raise ValueError(f"{path} has no {EXPORT_KEY!r} tensor (found {sorted(shapes)}); not a prompt adapter")
    if shapes[EXPORT_KEY] != expected:
        raise ValueError(
            f"{path}: {EXPORT_KEY} has shape {shapes[EXPORT_KEY]}, but {folder / CONFIG_NAME} on this model needs "
            f"{expected} (model: hidden {shape.hidden_size}, {shape.num_layers} layers, {shape.num_key_value_heads} "
            f"kv heads of {shape.head_dim}); the files disagree, or the adapter was made for another model: load it "
            "onto the model it was trained with"
        )
    return _load_tensors(path)[EXPORT_KEY].float()


def _config_in_state(saved: PromptLearningConfig, meta: dict[str, str], folder: Path) -> PromptLearningConfig:
    """The training-time config kept in `model.safetensors`' metadata; it must describe the same adapter as
    `adapter_config.json`."""
    path = folder / STATE_NAME
    if "softprompt_config" not in meta:
        return saved

    def invalid(err: Exception) -> ValueError:
        return ValueError(f"{path}: its metadata 'softprompt_config' is not a valid adapter config ({err}); delete "
                          f"{STATE_NAME} to load the exported prompt, or save the adapter again")

    try:
        data = json.loads(meta["softprompt_config"])
    except ValueError as err:
        raise invalid(err) from err
    if not isinstance(data, dict):
        raise invalid(TypeError(f"a {type(data).__name__}, not an object"))
    if data.get("peft_type") != saved.peft_type:
        raise ValueError(f"{folder / CONFIG_NAME} says peft_type {saved.peft_type!r}, but {path} was saved by a "
                         f"{data.get('peft_type')!r} adapter; the files disagree: save the adapter again")
    try:
        config = type(saved).from_dict(data)
    except (ValueError, TypeError) as err:
        raise invalid(err) from err
    if config.num_virtual_tokens != saved.num_virtual_tokens:
        raise ValueError(f"{folder / CONFIG_NAME} says {saved.num_virtual_tokens} virtual tokens, but {path} holds "
                         f"{config.num_virtual_tokens}; the files disagree: save the adapter again")
    return config


def _check_context(config: PromptLearningConfig, model_config, path: Path) -> None:
    """An adapter longer than the model's context cannot have been trained on it (and would allocate for nothing)."""
    text = model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    limit = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
    if isinstance(limit, int) and config.num_virtual_tokens >= limit:
        raise ValueError(f"{path}: num_virtual_tokens={config.num_virtual_tokens} fills the model's whole context of "
                         f"{limit} positions; this adapter was not trained for this model")


def _meta_state(config: PromptLearningConfig, shape: ModelShape) -> dict[str, tuple[int, ...]]:
    """The state's tensor shapes this config builds, computed on the meta device: nothing is allocated."""
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in _build(config, shape).state_dict().items()}


def load_adapter(
    model,
    model_id: str | os.PathLike,
    adapter_name: str = "default",
    config: PromptLearningConfig | None = None,
    subfolder: str | None = None,
    tokenizer=None,
    **hub_kwargs,
) -> PromptAdapter:
    """Build the adapter saved in `model_id` for `model`, checking that it fits the model's shape."""
    folder = _resolve_folder(model_id, subfolder, **hub_kwargs)
    saved = config or read_config(folder)
    shape = ModelShape.from_model_config(model.config)
    state_path = folder / STATE_NAME
    shapes, meta = _read_header(state_path) if state_path.is_file() else ({}, {})
    in_state = _config_in_state(saved, meta, folder)  # first: files that disagree are not "another model"
    saved.check_fits(shape)
    _check_context(saved, model.config, folder / CONFIG_NAME)
    if state_path.is_file():
        train_config = dataclasses.replace(in_state, inference_mode=False).resolve(shape)
        prefix = f"prompt_encoder.{meta.get('adapter_name', 'default')}."
        _check_shapes(_meta_state(train_config, shape), {k[len(prefix):]: v for k, v in shapes.items()
                                                          if k.startswith(prefix)}, state_path)
        tensors = _load_tensors(state_path)
        adapter = _build(train_config, shape)
        adapter.load_state_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)})
        _check_matches_export(adapter, folder)
        return adapter
    # peft's file: only the exported prompt; the encoder (if any) is gone, so build the inference form.
    infer_config = dataclasses.replace(saved, inference_mode=True).resolve(shape)
    exported = _read_prompt_embeddings(folder, _meta_state(infer_config, shape)["embedding.weight"], shape)
    adapter = _build(infer_config, shape)
    adapter.load_exported(exported)
    return adapter


def _check_matches_export(adapter: PromptAdapter, folder: Path) -> None:
    """`model.safetensors` must describe the same prompt as peft's file beside it: another tool (peft)
    may have rewritten the adapter and left our state file behind, stale."""
    if not (folder / WEIGHTS_NAME).is_file():
        return  # (an adapter_model.bin beside it is never read)
    ours = adapter.exported()
    exported = _read_prompt_embeddings(folder, tuple(ours.shape), adapter.shape)
    if not torch.allclose(exported, ours, rtol=1e-4, atol=1e-4):
        raise ValueError(
            f"{folder / STATE_NAME} does not match {folder / WEIGHTS_NAME} (the adapter was rewritten by another "
            f"tool?); delete {STATE_NAME} to load the exported prompt, or save the adapter again"
        )


def _build(config: PromptLearningConfig, shape: ModelShape) -> PromptAdapter:
    return config.build(shape, None)


def _check_shapes(own: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], path: Path) -> None:
    missing = sorted(set(own) - set(found))
    unexpected = sorted(set(found) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter state does not match its config (missing {missing}, unexpected {unexpected})")
    for k, v in found.items():
        if v != own[k]:
            raise ValueError(
                f"{path}: {k} has shape {v}, but its config on this model needs {own[k]}; the files disagree, or "
                "the adapter was made for another model: load it onto the model it was trained with"
            )
