"""The Anthropic backend: Claude through the official `anthropic` SDK (`pip install 'sot[anthropic]'`).

Claude continues a started assistant reply, so the engine uses prefill-style prompts (points start exactly
with "3. <point>:"); the API rejects a final assistant turn that ends in whitespace, so that whitespace is
stripped before sending and the reply's own leading whitespace dropped (the prefill as given plus the
returned text read as one). Prompt caching puts `cache_control` breakpoints where the points of a question
share their prefix (see `sot.backends.anthropic_messages`); cache reads and writes are in `counters()`, so a
run's `Result.stats.backend` has them, and `Usage.computed_prompt_tokens` counts only what was not read
from the cache. The SDK sends the request and checks its status, without retrying (`max_retries=0`: the
engine's one policy decides); the events are read from the raw stream. Errors map to `sot.errors`: 429 and
529 (overloaded) are `RateLimitError` with the upstream's `retry-after`, 401/403 `AuthenticationError`,
400/404/413/422 `BadRequestError`, other statuses `BackendStatusError`, an error event mid-stream a
`BackendStreamError`. Whitespace-only stop strings (the API refuses them) are applied here, client-side.
"""

from __future__ import annotations

import contextlib
import email.utils
import os
import time
from collections.abc import AsyncGenerator, Mapping
from typing import TYPE_CHECKING, Any

from sot.backends.anthropic_messages import LeadingSpace, MessageState, build_messages_body, sse_payloads
from sot.backends.base import Chunk, GenerationRequest, LoopBound, broken_connection, is_transport_error
from sot.backends.registry import Capabilities
from sot.core.stops import StopHoldback
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

if TYPE_CHECKING:
    import anthropic as anthropic_sdk

INSTALL_HINT = "pip install 'sot[anthropic]'  (or: pip install anthropic)"
COUNTERS = ("requests", "input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens", "output_tokens")


def _sdk() -> Any:
    """The `anthropic` module, or a `ConfigError` that says how to install it."""
    try:
        import anthropic as sdk
    except ImportError as exc:
        raise ConfigError(f"the anthropic backend needs the anthropic SDK: {INSTALL_HINT}") from exc
    return sdk


def retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date), when sent."""
    millis = headers.get("retry-after-ms")
    with contextlib.suppress(TypeError, ValueError):
        if millis is not None:
            return max(0.0, float(millis) / 1000)
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _error_message(exc: Any) -> str:
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    return str(message or getattr(exc, "message", None) or exc)


def map_status(status: int, message: str, headers: Mapping[str, str], backend: str) -> BackendError:
    """The `sot.errors` class of an HTTP error status from Anthropic's API."""
    text = f"upstream answered {status}: {message}"
    if status in (401, 403):
        return AuthenticationError(text, status_code=status, backend=backend)
    if status in (429, 529):  # 529: Anthropic is overloaded; retried like a rate limit, after retry-after
        return RateLimitError(text, status_code=status, retry_after=retry_after(headers), backend=backend)
    if status in (400, 404, 413, 422):
        if "prefill" in message.lower():
            text += " (this model does not continue a started reply: use --backend-option prefill=false)"
        return BadRequestError(text, status_code=status, backend=backend)
    return BackendStatusError(text, status_code=status, backend=backend)


def map_anthropic_error(exc: Exception, backend: str) -> BackendError:
    """The most specific `sot.errors` class for an `anthropic` SDK exception, with the upstream's message."""
    sdk = _sdk()
    message = _error_message(exc)
    if isinstance(exc, sdk.APITimeoutError):
        return BackendTimeoutError(f"the upstream timed out: {message}", backend=backend)
    if isinstance(exc, sdk.APIConnectionError):
        return BackendConnectionError(f"could not reach the upstream: {message}", backend=backend)
    if isinstance(exc, sdk.APIStatusError):
        return map_status(exc.status_code, message, exc.response.headers, backend)
    return BackendError(f"{type(exc).__name__}: {message}", backend=backend)


def _api_root(base_url: str | None) -> str | None:
    """The SDK appends /v1/messages itself: a base URL given as ".../v1" (as for OpenAI) loses that suffix."""
    if base_url is None:
        return None
    return base_url.rstrip("/").removesuffix("/v1") or base_url


