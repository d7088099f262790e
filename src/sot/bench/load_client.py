"""The load check's HTTP client: streamed chat completions over raw HTTP/1.1, timing headers and each SSE event."""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import httptools
import orjson


@dataclass
class StreamTrace:
    """One streamed request as the client saw it. Times are seconds after the connection was opened."""

    status: int = 0
    headers: float | None = None  # the status line and all headers had arrived
    first_content: float | None = None  # the first event with a non-empty delta.content
    total: float | None = None  # the response had ended (its last chunk arrived)
    content_events: int = 0
    tokens: int = 0  # words in all delta.content
    max_tokens_per_event: int = 0
    finish_reason: str | None = None
    done: bool = False  # `data: [DONE]` arrived
    error: str | None = None  # why the request counts as failed; None: it did not (yet)
    opened: float = 0.0  # time.monotonic() when the connection was opened (comparable across processes)

    def failure(self) -> str | None:
        """Why this request failed, or None when it streamed an answer to a finish reason and [DONE]."""
        if self.error is not None:
            return self.error
        if self.status != 200:
            return f"HTTP {self.status}"
        for missing, absent in (("content", not self.tokens), ("finish_reason", self.finish_reason is None)):
            if absent:
                return f"the stream ended without {missing}"
        return None if self.done else "the stream ended without data: [DONE]"


def request_bytes(url: str, body: dict[str, Any]) -> tuple[str, int, bytes]:
    """(host, port, the whole HTTP/1.1 request) of a POST of JSON `body` to `url`."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    payload = orjson.dumps(body)
    head = (
        f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Accept: text/event-stream\r\nAuthorization: Bearer load-check\r\nConnection: close\r\n"
        f"Content-Length: {len(payload)}\r\n\r\n"
    )
    return host, port, head.encode() + payload


class SSEStream(asyncio.Protocol):
    """Parses one HTTP response (httptools: chunked or not) and its SSE events into a `StreamTrace`."""

    def __init__(self, request: bytes, start: float) -> None:
        self.request = request
        self.start = start
        self.trace = StreamTrace(opened=time.monotonic())
        self.finished: asyncio.Future[StreamTrace] = asyncio.get_running_loop().create_future()
        self._parser = httptools.HttpResponseParser(self)
        self._now = start
        self._pending = b""  # an incomplete line
        self._data: list[bytes] = []  # data lines of the event being read
        self._body = b""  # a non-200 response's body, for the error message

    # -- asyncio.Protocol -------------------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.WriteTransport)
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self._now = time.perf_counter()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._end(f"bad HTTP response: {exc}")

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.finished.done():
            self._end(f"connection closed before the response ended ({exc or 'EOF'})")

    # -- httptools callbacks ----------------------------------------------------------------------------------

    def on_headers_complete(self) -> None:
        self.trace.headers = self._now - self.start
        self.trace.status = self._parser.get_status_code()

    def on_body(self, body: bytes) -> None:
        if self.trace.status != 200:
            self._body += body[: 500 - len(self._body)]
            return
        lines = (self._pending + body).split(b"\n")
        self._pending = lines.pop()
        for line in lines:
            self.feed_line(line.rstrip(b"\r"))

    def on_message_complete(self) -> None:
        self.trace.total = self._now - self.start
        if self.trace.status != 200:
            self.trace.error = f"HTTP {self.trace.status}: {self._body.decode(errors='replace')[:200]}"
        self._end(None)

    # -- SSE ----------------------------------------------------------------------------------------------------

    def feed_line(self, line: bytes) -> None:
        """One line of the event stream: `data:` lines gather, an empty line ends the event."""
        if line.startswith(b"data:"):
            self._data.append(line[5:].removeprefix(b" "))
        elif not line and self._data:
            data = b"\n".join(self._data)
            self._data = []
            self.feed_event(data)

    def feed_event(self, data: bytes) -> None:
        """One event's data: [DONE], an error object, or a chat-completion chunk."""
        trace = self.trace
        if data == b"[DONE]":
            trace.done = True
            return
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            trace.error = trace.error or f"malformed event: {data[:80]!r}"
            return
        if not isinstance(chunk, dict):
            trace.error = trace.error or f"an event that is not an object: {data[:80]!r}"
        elif "error" in chunk:
            trace.error = trace.error or f"error event: {str(chunk['error'])[:200]}"
        elif chunk.get("choices"):
            choice = chunk["choices"][0]
            content = (choice.get("delta") or {}).get("content")
            if content:
                if trace.first_content is None:
                    trace.first_content = self._now - self.start
                words = len(content.split())
                trace.content_events += 1
                trace.tokens += words
                trace.max_tokens_per_event = max(trace.max_tokens_per_event, words)
            if choice.get("finish_reason"):
                trace.finish_reason = choice["finish_reason"]

    def _end(self, error: str | None) -> None:
        if error is not None and self.trace.error is None:
            self.trace.error = error
        if not self.finished.done():
            self.finished.set_result(self.trace)


