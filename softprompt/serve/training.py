"""`TrainingRuns`: the server's training page runs `softprompt train`, one run at a time, in a child process.

A run is the CLI's own command (`python -m softprompt train --key value ...`) writing to `<root>/<name>/`:
the server imports nothing of training, a bad key fails as it fails on the terminal (its message shown on
the page), and Stop cannot leave the server half-changed. Progress comes from the run's
`trainer_log.jsonl`; Stop creates `<run>/STOP` (the run ends after its step and saves its adapter), and a
second Stop kills the process. The finished adapter is loaded into the engine through the registry.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from softprompt.io import files
from softprompt.methods.config import methods
from softprompt.serve.registry import NAME_PATTERN, AdapterInfo, AdapterRegistry

LOG_NAME = "train.log"  # the child's stdout and stderr
_TAIL_LINES = 40


class RunActive(RuntimeError):
    """A run is going; one at a time per server."""


class TrainingOff(PermissionError):
    """The server was started without a folder for training runs."""


@dataclass
class Run:
    name: str
    folder: Path
    model: str
    command: list[str]
    process: subprocess.Popen
    started: float = field(default_factory=time.time)
    stop_requested: bool = False
    adapter: str | None = None  # its name in the engine, once opened

    @property
    def running(self) -> bool:
        return self.process.poll() is None


class TrainingRuns:
    def __init__(self, root: str | os.PathLike | None, base_model: str | None, registry: AdapterRegistry):
        self.root = Path(root).resolve() if root is not None else None
        if self.root is not None:
            self.root.mkdir(parents=True, exist_ok=True)
        self.base_model = base_model  # what the server serves: a run on it can be opened in the playground
        self.registry = registry
        self.run: Run | None = None
        self.lock = threading.Lock()

    def _check_on(self) -> Path:
        if self.root is None:
            raise TrainingOff("training is off on this server; start it with --train-root DIR "
                              "(the folder where runs are written)")
        return self.root

    def start(self, request) -> dict:
        """Start `softprompt train` for a `TrainRequest`; raises `RunActive`, `ValueError` or `FileExistsError`."""
        root = self._check_on()
        with self.lock:
            if self.run is not None and self.run.running:
                raise RunActive(f"run {self.run.name!r} is still going; stop it or wait for it to end "
                                "(one run at a time per server)")
            model = request.model or self.base_model
            if not model:
                raise ValueError("model: give the base model to train on")
            name = request.name or time.strftime("run-%Y%m%d-%H%M%S")
            if not NAME_PATTERN.match(name):
                raise ValueError(f"name: {name!r} is not valid; use 1-64 letters, digits, '.', '_' or '-', "
                                 "starting with a letter or digit")
            folder = root / name
            if folder.exists():
                raise FileExistsError(f"name: a run named {name!r} already exists in {root}; pick another name")
            command = [sys.executable, "-m", "softprompt", "train", *train_arguments(request, model, folder)]
            folder.mkdir(parents=True)
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            package_parent = str(Path(__file__).resolve().parents[2])  # this softprompt, not another install
            env["PYTHONPATH"] = os.pathsep.join(p for p in (package_parent, env.get("PYTHONPATH")) if p)
            with open(folder / LOG_NAME, "wb") as log:
                process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                           env=env)
            self.run = Run(name, folder, model, command, process)
            return self.status()

    def stop(self) -> dict:
        """Ask the run to end after its current step (its adapter is saved); a second call kills it."""
        self._check_on()
        with self.lock:
            run = self.run
            if run is None or not run.running:
                raise LookupError("no run is going; nothing to stop")
            if run.stop_requested:
                run.process.kill()
                run.process.wait(timeout=30)
            else:
                (run.folder / files.STOP_FILE_NAME).touch()
                run.stop_requested = True
            return self.status()

    def open(self) -> AdapterInfo:
        """Load the last run's adapter into the engine, named as the run, beside the base and other adapters."""
        self._check_on()
        with self.lock:
            run = self.run
            if run is None:
                raise LookupError("no run to open; start one first")
            if run.running:
                raise RunActive(f"run {run.name!r} is still going; open its adapter once it has ended")
            if run.adapter is not None:
                return self.registry.adapters[run.adapter]
            if not (run.folder / files.CONFIG_NAME).is_file():
                raise FileNotFoundError(f"run {run.name!r} saved no adapter (it failed before the end; see its log)")
            if run.model != self.base_model:
                raise ValueError(f"run {run.name!r} trained on {run.model!r} but this server serves "
                                 f"{self.base_model!r}; serve it with softprompt serve --model {run.model} "
                                 f"--adapter {run.name}={run.folder}")
            info = self.registry.load(run.name, run.folder, trusted=True)  # a folder the server wrote itself
            run.adapter = run.name
            return info

    def status(self) -> dict:
        """The run's state, its logged points (step, loss, tokens/s, ETA ...) and, once it failed, its log's end."""
        if self.root is None:
            return {"enabled": False, "state": "off", "base_model": self.base_model}
        run = self.run
        if run is None:
            return {"enabled": True, "state": "idle", "base_model": self.base_model, "methods": sorted(methods())}
        code = run.process.poll()
        points = read_log(run.folder / files.TRAINER_LOG_NAME)
        ended = next((p for p in points if p.get("event") == "end"), None)
        if code is None:
            state = "stopping" if run.stop_requested else ("running" if points else "starting")
        elif code == 0:
            state = "stopped" if run.stop_requested or (ended and ended.get("stopped")) else "finished"
        else:
            state = "killed" if run.stop_requested and code < 0 else "failed"
        last = next((p for p in reversed(points) if "loss" in p or "eval_loss" in p), {})
        begin = next((p for p in points if p.get("event") == "begin"), {})
        status = {
            "enabled": True, "state": state, "name": run.name, "folder": str(run.folder), "model": run.model,
            "base_model": self.base_model, "methods": sorted(methods()), "started": run.started,
            "elapsed_s": time.time() - run.started, "exit_code": code,
            "step": last.get("step", begin.get("step", 0)), "total_steps": last.get("total_steps", begin.get("total_steps")),
            "tokens_per_s": last.get("tokens_per_s"), "eta_s": last.get("eta_s") if code is None else 0,
            "losses": [[p["step"], p["loss"]] for p in points if "loss" in p],
            "eval_losses": [[p["step"], p["eval_loss"]] for p in points if "eval_loss" in p],
            "adapter_saved": code == 0 and (run.folder / files.CONFIG_NAME).is_file(),
            "adapter": run.adapter,
        }
        if state in ("failed", "killed"):
            status["error"] = error_line(run.folder / LOG_NAME, code)
        return status

    def close(self) -> None:
        """At server shutdown: a run still going is ended (it does not outlive the server)."""
        run = self.run
        if run is not None and run.running:
            run.process.terminate()
            try:
                run.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                run.process.kill()


