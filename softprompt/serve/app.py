"""The HTTP server: OpenAI's `/v1/completions`, `/v1/chat/completions` and `/v1/models`, softprompt's
`/v1/adapters` and `/v1/train` (the training page's runs, `training.py`), and the playground page at `/`.

The request's `model` picks the adapter (or the base model by its name). Every failure answers with
OpenAI's error object and a 4xx status; a request the engine could not finish answers 503.

Hostile input stays bounded: a body over `max_request_bytes` is refused (413) before it is read whole, a
prompt longer in characters than any prompt that fits the context is refused before it is tokenized, and
tokenizing runs off the event loop. A client that goes away aborts its request, streaming or not.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from softprompt.data.templates import seed_chat_prompt
from softprompt.serve.async_engine import AsyncEngine, RequestStream
from softprompt.serve.engine import ContextTooLong, Engine, InvalidTokenId, UnknownAdapter
from softprompt.serve.protocol import (
    SEED_TEMPLATE,
    TOKENIZER_TEMPLATE,
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    LoadAdapterRequest,
    TrainRequest,
)
from softprompt.serve.registry import AdapterExists, AdapterPathError, AdapterRegistry
from softprompt.serve.training import RunActive, TrainingOff, TrainingRuns

STATIC = Path(__file__).parent / "static"
DEFAULT_MAX_REQUEST_BYTES = 4 * 2**20  # far above what a prompt that fits a 2,048-token context takes


def create_app(
    engine: Engine,
    tokenizer,
    *,
    model_name: str,
    registry: AdapterRegistry | None = None,
    api_key: str | None = None,
    chat_template: str = SEED_TEMPLATE,
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    training: TrainingRuns | None = None,
) -> FastAPI:
    """The app around `engine`; its lifespan starts and stops the engine's thread (and ends a training run
    still going). `training`: the runs of the training page (off when None)."""
    if isinstance(max_request_bytes, bool) or not isinstance(max_request_bytes, int) or max_request_bytes < 1024:
        raise ValueError(f"max_request_bytes={max_request_bytes!r} is not valid; give a number of bytes of at least 1024")
    if chat_template not in (SEED_TEMPLATE, TOKENIZER_TEMPLATE):
        raise ValueError(f"chat_template={chat_template!r} is not valid; allowed values: 'seed', 'tokenizer'")
    if chat_template == TOKENIZER_TEMPLATE and not getattr(tokenizer, "chat_template", None):
        raise ValueError("chat_template='tokenizer', but the tokenizer has no chat template; use 'seed'")
    runner = AsyncEngine(engine)
    registry = registry or AdapterRegistry(engine, model_name)
    training = training or TrainingRuns(None, None, registry)
    started = int(time.time())

    async def lifespan(app: FastAPI):
        runner.start()
        yield
        await run_in_threadpool(training.close)
        await run_in_threadpool(runner.stop)

    app = FastAPI(title="softprompt", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.runner, app.state.registry = runner, registry
    app.add_middleware(BodyLimitMiddleware, limit=max_request_bytes)
    app.add_middleware(APIKeyMiddleware, api_key=api_key)  # added last, so it runs first: no key, no body read
    max_prompt_chars = engine.max_model_len * _longest_token(tokenizer)
    _error_handlers(app)

    # -- helpers ----------------------------------------------------------------------------------
    def adapter_for(model: str) -> str | None:
        if model == model_name:
            return None
        if model in engine.model.peft_config:
            return model
        known = ", ".join([model_name, *engine.model.peft_config])
        raise APIError(404, f"The model {model!r} does not exist; served models: {known}", param="model", code="model_not_found")

    def model_card(name: str) -> dict:
        info = registry.adapters.get(name)
        card = {"id": name, "object": "model", "created": info.created if info else started, "owned_by": "softprompt",
                "root": model_name, "parent": model_name if info else None}
        if info:
            card["softprompt"] = {"method": info.method, "num_virtual_tokens": info.num_virtual_tokens}
        return card

    def check_chars(chars: int, param: str) -> None:
        """A cheap bound before tokenizing: no token is longer than the vocabulary's longest entry."""
        if chars > max_prompt_chars:
            raise APIError(400, f"The prompt is {chars} characters, more than any prompt that fits the server's "
                           f"context of {engine.max_model_len} tokens; shorten it", param=param,
                           code="context_length_exceeded")

    async def encode(text: str, special: bool = True) -> list[int]:
        if tokenizer is None:
            raise APIError(400, "this server has no tokenizer; send the prompt as token ids", param="prompt")
        return (await run_in_threadpool(tokenizer, text, add_special_tokens=special))["input_ids"]

    def submit(prompts: list[list[int]], req, adapter: str | None, default_max: int | None) -> list[RequestStream]:
        """Check every sequence first, then queue them all: a bad one queues none."""
        plans = []
        for ids in prompts:
            if not ids:
                raise APIError(400, "The prompt is empty; send at least one token", param="prompt", code="empty_prompt")
            max_tokens = req.max_tokens or getattr(req, "max_completion_tokens", None) or default_max
            if max_tokens is None:  # chat: whatever room the context leaves
                max_tokens = engine.max_model_len - engine.num_virtual_tokens(adapter) - len(ids)
                if max_tokens < 1:
                    raise APIError(400, f"The prompt is {len(ids)} tokens, which leaves no room to answer within the "
                                   f"server's context of {engine.max_model_len} tokens", param="messages",
                                   code="context_length_exceeded")
            for j in range(req.n):
                try:
                    params = req.sampling_params(max_tokens, seed_offset=j)
                    engine.check(ids, params, adapter)
                except ContextTooLong as err:
                    too_long = engine.num_virtual_tokens(adapter) + len(ids) >= engine.max_model_len
                    param = ("prompt" if isinstance(req, CompletionRequest) else "messages") if too_long else "max_tokens"
                    raise APIError(400, str(err), param=param, code="context_length_exceeded") from err
                except UnknownAdapter as err:
                    raise APIError(404, str(err), param="model", code="model_not_found") from err
                except InvalidTokenId as err:
                    raise APIError(400, str(err), param="prompt", code="invalid_value") from err
                except ValueError as err:  # SamplingParams' messages start with the field's name
                    field = str(err).split("=", 1)[0]
                    raise APIError(400, str(err), param=field if field in _SAMPLING_FIELDS else None,
                                   code="invalid_value") from err
                plans.append((ids, params))
        try:
            return [runner.submit(ids, params, adapter, stream=bool(req.stream)) for ids, params in plans]
        except UnknownAdapter as err:  # unloaded in between
            raise APIError(404, str(err), param="model", code="model_not_found") from err

    # -- routes -----------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card(model_name)] + [model_card(n) for n in list(registry.adapters)]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        adapter_for(name)
        return model_card(name)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        adapter = adapter_for(req.model)
        prompt = req.prompt
        if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and isinstance(prompt[0], int)):
            prompt = [prompt]
        if not prompt:
            raise APIError(400, "The prompt is empty; send at least one token", param="prompt", code="empty_prompt")
        if len(prompt) * req.n > 64:
            raise APIError(400, "at most 64 completions per request (prompts x n)", param="n")
        texts = [p if isinstance(p, str) else None for p in prompt]
        for p in texts:
            if p is not None:
                check_chars(len(p), "prompt")
        ids = [(await encode(p) if p else []) if isinstance(p, str) else p for p in prompt]
        streams = submit(ids, req, adapter, default_max=16)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        echo = [""] * len(ids)
        if req.echo:  # the prompt's text before each answer
            echo = [t if t is not None else (tokenizer.decode(i) if tokenizer else "") for t, i in zip(texts, ids)]

        def chunk(index: int, text: str, finish: str | None) -> dict:
            return {"id": rid, "object": "text_completion", "created": created, "model": req.model,
                    "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            async def events() -> AsyncIterator[str]:
                started = set()
                async for index, delta in merged(streams):
                    prefix = "" if index in started else echo[index // req.n]
                    started.add(index)
                    if delta.text or prefix or delta.finished:
                        yield sse(chunk(index, prefix + delta.text, finish_reason(delta)))
                if req.include_usage:
                    yield sse({"id": rid, "object": "text_completion", "created": created, "model": req.model,
                               "choices": [], "usage": usage(ids, req.n, streams)})
            return StreamingResponse(with_done(events()), media_type="text/event-stream")
        results = await collect_unless_gone(request, streams)
        if results is None:
            return Response(status_code=499)  # nobody is listening; the engine has dropped the work
        choices = [{"index": i, "text": echo[i // req.n] + text, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(results)]
        return {"id": rid, "object": "text_completion", "created": created, "model": req.model, "choices": choices,
                "usage": usage(ids, req.n, streams)}

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, request: Request):
        adapter = adapter_for(req.model)
        if not any(m.text.strip() for m in req.messages if m.role == "user"):
            raise APIError(400, "The messages hold no user text; send at least one non-empty user message",
                           param="messages", code="empty_prompt")
        check_chars(sum(len(m.text) for m in req.messages), "messages")
        if chat_template == SEED_TEMPLATE:
            ids = await encode(seed_chat_prompt([(m.role, m.text) for m in req.messages]))
        else:
            messages = [{"role": m.role, "content": m.text} for m in req.messages]
            text = await run_in_threadpool(tokenizer.apply_chat_template, messages, add_generation_prompt=True,
                                           tokenize=False)
            ids = await encode(text, special=False)
        streams = submit([ids], req, adapter, default_max=None)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        def chunk(index: int, delta: dict, finish: str | None) -> dict:
            return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                    "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}]}

        if req.stream:
            async def events() -> AsyncIterator[str]:
                for i in range(len(streams)):
                    yield sse(chunk(i, {"role": "assistant", "content": ""}, None))
                async for index, delta in merged(streams):
                    if delta.text:
                        yield sse(chunk(index, {"content": delta.text}, None))
                    if delta.finished:
                        yield sse(chunk(index, {}, finish_reason(delta)))
                if req.include_usage:
                    yield sse({"id": rid, "object": "chat.completion.chunk", "created": created, "model": req.model,
                               "choices": [], "usage": usage([ids], req.n, streams)})
            return StreamingResponse(with_done(events()), media_type="text/event-stream")
        results = await collect_unless_gone(request, streams)
        if results is None:
            return Response(status_code=499)
        choices = [{"index": i, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": reason}
                   for i, (text, reason) in enumerate(results)]
        return {"id": rid, "object": "chat.completion", "created": created, "model": req.model, "choices": choices,
                "usage": usage([ids], req.n, streams)}

    @app.post("/v1/adapters", status_code=201)
    async def load_adapter(req: LoadAdapterRequest):
        try:
            await run_in_threadpool(registry.load, req.name, req.path)
        except AdapterExists as err:
            raise APIError(409, str(err), param="name", code="adapter_exists") from err
        except AdapterPathError as err:
            raise APIError(403, str(err), type="permission_error", param="path", code="path_not_allowed") from err
        except FileNotFoundError as err:
            raise APIError(404, str(err), type="not_found_error", param="path", code="adapter_not_found") from err
        except (ValueError, TypeError, RuntimeError, OSError) as err:  # a folder that is not a usable adapter
            raise APIError(400, f"could not load the adapter: {err}", param="path", code="invalid_adapter") from err
        return model_card(req.name)

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str):
        try:
            await run_in_threadpool(registry.unload, name)
        except KeyError as err:
            raise APIError(404, f"no adapter named {name!r} is loaded", param="name", code="model_not_found") from err
        return {"id": name, "object": "model", "deleted": True}

    # -- the training page's runs ---------------------------------------------------------------------
    async def training_call(action, *args):
        try:
            return await run_in_threadpool(action, *args)
        except TrainingOff as err:
            raise APIError(403, str(err), type="permission_error", code="training_off") from err
        except RunActive as err:
            raise APIError(409, str(err), code="run_active") from err
        except (FileExistsError, AdapterExists) as err:
            raise APIError(409, str(err), param="name", code="name_in_use") from err
        except FileNotFoundError as err:  # the run saved no adapter
            raise APIError(404, str(err), type="not_found_error", code="adapter_not_found") from err
        except LookupError as err:
            raise APIError(409, str(err), code="no_run") from err
        except ValueError as err:  # "field: message" names the field
            field = str(err).split(":", 1)[0]
            raise APIError(400, str(err), param=field if field in TrainRequest.model_fields else None,
                           code="invalid_value") from err

    @app.get("/v1/train")
    async def train_status():
        return await run_in_threadpool(training.status)

    @app.post("/v1/train", status_code=201)
    async def train_start(req: TrainRequest):
        return await training_call(training.start, req)

    @app.post("/v1/train/stop")
    async def train_stop():
        return await training_call(training.stop)

    @app.post("/v1/train/open", status_code=201)
    async def train_open():
        info = await training_call(training.open)
        return model_card(info.name)

    return app


# -- streaming helpers ------------------------------------------------------------------------------
def sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def with_done(events: AsyncIterator[str]) -> AsyncIterator[str]:
    """The events, then `data: [DONE]`; an engine failure becomes an error event, not a cut connection."""
    try:
        async for event in events:
            yield event
    except APIError as err:
        yield sse(err.body())
    yield "data: [DONE]\n\n"


async def merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, object]]:
    """`(index, delta)` from all streams as they come; raises `APIError` if the engine failed one."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        async for delta in stream:
            await queue.put((index, delta))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            index, delta = await queue.get()
            if delta.finished and delta.finish_reason in ("error", "unloaded", "abort", "invalid"):
                raise engine_error(delta)
            yield index, delta
            remaining -= delta.finished
    finally:
        for task in tasks:
            task.cancel()


async def collect(streams: list[RequestStream]) -> list[tuple[str, str | None]]:
    texts = [""] * len(streams)
    reasons: list[str | None] = [None] * len(streams)
    async for index, delta in merged(streams):
        texts[index] += delta.text
        if delta.finished:
            reasons[index] = finish_reason(delta)
    return list(zip(texts, reasons))


async def collect_unless_gone(request: Request, streams: list[RequestStream]) -> list[tuple[str, str | None]] | None:
    """`collect(streams)`, or None as soon as the client disconnects (its sequences are then aborted: the
    engine drops them at its next step, as it does for a stream left early)."""
    work = asyncio.ensure_future(collect(streams))
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()
            for stream in streams:
                stream.engine.abort(stream.seq)
    return work.result() if work.done() and not work.cancelled() else None


async def _disconnected(request: Request) -> None:
    """Returns when the client goes away (the body is already read, so only `http.disconnect` can come)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def engine_error(delta) -> APIError:
    if delta.finish_reason == "unloaded":
        return APIError(404, delta.error or "the adapter was unloaded", param="model", code="model_not_found")
    if delta.finish_reason == "invalid":  # failed alone, so the request's own input caused it
        return APIError(400, delta.error or "the request could not be run", code="invalid_request")
    return APIError(503, delta.error or "the request was not completed", type="server_error")


def finish_reason(delta) -> str | None:
    return delta.finish_reason if delta.finished else None


def usage(prompts: list[list[int]], n: int, streams: list[RequestStream]) -> dict:
    prompt_tokens = sum(len(p) for p in prompts)
    completion_tokens = sum(len(s.seq.output_ids) for s in streams)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _longest_token(tokenizer) -> int:
    """Characters in the vocabulary's longest entry: no token stands for more text (byte-level and
    SentencePiece entries spell their text out, a byte fallback entry like `<0x41>` is longer than its text)."""
    vocab = tokenizer.get_vocab() if tokenizer is not None and hasattr(tokenizer, "get_vocab") else None
    return max((len(token) for token in vocab), default=1) if vocab else 10**9  # no vocabulary: no bound


# -- errors, the body limit and the API key -----------------------------------------------------------
_SAMPLING_FIELDS = {"max_tokens", "temperature", "top_p", "top_k", "seed", "stop"}


class ErrorResponse(JSONResponse):
    """An error body in ASCII JSON: whatever text a message quotes, it always encodes."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, err: APIError):
        return ErrorResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        errors = err.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":
            reason = first.get("ctx", {}).get("error", "")
            message = f"The request body is not valid JSON: {reason}".rstrip(": ")
            return ErrorResponse(APIError(400, message, code="invalid_json").body(), status_code=400)
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        # pydantic names union branches in loc (`str`, `list[int]`); keep the field path only
        field = ".".join(p for p in loc if not any(c in p for c in "[]") and p not in ("str", "int", "float", "bool"))
        message = first.get("msg", "invalid request")
        same_field = [e for e in errors if [str(p) for p in e.get("loc", ()) if p != "body"][:1] == loc[:1]]
        if len(same_field) > 1 and first.get("type", "").endswith("_type"):  # a union: name no single branch
            message = "wrong type; see the API reference for the accepted types"
        if field:
            message = f"{field}: {message}"
        return ErrorResponse(APIError(400, message, param=field or None, code="invalid_value").body(), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        if err.status_code == 413:  # raised while the body was read (FastAPI passes HTTP errors through)
            return ErrorResponse(_too_large(err.detail).body(), status_code=413)
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        message = f"{request.method} {request.url.path}: {err.detail}"
        return ErrorResponse(APIError(err.status_code, message, type=kind).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, err: Exception):  # a bug: still answer in OpenAI's shape
        return ErrorResponse(APIError(500, f"internal error: {type(err).__name__}: {err}", type="server_error").body(),
                            status_code=500)


class APIKeyMiddleware:
    """With an API key set, `/v1/*` needs `Authorization: Bearer <key>` (checked before the body is read)."""

    def __init__(self, app, api_key: str | None):
        self.app, self.api_key = app, api_key

    async def __call__(self, scope, receive, send):
        if self.api_key is None or scope["type"] != "http" or not scope["path"].startswith("/v1/"):
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
        if scheme.lower() == "bearer" and secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
            return await self.app(scope, receive, send)
        body = APIError(401, "Incorrect API key provided; send it as 'Authorization: Bearer <key>'",
                        code="invalid_api_key").body()
        await _drain(receive)  # so that the connection stays open for the client's next request
        await ErrorResponse(body, status_code=401)(scope, receive, send)


class BodyLimitMiddleware:
    """Refuses a request body over `limit` bytes with 413: by its Content-Length before reading any of it,
    or, sent chunked, as soon as the bytes received pass the limit. The rest is read and dropped, never
    kept, so that the kept-alive connection serves the client's next request."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.limit:
            await _drain(receive)
            error = _too_large(f"The request body is {int(length)} bytes, more than this server's limit of "
                                 f"{self.limit}; send a shorter request")
            return await ErrorResponse(error.body(), status_code=413)(scope, receive, send)
        received = 0

        async def counted():  # a body sent in chunks, without a length
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    if message.get("more_body", False):
                        await _drain(receive)
                    raise StarletteHTTPException(413, f"The request body is more than this server's limit of "
                                                      f"{self.limit} bytes; send a shorter request")
            return message

        await self.app(scope, counted, send)


def _too_large(message: str) -> APIError:
    return APIError(413, message, code="request_too_large")


_DRAIN_LIMIT = 256 * 2**20  # past this, stop reading: the server then closes the connection after its reply


async def _drain(receive) -> None:
    """Read the rest of a request's body, keeping none of it."""
    drained = 0
    while drained < _DRAIN_LIMIT:
        message = await receive()
        if message["type"] != "http.request":
            return
        drained += len(message.get("body", b""))
        if not message.get("more_body", False):
            return