class AnthropicBackend:
    """Claude models through Anthropic's Messages API (or any server that speaks it, via `base_url`).

    `prefill`: continue the engine's started reply (default); turn it off for a model that refuses a
    prefilled assistant turn (the API answers 400 "prefill not supported"). `prompt_cache`: place
    `cache_control` breakpoints (default); `cache_ttl` ("5m" or "1h") sets their lifetime. `sampling`: send
    the engine's temperature and top_p (current models take neither).
    """

    capabilities = Capabilities(
        prefill=True, prompt_cache=True, notes="cache_control breakpoints on the shared skeleton conversation"
    )
    description = "Claude through Anthropic's Messages API (official SDK): prefill, prompt caching."
    requires = ("anthropic",)
    install_hint = INSTALL_HINT

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        prefill: bool = True,
        prompt_cache: bool = True,
        cache_ttl: str | None = None,
        sampling: bool = False,
        timeout: float = 120.0,
        max_retries: int = 0,
        name: str = "anthropic",
    ) -> None:
        if not model:
            raise ConfigError("the anthropic backend needs a model name (--model, e.g. claude-sonnet-4-5)")
        if cache_ttl not in (None, "5m", "1h"):
            raise ConfigError(f"cache_ttl must be 5m or 1h, not {cache_ttl!r}")
        sdk = _sdk()
        self.name = name
        self.model = model
        self.supports_prefill = prefill
        self.prompt_cache = prompt_cache
        self.cache_ttl = cache_ttl
        self.sampling = sampling
        api_key = api_key or os.environ.get("ANTHROPIC_API_KEY")
        # A local server takes any key; the SDK insists on credentials, so give it a placeholder rather than fail.
        if api_key is None and base_url is not None and not os.environ.get("ANTHROPIC_AUTH_TOKEN"):
            api_key = "not-needed"
        try:
            client: anthropic_sdk.AsyncAnthropic = sdk.AsyncAnthropic(
                api_key=api_key, base_url=_api_root(base_url), timeout=timeout, max_retries=max_retries
            )
            self._clients = LoopBound(client, lambda old: old.copy(http_client=sdk.DefaultAsyncHttpxClient()))
        except sdk.AnthropicError as exc:
            raise ConfigError(
                f"cannot configure the Anthropic client: {exc} (or set ANTHROPIC_API_KEY, or pass --api-key)"
            ) from exc
        if not any(getattr(self.client, attr, None) for attr in ("api_key", "auth_token", "credentials")):
            raise ConfigError("the anthropic backend needs an API key: set ANTHROPIC_API_KEY or pass --api-key")
        self._sdk_error: type[Exception] = sdk.AnthropicError
        self._counters = dict.fromkeys(COUNTERS, 0)

    @property
    def client(self) -> anthropic_sdk.AsyncAnthropic:
        """The SDK client (the one for the event loop that used the backend last)."""
        return self._clients.client

    @client.setter
    def client(self, client: anthropic_sdk.AsyncAnthropic) -> None:
        self._clients.client = client

    @classmethod
    def create(
        cls,
        *,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        prefill: bool = True,
        prompt_cache: bool = True,
        cache_ttl: str | None = None,
        sampling: bool = False,
        timeout: float = 120.0,
    ) -> AnthropicBackend:
        """The registry's constructor: `model` defaults to SOT_MODEL or ANTHROPIC_MODEL."""
        model = model or os.environ.get("SOT_MODEL") or os.environ.get("ANTHROPIC_MODEL")
        if not model:
            raise ConfigError("the anthropic backend needs --model (e.g. claude-sonnet-4-5), or SOT_MODEL")
        return cls(
            model,
            base_url=base_url,
            api_key=api_key,
            prefill=prefill,
            prompt_cache=prompt_cache,
            cache_ttl=cache_ttl,
            sampling=sampling,
            timeout=timeout,
        )

    def counters(self) -> dict[str, int]:
        """Requests and tokens so far; the engine reports each run's share in `Result.stats.backend`."""
        return dict(self._counters)

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Stream one message, reading the raw events (one JSON parse per event, no model objects)."""
        body = build_messages_body(
            request,
            model=self.model,
            prefill=self.supports_prefill,
            prompt_cache=self.prompt_cache,
            cache_ttl=self.cache_ttl,
            sampling=self.sampling,
        )
        state = MessageState(self.name)
        lead = LeadingSpace(body.stripped)
        cut = StopHoldback(body.client_stops)
        chunks = 0
        try:
            client = self._clients.get()
            async with client.messages.with_streaming_response.create(**body.kwargs) as response:
                self._counters["requests"] += 1
                yield Chunk()  # the upstream accepted the request (its status was a success)
                async with contextlib.aclosing(sse_payloads(response.iter_lines(), self.name)) as payloads:
                    async for payload in payloads:
                        text = state.handle(payload)
                        if text and (text := cut.push(lead.push(text))):
                            chunks += 1
                            yield Chunk(text=text)
                        if cut.stopped:
                            break
        except BackendError:
            raise
        except self._sdk_error as exc:
            raise map_anthropic_error(exc, self.name) from exc
        except Exception as exc:
            if not is_transport_error(exc):
                raise
            # Reading the raw body bypasses the SDK's own mapping of its HTTP library's errors.
            raise broken_connection(exc, self.name) from exc
        finally:
            self._count(state, chunks)
        if not cut.stopped:
            if tail := cut.flush():
                yield Chunk(text=tail)
            if state.stop_reason is None:
                raise BackendStreamError("the upstream's stream ended without a stop reason", backend=self.name)
        yield Chunk(finish_reason="length" if state.finish_reason() == "length" else "stop", usage=state.usage(chunks))

    def _count(self, state: MessageState, chunks: int) -> None:
        counters = self._counters
        counters["input_tokens"] += state.input_tokens
        counters["cache_creation_input_tokens"] += state.cache_creation_input_tokens
        counters["cache_read_input_tokens"] += state.cache_read_input_tokens
        counters["output_tokens"] += state.output_tokens if state.output_tokens is not None else chunks

    async def aclose(self) -> None:
        # The client of this loop: one left from a loop that has ended cannot be closed from here (nor needs to be).
        await self._clients.get().close()
