"""`python -m softprompt serve` (the CLI) end to end: a saved model and adapter, a real process, a real socket."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import httpx
from _serve_fixtures import free_port, tiny_base, tiny_peft, tiny_tokenizer

from softprompt.io import files


def test_serve_command_loads_model_and_adapters_and_answers(tmp_path):
    tiny_base("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    source = tiny_peft("llama")
    files.save_adapter(source.prompt_encoder["prefix8"], "prefix8", tmp_path / "adapters" / "prefix8")
    files.save_adapter(source.prompt_encoder["pt4"], "pt4", tmp_path / "root" / "pt4")
    port = free_port()
    cmd = [sys.executable, "-m", "softprompt", "serve", "--model", str(tmp_path / "model"), "--served-model-name", "tiny",
           "--adapter", f"zh={tmp_path / 'adapters' / 'prefix8'}", "--adapter-root", str(tmp_path / "root"),
           "--port", str(port), "--api-key", "k", "--max-model-len", "128", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url, auth = f"http://127.0.0.1:{port}", {"Authorization": "Bearer k"}
    try:
        with httpx.Client(timeout=10) as http:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None, proc.stdout.read().decode()
                try:
                    if http.get(url + "/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                assert time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
            models = http.get(url + "/v1/models", headers=auth).json()["data"]
            assert [m["id"] for m in models] == ["tiny", "zh"]
            r = http.post(url + "/v1/chat/completions", headers=auth,
                          json={"model": "zh", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
            assert http.post(url + "/v1/adapters", headers=auth, json={"name": "en", "path": "pt4"}).status_code == 201
            assert http.post(url + "/v1/completions", headers=auth,
                             json={"model": "en", "prompt": "x", "max_tokens": 3}).status_code == 200
            assert http.get(url + "/v1/models").status_code == 401
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def test_serve_command_names_what_is_wrong_without_a_traceback(tmp_path):
    tiny_base("llama").save_pretrained(tmp_path / "model")
    tiny_tokenizer().save_pretrained(tmp_path / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("SOFTPROMPT_DEBUG", None)
    cases = {
        "missing adapter folder": (["--model", str(tmp_path / "model"), "--adapter", f"zh={tmp_path / 'nowhere'}"],
                                   "nowhere"),
        "context over the model's": (["--model", str(tmp_path / "model"), "--max-model-len", "100000"],
                                     "max_model_len"),
    }
    for name, (args, expected) in cases.items():
        done = subprocess.run([sys.executable, "-m", "softprompt", "serve", *args, "--device", "cpu",
                               "--port", str(free_port())], capture_output=True, text=True, env=env, timeout=120)
        assert done.returncode == 2, (name, done.stderr)
        assert "softprompt serve: error:" in done.stderr and expected in done.stderr, (name, done.stderr)
        assert "Traceback" not in done.stderr, (name, done.stderr)
