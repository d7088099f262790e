"""Wire format of the test upstream's Messages API: its streamed events, error objects and replies by fault."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from starlette.responses import JSONResponse
from starlette.types import Send

from sot.testing.upstream_cache import CacheUsage
from sot.testing.upstream_options import format_seconds
from sot.testing.upstream_reply import Reply, forever, sleep_until, stream_paced
from sot.testing.upstream_wire import JSON_HEADERS, MALFORMED_JSON, json_bytes

# A broken proxy's output: a line that is not JSON, and a delta of the wrong shape.
MALFORMED_SHAPE = b'{"type":"content_block_delta","index":0,"delta":"x"}'
STOP_REASONS = {"stop": "end_turn", "length": "max_tokens"}


def event(kind: str, data: Any) -> bytes:
    """One server-sent event: its name, and its data as JSON."""
    return b"event: " + kind.encode() + b"\ndata: " + json_bytes(data) + b"\n\n"


def error_object(kind: str, message: str) -> dict[str, Any]:
    """An Anthropic error object (`{"type": "error", "error": {...}}`)."""
    return {"type": "error", "error": {"type": kind, "message": message}}


_STATUS_ERRORS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def status_error(status: int, retry_after: float | None = None, message: str | None = None) -> JSONResponse:
    """An HTTP error with an Anthropic error object; 429 and 529 carry `retry-after` when given."""
    kind = _STATUS_ERRORS.get(status, "api_error" if status >= 500 else "invalid_request_error")
    text = message or f"Simulated {kind} (HTTP {status}) from the sot test upstream."
    headers = {}
    if status in (429, 529) and retry_after is not None:
        headers["retry-after"] = format_seconds(retry_after)
    return JSONResponse(error_object(kind, text), status_code=status, headers=headers)


MID_STREAM_ERROR = event("error", error_object("overloaded_error", "Overloaded (simulated by the sot test upstream)."))


@dataclass(frozen=True, slots=True)
class MessageReply:
    """A Messages API answer: the shared `Reply` plus what only this API reports."""

    reply: Reply
    usage: CacheUsage
    stop_sequence: str | None  # the stop sequence that ended the answer, if one did


class EventEncoder:
    """The events of one streamed message; a text delta costs one JSON string encoding and two joins."""

    __slots__ = ("_delta_head", "_message")

    def __init__(self, message: MessageReply) -> None:
        self._message = message
        self._delta_head = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":'

    def role(self) -> bytes:
        """message_start (with the prompt's usage), content_block_start and a ping."""
        reply, usage = self._message.reply, self._message.usage
        message: dict[str, Any] = {
            "id": reply.record.id,
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": reply.model,
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": usage.input_tokens,
                "cache_creation_input_tokens": usage.cache_creation_input_tokens,
                "cache_read_input_tokens": usage.cache_read_input_tokens,
                "output_tokens": 1,
            },
        }
        block = {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
        return (
            event("message_start", {"type": "message_start", "message": message})
            + event("content_block_start", block)
            + event("ping", {"type": "ping"})
        )

    def tokens(self, texts: list[str]) -> bytes:
        head = self._delta_head
        return b"".join([head + b'{"type":"text_delta","text":' + json_bytes(text) + b"}}\n\n" for text in texts])

    def finish(self, stop_reason: str | None, output_tokens: int) -> bytes:
        """content_block_stop, message_delta (stop reason and usage) and message_stop."""
        stop_sequence = self._message.stop_sequence if stop_reason == "stop_sequence" else None
        delta = {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
        usage = {"output_tokens": output_tokens}
        return (
            event("content_block_stop", {"type": "content_block_stop", "index": 0})
            + event("message_delta", {"type": "message_delta", "delta": delta, "usage": usage})
            + event("message_stop", {"type": "message_stop"})
        )


def stop_reason(message: MessageReply) -> str:
    """end_turn, max_tokens or stop_sequence."""
    if message.stop_sequence is not None and message.reply.plan.finish_reason == "stop":
        return "stop_sequence"
    return STOP_REASONS.get(message.reply.plan.finish_reason, "end_turn")


def _tail(message: MessageReply, encoder: EventEncoder) -> bytes:
    """What ends a stream after its tokens, by fault."""
    reply = message.reply
    fault, record = reply.fault, reply.record
    if fault == "cut":
        return b""
    if fault == "error-mid-stream":
        return MID_STREAM_ERROR
    if fault == "malformed-json":
        return b"event: content_block_delta\ndata: " + MALFORMED_JSON + b"\n\n"
    if fault == "malformed-shape":
        return b"event: content_block_delta\ndata: " + MALFORMED_SHAPE + b"\n\n" + encoder.finish(None, 0)
    if fault == "no-finish":
        return encoder.finish(None, record.completion_tokens)
    record.finish_reason = reply.plan.finish_reason
    return encoder.finish(stop_reason(message), record.completion_tokens)


def _body(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


async def stream_message(message: MessageReply, send: Send) -> None:
    """A streamed message, paced like a chat completion (see `sot.testing.upstream`), with its fault applied."""
    encoder = EventEncoder(message)
    await stream_paced(message.reply, send, encoder, empty=b"", tail=lambda: _tail(message, encoder))


async def json_message(message: MessageReply, send: Send) -> None:
    """A message as one JSON body, sent when its last token would have been; a mid-stream error is a 529."""
    reply = message.reply
    if reply.fault == "stall":
        await forever()
    last = max(len(reply.tokens) - 1, 0)
    await sleep_until(reply.first_at + (last / reply.rate if reply.rate else 0.0))
    reply.record.mark_first_token()
    if reply.fault == "error-mid-stream":
        reply.record.http_status = 529
        error = error_object("overloaded_error", "Overloaded (simulated by the sot test upstream).")
        await send({"type": "http.response.start", "status": 529, "headers": JSON_HEADERS})
        await send(_body(json_bytes(error), more=False))
        return
    record = reply.record
    record.completion_tokens = len(reply.tokens)
    truncated = reply.fault in ("cut", "no-finish", "stall-mid", "malformed-json", "malformed-shape")
    record.finish_reason = None if truncated else reply.plan.finish_reason
    usage = message.usage
    body = {
        "id": record.id,
        "type": "message",
        "role": "assistant",
        "content": [{"type": "text", "text": "".join(reply.tokens)}],
        "model": reply.model,
        "stop_reason": None if truncated else stop_reason(message),
        "stop_sequence": message.stop_sequence,
        "usage": {
            "input_tokens": usage.input_tokens,
            "cache_creation_input_tokens": usage.cache_creation_input_tokens,
            "cache_read_input_tokens": usage.cache_read_input_tokens,
            "output_tokens": record.completion_tokens,
        },
    }
    await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
    await send(_body(json_bytes(body), more=False))
