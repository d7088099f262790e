"""Normal decoding: one request, the answer streamed as it comes; also SoT's fallback, which continues
whatever part of the answer was already sent."""

from __future__ import annotations

from dataclasses import replace

from sot.backends.base import GenerationRequest
from sot.core.answer import AnswerStream, join_continuation
from sot.core.policy import stage_budget
from sot.core.prompts import PromptSet, continuation_request
from sot.engine.run import Run
from sot.events import Result


async def answer_normally(
    run: Run, prompts: PromptSet, *, prefill: bool, fallback_reason: str | None = None, skeleton: str | None = None
) -> Result:
    """Answer `run`'s question in one request, continuing `run.sent` if SoT already sent part of it."""
    config = run.config
    prefix = run.sent
    messages, prefill_text = continuation_request(prompts, run.messages, prefix, prefill=prefill)
    max_tokens = stage_budget(run.tokens_left(), config.sampling.max_tokens)
    stream = AnswerStream(prefix)
    finish = "length"  # with no budget left there is nothing to ask for: the answer stops where it is
    if max_tokens > 0:
        sampling = replace(config.sampling, max_tokens=max_tokens)
        request = GenerationRequest(
            messages=tuple(messages),
            sampling=sampling,
            stop=config.answer_stop,
            prefill=prefill_text,
            cache_key=run.key,
        )

        def restart(attempt: int) -> None:
            nonlocal stream
            stream = AnswerStream(prefix)  # nothing of a failed attempt was sent, or it is not retried

        def on_text(text: str) -> bool:
            if prefix and not prefill_text and stream.length == len(prefix):
                text = join_continuation(prefix, text.lstrip())
            run.clock.mark_token()
            run.stats.token_times.append(run.clock.now())
            run.send_answer(stream.push(text))
            return False

        deadline = run.stage_deadline("normal_deadline", config.normal_deadline)
        stage = "fallback answer" if fallback_reason else "normal answer"
        outcome = await run.request(
            stage, request, deadline, on_text, on_attempt=restart, sent=lambda: stream.length > len(prefix)
        )
        finish = "length" if outcome.finish == "length" else "stop"
    return Result(
        mode_requested="normal",
        mode_used="normal",
        answer=run.sent,
        complete=finish == "stop",
        finish_reason="length" if finish == "length" else "stop",
        skeleton=skeleton,
        fallback_reason=fallback_reason,
        backend=run.backend.name,
        model=run.backend.model,
        stats=run.stats,
    )
