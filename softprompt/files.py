"""Adapter files in peft's format, plus the full trainable state that peft drops.

A folder holds:
- `adapter_config.json`: peft's keys, `inference_mode: true` (what peft writes);
- `adapter_model.safetensors`: one tensor, `prompt_embeddings` (fp32), what peft reads;
- `model.safetensors`: softprompt's extra, the adapter's whole state (`prompt_encoder.<name>.*`,
  P-Tuning encoder and prefix projection included) and its training-time config in the metadata. peft
  ignores it; softprompt resumes training from it, and a plain `Trainer` resumes from it too.

Every file is written to a temporary name and renamed into place, config last: a folder that has
`adapter_config.json` has the tensors it describes.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .adapter import PromptAdapter, config_class_for
from .config import ModelShape, PromptLearningConfig

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


def _load_tensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable safetensors file ({err}); the adapter is corrupt") from err


def _read_prompt_embeddings(folder: Path) -> torch.Tensor:
    path = folder / WEIGHTS_NAME
    if path.is_file():
        tensors, _ = _load_tensors(path)
    elif (folder / LEGACY_WEIGHTS_NAME).is_file():
        path = folder / LEGACY_WEIGHTS_NAME
        try:
            tensors = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:
            raise ValueError(f"{path} could not be read ({err}); the adapter is corrupt") from err
    else:
        raise FileNotFoundError(f"{path} is missing: the adapter folder has a config but no weights")
    if EXPORT_KEY not in tensors:
        raise ValueError(f"{path} has no {EXPORT_KEY!r} tensor (found {sorted(tensors)}); not a prompt adapter")
    return tensors[EXPORT_KEY].float()


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
    import dataclasses

    saved.check_fits(shape)
    state_path = folder / STATE_NAME
    if state_path.is_file():
        tensors, meta = _load_tensors(state_path)
        train_config = saved
        if "softprompt_config" in meta:
            train_config = type(saved).from_dict(json.loads(meta["softprompt_config"]))
        train_config = dataclasses.replace(train_config, inference_mode=False).resolve(shape)
        adapter = _build(train_config, shape)
        prefix = f"prompt_encoder.{meta.get('adapter_name', 'default')}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        _load_state(adapter, state, state_path)
        _check_matches_export(adapter, folder)
        return adapter
    # peft's file: only the exported prompt; the encoder (if any) is gone, so build the inference form.
    exported = _read_prompt_embeddings(folder)
    infer_config = dataclasses.replace(saved, inference_mode=True).resolve(shape)
    adapter = _build(infer_config, shape)
    expected = tuple(adapter.embedding.weight.shape)
    if tuple(exported.shape) != expected:
        raise ValueError(
            f"{folder / WEIGHTS_NAME}: prompt_embeddings has shape {tuple(exported.shape)}, but this model needs "
            f"{expected} (model: hidden {shape.hidden_size}, {shape.num_layers} layers, "
            f"{shape.num_key_value_heads} kv heads of {shape.head_dim}); load it onto the model it was trained with"
        )
    adapter.load_exported(exported)
    return adapter


def _check_matches_export(adapter: PromptAdapter, folder: Path) -> None:
    """`model.safetensors` must describe the same prompt as peft's file beside it: another tool (peft)
    may have rewritten the adapter and left our state file behind, stale."""
    if not (folder / WEIGHTS_NAME).is_file() and not (folder / LEGACY_WEIGHTS_NAME).is_file():
        return
    exported = _read_prompt_embeddings(folder)
    ours = adapter.exported()
    if exported.shape != ours.shape or not torch.allclose(exported, ours, rtol=1e-4, atol=1e-4):
        raise ValueError(
            f"{folder / STATE_NAME} does not match {folder / WEIGHTS_NAME} (the adapter was rewritten by another "
            f"tool?); delete {STATE_NAME} to load the exported prompt, or save the adapter again"
        )


def _build(config: PromptLearningConfig, shape: ModelShape) -> PromptAdapter:
    return config.build(shape, None)


def _load_state(adapter: PromptAdapter, state: dict[str, torch.Tensor], path: Path) -> None:
    own = adapter.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if missing or unexpected:
        raise ValueError(f"{path}: adapter state does not match its config (missing {missing}, unexpected {unexpected})")
    for k, v in state.items():
        if tuple(v.shape) != tuple(own[k].shape):
            raise ValueError(
                f"{path}: {k} has shape {tuple(v.shape)}, this model needs {tuple(own[k].shape)}; "
                "load the adapter onto the model it was trained with"
            )
    adapter.load_state_dict(state)
