"""The OpenAI request bodies the server accepts, checked field by field.

Fields OpenAI defines but a local model cannot honour (tools, logprobs, penalties, ``n`` above 1)
are accepted at their neutral values only, and anything else is refused with the field's name:
a client never gets an answer that silently ignored what it asked for.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from blockrag.engine import PrefillMode
from blockrag.engine import DecodeMode, GenerationOptions

from blockrag.errors import InvalidArgumentError, InvalidRequestError

BLOCKRAG_OPTIONS = ("block_ids", "mode", "decode", "gate")
"""The fields of the ``blockrag`` extension object (``extra_body={"blockrag": {...}}`` in the openai client)."""


class BlockragOptions(BaseModel):
    """blockrag's extension of a request: passages by id, and the engine options a request may set."""

    model_config = ConfigDict(extra="forbid")

    block_ids: list[str] = Field(default_factory=list, max_length=1024)
    """Passages (node ids of the server's index, or block store keys) to serve as blocks where the prompt
    quotes them."""
    mode: PrefillMode | None = None
    """``"block"`` serves passages from blocks; ``"full"`` prefills the whole prompt (for comparison)."""
    decode: DecodeMode | Literal["auto"] = "auto"
    """What new tokens attend to: ``"auto"`` (Recycled Attention for long prompts), ``"full"``, ``"recycled"``
    or ``"streaming"``, as :class:`blockrag.engine.GenerationOptions` describes."""
    gate: bool | None = None
    """Check this request's first token against full attention (``True``) or never (``False``); the
    server's sampled fraction when absent."""


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    include_usage: bool = False


def _neutral(value: Any, allowed: tuple[Any, ...]) -> Any:
    """``value`` if it asks for nothing this server cannot do (one of ``allowed``)."""
    if value not in allowed:
        raise InvalidArgumentError(f"this server does not support {value!r} here; leave the field out or send "
                         f"{allowed[-1]!r}")
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, gt=0.0, le=1.0)
    seed: int | None = Field(default=None, ge=-(2**63), le=2**64 - 1)
    stop: str | list[str] | None = None
    n: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logit_bias: dict[str, float] | None = None
    blockrag: BlockragOptions | None = None

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and (len(value) > 4 or not all(value)):
            raise InvalidArgumentError("stop takes up to 4 non-empty strings")
        if value == "":
            raise InvalidArgumentError("stop must not be empty")
        return value

    @field_validator("n")
    @classmethod
    def _one_choice(cls, value: int | None) -> int | None:
        return _neutral(value, (None, 1))

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None) -> float | None:
        return _neutral(value, (None, 0.0))

    @field_validator("logit_bias")
    @classmethod
    def _no_bias(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        return _neutral(value, (None, {}))

    @model_validator(mode="after")
    def _usage_needs_stream(self) -> "_Request":
        if self.stream_options is not None and not self.stream:
            raise InvalidArgumentError("stream_options is only allowed when stream is true")
        return self

    def max_new_tokens(self, default: int) -> int:
        return self.max_tokens if self.max_tokens is not None else default


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="forbid")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[dict[str, Any]]
    name: str | None = None


class ChatRequest(_Request):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    store: bool | None = None
    metadata: dict[str, str] | None = None

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: bool | None) -> bool | None:
        return _neutral(value, (None, False))

    @field_validator("top_logprobs")
    @classmethod
    def _no_top_logprobs(cls, value: int | None) -> int | None:
        return _neutral(value, (None, 0))

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, value: list | None) -> list | None:
        return _neutral(value, (None, []))

    @field_validator("tool_choice")
    @classmethod
    def _no_tool_choice(cls, value: Any) -> Any:
        return _neutral(value, (None, "none"))

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, value: dict | None) -> dict | None:
        return _neutral(value, (None, {"type": "text"}))

    def max_new_tokens(self, default: int) -> int:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens
        return super().max_new_tokens(default)

    def turns(self) -> list[dict[str, str]]:
        """The messages as role and text, for the model's chat template (``developer`` reads as ``system``)."""
        out = []
        for i, message in enumerate(self.messages):
            content = message.content
            if not isinstance(content, str):
                texts = []
                for j, part in enumerate(content):
                    if part.get("type") != "text" or not isinstance(part.get("text"), str):
                        raise InvalidRequestError(
                            f"content part of type {part.get('type')!r} in messages[{i}]: this server reads text "
                            "only; send {'type': 'text', 'text': ...} parts or a string.",
                            param=f"messages[{i}].content[{j}]", code="unsupported_content_type")
                    texts.append(part["text"])
                content = "".join(texts)
            out.append({"role": "system" if message.role == "developer" else message.role, "content": content})
        return out


