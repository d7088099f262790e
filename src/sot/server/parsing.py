"""What a request asks for, within the server's limits: the settings, the mode, the conversation, the fields the
server cannot honour, `max_tokens`, and the engine with the request's sampling.

The mode of a request comes from, in order: `sot_mode` in the body (or `mode` on /v1/sot/stream), the
`X-SoT-Mode` header, a mode prefix of the model name (`sot:NAME`, `normal:NAME`, `auto:NAME`, or the bare
word), the server's default. An unknown mode is a 400 wherever it is given. In the model name, a prefix is
taken as an attempt at a mode when it is a single lowercase word of letters (`fast:gpt-4o`); anything else
before a colon is part of a model name: `ft:` (OpenAI fine-tunes), names whose prefix has digits, dots,
dashes, slashes or capitals (`llama3:8b`, `qwen2.5:7b`, `org/m:v1`), and Ollama-style tags after a name of
letters (`mistral:latest`, `mistral:7b`: a tag that is `latest` or starts with a digit).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sot.backends.base import Message, Role
from sot.core.conversation import check_encodable
from sot.engine import Engine
from sot.errors import InputError
from sot.events import Mode
from sot.server.errors import ApiError
from sot.server.openai_schema import ChatCompletionRequest, ChatMessage, SoTStreamRequest

MODES: tuple[Mode, ...] = ("sot", "normal", "auto")


@dataclass(frozen=True)
class ServerSettings:
    """Limits and defaults of one server. Every limit answers with a clear error rather than a hang."""

    api_key: str | None = None  # bearer token required on /v1/*; None: open
    default_mode: Mode = "sot"
    max_concurrency: int = 64  # questions being answered at once; beyond it: 429 + Retry-After
    retry_after: int = 1  # seconds, sent with every 429 the server itself decides
    max_body_bytes: int = 1_000_000
    max_messages: int = 64
    max_question_chars: int = 32_000  # all messages' text together
    max_tokens_limit: int = 4096  # the largest max_tokens a request may ask for
    ping_seconds: float = 15.0  # SSE keep-alive comments, so proxies do not cut a long skeleton wait
    metrics: bool = False  # Prometheus metrics at /metrics (behind the API key when there is one)
    routing_header: str | None = "X-SoT-Session"  # also read from clients that name their conversation
    drain_seconds: float = 30.0  # after SIGTERM: how long answers in flight may take before they are cancelled
    access_log_json: str | None = None  # one JSON line per request: "-" (stderr) or a file to append to


# -- the mode ----------------------------------------------------------------------------------------------

_MODE_ATTEMPT = re.compile(r"[a-z]+")
_NOT_MODES = frozenset({"ft"})  # "ft:gpt-4o-mini:org::id" is an OpenAI fine-tune's name
_OLLAMA_TAG = re.compile(r"latest|\d.*")


def resolve_mode(
    body_mode: str | None, header: str | None, model: str, default: Mode, served: str | None = None
) -> Mode:
    """The request's mode: `sot_mode` in the body, else the `X-SoT-Mode` header, else a model-name prefix
    (`sot:`, `normal:`, `auto:`, or the bare word), else the server default (see the module's rule).
    `served` is the model the server serves: asked for by its own name it is never a mode attempt
    (an Ollama model such as `mistral:instruct`)."""
    if body_mode is not None:
        return _as_mode(body_mode, "sot_mode")
    if header is not None and header.strip():
        return _as_mode(header, "X-SoT-Mode")
    if served is not None and model == served:
        return default
    return model_mode(model) or default


def model_mode(model: str) -> Mode | None:
    """The mode a model name asks for, None if it names none; a 400 for a prefix meant as an unknown mode."""
    if model.strip().lower() in MODES:
        return _as_mode(model, "model")
    prefix, sep, rest = model.partition(":")
    if not sep:
        return None
    if prefix.strip().lower() in MODES:
        return _as_mode(prefix, "model")
    if _MODE_ATTEMPT.fullmatch(prefix) and prefix not in _NOT_MODES and not _OLLAMA_TAG.fullmatch(rest):
        raise _unknown_mode(prefix, "model")
    return None


def _as_mode(value: str, param: str) -> Mode:
    name = value.strip().lower()
    for mode in MODES:
        if name == mode:
            return mode
    raise _unknown_mode(value, param)


def _unknown_mode(value: str, param: str) -> ApiError:
    return ApiError(
        400, f"{param}: unknown mode {value!r}; use one of sot, normal, auto", param=param, code="invalid_mode"
    )


# -- the conversation --------------------------------------------------------------------------------------


def conversation(messages: Sequence[ChatMessage], settings: ServerSettings) -> list[Message]:
    """The engine's conversation for the request's messages, or a 400 saying what cannot be answered."""
    if len(messages) > settings.max_messages:
        raise ApiError(
            400,
            f"messages: {len(messages)} messages; this server accepts at most {settings.max_messages}",
            param="messages",
            code="too_many_messages",
        )
    out = [_message(i, message) for i, message in enumerate(messages)]
    for i, message in enumerate(out):
        try:
            check_encodable(message.content, f"messages[{i}].content")
        except InputError as exc:
            raise ApiError(400, str(exc), param=f"messages[{i}].content", code="invalid_input") from None
    size = sum(len(m.content) for m in out)
    if size > settings.max_question_chars:
        raise ApiError(
            400,
            f"messages: {size:,} characters; this server accepts at most {settings.max_question_chars:,}",
            param="messages",
            code="context_length_exceeded",
        )
    if out[-1].role != "user":
        raise ApiError(
            400, "messages: the conversation must end with a user message", param="messages", code="invalid_input"
        )
    if not out[-1].content.strip():
        raise ApiError(400, "messages: the last user message is empty", param="messages", code="invalid_input")
    return out


_ROLES: dict[str, Role] = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def _message(i: int, message: ChatMessage) -> Message:
    role = _ROLES.get(message.role)
    if role is None or message.tool_calls:  # a tool or function turn, or an assistant turn calling tools
        raise ApiError(
            400,
            f"messages[{i}]: tool and function calls are not supported by this server",
            param=f"messages[{i}]",
            code="unsupported_feature",
        )
    content = message.content
    if content is None or isinstance(content, str):
        return Message(role, content or "")
    kinds = {part.type for part in content if part.type != "text"}
    if kinds:
        raise ApiError(
            400,
            f"messages[{i}].content: only text content is supported, not {', '.join(sorted(kinds))}",
            param=f"messages[{i}].content",
            code="unsupported_content",
        )
    return Message(role, "".join(part.text or "" for part in content))


# -- fields the server cannot honour -----------------------------------------------------------------------


def _unsupported(param: str, message: str, code: str = "unsupported_feature") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


def check_supported(body: ChatCompletionRequest) -> None:
    """A clear 400 for every field whose meaning this server cannot honour."""
    if body.n is not None and body.n > 1:
        raise _unsupported("n", "only one choice per request is supported (n=1)", "unsupported_value")
    if body.tools or body.functions:
        raise _unsupported("tools", "tool and function calling is not supported by this server")
    if isinstance(body.tool_choice, dict) or body.tool_choice == "required":
        raise _unsupported("tool_choice", "tool calling is not supported by this server")
    if body.function_call is not None and body.function_call != "none":
        raise _unsupported("function_call", "function calling is not supported by this server")
    if body.response_format is not None and body.response_format.type != "text":
        kind = body.response_format.type
        raise _unsupported("response_format", f"only type 'text' is supported, not {kind!r}", "unsupported_value")
    if body.logprobs or body.top_logprobs:
        raise _unsupported("logprobs", "log probabilities are not supported by this server")
    if body.modalities and any(m != "text" for m in body.modalities):
        raise _unsupported("modalities", "only text output is supported", "unsupported_value")
    if body.audio is not None:
        raise _unsupported("audio", "audio output is not supported")
    if isinstance(body.stop, list) and len(body.stop) > 4:
        raise _unsupported("stop", "at most 4 stop sequences", "invalid_value")


@dataclass(frozen=True)
class RunPlan:
    """The engine run a request asks for, checked against the server's limits."""

    mode: Mode
    messages: list[Message]
    sampling: dict[str, Any]  # `request_engine`'s keyword arguments

    def engine(self, base: Engine) -> Engine:
        return request_engine(base, **self.sampling)


@dataclass(frozen=True)
class ChatPlan(RunPlan):
    """A chat-completions request: the run, and how its answer is sent."""

    model: str  # as the client named it, echoed back
    stream: bool
    include_usage: bool
    sot_events: bool
    stops: list[str]


def chat_plan(
    body: ChatCompletionRequest, mode_header: str | None, settings: ServerSettings, served: str | None = None
) -> ChatPlan:
    """The plan of a chat-completions request, or the 400 saying what the server cannot do."""
    mode = resolve_mode(body.sot_mode, mode_header, body.model, settings.default_mode, served)
    check_supported(body)
    messages = conversation(body.messages, settings)
    max_tokens = requested_max_tokens([body.max_tokens, body.max_completion_tokens], settings, "max_tokens")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    return ChatPlan(
        mode=mode,
        messages=messages,
        model=body.model,
        stream=bool(body.stream),
        include_usage=bool(body.stream_options and body.stream_options.include_usage),
        sot_events=body.sot_events,
        stops=stops,
        sampling={
            "max_tokens": max_tokens,
            "temperature": body.temperature,
            "top_p": body.top_p,
            "seed": body.seed,
            "frequency_penalty": body.frequency_penalty,
            "stop": stops,
        },
    )


def events_plan(body: SoTStreamRequest, mode_header: str | None, settings: ServerSettings) -> RunPlan:
    """The run a /v1/sot/stream request asks for: one question, or a conversation."""
    mode = resolve_mode(body.mode, mode_header, "", settings.default_mode)
    if body.messages is not None:
        if body.question is not None:
            raise ApiError(400, "give either question or messages, not both", param="question")
        messages = conversation(body.messages, settings)
    elif body.question is not None:
        messages = conversation([ChatMessage(role="user", content=body.question)], settings)
    else:
        raise ApiError(400, "question: give a question (or messages)", param="question")
    max_tokens = requested_max_tokens([body.max_tokens], settings, "max_tokens")
    sampling = {"max_tokens": max_tokens, "temperature": body.temperature, "top_p": body.top_p, "seed": body.seed}
    return RunPlan(mode=mode, messages=messages, sampling=sampling)


def requested_max_tokens(values: Sequence[int | None], settings: ServerSettings, param: str) -> int | None:
    """The smallest of the token limits a request gives (None if none), or a 400 above the server's limit."""
    given = [v for v in values if v is not None]
    if not given:
        return None
    value = min(given)
    if value > settings.max_tokens_limit:
        raise ApiError(
            400,
            f"{param}: {value} is more than this server allows ({settings.max_tokens_limit})",
            param=param,
            code="invalid_value",
        )
    return value


def request_engine(
    base: Engine,
    *,
    max_tokens: int | None,
    temperature: float | None,
    top_p: float | None,
    seed: int | None,
    frequency_penalty: float | None = None,
    stop: Sequence[str] = (),
) -> Engine:
    """An engine with this request's sampling on the shared backend (engines are cheap; backends are not).

    `max_tokens` bounds the completion tokens of the whole answer, as `usage.completion_tokens` reports them:
    in SoT mode the skeleton and every point together (the engine shares the budget out among the points).
    `stop` goes upstream with a normal answer (`EngineConfig.answer_stop`); the server cuts the text as well.
    """
    changes: dict[str, Any] = {}
    for name, value in (
        ("temperature", temperature),
        ("top_p", top_p),
        ("seed", seed),
        ("frequency_penalty", frequency_penalty),
        ("max_tokens", max_tokens),
    ):
        if value is not None:
            changes[name] = value
    answer_stop = tuple(s for s in stop if s)
    if not changes and not answer_stop:
        return base
    config = dataclasses.replace(base.config, sampling=dataclasses.replace(base.config.sampling, **changes))
    if max_tokens is not None:
        config = dataclasses.replace(config, answer_max_tokens=max_tokens)
    if answer_stop:
        config = dataclasses.replace(config, answer_stop=answer_stop)
    return Engine(base.backend, config, router=base.router)