def train_arguments(request, model: str, folder: Path) -> list[str]:
    """`--key value` for `softprompt train`: the page's keys, then its extra keys (checked by the command)."""
    if request.method not in methods():
        raise ValueError(f"method: {request.method!r} is not a method; choose one of {', '.join(sorted(methods()))}")
    data = request.data.strip()
    if not data:
        raise ValueError("data: give a data file (json, jsonl, csv, parquet) or a dataset name")
    if _looks_like_path(data) and not Path(data).expanduser().exists():
        raise ValueError(f"data: {data}: no such file on the server; give a path the server can read")
    keys = {"model": model, "data": data, "method": request.method, "output_dir": str(folder),
            "logging_steps": request.logging_steps, "report_to": "none", "disable_tqdm": True, "num_samples": 0,
            "save_strategy": "no"}
    for key in ("learning_rate", "max_steps", "num_train_epochs", "per_device_train_batch_size",
                "num_virtual_tokens", "max_length", "val_size"):
        value = getattr(request, key)
        if value is not None:
            keys[key] = value
    for key, value in request.extra.items():
        if key == "output_dir":
            raise ValueError("extra: output_dir is the run's folder, named by 'name'; leave it out")
        if key in keys and key not in ("report_to", "disable_tqdm", "num_samples", "save_strategy"):
            raise ValueError(f"extra: {key!r} is a field of its own here; set it there, not in extra")
        keys[key] = value
    args: list[str] = []
    for key, value in keys.items():
        args += [f"--{key}", json.dumps(value) if isinstance(value, bool) else str(value)]
    return args


def _looks_like_path(data: str) -> bool:
    """A file path, not a dataset name (`hub:owner/name`, or a name from a dataset registry)."""
    return ":" not in data.split("/")[0] and ("/" in data or "." in Path(data).name)


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    points = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            points.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            pass
    return points


def error_line(log: Path, code: int | None) -> str:
    """The run's own error message (`softprompt train: error: ...`), else the end of its log."""
    try:
        lines = deque(log.read_text(encoding="utf-8", errors="replace").splitlines(), maxlen=_TAIL_LINES)
    except OSError:
        lines = deque()
    for line in reversed(lines):
        if ": error: " in line or line.startswith(("ValueError", "RuntimeError", "FileNotFoundError")):
            return line.strip()
    if code is not None and code < 0:
        return f"the run was killed (signal {-code})"
    return "\n".join(lines) or f"the run ended with exit code {code}"
