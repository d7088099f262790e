"""Anthropic's Messages API without the SDK: the request body (prefill, `cache_control` breakpoints) and the
streamed events read from raw server-sent events, one orjson parse per event and no model object per token.

Prompt caching: two `cache_control` breakpoints close the conversation's last two turns (before any
prefill), and one the system prompt. The points of a question share every turn but their last (the
skeleton conversation, closed by the skeleton as the assistant's turn), so the first point reads the
skeleton request's prefix and writes the skeleton, and every later one reads all of that and writes only
its own short tail; the skeleton request itself reads the fixed few-shot turns of any earlier question.
Anthropic caches only prefixes above a model-dependent minimum (1024 tokens and more); shorter prompts are
simply not cached, and a cache entry is readable once the response that wrote it has begun.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from sot.backends.base import GenerationRequest, Usage
from sot.errors import BackendStreamError


@dataclass(frozen=True, slots=True)
class MessagesBody:
    """The keyword arguments of `messages.create`, and what the backend must do to the streamed text."""

    kwargs: dict[str, Any]
    # Stop strings the API does not take (whitespace only): the backend cuts the stream at them itself.
    client_stops: tuple[str, ...] = ()
    # Trailing whitespace taken off the final assistant turn (the API rejects it); the reply's own leading
    # whitespace is dropped so that the prefill as given plus the returned text read right.
    stripped: str = ""


def _cache_control(ttl: str | None) -> dict[str, str]:
    return {"type": "ephemeral", "ttl": ttl} if ttl else {"type": "ephemeral"}


def _turns(request: GenerationRequest) -> tuple[str, list[dict[str, str]]]:
    """The system text and the user/assistant turns, consecutive turns of one role merged."""
    system = "\n\n".join(m.content for m in request.messages if m.role == "system")
    turns: list[dict[str, str]] = []
    for message in request.messages:
        if message.role == "system":
            continue
        if turns and turns[-1]["role"] == message.role:
            turns[-1]["text"] += "\n\n" + message.content
        else:
            turns.append({"role": message.role, "text": message.content})
    return system, turns


def _breakpoints(turns: list[dict[str, str]]) -> set[int]:
    """The turns that get a cache breakpoint: the last two (see the module docstring)."""
    return set(range(max(0, len(turns) - 2), len(turns)))


def build_messages_body(
    request: GenerationRequest,
    *,
    model: str,
    prefill: bool = True,
    prompt_cache: bool = True,
    cache_ttl: str | None = None,
    sampling: bool = False,
) -> MessagesBody:
    """The `messages.create` arguments for `request` (streamed).

    Current Claude models choose their own sampling (the SDK no longer has `temperature` or `top_p`); with
    `sampling`, the request's temperature and top_p go in the body anyway, for models and servers that take them.
    """
    system, turns = _turns(request)
    marks = _breakpoints(turns) if prompt_cache else set()
    stripped = ""
    start = request.prefill if prefill else ""
    if start:
        if turns and turns[-1]["role"] == "assistant":
            turns[-1]["text"] += start
        else:
            turns.append({"role": "assistant", "text": start})
    if turns and turns[-1]["role"] == "assistant":
        kept = turns[-1]["text"].rstrip()
        stripped = turns[-1]["text"][len(kept) :]
        turns[-1]["text"] = kept
        if not kept:
            turns.pop()
    messages: list[dict[str, Any]] = []
    for index, turn in enumerate(turns):
        content: Any = turn["text"]
        if index in marks:
            content = [{"type": "text", "text": turn["text"], "cache_control": _cache_control(cache_ttl)}]
        messages.append({"role": turn["role"], "content": content})
    s = request.sampling
    kwargs: dict[str, Any] = {"model": model, "messages": messages, "max_tokens": s.max_tokens, "stream": True}
    if system:
        kwargs["system"] = (
            [{"type": "text", "text": system, "cache_control": _cache_control(cache_ttl)}] if prompt_cache else system
        )
    if sampling:
        kwargs["extra_body"] = {"temperature": s.temperature, **({"top_p": s.top_p} if s.top_p < 1.0 else {})}
    server_stops = [stop for stop in request.stop if stop.strip()]
    if server_stops:
        kwargs["stop_sequences"] = server_stops
    client_stops = tuple(stop for stop in request.stop if stop and not stop.strip())
    return MessagesBody(kwargs=kwargs, client_stops=client_stops, stripped=stripped)


class LeadingSpace:
    """Drops the reply's leading whitespace when the prefill's trailing whitespace was stripped before sending."""

    def __init__(self, stripped: str) -> None:
        self.pending = bool(stripped)

    def push(self, text: str) -> str:
        if not self.pending:
            return text
        text = text.lstrip()
        if text:
            self.pending = False
        return text


async def sse_payloads(lines: AsyncIterator[str], backend: str) -> AsyncGenerator[Any, None]:
    """The parsed `data` of each server-sent event (the `event:` name is repeated in the data's `type`).

    The line reader is closed on every way out, so the HTTP library's nested generators finish rather than
    being left to the garbage collector; a `data` that is not JSON is a `BackendStreamError`.
    """
    data: list[str] = []
    try:
        async for line in lines:
            if line.startswith("data:"):
                value = line[5:]
                data.append(value[1:] if value.startswith(" ") else value)
            elif line == "" and data:
                yield _parse(data, backend)
                data = []
        if data:
            yield _parse(data, backend)
    finally:
        close = getattr(lines, "aclose", None)
        if close is not None:  # a caller that stopped early: the HTTP library's line reader ends here, not in GC
            await close()


def _parse(data: list[str], backend: str) -> Any:
    text = "\n".join(data)
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        raise BackendStreamError(f"the upstream sent a malformed event: {text[:200]!r}", backend=backend) from None


@dataclass
class MessageState:
    """What the events of one streamed message have said so far: its usage, stop reason, and whether it ended."""

    backend: str
    input_tokens: int = 0
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0
    output_tokens: int | None = None
    started: bool = False
    stop_reason: str | None = None
    ended: bool = False
    unknown: list[str] = field(default_factory=list)  # event types this reader does not know (ignored)

    def handle(self, payload: Any) -> str | None:
        """Take one event; return the text it carries, if any. An error event is a `BackendStreamError`."""
        if not isinstance(payload, dict) or not isinstance(payload.get("type"), str):
            raise self._shape(payload)
        kind = payload["type"]
        if kind == "content_block_delta":
            delta = payload.get("delta")
            if not isinstance(delta, dict):
                raise self._shape(payload)
            if delta.get("type") != "text_delta":
                return None  # thinking, signatures, tool input: not part of the answer
            text = delta.get("text")
            if not isinstance(text, str):
                raise self._shape(payload)
            return text
        if kind == "message_start":
            message = payload.get("message")
            if not isinstance(message, dict):
                raise self._shape(payload)
            self.started = True
            self._usage(message.get("usage"))
        elif kind == "message_delta":
            delta = payload.get("delta")
            reason = delta.get("stop_reason") if isinstance(delta, dict) else None
            if reason is not None and not isinstance(reason, str):
                raise self._shape(payload)
            self.stop_reason = reason or self.stop_reason
            self._usage(payload.get("usage"))
        elif kind == "message_stop":
            self.ended = True
        elif kind == "error":
            error = payload.get("error")
            message = error.get("message") if isinstance(error, dict) else error
            kind_name = error.get("type") if isinstance(error, dict) else None
            raise BackendStreamError(
                f"the upstream reported an error mid-stream ({kind_name or 'error'}): {message}", backend=self.backend
            )
        elif kind not in ("ping", "content_block_start", "content_block_stop"):
            self.unknown.append(kind)  # the API may add event types; they carry no answer text
        return None

    def _usage(self, raw: Any) -> None:
        """Usage fields, as message_start and message_delta report them (message_delta's are cumulative)."""
        if not isinstance(raw, dict):
            return
        for name in ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens"):
            value = raw.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                setattr(self, name, value)
        output = raw.get("output_tokens")
        if isinstance(output, int) and not isinstance(output, bool):
            self.output_tokens = output

    def usage(self, chunks: int) -> Usage:
        """The request's usage: every prompt token, of which the uncached ones had to be computed."""
        computed = self.input_tokens + self.cache_creation_input_tokens
        return Usage(
            prompt_tokens=computed + self.cache_read_input_tokens,
            completion_tokens=self.output_tokens if self.output_tokens is not None else chunks,
            computed_prompt_tokens=computed,
        )

    def finish_reason(self) -> str:
        return "length" if self.stop_reason in ("max_tokens", "model_context_window_exceeded") else "stop"

    def _shape(self, payload: Any) -> BackendStreamError:
        text = orjson.dumps(payload).decode()[:200]
        return BackendStreamError(f"the upstream sent an event of the wrong shape: {text}", backend=self.backend)
