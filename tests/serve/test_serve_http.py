"""The server over real HTTP on 127.0.0.1: OpenAI's client unchanged, 64 concurrent clients, errors."""

from __future__ import annotations

import concurrent.futures
import json
import os
import time

import httpx
import openai
import pytest
import torch
from _serve_fixtures import ADAPTERS, running_server, tiny_peft, tiny_tokenizer
from safetensors.torch import save_file

from softprompt.io import files
from softprompt.serve import Engine
from softprompt.serve.app import create_app
from softprompt.serve.registry import AdapterRegistry

KEY = "test-key"
BASE = "tiny-llama"
AUTH = {"Authorization": f"Bearer {KEY}"}


@pytest.fixture(scope="module")
def adapter_root(tmp_path_factory):
    """A root with two saved adapters, plus the things a client must not reach through it."""
    tmp = tmp_path_factory.mktemp("adapters")
    root, outside = tmp / "root", tmp / "outside"
    source = tiny_peft("llama", seed=5)  # same base shape, other prompts
    files.save_adapter(source.prompt_encoder["pt4"], "pt4", root / "a1")
    files.save_adapter(source.prompt_encoder["prefix3"], "prefix3", root / "sub" / "a2")
    files.save_adapter(source.prompt_encoder["pt9"], "pt9", outside / "secret")
    (root / "link").symlink_to(outside / "secret", target_is_directory=True)
    (root / "filelink").mkdir()
    for name in os.listdir(root / "a1"):
        (root / "filelink" / name).symlink_to(outside / "secret" / name)
    (root / "empty").mkdir()
    (root / "corrupt").mkdir()
    (root / "corrupt" / "adapter_config.json").write_text("{not json")
    # issue #9: files that must not load (and must not cost memory): NaN weights, a pickle, a huge config
    files.save_adapter(source.prompt_encoder["pt4"], "pt4", root / "nan")
    save_file({"prompt_embeddings": torch.full((4, 32), float("nan"))}, str(root / "nan" / files.WEIGHTS_NAME))
    (root / "nan" / files.STATE_NAME).unlink()
    files.save_adapter(source.prompt_encoder["pt4"], "pt4", root / "pickled")
    for name in (files.WEIGHTS_NAME, files.STATE_NAME):
        (root / "pickled" / name).unlink()
    torch.save({"prompt_embeddings": torch.zeros(4, 32)}, root / "pickled" / files.LEGACY_WEIGHTS_NAME)
    files.save_adapter(source.prompt_encoder["pt4"], "pt4", root / "huge")
    config = json.loads((root / "huge" / files.CONFIG_NAME).read_text())
    (root / "huge" / files.CONFIG_NAME).write_text(json.dumps({**config, "num_virtual_tokens": 500_000}))
    return root


@pytest.fixture(scope="module")
def server(adapter_root):
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_peft("llama"), tokenizer, max_num_seqs=64, max_model_len=128)
    registry = AdapterRegistry(engine, BASE, adapter_root)
    app = create_app(engine, tokenizer, model_name=BASE, registry=registry, api_key=KEY)
    with running_server(app) as url:
        yield url, engine


OPENAI_HTTP = openai.DefaultHttpxClient(timeout=30)


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=30, http_client=OPENAI_HTTP)


# One pooled client: building an httpx client costs ~50 ms (its SSL context), more than a request.
HTTP = httpx.Client(timeout=30, limits=httpx.Limits(max_connections=100, max_keepalive_connections=100))


def post(url: str, path: str, body, headers=AUTH) -> httpx.Response:
    content = body if isinstance(body, (str, bytes)) else json.dumps(body)
    return HTTP.post(url + path, content=content, headers={"Content-Type": "application/json", **headers})


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


