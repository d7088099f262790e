"""How the test upstream sends one answer: paced SSE chunks or one JSON body, with the request's fault applied."""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from starlette.types import ASGIApp, Receive, Scope, Send

from sot.testing.upstream_answers import Plan
from sot.testing.upstream_options import TRUNCATING_FAULTS, UpstreamOptions
from sot.testing.upstream_stats import RequestRecord, UpstreamState
from sot.testing.upstream_wire import (
    DONE,
    FINGERPRINT,
    JSON_HEADERS,
    MALFORMED_JSON,
    MALFORMED_SHAPE,
    MID_STREAM_ERROR,
    SSE_HEADERS,
    ChunkEncoder,
    json_bytes,
    sse,
)


@dataclass(frozen=True, slots=True)
class Reply:
    """Everything one answer needs, decided when the request arrived."""

    record: RequestRecord
    plan: Plan
    fault: str | None
    options: UpstreamOptions
    model: str
    include_usage: bool
    arrived: float  # event loop time (time.monotonic()) of the request's arrival
    created: int

    @property
    def tokens(self) -> list[str]:
        """The tokens to send: the whole answer, or the first `fault_after` with a fault that cuts it."""
        if self.fault in TRUNCATING_FAULTS:
            return self.plan.tokens[: self.options.fault_after]
        return self.plan.tokens

    @property
    def first_at(self) -> float:
        """Loop time of the first token."""
        return self.arrived + self.options.ttft

    @property
    def rate(self) -> float:
        """Tokens per second; 0 for no delay between tokens."""
        tps = self.options.tokens_per_second
        return tps if tps > 0 and math.isfinite(tps) else 0.0

    def usage(self) -> dict[str, int]:
        prompt, done = self.record.prompt_tokens, self.record.completion_tokens
        return {"prompt_tokens": prompt, "completion_tokens": done, "total_tokens": prompt + done}


async def sleep_until(deadline: float) -> None:
    """Sleep until a loop time. Always yields, so a zero-delay answer cannot hog the loop. (asyncio.sleep
    without its relative delay and extra coroutine: this runs once per token.)"""
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    timer = loop.call_at(deadline, _wake, future)
    try:
        await future
    finally:
        timer.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def forever() -> None:
    await asyncio.Event().wait()


def _body(data: bytes, more: bool = True) -> dict[str, Any]:
    return {"type": "http.response.body", "body": data, "more_body": more}


def tokens_due(elapsed: float, rate: float, sent: int, total: int) -> int:
    """How many tokens should have gone out `elapsed` seconds after the first one (which is due at 0), at
    `rate` tokens per second (0: all of them), given that `sent` have and that we were woken for the next.

    Deadlines are absolute (token i is due at i / rate), so a late wake-up sends every overdue token at
    once instead of shifting all later ones: scheduling delays never accumulate."""
    if rate <= 0:
        return total
    # A timer may fire a hair early; the 1e-6 keeps a token due exactly now from waiting another round.
    return min(total, max(sent + 1, math.floor(elapsed * rate + 1e-6) + 1))


class PacedEncoder(Protocol):
    """What `send_paced` needs of a wire format: the opening bytes and the bytes of some tokens."""

    def role(self) -> bytes: ...

    def tokens(self, texts: list[str]) -> bytes: ...


async def send_paced(reply: Reply, encoder: PacedEncoder, send: Send) -> None:
    """The opening (role) chunk and the tokens, each at its deadline; overdue tokens go out in one write."""
    loop = asyncio.get_running_loop()
    record, tokens, rate, first_at = reply.record, reply.tokens, reply.rate, reply.first_at
    pending = encoder.role()
    sent = 0
    while True:
        due = tokens_due(loop.time() - first_at, rate, sent, len(tokens))
        await send(_body(pending + encoder.tokens(tokens[sent:due])))
        pending = b""
        if record.first_token_at is None:
            record.mark_first_token()
        sent = record.completion_tokens = due
        if sent >= len(tokens):
            return
        await sleep_until(first_at + sent / rate)


def _stream_tail(reply: Reply, encoder: ChunkEncoder) -> bytes:
    """What ends a stream after its tokens, by fault."""
    fault, record = reply.fault, reply.record
    if fault == "cut":
        return b""
    if fault == "error-mid-stream":
        return sse(MID_STREAM_ERROR)
    if fault == "malformed-json":
        return b"data: " + MALFORMED_JSON + b"\n\n"
    if fault == "malformed-shape":
        return b"data: " + MALFORMED_SHAPE + b"\n\n" + DONE
    usage = encoder.usage(record.prompt_tokens, record.completion_tokens) if reply.include_usage else b""
    if fault == "no-finish":
        return usage + DONE
    record.finish_reason = reply.plan.finish_reason
    return encoder.finish(reply.plan.finish_reason) + usage + DONE


