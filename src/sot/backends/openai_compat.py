"""The OpenAI-compatible backend, on the official `openai` SDK: OpenAI, Azure OpenAI, vLLM, SGLang,
llama.cpp's server, Ollama.

The wire format (chat completions) is separate from the endpoint (base URL, key, model, extra fields),
so one class serves them all. The SDK sends the request and checks its status; the stream's SSE is read
raw and each chunk parsed once with orjson, without building a pydantic object per token (a proxy relays
thousands of them a second). The SDK does not retry (`max_retries=0`): retries are the engine's one
policy (`sot.engine.retry`). Errors are mapped to `sot.errors` at one boundary, keeping the upstream's
message; a malformed chunk, an error object mid-stream, or a stream without a finish reason is a
`BackendStreamError`.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import aiohttp
import openai
import orjson

from sot.backends.base import (
    Chunk,
    GenerationRequest,
    LoopBound,
    Usage,
    broken_connection,
    collapse_messages,
    is_transport_error,
)
from sot.errors import (
    AuthenticationError,
    BackendConnectionError,
    BackendError,
    BackendStatusError,
    BackendStreamError,
    BackendTimeoutError,
    BadRequestError,
    ConfigError,
    RateLimitError,
)


def _retry_after(exc: openai.APIStatusError) -> float | None:
    value = exc.response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


def _http_client(transport: str) -> Any:
    """The SDK's HTTP client for `transport`: "aiohttp" (the SDK's `DefaultAioHttpClient`, the `openai[aiohttp]`
    extra) or "httpx" (the SDK's default). aiohttp is the default because it costs about a third of the CPU per
    request (0.5-0.7 ms against 1.6-1.9 ms, measured with 200 concurrent streams): a proxy pays it for every
    skeleton and point request, and when many arrive at once it decides how soon the first byte goes out."""
    if transport == "aiohttp":
        return openai.DefaultAioHttpClient()
    if transport == "httpx":
        return openai.DefaultAsyncHttpxClient()
    raise ConfigError(f"unknown transport {transport!r}: use 'aiohttp' or 'httpx'")


def _refused_or_broken(exc: BaseException) -> BaseException | None:
    """The refused or broken connection behind an SDK "timeout", if that is what it was: the aiohttp transport's
    error map turns every connection error into a connect timeout, so the cause chain decides (a real timeout
    has one)."""
    cause = exc.__cause__ or exc.__context__
    while cause is not None:
        if isinstance(cause, TimeoutError):
            return None
        if isinstance(cause, OSError | aiohttp.ClientConnectionError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def map_openai_error(exc: Exception, backend: str) -> BackendError:
    """The most specific `sot.errors` class for an SDK exception, with the upstream's message."""
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, openai.APITimeoutError):
        broken = _refused_or_broken(exc)
        if broken is None:
            return BackendTimeoutError(f"the upstream timed out: {message}", backend=backend)
        reason = f"{type(broken).__name__}: {broken}"
        return BackendConnectionError(f"could not reach the upstream: {reason}", backend=backend)
    if isinstance(exc, openai.APIConnectionError):
        return BackendConnectionError(f"could not reach the upstream: {message}", backend=backend)
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        text = f"upstream answered {status}: {message}"
        if isinstance(exc, openai.AuthenticationError | openai.PermissionDeniedError):
            return AuthenticationError(text, status_code=status, backend=backend)
        if isinstance(exc, openai.RateLimitError):
            return RateLimitError(text, status_code=status, retry_after=_retry_after(exc), backend=backend)
        if isinstance(exc, openai.BadRequestError | openai.NotFoundError | openai.UnprocessableEntityError):
            return BadRequestError(text, status_code=status, backend=backend)
        return BackendStatusError(text, status_code=status, backend=backend)
    if isinstance(exc, openai.APIError):
        # An error object inside an otherwise healthy stream.
        return BackendStreamError(f"the upstream reported an error mid-stream: {message}", backend=backend)
    return BackendError(f"{type(exc).__name__}: {message}", backend=backend)


