"""An example third-party sot backend: answers every request from its text alone, with no model."""

from __future__ import annotations

import re
from collections.abc import AsyncGenerator
from typing import Any, ClassVar

from sot.backends import Chunk, GenerationRequest, Usage

_START = re.compile(r'Start your reply with "([^"]*)"')


class EchoBackend:
    """A skeleton of three points for a skeleton request; for a point, its own header and a short sentence."""

    capabilities: ClassVar[dict[str, bool]] = {
        "prefill": False,
        "prompt_cache": False,
        "batching": False,
        "concurrent": True,
    }
    description = "An example plugin backend that echoes SoT-shaped answers."

    def __init__(self, model: str = "echo-1") -> None:
        self.name = "echo"
        self.model = model
        self.supports_prefill = False
        self.calls = 0

    @classmethod
    def create(cls, *, model: str | None = None, base_url: str | None = None, api_key: str | None = None) -> Any:
        """What sot's registry calls: `base_url` and `api_key` mean nothing to this backend."""
        return cls(model or "echo-1")

    def counters(self) -> dict[str, int]:
        return {"echo_calls": self.calls}

    def answer(self, request: GenerationRequest) -> str:
        last = request.messages[-1].content
        start = _START.search(last)
        if start and "expand point" in last.lower():
            return f"{start.group(1)} echoed by a plugin backend."
        if "skeleton" in last.lower():
            return "1. Echo the question\n2. Echo the skeleton\n3. Echo every point"
        return "A plain answer, echoed by a plugin backend."

    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        self.calls += 1
        yield Chunk()  # accepted
        words = re.findall(r"\S+\s*", self.answer(request))
        for word in words:
            yield Chunk(text=word)
        prompt = sum(len(m.content.split()) for m in request.messages)
        yield Chunk(finish_reason="stop", usage=Usage(prompt_tokens=prompt, completion_tokens=len(words)))

    async def aclose(self) -> None:
        return None
