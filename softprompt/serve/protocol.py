"""OpenAI's request bodies (the parts softprompt serves), its error object, and the chat prompt.

Fields OpenAI defines but softprompt does not implement are accepted only at their neutral value
(`presence_penalty: 0`, `logprobs: null`, ...) and refused otherwise, never silently ignored;
unknown fields are refused.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from softprompt.serve.params import SamplingParams

SEED_TEMPLATE = "seed"
TOKENIZER_TEMPLATE = "tokenizer"


class APIError(Exception):
    """An error with OpenAI's shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _unicode_text(value: str) -> str:
    """JSON may escape a lone surrogate (`"\\ud800"`); it is not text: no tokenizer or encoder takes it."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(f"holds a lone surrogate ({value[err.start]!r} at character {err.start}), which is not "
                         "text; send valid Unicode") from None
    return value


Text = Annotated[str, AfterValidator(_unicode_text)]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: Text
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=-1)  # softprompt's extension (vLLM's name)
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: dict[str, bool] | None = None
    stop: Text | list[Text] | None = None
    seed: int | None = None
    ignore_eos: bool = False  # extension
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    user: Text | None = None

    @model_validator(mode="after")
    def _neutral_only(self):
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0):
                raise ValueError(f"{name} is not supported by softprompt; leave it out or 0")
        if self.logit_bias:
            raise ValueError("logit_bias is not supported by softprompt; leave it out")
        if self.stream_options is not None:
            unknown = set(self.stream_options) - {"include_usage"}
            if unknown:
                raise ValueError(f"stream_options: unknown keys {sorted(unknown)}; only include_usage is supported")
            if not self.stream:
                raise ValueError("stream_options is only allowed with stream: true")
        if isinstance(self.stop, list) and len(self.stop) > 16:
            raise ValueError("stop: at most 16 stop strings")
        if self.stop == "" or (isinstance(self.stop, list) and "" in self.stop):
            raise ValueError("stop: an empty stop string would end every answer at once; leave it out")
        return self

    def sampling_params(self, max_tokens: int, seed_offset: int = 0) -> SamplingParams:
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=1.0 if self.temperature is None else float(self.temperature),
            top_p=1.0 if self.top_p is None else float(self.top_p),
            top_k=self.top_k or 0,
            seed=None if self.seed is None else self.seed + seed_offset,
            stop=tuple([self.stop] if isinstance(self.stop, str) else self.stop or ()),
            ignore_eos=self.ignore_eos,
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.get("include_usage"))


class CompletionRequest(_Request):
    prompt: Text | list[Text] | list[int] | list[list[int]]
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None

    @model_validator(mode="after")
    def _completion_only(self):
        if self.logprobs not in (None, 0):
            raise ValueError("logprobs is not supported by softprompt; leave it out")
        if self.best_of not in (None, 1, self.n):
            raise ValueError("best_of is not supported by softprompt; leave it out (or equal to n)")
        if self.suffix:
            raise ValueError("suffix is not supported by softprompt; leave it out")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[TextPart]
    name: Text | None = None

    @property
    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Text | None = None
    parallel_tool_calls: bool | None = None

    @model_validator(mode="after")
    def _chat_only(self):
        if self.logprobs or self.top_logprobs:
            raise ValueError("logprobs is not supported by softprompt; leave it out")
        if self.response_format not in (None, {"type": "text"}):
            raise ValueError("response_format is not supported by softprompt; leave it out or {'type': 'text'}")
        if self.tools or self.tool_choice not in (None, "none"):
            raise ValueError("tools are not supported by softprompt; leave them out")
        if self.max_tokens is not None and self.max_completion_tokens is not None:
            raise ValueError("give max_tokens or max_completion_tokens, not both")
        return self


class LoadAdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: Text
    path: Text


class TrainRequest(BaseModel):
    """`POST /v1/train`: the training page's keys (softprompt train's names); `extra` holds any other key of
    `softprompt train`, checked by the command itself."""

    model_config = ConfigDict(extra="forbid", strict=True)
    data: Text
    model: Text | None = None  # default: the model the server serves
    name: Text | None = None  # the run's folder under --train-root, and the adapter's name once opened
    method: Text = "prompt_tuning"
    learning_rate: float | None = Field(default=None, gt=0)
    max_steps: int | None = Field(default=None, ge=1)
    num_train_epochs: float | None = Field(default=None, gt=0)
    per_device_train_batch_size: int | None = Field(default=None, ge=1)
    num_virtual_tokens: int | None = Field(default=None, ge=1)
    max_length: int | None = Field(default=None, ge=8)
    val_size: float | None = Field(default=None, ge=0)
    logging_steps: int = Field(default=1, ge=1)
    extra: dict[str, str | int | float | bool] = Field(default_factory=dict)
