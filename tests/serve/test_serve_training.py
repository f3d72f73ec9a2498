"""The training page's endpoints over real HTTP: `POST /v1/train` starts `softprompt train` in a child process,
`GET /v1/train` reports it, a second start is refused (409), Stop asks it to end and a second Stop kills it,
bad input is a 400 naming the field. (A run followed to its end, opened and chatted with: the browser test.)"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest
from _serve_fixtures import running_server, tiny_peft, tiny_tokenizer

from softprompt.serve import Engine
from softprompt.serve.app import create_app
from softprompt.serve.launch import build_server
from tiny_lm import make_workspace


def wait_for(url: str, done, timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = httpx.get(url + "/v1/train", timeout=10).json()
        if done(status):
            return status
        assert time.monotonic() < deadline, status
        assert status["state"] not in ("failed", "killed") or done(status), status
        time.sleep(0.2)


def error_of(response: httpx.Response) -> dict:
    return response.json()["error"]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    return make_workspace(tmp_path_factory.mktemp("train-http"), 24)


def test_training_is_off_without_a_train_root():
    tokenizer = tiny_tokenizer()
    app = create_app(Engine(tiny_peft("llama", adapters={}), tokenizer, max_model_len=64), tokenizer, model_name="tiny")
    with running_server(app) as url:
        assert httpx.get(url + "/v1/train").json() == {"enabled": False, "state": "off", "base_model": None}
        r = httpx.post(url + "/v1/train", json={"data": "x.jsonl"})
        assert r.status_code == 403 and "--train-root" in error_of(r)["message"]


@pytest.mark.slow  # two `softprompt train` processes start (about 10 s of CPU for their imports)
def test_start_status_refuse_stop_kill_and_a_failing_run(workspace, tmp_path):
    model, data = str(workspace / "model"), str(workspace / "data.jsonl")
    app = build_server(model, train_root=str(tmp_path / "runs"), cuda_graphs=False, max_model_len=128)
    with running_server(app) as url:
        assert httpx.get(url + "/v1/train").json()["state"] == "idle"
        # Bad input: 400, naming the field and what it takes; nothing starts.
        bad = [({"data": data, "method": "lora"}, "method", "choose one of p_tuning, prefix_tuning, prompt_tuning"),
               ({"data": str(tmp_path / "nope.jsonl")}, "data", "no such file on the server"),
               ({"data": data, "learning_rate": -1}, "learning_rate", "greater than 0"),
               ({"data": data, "max_steps": "ten"}, "max_steps", "integer"),
               ({"data": data, "name": "../up"}, "name", "is not valid"),
               ({"data": data, "extra": {"output_dir": "/tmp/x"}}, "extra", "output_dir is the run's folder")]
        for body, param, message in bad:
            r = httpx.post(url + "/v1/train", json=body)
            assert r.status_code == 400, (body, r.text)
            assert error_of(r)["param"] == param and message in error_of(r)["message"], (body, r.text)
        assert httpx.get(url + "/v1/train").json()["state"] == "idle"

        body = {"data": data, "name": "first", "max_steps": 400, "per_device_train_batch_size": 2,
                "num_virtual_tokens": 4, "learning_rate": 0.05, "max_length": 64, "val_size": 0}
        r = httpx.post(url + "/v1/train", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["state"] == "starting" and r.json()["model"] == model and r.json()["total_steps"] is None
        run = tmp_path / "runs" / "first"
        assert (run / "train.log").is_file()
        again = httpx.post(url + "/v1/train", json=dict(body, name="second"))
        assert again.status_code == 409 and "'first' is still going" in error_of(again)["message"]
        assert not (tmp_path / "runs" / "second").exists()
        assert httpx.post(url + "/v1/train/open").status_code == 409  # not before it ends

        # Stop asks the run to end after its step (the STOP file); a second Stop kills it.
        assert httpx.post(url + "/v1/train/stop").json()["state"] == "stopping"
        assert (run / "STOP").is_file()
        status = httpx.post(url + "/v1/train/stop").json()
        assert status["state"] == "killed" and status["exit_code"] < 0 and "killed" in status["error"]
        assert httpx.post(url + "/v1/train/stop").status_code == 409  # nothing left to stop
        r = httpx.post(url + "/v1/train/open")
        assert r.status_code == 404 and "saved no adapter" in error_of(r)["message"]

        # A key that softprompt train refuses: the run fails, and the command's own message reaches the page.
        r = httpx.post(url + "/v1/train", json={"data": data, "name": "typo", "extra": {"num_virtual_token": 4}})
        assert r.status_code == 201
        status = wait_for(url, lambda s: s["exit_code"] is not None)
        assert status["state"] == "failed" and status["exit_code"] == 2
        assert "did you mean num_virtual_tokens" in status["error"], status
        r = httpx.post(url + "/v1/train", json={"data": data, "name": "first"})
        assert r.status_code == 409 and error_of(r)["param"] == "name"