async def stream_once(host: str, port: int, request: bytes, request_timeout: float) -> StreamTrace:
    """Send one request on a new connection and read its streamed response to the end (or `request_timeout`)."""
    loop = asyncio.get_running_loop()
    start = time.perf_counter()
    transport: asyncio.BaseTransport | None = None
    protocol: SSEStream | None = None
    try:
        async with asyncio.timeout(request_timeout):
            transport, protocol = await loop.create_connection(lambda: SSEStream(request, start), host, port)
            return await protocol.finished
    except TimeoutError:
        trace = protocol.trace if protocol is not None else StreamTrace()
        trace.error = trace.error or f"no end within {request_timeout:g} s"
        return trace
    except OSError as exc:
        return StreamTrace(error=f"{type(exc).__name__}: {exc}")
    finally:
        if transport is not None:
            transport.close()


@dataclass
class Batch:
    """The traces of requests sent at once, and the batch's wall time (first sent to last ended)."""

    traces: list[StreamTrace] = field(default_factory=list)
    wall: float = 0.0

    @property
    def failures(self) -> list[str]:
        return [f for f in (t.failure() for t in self.traces) if f is not None]


def arrival_offsets(n: int, rate: float, seed: int = 0) -> list[float]:
    """When each of `n` requests is sent, in seconds after the first: all at once when `rate` is 0 (a burst),
    else as a Poisson process of `rate` requests per second (exponential gaps, seeded: the same schedule for
    both sides of a comparison and in every run).

    >>> arrival_offsets(3, 0.0)
    [0.0, 0.0, 0.0]
    >>> offsets = arrival_offsets(3, 10.0)
    >>> offsets[0], offsets == sorted(offsets), offsets == arrival_offsets(3, 10.0)
    (0.0, True, True)
    """
    if rate <= 0:
        return [0.0] * n
    rng = random.Random(seed)
    offsets, at = [], 0.0
    for _ in range(n):
        offsets.append(at)
        at += rng.expovariate(rate)
    return offsets


async def run_batch(
    url: str, bodies: Sequence[dict[str, Any]], request_timeout: float = 120.0, offsets: Sequence[float] = ()
) -> Batch:
    """POST every body to `url`, each streamed on its own connection: all at once, or body i `offsets[i]`
    seconds after the first. Each request's times count from its own sending."""
    requests = [request_bytes(url, body) for body in bodies]
    start = time.perf_counter()

    async def send(index: int, host: str, port: int, raw: bytes) -> StreamTrace:
        if index < len(offsets) and (delay := start + offsets[index] - time.perf_counter()) > 0:
            await asyncio.sleep(delay)
        return await stream_once(host, port, raw, request_timeout)

    async with asyncio.TaskGroup() as group:
        tasks = [group.create_task(send(i, host, port, raw)) for i, (host, port, raw) in enumerate(requests)]
    return Batch([task.result() for task in tasks], time.perf_counter() - start)


def chat_body(model: str, question: str, max_tokens: int) -> dict[str, Any]:
    """A streamed chat completion request with usage, as an OpenAI client sends it."""
    return {
        "model": model,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