class CompletionRequest(_Request):
    """``POST /v1/completions``: the prompt is continued as it is, with no chat template."""

    prompt: str | list[str]
    echo: bool | None = None
    suffix: str | None = None
    best_of: int | None = None
    logprobs: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and len(value) != 1:
            raise InvalidArgumentError("send one prompt per request (a string, or a list holding one string)")
        return value

    @field_validator("echo")
    @classmethod
    def _no_echo(cls, value: bool | None) -> bool | None:
        return _neutral(value, (None, False))

    @field_validator("suffix")
    @classmethod
    def _no_suffix(cls, value: str | None) -> str | None:
        return _neutral(value, (None, ""))

    @field_validator("best_of")
    @classmethod
    def _no_best_of(cls, value: int | None) -> int | None:
        return _neutral(value, (None, 1))

    @field_validator("logprobs")
    @classmethod
    def _no_logprobs(cls, value: int | None) -> int | None:
        return _neutral(value, (None, 0))

    def text(self) -> str:
        return self.prompt if isinstance(self.prompt, str) else self.prompt[0]


@dataclass(frozen=True)
class Decoded:
    """What a request asks the engine for, in the engine's terms."""

    options: GenerationOptions
    stream: bool
    include_usage: bool
    block_ids: tuple[str, ...]
    mode: PrefillMode | None
    gate: bool | None


M = TypeVar("M", bound=BaseModel)
_TYPE_TAGS = {"str", "int", "float", "bool", "none"}


def parse_body(raw: bytes, model: type[M]) -> M:
    """The request in ``raw`` as ``model``, or :class:`InvalidRequestError` naming the first bad field."""
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidRequestError(f"the request body is not valid JSON ({exc}); send a JSON object.",
                                  code="invalid_json") from None
    except RecursionError:
        raise InvalidRequestError("the request body nests too deeply to read; send a flatter JSON object.",
                                  code="invalid_json") from None
    if not isinstance(data, Mapping):
        raise InvalidRequestError("the request body must be a JSON object.", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise _field_error(exc) from None


def _field_error(exc: ValidationError) -> InvalidRequestError:
    error = exc.errors(include_url=False)[0]
    # Union members and validators name themselves in the location (``stop.list[str]``): keep the fields only.
    loc = [str(part) for part in error["loc"]
           if str(part) not in _TYPE_TAGS and "[" not in str(part) and not str(part).startswith("function-")]
    param = ".".join(loc) or None
    if error["type"] == "extra_forbidden" and loc[:1] == ["blockrag"]:
        return InvalidRequestError(f"unknown blockrag option {loc[-1]!r}; this server accepts "
                                   f"{', '.join(BLOCKRAG_OPTIONS)}.", param=param, code="unknown_option")
    if error["type"] == "extra_forbidden":
        return InvalidRequestError(f"unsupported parameter {param!r}; leave it out.", param=param,
                                   code="unsupported_parameter")
    message = error["msg"].removeprefix("Value error, ")
    return InvalidRequestError(f"{param}: {message}" if param else message, param=param, code="invalid_value")


def decode(request: _Request, default_max_tokens: int) -> Decoded:
    """The engine's options for ``request`` (OpenAI's defaults where a field is absent: temperature and top_p 1)."""
    stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
    options = GenerationOptions(
        max_new_tokens=request.max_new_tokens(default_max_tokens),
        temperature=1.0 if request.temperature is None else request.temperature,
        top_p=1.0 if request.top_p is None else request.top_p, seed=request.seed, stop=stop,
        decode=(request.blockrag or BlockragOptions()).decode)
    extension = request.blockrag or BlockragOptions()
    return Decoded(options, bool(request.stream), bool(request.stream_options and request.stream_options.include_usage),
                   tuple(extension.block_ids), extension.mode, extension.gate)