class OpenAIBackend:
    """Any chat-completions endpoint.

    `continue_final_message`: the server can continue a final assistant message (vLLM, SGLang and
    llama.cpp's server take `continue_final_message` / `add_generation_prompt` in the body); the engine
    then uses prefill-style prompts. Otherwise it uses instruction-style prompts.
    `cache_key_field`: the body field that carries one cache key per question (`prompt_cache_key` on
    OpenAI); `None` sends nothing, for servers that reject unknown fields.
    `routing_header`: the header that carries the same key on every request (default `X-SoT-Session`), so a
    load balancer that hashes on it (nginx `hash $http_x_sot_session consistent`) sends the skeleton and all
    points of a question to one replica and its prefix cache; `None` sends no header.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        azure_api_version: str | None = None,
        continue_final_message: bool = False,
        cache_key_field: str | None = None,
        routing_header: str | None = "X-SoT-Session",
        extra_body: Mapping[str, Any] | None = None,
        include_usage: bool = True,
        timeout: float = 120.0,
        max_retries: int = 0,
        transport: str = "aiohttp",
        name: str = "openai",
    ) -> None:
        if not model:
            raise ConfigError("the OpenAI-compatible backend needs a model name (--model or SOT_MODEL)")
        self.name = name
        self.model = model
        self.supports_prefill = continue_final_message
        self.cache_key_field = cache_key_field
        self.routing_header = routing_header
        self.extra_body = dict(extra_body or {})
        self.include_usage = include_usage
        api_key = api_key or os.environ.get("AZURE_OPENAI_API_KEY" if azure_api_version else "OPENAI_API_KEY")
        # Local servers take any key; the SDK insists on one, so give it a placeholder rather than fail.
        api_key = api_key or ("not-needed" if base_url else None)
        common: dict[str, Any] = {"api_key": api_key, "timeout": timeout, "max_retries": max_retries}
        common["http_client"] = _http_client(transport)
        try:
            if azure_api_version:
                client: openai.AsyncOpenAI = openai.AsyncAzureOpenAI(
                    azure_endpoint=base_url or os.environ.get("AZURE_OPENAI_ENDPOINT", ""),
                    api_version=azure_api_version,
                    **common,
                )
            else:
                client = openai.AsyncOpenAI(base_url=base_url, **common)
        except openai.OpenAIError as exc:
            raise ConfigError(f"cannot configure the OpenAI client: {exc}") from exc
        self._clients = LoopBound(client, lambda old: old.copy(http_client=_http_client(transport)))

    @property
    def client(self) -> openai.AsyncOpenAI:
        """The SDK client (the one for the event loop that used the backend last)."""
        return self._clients.client

    @client.setter
    def client(self, client: openai.AsyncOpenAI) -> None:
        self._clients.client = client

    def _payload(self, request: GenerationRequest) -> tuple[dict[str, Any], dict[str, str]]:
        """The JSON body and the extra headers of one streamed chat-completions request."""
        s = request.sampling
        messages = collapse_messages(request.messages)
        body: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stream": True,
        }
        if s.frequency_penalty:
            body["frequency_penalty"] = s.frequency_penalty
        if s.seed is not None:
            body["seed"] = s.seed
        if request.stop:
            body["stop"] = list(request.stop)[:4]
        if self.include_usage:
            body["stream_options"] = {"include_usage": True}
        extra: dict[str, Any] = dict(self.extra_body)  # the user's extra fields win over the defaults below
        if request.prefill and self.supports_prefill:
            messages.append({"role": "assistant", "content": request.prefill})
            extra.setdefault("continue_final_message", True)
            extra.setdefault("add_generation_prompt", False)
        if request.cache_key and self.cache_key_field:
            extra[self.cache_key_field] = request.cache_key
        if s.repeat_penalty != 1.0:
            extra.setdefault("repetition_penalty", s.repeat_penalty)  # vLLM/SGLang/llama.cpp understand it
        body.update(extra)
        headers: dict[str, str] = {}
        key = request.cache_key
        if key and self.routing_header and key.isascii() and key.isprintable():
            headers[self.routing_header] = key
        return body, headers

    async def _post(self, request: GenerationRequest) -> openai.AsyncStream[object]:
        """Send the request through the SDK's custom-request door (`client.post`): its status handling,
        auth, Azure's deployment routing and error mapping, without converting a plain-JSON body through
        the typed-parameter machinery, which costs more than the rest of the request when 200 arrive at
        once. The returned stream's raw response is read by the caller."""
        body, headers = self._payload(request)
        return await self._clients.get().post(
            "/chat/completions",
            cast_to=object,
            body=body,
            options={"headers": headers} if headers else {},
            stream=True,
            stream_cls=openai.AsyncStream[object],
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Stream one chat completion, parsing the raw SSE ourselves (one JSON parse per chunk, no models)."""
        finish: str | None = None
        usage: Usage | None = None
        events = _ChunkReader(self.name)
        try:
            async with await self._post(request) as response:
                yield Chunk()  # the upstream accepted the request (its status was a success)
                async with contextlib.aclosing(_payloads(response.response, events)) as payloads:
                    async for payload in payloads:
                        text, chunk_finish, chunk_usage = events.parse(payload)
                        usage = chunk_usage or usage
                        if text:
                            yield Chunk(text=text)
                        finish = chunk_finish or finish
        except openai.OpenAIError as exc:
            raise map_openai_error(exc, self.name) from exc
        except BackendError:
            raise
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            # Reading the raw body bypasses the SDK's own mapping of its HTTP library's errors.
            raise broken_connection(exc, self.name) from exc
        if finish is None:
            raise BackendStreamError("the upstream's stream ended without a finish reason", backend=self.name)
        yield Chunk(finish_reason="length" if finish == "length" else "stop", usage=usage)

    async def aclose(self) -> None:
        # The client of this loop: one left from a loop that has ended cannot be closed from here (nor needs to be).
        await self._clients.get().close()


_DONE: Any = object()


async def _payloads(response: Any, reader: _ChunkReader) -> AsyncGenerator[Any, None]:
    """The parsed chunks of a raw response body. The bytes are read as they come and split into events
    here: when a busy reader falls behind, one read brings many events, parsed in one go."""
    async for data in response.aiter_bytes():
        for payload in reader.feed_bytes(data):
            yield payload
    for payload in reader.end():
        yield payload


class _ChunkReader:
    """Server-sent events in, chat-completion chunk payloads out; anything malformed is a `BackendStreamError`."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self._buffer = b""  # an incomplete line
        self._data: list[bytes] = []  # the data lines of the event being read
        self.done = False  # `[DONE]` was seen: anything after it is ignored (but still read off the wire)

    def feed_bytes(self, data: bytes) -> list[Any]:
        """More of the body; returns the payloads of the events it completed, in order."""
        if self.done:
            return []
        lines = (self._buffer + data).split(b"\n")
        self._buffer = lines.pop()
        payloads: list[Any] = []
        for line in lines:
            if line.endswith(b"\r"):
                line = line[:-1]
            if line.startswith(b"data:"):
                value = line[5:]
                self._data.append(value[1:] if value.startswith(b" ") else value)
            elif not line and self._data:
                payload = self._take()
                if payload is _DONE:
                    self.done = True
                    break
                payloads.append(payload)
            # anything else: comments (": ping"), `event:`/`id:` fields, blank keep-alive lines
        return payloads

    def end(self) -> list[Any]:
        """The body ended: an event still waiting for its blank line, if any."""
        if self._buffer and not self.done:
            return self.feed_bytes(b"\n\n")
        if self._data and not self.done:
            return self.feed_bytes(b"\n")
        return []

    def _take(self) -> Any:
        data, self._data = b"\n".join(self._data), []
        if data == b"[DONE]":
            return _DONE
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            raise BackendStreamError(
                f"the upstream sent a malformed chunk: {data[:200].decode(errors='replace')!r}", backend=self.backend
            ) from None

    def parse(self, payload: Any) -> tuple[str | None, str | None, Usage | None]:
        """(text, finish reason, usage) of one chunk."""
        if not isinstance(payload, dict):
            raise self._shape(payload)
        if "error" in payload:
            error = payload["error"]
            message = error.get("message") if isinstance(error, dict) else error
            raise BackendStreamError(f"the upstream reported an error mid-stream: {message}", backend=self.backend)
        usage = self._usage(payload.get("usage"))
        choices = payload.get("choices") or []
        if not isinstance(choices, list):
            raise self._shape(payload)
        if not choices:
            return None, None, usage
        choice = choices[0]
        if not isinstance(choice, dict):
            raise self._shape(payload)
        delta = choice.get("delta") or {}
        text = delta.get("content") if isinstance(delta, dict) else None
        finish = choice.get("finish_reason")
        if (text is not None and not isinstance(text, str)) or (finish is not None and not isinstance(finish, str)):
            raise self._shape(payload)
        return text, finish, usage

    def _usage(self, raw: Any) -> Usage | None:
        if not isinstance(raw, dict):
            return None
        prompt, completion = raw.get("prompt_tokens"), raw.get("completion_tokens")
        return Usage(
            prompt_tokens=prompt if isinstance(prompt, int) else 0,
            completion_tokens=completion if isinstance(completion, int) else 0,
        )

    def _shape(self, payload: Any) -> BackendStreamError:
        text = orjson.dumps(payload).decode()[:200]
        return BackendStreamError(f"the upstream sent a chunk of the wrong shape: {text}", backend=self.backend)
