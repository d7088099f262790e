"""SoT as the paper states it, without streaming: skeleton -> parse -> gather(points) -> assemble.

A short oracle for the streaming engine (`sot.engine.sot`): the tests hold the engine's answers to this
one's on the same backend. It shares the prompts and the pure decisions in `sot.core`, and leaves out
what only streaming needs (overlap, cutting a prose skeleton line mid-stream, live text, retries,
deadlines), so it is meant for well-behaved backends whose skeleton points are short.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace

from sot.backends.base import Backend, GenerationRequest, Message
from sot.core.assemble import assemble_answer, clean_point_text
from sot.core.policy import keep_points, too_few_points
from sot.core.prompts import PromptSet, point_request, skeleton_request
from sot.core.skeleton import parse_skeleton
from sot.core.stops import find_point_end
from sot.engine.config import EngineConfig
from sot.engine.run import cache_key


async def complete(backend: Backend, request: GenerationRequest) -> tuple[str, str]:
    """The whole reply to `request` and its finish reason."""
    parts: list[str] = []
    finish = "stop"
    async for chunk in backend.stream(request):
        parts.append(chunk.text)
        finish = chunk.finish_reason or finish
    return "".join(parts), finish


async def answer_with_sot(
    backend: Backend, messages: list[Message], prompts: PromptSet, config: EngineConfig, *, prefill: bool
) -> tuple[list[str], list[str], str] | None:
    """(points, expansions, answer), or None where the engine would fall back to normal decoding."""
    prompt, start = skeleton_request(prompts, messages, prefill=prefill)
    sampling = replace(config.sampling, max_tokens=config.skeleton_max_tokens)
    text, finish = await complete(backend, GenerationRequest(tuple(prompt), sampling, prefill=start))
    parsed = parse_skeleton(start + text, max_points=config.max_points, max_point_chars=config.max_point_chars)
    points = keep_points(parsed.points, finish=finish, ended=parsed.ended, started=0)
    if too_few_points(points, min_points=config.min_points):
        return None
    raws = await asyncio.gather(
        *(_expand(backend, messages, prompts, config, points, i, prefill) for i in range(1, len(points) + 1))
    )
    expansions = [clean_point_text(i, point, raw) for i, (point, raw) in enumerate(zip(points, raws, strict=True), 1)]
    return points, expansions, assemble_answer(points, expansions)


async def _expand(
    backend: Backend,
    messages: list[Message],
    prompts: PromptSet,
    config: EngineConfig,
    points: list[str],
    index: int,
    prefill: bool,
) -> str:
    prompt, start = point_request(prompts, messages, points, index, prefill=prefill)
    sampling = replace(config.sampling, max_tokens=config.point_max_tokens)
    request = GenerationRequest(tuple(prompt), sampling, prefill=start, stop=("\n\n",), cache_key=cache_key(messages))
    raw, _finish = await complete(backend, request)
    end = find_point_end(raw, max_sentences=config.point_max_sentences or prompts.point_max_sentences)
    return raw if end is None else raw[:end]
