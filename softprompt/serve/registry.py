"""`AdapterRegistry`: the adapters a server holds, loaded and unloaded while it runs.

Adapters named at start may live anywhere. At run time a client may only name a folder under the
root given at start: the path is relative to the root, has no `..`, passes through no symbolic link
(the folder, its parents below the root and the adapter files themselves), and must resolve inside
the root. Loading and unloading take the engine's lock, so they happen between two steps.
"""

from __future__ import annotations

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path

from softprompt.io import files
from softprompt.serve.engine import Engine

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_ADAPTER_FILES = (files.CONFIG_NAME, files.WEIGHTS_NAME, files.STATE_NAME, files.LEGACY_WEIGHTS_NAME)


class AdapterPathError(PermissionError):
    """A run-time load asked for a folder outside the adapter root, or runtime loading is off."""


class AdapterExists(ValueError):
    """An adapter of that name is already loaded."""


@dataclass(frozen=True)
class AdapterInfo:
    name: str
    path: str
    method: str
    num_virtual_tokens: int
    created: int


class AdapterRegistry:
    def __init__(self, engine: Engine, base_name: str, root: str | os.PathLike | None = None):
        self.engine = engine
        self.base_name = base_name
        self.root = Path(root).resolve(strict=True) if root is not None else None
        if self.root is not None and not self.root.is_dir():
            raise ValueError(f"adapter root {str(root)!r} is not a folder")
        now = int(time.time())
        self.adapters: dict[str, AdapterInfo] = {  # adapters the model already holds (built in memory)
            name: AdapterInfo(name, "", config.peft_type, config.num_virtual_tokens, now)
            for name, config in engine.model.peft_config.items()
        }

    @property
    def model(self):
        return self.engine.model

    def check_name(self, name: str) -> None:
        if not isinstance(name, str) or not NAME_PATTERN.match(name):
            raise ValueError(
                f"adapter name {name!r} is not valid; use 1-64 letters, digits, '.', '_' or '-', starting with a letter or digit"
            )
        if name == self.base_name or name in self.adapters or name in self.model.peft_config:
            raise AdapterExists(f"the name {name!r} is already in use; unload it first or pick another name")

    def load(self, name: str, path: str | os.PathLike, *, trusted: bool = False) -> AdapterInfo:
        """Load the adapter folder `path` as `name`; untrusted paths must lie under the root."""
        self.check_name(name)
        folder = Path(path).expanduser().resolve() if trusted else self.resolve_under_root(str(path))
        if not (folder / files.CONFIG_NAME).is_file():
            raise FileNotFoundError(f"{str(path)!r} is not an adapter folder (no {files.CONFIG_NAME})")
        with self.engine.lock:
            self.check_name(name)
            self.model.load_adapter(str(folder), name)
        config = self.model.peft_config[name]
        info = AdapterInfo(name, str(folder), config.peft_type, config.num_virtual_tokens, int(time.time()))
        self.adapters[name] = info
        return info

    def unload(self, name: str) -> None:
        if name not in self.adapters:
            raise KeyError(f"no adapter named {name!r} is loaded")
        with self.engine.lock:
            self.model.delete_adapter(name)
        del self.adapters[name]

    def resolve_under_root(self, path: str) -> Path:
        if self.root is None:
            raise AdapterPathError("loading adapters at run time is off; start the server with --adapter-root DIR")
        if not isinstance(path, str) or not path or "\x00" in path:
            raise ValueError("path must be a non-empty folder path relative to the adapter root")
        relative = Path(path)
        if relative.is_absolute():
            raise AdapterPathError(f"path {path!r} must be relative to the adapter root, not absolute")
        if ".." in relative.parts:
            raise AdapterPathError(f"path {path!r} may not contain '..'; give a folder under the adapter root")
        current = self.root
        for part in relative.parts:
            current = current / part
            if current.is_symlink():
                raise AdapterPathError(f"path {path!r} passes through a symbolic link ({part!r}); links are not followed")
        if not current.exists():
            raise FileNotFoundError(f"no folder {path!r} under the adapter root")
        resolved = current.resolve(strict=True)
        if not resolved.is_relative_to(self.root) or not resolved.is_dir():
            raise AdapterPathError(f"path {path!r} is not a folder inside the adapter root")
        for name in _ADAPTER_FILES:
            if (resolved / name).is_symlink():
                raise AdapterPathError(f"{path}/{name} is a symbolic link; adapter files must be plain files")
        return resolved
