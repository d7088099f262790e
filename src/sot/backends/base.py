"""The one small async protocol every backend implements, and the plain data that crosses it.

A backend turns a `GenerationRequest` (a conversation, optionally with the start of the assistant's reply)
into a stream of `Chunk`s. Everything SoT-specific lives in the engine; a backend knows nothing of
skeletons or points. Concurrency is the caller's business: the engine opens one stream per point, and a
backend that can batch (the embedded engine) batches concurrent streams itself, as a serving engine does.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

from sot.errors import BackendConnectionError

ClientT = TypeVar("ClientT")
Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Message:
    """One turn of a chat conversation."""

    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class SamplingParams:
    """Generation settings shared by every request of one answer (both modes use the same)."""

    max_tokens: int = 512
    temperature: float = 0.0
    top_p: float = 1.0
    # Multiplicative llama.cpp-style penalty for local models; OpenAI-style endpoints get frequency_penalty.
    repeat_penalty: float = 1.0
    frequency_penalty: float = 0.0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate: a conversation and, optionally, the first words of the assistant's reply.

    `prefill` is only honoured by backends with `supports_prefill`; the engine never sends a prefill to a
    backend that cannot continue a reply (it uses instruction-style prompts instead).
    `stop` strings end the generation server-side and are not part of the returned text.
    `cache_key` groups requests that share a long prefix (OpenAI's `prompt_cache_key`).
    """

    messages: tuple[Message, ...]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    prefill: str = ""
    stop: tuple[str, ...] = ()
    cache_key: str | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """Token accounting of one request.

    `prompt_tokens` is the prompt's length; `computed_prompt_tokens` how many of those the backend actually
    had to process (the rest came from a prefix cache), when the backend knows.
    """

    prompt_tokens: int = 0
    completion_tokens: int = 0
    computed_prompt_tokens: int | None = None


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of generated text. The last chunk of a stream carries `finish_reason` (and `usage`)."""

    text: str = ""
    finish_reason: FinishReason | None = None
    usage: Usage | None = None


@runtime_checkable
class Backend(Protocol):
    """A model behind one async streaming call.

    Contract:
    - `stream(request)` yields chunks; the final chunk has `finish_reason` set ("stop" or "length").
      A stream that ends without one is an error, and the backend raises `BackendStreamError`.
    - A chunk with neither text nor finish reason says the request was accepted (the upstream answered
      with a success status; the embedded engine admitted it); a server decides a stream's status there.
    - Errors are raised as `sot.errors.BackendError` subclasses, never as a library's own exceptions.
    - Closing the iterator early (`aclose()`, or cancelling the task that iterates it) cancels the
      request and frees whatever it held (an HTTP connection, KV cache cells).
    - Many streams may be open at once; the backend may batch them.
    """

    name: str
    model: str
    supports_prefill: bool

    def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]: ...

    async def aclose(self) -> None: ...


def collapse_messages(messages: tuple[Message, ...] | list[Message]) -> list[dict[str, str]]:
    """Messages as the plain dicts chat APIs take."""
    return [{"role": m.role, "content": m.content} for m in messages]


def broken_connection(exc: BaseException, backend: str) -> BackendConnectionError:
    """The error for an HTTP library's exception met while reading a raw body, which the SDK did not map."""
    return BackendConnectionError(f"the connection to the upstream broke: {type(exc).__name__}: {exc}", backend=backend)


def is_transport_error(exc: BaseException) -> bool:
    """Whether `exc` comes from an SDK's HTTP stack (httpx, or httpx2 in newer SDKs, aiohttp, what is under them),
    whatever their versions: a backend reading a raw body sees these unmapped by the SDK."""
    libraries = ("httpx", "httpx2", "httpcore", "h11", "aiohttp")
    return any(kind.__module__.split(".")[0] in libraries for kind in type(exc).__mro__)


class LoopBound(Generic[ClientT]):
    """An SDK client for the running event loop.

    An HTTP client's connections belong to the event loop that opened them. A backend used from a new loop (a
    second `asyncio.run`, `Engine.run_sync` called again) takes a fresh client with the same settings from
    `fresh(old)` instead of failing with "Event loop is closed"; the old one's connections ended with their
    loop. `client` is the latest one (for settings and hooks outside a loop).
    """

    def __init__(self, client: ClientT, fresh: Callable[[ClientT], ClientT]) -> None:
        self.client = client
        self._fresh = fresh
        self._loop: asyncio.AbstractEventLoop | None = None

    def get(self) -> ClientT:
        """The client for the running loop (call from inside it)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            old_loop, self._loop = self._loop, loop
            if old_loop is not None:
                if old_loop.is_closed():
                    quiet_closed_loop(old_loop)
                self.client = self._fresh(self.client)
        return self.client


def quiet_closed_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Ignore reports of "unclosed" sessions and connectors to `loop`, which has been closed: their connections
    ended with it (aiohttp reports them to the loop's exception handler when a client is dropped)."""

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        if not str(context.get("message", "")).startswith("Unclosed"):
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
