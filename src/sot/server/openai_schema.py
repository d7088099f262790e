"""Pydantic models of the OpenAI chat-completions wire format that `sot serve` speaks (only what it needs).

Requests are lenient where clients differ (unknown fields are accepted and ignored, as most OpenAI-compatible
servers do) and strict where a wrong value would silently change the answer (ranges, `n`, tools): those the
server rejects with a clear 400. Responses carry the standard fields plus an optional `sot` object, which
standard clients ignore. This module holds no behaviour beyond shape and range checks.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

SoTModeName = Literal["sot", "normal", "auto"]


# -- requests ---------------------------------------------------------------------------------------------


class ContentPart(BaseModel):
    """One part of a message's content; only `text` parts are answerable (others are rejected)."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(max_length=64)
    text: str | None = None


class ChatMessage(BaseModel):
    """One message of the conversation. `tool`/`function` turns and tool calls are rejected by the server."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[dict[str, Any]] | None = None
    tool_call_id: str | None = None


class StreamOptions(BaseModel):
    """`stream_options`: `include_usage` adds a last chunk with `usage` and no choices."""

    model_config = ConfigDict(extra="allow")

    include_usage: bool = False


class ResponseFormat(BaseModel):
    """`response_format`: only `{"type": "text"}` is supported."""

    model_config = ConfigDict(extra="allow")

    type: str = Field(max_length=64)


class ChatCompletionRequest(BaseModel):
    """POST /v1/chat/completions.

    SoT extensions (send them with the SDK's `extra_body`): `sot_mode` chooses the mode for this request;
    `sot_events` adds the engine's own events to a stream as extra chunks (empty `choices`, a `sot_event`
    object): opt-in because a client that assumes every chunk has a choice would break on them.
    """

    model_config = ConfigDict(extra="allow")

    model: str = Field(
        min_length=1, max_length=256, description="Any name; a prefix `sot:`, `normal:` or `auto:` chooses the mode."
    )
    messages: list[ChatMessage] = Field(min_length=1)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    n: int | None = Field(default=None, ge=1, le=128)
    stop: str | list[str] | None = None
    seed: int | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(default=None, ge=-2.0, le=2.0)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None
    response_format: ResponseFormat | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    user: str | None = None
    sot_mode: SoTModeName | None = None
    sot_events: bool = False


class SoTStreamRequest(BaseModel):
    """POST /v1/sot/stream: a question (or a conversation) and a mode; answered as the engine's events."""

    model_config = ConfigDict(extra="forbid")

    question: str | None = Field(default=None, description="A single user question (or give `messages`).")
    messages: list[ChatMessage] | None = Field(default=None, min_length=1)
    mode: SoTModeName | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0.0, le=2.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    seed: int | None = None


# -- responses --------------------------------------------------------------------------------------------


class Usage(BaseModel):
    """Token accounting of the whole answer (in SoT mode: the skeleton and every point together)."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str
    refusal: None = None


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class SoTInfo(BaseModel):
    """How a SoT server produced the answer; standard clients ignore it."""

    mode_requested: SoTModeName
    mode_used: Literal["sot", "normal"]
    skeleton: str | None = None
    points: list[str] = Field(default_factory=list)
    truncated_points: list[int] = Field(default_factory=list)
    fallback_reason: str | None = None
    route: dict[str, Any] | None = None
    backend: str
    model: str
    stats: dict[str, Any] = Field(default_factory=dict)


class ChatCompletion(BaseModel):
    """A non-streamed answer."""

    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[Choice]
    usage: Usage
    sot: SoTInfo | None = None


class Delta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChunkChoice(BaseModel):
    index: int = 0
    delta: Delta
    logprobs: None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatCompletionChunk(BaseModel):
    """One `data:` line of a streamed answer (the stream ends with `data: [DONE]`)."""

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChunkChoice]
    usage: Usage | None = None
    sot: SoTInfo | None = None
    sot_event: dict[str, Any] | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """Every error answer: `{"error": {"message", "type", "param", "code"}}`."""

    error: ErrorDetail


class Health(BaseModel):
    """GET /health: liveness, and what the page shows in its header."""

    status: Literal["ok"] = "ok"
    backend: str
    model: str
    default_mode: SoTModeName
    auth: bool
    in_flight: int
    max_concurrency: int  # per worker
    ready: bool = True  # false while the server drains before a restart (see /ready)