# -- the OpenAI client, unchanged ---------------------------------------------------------------
def test_models_lists_the_base_and_every_adapter(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {BASE, *ADAPTERS}
    assert models["prefix8"].model_extra["softprompt"] == {"method": "PREFIX_TUNING", "num_virtual_tokens": 8}
    assert client.models.retrieve("pt9").id == "pt9"


def test_completions_chat_and_streaming_with_the_openai_client(client):
    done = client.completions.create(model="pt9", prompt="Human: hi\n\nAssistant: ", max_tokens=12, temperature=0)
    assert done.object == "text_completion" and done.choices[0].finish_reason in ("stop", "length")
    assert done.usage.completion_tokens >= 1 and done.usage.prompt_tokens > 0
    stream = client.completions.create(model="pt9", prompt="Human: hi\n\nAssistant: ", max_tokens=12, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in stream) == done.choices[0].text

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "考试有哪些技巧？"}]
    chat = client.chat.completions.create(model="prefix8", messages=messages, max_tokens=16, temperature=0)
    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    chunks = list(client.chat.completions.create(model="prefix8", messages=messages, max_tokens=16, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == chat.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == chat.usage.completion_tokens
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == chat.choices[0].finish_reason

    base = client.chat.completions.create(model=BASE, messages=messages, max_tokens=16, temperature=0)
    assert base.choices[0].message.content != chat.choices[0].message.content  # the adapter matters


def test_sse_ends_with_done(server):
    url, _ = server
    with HTTP.stream("POST", url + "/v1/completions", headers=AUTH, timeout=30,
                      json={"model": "ptune6", "prompt": "abc", "max_tokens": 5, "temperature": 0, "stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]" and all(line.startswith("data: ") for line in lines)


def test_n_choices_prompt_lists_and_seeded_sampling(client):
    many = client.completions.create(model="pt4", prompt=["one", "two"], n=2, max_tokens=6, temperature=0.8, seed=3)
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="pt4", prompt=["one", "two"], n=2, max_tokens=6, temperature=0.8, seed=3)
    assert [c.text for c in many.choices] == [c.text for c in again.choices]
    ids = client.completions.create(model="pt4", prompt=[5, 6, 7], max_tokens=4, temperature=0)
    assert ids.choices[0].finish_reason == "length"


# -- many clients at once -----------------------------------------------------------------------
def _request(i: int) -> tuple[str, dict]:
    models = [BASE, *ADAPTERS]
    body = {"model": models[i % len(models)], "max_tokens": 6 + i % 11, "temperature": 0}
    text = f"Human: question {i} {'x' * (i % 7)}\n\nAssistant: "
    if i % 2:
        return "/v1/chat/completions", {**body, "messages": [{"role": "user", "content": f"question {i}"}], "stream": i % 4 == 1}
    return "/v1/completions", {**body, "prompt": text, "stream": i % 4 == 2}


def _answer(url: str, path: str, body: dict) -> str:
    if not body["stream"]:
        r = post(url, path, body)
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        return choice["text"] if "text" in choice else choice["message"]["content"]
    parts = []
    with HTTP.stream("POST", url + path, headers=AUTH, json=body) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                choice = json.loads(line[6:])["choices"][0]
                parts.append(choice.get("text") or choice.get("delta", {}).get("content") or "")
    return "".join(parts)


def test_64_concurrent_clients_mixing_adapters_get_their_alone_answers(server):
    url, engine = server
    reqs = [_request(i) for i in range(64)]
    engine.stats["peak_batch"] = 0
    with concurrent.futures.ThreadPoolExecutor(64) as pool:
        together = list(pool.map(lambda r: _answer(url, *r), reqs))
    assert engine.stats["peak_batch"] >= 16  # they really ran together
    alone = [_answer(url, path, body) for path, body in reqs]  # one at a time
    assert together == alone
    assert len(set(alone)) > 32


# -- errors: OpenAI's shape, the right status, and the server keeps serving ----------------------
BAD_REQUESTS = [
    ("/v1/completions", "{not json", 400, "invalid_json"),
    ("/v1/completions", "", 400, None),
    ("/v1/completions", "[1, 2]", 400, None),
    ("/v1/completions", {"model": "pt4", "prompt": "x", "max_tokens": "ten"}, 400, None),
    ("/v1/completions", {"model": "pt4", "prompt": {"text": "x"}}, 400, None),
    ("/v1/completions", {"model": "pt4", "prompt": "x", "temperature": "hot"}, 400, None),
    ("/v1/completions", {"model": "pt4", "prompt": "x", "stream": "yes"}, 400, None),
    ("/v1/completions", {"model": "pt4", "prompt": "x", "n": 0}, 400, None),
    ("/v1/completions", {"model": 7, "prompt": "x"}, 400, None),
    ("/v1/completions", {"prompt": "x"}, 400, None),
    ("/v1/completions", {"model": "pt4", "prompt": "x", "presence_penalty": 1.0}, 400, None),
    ("/v1/completions", {"model": "pt4", "prompt": "x", "frobnicate": True}, 400, None),
    ("/v1/chat/completions", {"model": "pt4", "messages": "hi"}, 400, None),
    ("/v1/chat/completions", {"model": "pt4", "messages": [{"role": "robot", "content": "hi"}]}, 400, None),
    ("/v1/completions", {"model": "no-such-adapter", "prompt": "x"}, 404, "model_not_found"),
    ("/v1/chat/completions", {"model": "no-such-adapter", "messages": [{"role": "user", "content": "x"}], "stream": True},
     404, "model_not_found"),
    ("/v1/completions", {"model": "pt4", "prompt": "x", "max_tokens": 500}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": "pt4", "prompt": "word " * 200}, 400, "context_length_exceeded"),
    ("/v1/chat/completions", {"model": "pt9", "messages": [{"role": "user", "content": "word " * 200}]},
     400, "context_length_exceeded"),
    ("/v1/completions", {"model": "pt4", "prompt": ""}, 400, "empty_prompt"),
    ("/v1/completions", {"model": "pt4", "prompt": []}, 400, "empty_prompt"),
    ("/v1/completions", {"model": "pt4", "prompt": [[]]}, 400, "empty_prompt"),
    ("/v1/chat/completions", {"model": "pt4", "messages": []}, 400, None),
    ("/v1/chat/completions", {"model": "pt4", "messages": [{"role": "user", "content": "  "}]}, 400, "empty_prompt"),
]


@pytest.mark.parametrize("path, body, status, code", BAD_REQUESTS)
def test_bad_request_gets_openai_error(server, path, body, status, code):
    url, _ = server
    assert_error(post(url, path, body), status, code)


def test_errors_never_break_the_server(server, client):
    url, engine = server
    for path, body, status, code in BAD_REQUESTS:
        assert_error(post(url, path, body), status, code)
    plain_text = {**AUTH, "Content-Type": "text/plain"}
    assert_error(post(url, "/v1/completions", {"model": "pt4", "prompt": "x"}, headers=plain_text), 400)
    assert_error(HTTP.get(url + "/v1/nowhere", headers=AUTH), 404)
    assert_error(HTTP.get(url + "/v1/completions", headers=AUTH), 405)
    assert client.completions.create(model="pt4", prompt="still here", max_tokens=3, temperature=0).choices[0].text is not None
    with pytest.raises(openai.NotFoundError) as err:
        client.completions.create(model="missing", prompt="x")
    assert err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="pt4", messages=[{"role": "user", "content": "x"}], max_tokens=1000)


def test_api_key_is_required_for_the_api_but_not_the_page(server):
    url, _ = server
    body = {"model": "pt4", "prompt": "x", "max_tokens": 2}
    assert_error(post(url, "/v1/completions", body, headers={}), 401, "invalid_api_key")
    assert_error(post(url, "/v1/completions", body, headers={"Authorization": "Bearer wrong"}), 401, "invalid_api_key")
    assert_error(post(url, "/v1/completions", "{broken", headers={"Authorization": "Bearer wrong"}), 401)
    assert_error(HTTP.get(url + "/v1/models"), 401)
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0, http_client=OPENAI_HTTP).models.list()
    assert HTTP.get(url + "/").status_code == 200
    assert post(url, "/v1/completions", body).status_code == 200


def test_client_that_leaves_mid_stream_frees_its_slot(server):
    url, engine = server
    body = {"model": "prefix8", "prompt": "long answer", "max_tokens": 100, "temperature": 0, "stream": True, "ignore_eos": True}
    with HTTP.stream("POST", url + "/v1/completions", headers=AUTH, json=body) as r:
        lines = r.iter_lines()
        next(lines)
    deadline = time.monotonic() + 10
    while engine.scheduler.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.scheduler.running == []
    assert post(url, "/v1/completions", {"model": "pt4", "prompt": "x", "max_tokens": 2}).status_code == 200


# -- adapters at run time, only from under the root -----------------------------------------------
def test_adapters_load_and_unload_at_run_time(server, client):
    url, _ = server
    r = post(url, "/v1/adapters", {"name": "live", "path": "a1"})
    assert r.status_code == 201, r.text
    assert r.json()["softprompt"] == {"method": "PROMPT_TUNING", "num_virtual_tokens": 4}
    r = post(url, "/v1/adapters", {"name": "live2", "path": "sub/a2"})
    assert r.status_code == 201, r.text
    assert {"live", "live2"} <= {m.id for m in client.models.list().data}
    first = client.completions.create(model="live", prompt="abc", max_tokens=8, temperature=0).choices[0].text
    other = client.completions.create(model="pt4", prompt="abc", max_tokens=8, temperature=0).choices[0].text
    assert first != other  # the file's prompt, not the in-memory pt4's
    assert_error(post(url, "/v1/adapters", {"name": "live", "path": "a1"}), 409, "adapter_exists")
    assert_error(post(url, "/v1/adapters", {"name": BASE, "path": "a1"}), 409, "adapter_exists")
    assert HTTP.delete(url + "/v1/adapters/live", headers=AUTH).json() == {"id": "live", "object": "model", "deleted": True}
    assert HTTP.delete(url + "/v1/adapters/live2", headers=AUTH).status_code == 200
    assert_error(post(url, "/v1/completions", {"model": "live", "prompt": "abc"}), 404, "model_not_found")
    assert_error(HTTP.delete(url + "/v1/adapters/live", headers=AUTH), 404)
    r = post(url, "/v1/adapters", {"name": "live", "path": "a1"})  # the name is free again
    assert r.status_code == 201
    assert client.completions.create(model="live", prompt="abc", max_tokens=8, temperature=0).choices[0].text == first
    HTTP.delete(url + "/v1/adapters/live", headers=AUTH)


@pytest.mark.parametrize(
    "name, path, status",
    [
        ("x1", "../outside/secret", 403),
        ("x2", "sub/../../outside/secret", 403),
        ("x3", "link", 403),
        ("x4", "filelink", 403),
        ("x5", "/etc", 403),
        ("x6", "missing", 404),
        ("x7", "empty", 404),
        ("x8", "corrupt", 400),
        ("bad name", "a1", 400),
        ("x9", "", 400),
        ("x10", "nan", 400),
        ("x11", "pickled", 400),
        ("x12", "huge", 400),
    ],
)
def test_adapter_paths_outside_the_root_are_refused(server, name, path, status):
    url, _ = server
    assert_error(post(url, "/v1/adapters", {"name": name, "path": path}), status)
    assert name not in {m["id"] for m in HTTP.get(url + "/v1/models", headers=AUTH).json()["data"]}


def test_chat_can_use_the_tokenizers_own_template():
    tokenizer = tiny_tokenizer()
    engine = Engine(tiny_peft("llama"), tokenizer, max_num_seqs=4, max_model_len=128)
    app = create_app(engine, tokenizer, model_name=BASE, chat_template="tokenizer")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    expected = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    with running_server(app) as url:
        r = HTTP.post(url + "/v1/chat/completions", json={"model": "pt4", "messages": messages, "max_tokens": 3})
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(tokenizer(expected, add_special_tokens=False)["input_ids"])
    assert expected.startswith("<|system|>be brief")
    with pytest.raises(ValueError, match="chat_template"):
        create_app(engine, tokenizer, model_name=BASE, chat_template="jinja")