async def stream_reply(reply: Reply, send: Send) -> None:
    """A streamed chat completion (see `stream_paced`; the tail: see _stream_tail)."""
    encoder = ChunkEncoder(reply.record.id, reply.created, reply.model, reply.include_usage)
    await stream_paced(reply, send, encoder, empty=DONE, tail=lambda: _stream_tail(reply, encoder))


async def stream_paced(
    reply: Reply, send: Send, encoder: PacedEncoder, *, empty: bytes, tail: Callable[[], bytes]
) -> None:
    """A streamed answer in any wire format, with its fault applied. Headers go out at once (with
    slow-headers: at the first token's time); the role chunk and the first token at `ttft`; then the tokens
    at their rate; then `tail()`. An `empty` stream sends only `empty`; `stall` and `stall-mid` stop
    sending (before the first token, or after `fault_after` tokens) until the client goes away."""
    fault = reply.fault
    if fault == "slow-headers":
        await sleep_until(reply.first_at)
    await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
    await sleep_until(reply.first_at)
    if fault == "empty":
        await send(_body(empty, more=False))
        return
    if fault == "stall":
        await send(_body(encoder.role()))
        reply.record.mark_first_token()
        await forever()
    await send_paced(reply, encoder, send)
    if fault == "stall-mid":
        await forever()
    await send(_body(tail(), more=False))


def _completion(reply: Reply, content: str | None, finish_reason: str | None) -> dict[str, Any]:
    choices = []
    if content is not None:
        message = {"role": "assistant", "content": content, "refusal": None}
        choices.append({"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason})
    return {
        "id": reply.record.id,
        "object": "chat.completion",
        "created": reply.created,
        "model": reply.model,
        "system_fingerprint": FINGERPRINT,
        "choices": choices,
        "usage": reply.usage(),
    }


def _json_payload(reply: Reply) -> tuple[int, bytes]:
    """The status and body of a non-streamed answer, by fault."""
    fault, record, tokens = reply.fault, reply.record, reply.tokens
    if fault == "error-mid-stream":
        return 500, json_bytes(MID_STREAM_ERROR)
    if fault == "malformed-json":
        return 200, MALFORMED_JSON
    if fault == "malformed-shape":
        return 200, MALFORMED_SHAPE
    if fault == "empty":
        return 200, json_bytes(_completion(reply, None, None))
    record.completion_tokens = len(tokens)
    record.finish_reason = None if fault in ("cut", "no-finish") else reply.plan.finish_reason
    return 200, json_bytes(_completion(reply, "".join(tokens), record.finish_reason))


async def json_reply(reply: Reply, send: Send) -> None:
    """A non-streamed answer, sent when its last token would have been (stall: never; stall-mid: the headers
    then, the body never)."""
    if reply.fault == "stall":
        await forever()
    last = max(len(reply.tokens) - 1, 0)
    await sleep_until(reply.first_at + (last / reply.rate if reply.rate else 0.0))
    reply.record.mark_first_token()
    if reply.fault == "stall-mid":
        await send({"type": "http.response.start", "status": 200, "headers": JSON_HEADERS})
        await forever()
    status, data = _json_payload(reply)
    reply.record.http_status = status
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
    await send(_body(data, more=False))


async def answer(
    state: UpstreamState,
    reply: Reply,
    refusal: Callable[[int, float], ASGIApp],
    produce: Callable[[], Awaitable[None]],
    scope: Scope,
    receive: Receive,
    send: Send,
) -> None:
    """Open the request's record and answer it: a scripted HTTP status fault at once, as `refusal(status,
    retry_after)` (each API has its error shape), else whatever `produce` sends (see `run_reply`)."""
    record = reply.record
    state.begin(record)
    if reply.fault is not None and reply.fault.isdigit():
        record.http_status = int(reply.fault)
        await refusal(record.http_status, reply.options.retry_after)(scope, receive, send)
        state.end(record, "finished")
        return
    await run_reply(state, record, produce, receive)


async def run_reply(
    state: UpstreamState, record: RequestRecord, produce: Callable[[], Awaitable[None]], receive: Receive
) -> None:
    """Run `produce` (which sends the response) while watching for the client going away; record the end:
    finished if `produce` returned, cancelled if the client left first, failed if `produce` raised."""

    async def client_gone() -> None:
        # The body has been read already, so the next event is the disconnect (or the end of our
        # response, which the server also reports as a disconnect).
        while (await receive())["type"] != "http.disconnect":
            pass

    producer = asyncio.ensure_future(produce())
    watcher = asyncio.ensure_future(client_gone())
    status = "cancelled"
    error: BaseException | None = None
    try:
        await asyncio.wait({producer, watcher}, return_when=asyncio.FIRST_COMPLETED)
        if producer.done() and not producer.cancelled():
            error = producer.exception()
            status = "failed" if error is not None else "finished"
    finally:
        for task in (producer, watcher):
            task.cancel()
        await asyncio.gather(producer, watcher, return_exceptions=True)
        state.end(record, status)
    if error is not None:
        raise error
