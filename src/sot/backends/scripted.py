"""A scripted in-process backend: a test double that ships with the library (like pydantic-ai's TestModel).

It answers through a plain function of the request, streams word by word with optional delays, and can
raise any `BackendError` on demand. It is for unit tests of the engine and of views built on its events;
the tests that matter also run against real server processes and the real embedded model.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncGenerator, Callable

from sot.backends.base import Chunk, GenerationRequest, Usage
from sot.backends.registry import Capabilities

Responder = Callable[[GenerationRequest], str]


def default_responder(request: GenerationRequest) -> str:
    """A skeleton for skeleton requests, a sentence for point requests, a paragraph otherwise."""
    last = request.messages[-1].content.lower()
    if "skeleton" in last:
        body = "1. First idea\n2. Second idea\n3. Third idea\n\n"
        return body[len(request.prefill) :] if body.startswith(request.prefill) else body
    if "point" in last:
        return " A short explanation of this point."
    return "A plain answer in a few words."


class ScriptedBackend:
    """Answers with `responder(request)`, one word per chunk, `ttft` then `token_delay` seconds apart."""

    name = "scripted"
    capabilities = Capabilities(prefill=True)
    description = "An in-process test double: scripted answers, word by word, no model."

    def __init__(
        self,
        responder: Responder = default_responder,
        *,
        ttft: float = 0.0,
        token_delay: float = 0.0,
        supports_prefill: bool = True,
        model: str = "scripted",
    ) -> None:
        self.responder = responder
        self.ttft = ttft
        self.token_delay = token_delay
        self.supports_prefill = supports_prefill
        self.model = model
        self.requests: list[GenerationRequest] = []
        self.active = 0
        self.cancelled = 0

    @classmethod
    def create(
        cls,
        *,
        model: str | None = None,
        base_url: str | None = None,
        api_key: str | None = None,
        responder: Responder = default_responder,
        ttft: float = 0.0,
        token_delay: float = 0.0,
        supports_prefill: bool = True,
    ) -> ScriptedBackend:
        """The registry's constructor (`sot.backends.registry`): `base_url` and `api_key` are unused."""
        return cls(
            responder, ttft=ttft, token_delay=token_delay, supports_prefill=supports_prefill, model=model or "scripted"
        )

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        self.requests.append(request)
        self.active += 1
        finished = False
        try:
            text = self.responder(request)  # may raise a BackendError: that is the point
            for stop in request.stop:
                if stop in text:
                    text = text[: text.index(stop)]
            words = re.findall(r"\S*\s*", text)
            words = [w for w in words if w]
            budget = request.sampling.max_tokens
            await asyncio.sleep(self.ttft)
            for i, word in enumerate(words[:budget]):
                if i:
                    await asyncio.sleep(self.token_delay)
                yield Chunk(text=word)
            prompt_tokens = sum(len(m.content.split()) for m in request.messages)
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=min(len(words), budget))
            finished = True
            yield Chunk(finish_reason="length" if len(words) > budget else "stop", usage=usage)
        finally:
            self.active -= 1
            if not finished:
                self.cancelled += 1

    async def aclose(self) -> None:
        return None
