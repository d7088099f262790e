"""The OpenAI-compatible backend, on the official `openai` SDK: OpenAI, Azure OpenAI, vLLM, SGLang,
llama.cpp's server, Ollama.

The wire format (chat completions) is separate from the endpoint (base URL, key, model, extra fields),
so one class serves them all. Retries and HTTP timeouts are the SDK's; this module only maps the SDK's
exceptions to `sot.errors` at one boundary, keeping the upstream's message, and checks that every
stream really finished (the SDK raises nothing for a stream cut without a finish reason).
"""

from __future__ import annotations

import os
from collections.abc import AsyncGenerator, Mapping
from typing import Any

import openai

from sot.backends.base import Chunk, GenerationRequest, Usage, collapse_messages
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


def map_openai_error(exc: Exception, backend: str) -> BackendError:
    """The most specific `sot.errors` class for an SDK exception, with the upstream's message."""
    message = getattr(exc, "message", None) or str(exc)
    if isinstance(exc, openai.APITimeoutError):
        return BackendTimeoutError(f"the upstream timed out: {message}", backend=backend)
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
        extra_body: Mapping[str, Any] | None = None,
        include_usage: bool = True,
        timeout: float = 120.0,
        max_retries: int = 2,
        name: str = "openai",
    ) -> None:
        if not model:
            raise ConfigError("the OpenAI-compatible backend needs a model name (--model or SOT_MODEL)")
        self.name = name
        self.model = model
        self.supports_prefill = continue_final_message
        self.cache_key_field = cache_key_field
        self.extra_body = dict(extra_body or {})
        self.include_usage = include_usage
        api_key = api_key or os.environ.get("AZURE_OPENAI_API_KEY" if azure_api_version else "OPENAI_API_KEY")
        # Local servers take any key; the SDK insists on one, so give it a placeholder rather than fail.
        api_key = api_key or ("not-needed" if base_url else None)
        try:
            if azure_api_version:
                self.client: openai.AsyncOpenAI = openai.AsyncAzureOpenAI(
                    azure_endpoint=base_url or os.environ.get("AZURE_OPENAI_ENDPOINT", ""),
                    api_key=api_key,
                    api_version=azure_api_version,
                    timeout=timeout,
                    max_retries=max_retries,
                )
            else:
                self.client = openai.AsyncOpenAI(
                    base_url=base_url, api_key=api_key, timeout=timeout, max_retries=max_retries
                )
        except openai.OpenAIError as exc:
            raise ConfigError(f"cannot configure the OpenAI client: {exc}") from exc

    def _body(self, request: GenerationRequest) -> tuple[list[dict[str, str]], dict[str, Any]]:
        messages = collapse_messages(request.messages)
        extra: dict[str, Any] = dict(self.extra_body)
        if request.prefill and self.supports_prefill:
            messages.append({"role": "assistant", "content": request.prefill})
            extra.setdefault("continue_final_message", True)
            extra.setdefault("add_generation_prompt", False)
        if request.cache_key and self.cache_key_field:
            extra[self.cache_key_field] = request.cache_key
        s = request.sampling
        if s.repeat_penalty != 1.0:
            extra.setdefault("repetition_penalty", s.repeat_penalty)  # vLLM/SGLang/llama.cpp understand it
        return messages, extra

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        messages, extra = self._body(request)
        s = request.sampling
        kwargs: dict[str, Any] = {
            "model": self.model,
            "messages": messages,
            "max_tokens": s.max_tokens,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "stream": True,
        }
        if s.frequency_penalty:
            kwargs["frequency_penalty"] = s.frequency_penalty
        if s.seed is not None:
            kwargs["seed"] = s.seed
        if request.stop:
            kwargs["stop"] = list(request.stop)[:4]
        if self.include_usage:
            kwargs["stream_options"] = {"include_usage": True}
        if extra:
            kwargs["extra_body"] = extra
        finish: str | None = None
        usage: Usage | None = None
        try:
            stream = await self.client.chat.completions.create(**kwargs)
            try:
                async for event in stream:
                    if event.usage is not None:
                        usage = Usage(
                            prompt_tokens=event.usage.prompt_tokens or 0,
                            completion_tokens=event.usage.completion_tokens or 0,
                        )
                    if not event.choices:
                        continue
                    choice = event.choices[0]
                    text = choice.delta.content if choice.delta else None
                    if text:
                        yield Chunk(text=text)
                    if choice.finish_reason:
                        finish = choice.finish_reason
            finally:
                await stream.close()  # releases the connection; on early exit this cancels the upstream
        except openai.OpenAIError as exc:
            raise map_openai_error(exc, self.name) from exc
        if finish is None:
            raise BackendStreamError("the upstream's stream ended without a finish reason", backend=self.name)
        yield Chunk(finish_reason="length" if finish == "length" else "stop", usage=usage)

    async def aclose(self) -> None:
        await self.client.close()
