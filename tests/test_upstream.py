"""The test upstream (`sot.testing.upstream`) as a real process, driven by the official openai client."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest

from sot.testing.upstream import UpstreamOptions, _Msg, build_parser, classify, plan_answer
from upstream_helpers import async_get_stats, async_wait_for_stats

# The fixtures `upstream`, `upstream_server` and `upstream_factory`.
pytest_plugins = ["upstream_helpers"]

QUESTION = "How can I make my website load faster?"
SKELETON_PROMPT = (
    "You're an organizer responsible for only giving the skeleton (not the full content) for answering "
    f"the question. Provide the skeleton in a list of points (numbered 1., 2., 3., etc.).\nQuestion: {QUESTION}"
)
POINT_PROMPT = (
    f"Question: {QUESTION}\nThe skeleton of the answer is\n1. Use caching\n2. Compress images\n"
    "Continue and only continue the writing of point 2. Write it very shortly in 1~2 sentences."
)


# Typed Any: the SDK wants its TypedDict message params, which plain dicts match at runtime.
def user(content: str) -> Any:
    return {"role": "user", "content": content}


def assistant(content: str) -> Any:
    return {"role": "assistant", "content": content}


@pytest.fixture
async def client(upstream: str) -> AsyncIterator[openai.AsyncOpenAI]:
    async with openai.AsyncOpenAI(base_url=upstream, api_key="test", max_retries=0, timeout=10) as c:
        yield c


async def collect(stream: Any) -> tuple[list[str], list[Any]]:
    """The content pieces and all chunks of a chat completion stream."""
    pieces: list[str] = []
    chunks: list[Any] = []
    async for chunk in stream:
        chunks.append(chunk)
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
    return pieces, chunks


# --- answers -----------------------------------------------------------------------------------------------


async def test_models_and_health(client: openai.AsyncOpenAI) -> None:
    models = await client.models.list()
    assert [m.id for m in models.data] == ["sot-test-model"]


async def test_non_stream_full_answer(client: openai.AsyncOpenAI) -> None:
    system = "Be brief."
    messages: Any = [{"role": "system", "content": system}, user(QUESTION)]
    completion = await client.chat.completions.create(model="m", messages=messages)
    assert completion.object == "chat.completion"
    assert completion.id.startswith("chatcmpl-")
    assert completion.model == "m"
    choice = completion.choices[0]
    assert choice.finish_reason == "stop"
    assert choice.message.role == "assistant"
    text = choice.message.content or ""
    # A full answer is tokens_per_answer (60) x full_answer_factor (3) words, ending a sentence.
    assert len(text.split()) == 180
    assert text.endswith(".")
    assert completion.usage is not None
    assert completion.usage.completion_tokens == 180
    assert completion.usage.prompt_tokens == len(system.split()) + len(QUESTION.split())
    assert completion.usage.total_tokens == completion.usage.prompt_tokens + 180


async def test_stream_one_token_per_chunk_with_usage(client: openai.AsyncOpenAI) -> None:
    messages: Any = [user(QUESTION)]
    stream = await client.chat.completions.create(
        model="m", messages=messages, stream=True, stream_options={"include_usage": True}
    )
    pieces, chunks = await collect(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert len(pieces) == 180
    assert all(len(p.split()) == 1 for p in pieces)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 180
    # Deterministic: the same request without streaming gives the same text.
    completion = await client.chat.completions.create(model="m", messages=messages)
    assert "".join(pieces) == completion.choices[0].message.content


async def test_stream_without_include_usage_has_no_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=[user(QUESTION)], stream=True, extra_body={"sot_test": {"tokens": 5}}
    )
    pieces, chunks = await collect(stream)
    assert len(pieces) == 5
    assert all(getattr(c, "usage", None) is None for c in chunks)


async def test_skeleton_request_gives_numbered_list(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="m", messages=[user(SKELETON_PROMPT)])
    lines = (completion.choices[0].message.content or "").split("\n")
    assert len(lines) == 5
    for i, line in enumerate(lines, start=1):
        assert re.fullmatch(rf"{i}\. Point \w+ about [\w' -]+", line), line
    assert lines[0] == "1. Point one about website"
    # The number of points is an option, also per request.
    completion = await client.chat.completions.create(
        model="m", messages=[user(SKELETON_PROMPT)], extra_body={"sot_test": {"points": 3}}
    )
    assert (completion.choices[0].message.content or "").count("\n") == 2


async def test_skeleton_continues_the_prefill(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(
        model="m",
        messages=[user(SKELETON_PROMPT), assistant("1.")],
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    text = completion.choices[0].message.content or ""
    assert text.startswith(" Point one about")
    assert ("1." + text).split("\n")[1].startswith("2. Point two")


async def test_point_expansion_continues_without_repeating(client: openai.AsyncOpenAI, upstream: str) -> None:
    completion = await client.chat.completions.create(
        model="m", messages=[user(POINT_PROMPT), assistant("2. Compress images")]
    )
    text = completion.choices[0].message.content or ""
    assert len(text.split()) == 60
    assert text.startswith(" ") and "Compress images" not in text
    # Without a prefill, "point 2" alone marks a point expansion (not a skeleton, despite the word).
    await client.chat.completions.create(model="m", messages=[user(POINT_PROMPT)])
    stats = await async_get_stats(upstream)
    assert [r["kind"] for r in stats["requests"]] == ["point", "point"]


async def test_max_tokens_gives_length(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="m", messages=[user(QUESTION)], max_tokens=5)
    assert completion.choices[0].finish_reason == "length"
    assert len((completion.choices[0].message.content or "").split()) == 5
    assert completion.usage is not None and completion.usage.completion_tokens == 5
    stream = await client.chat.completions.create(
        model="m", messages=[user(QUESTION)], max_completion_tokens=7, stream=True
    )
    pieces, chunks = await collect(stream)
    assert len(pieces) == 7
    assert chunks[-1].choices[0].finish_reason == "length"
    # A cap the answer does not reach changes nothing.
    completion = await client.chat.completions.create(
        model="m", messages=[user(QUESTION)], max_tokens=50, extra_body={"sot_test": {"tokens": 10}}
    )
    assert completion.choices[0].finish_reason == "stop"


async def test_stop_string_ends_the_answer(client: openai.AsyncOpenAI) -> None:
    completion = await client.chat.completions.create(model="m", messages=[user(SKELETON_PROMPT)], stop=["\n3."])
    assert completion.choices[0].finish_reason == "stop"
    assert (completion.choices[0].message.content or "").split("\n") == [
        "1. Point one about website",
        "2. Point two about load",
    ]


async def test_unknown_fields_are_ignored_and_recorded(client: openai.AsyncOpenAI, upstream: str) -> None:
    completion = await client.chat.completions.create(
        model="m",
        messages=[user(QUESTION)],
        temperature=0.0,
        extra_body={"prompt_cache_key": "abc", "repeat_penalty": 1.1, "whatever": {"x": 1}},
    )
    assert completion.choices[0].finish_reason == "stop"
    (record,) = (await async_get_stats(upstream))["requests"]
    assert record["prompt_cache_key"] == "abc"
    assert record["status"] == "finished"


async def test_bad_sot_test_field_is_a_400(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError):
        await client.chat.completions.create(
            model="m", messages=[user(QUESTION)], extra_body={"sot_test": {"tokenz": 3}}
        )


# --- faults ------------------------------------------------------------------------------------------------

STATUS_FAULTS = [
    ("429", openai.RateLimitError),
    ("500", openai.InternalServerError),
    ("401", openai.AuthenticationError),
    ("503", openai.InternalServerError),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("fault", "error"), STATUS_FAULTS)
async def test_status_faults(
    client: openai.AsyncOpenAI, fault: str, error: type[openai.APIStatusError], stream: bool
) -> None:
    with pytest.raises(error) as caught:
        await client.chat.completions.create(
            model="m", messages=[user(QUESTION)], stream=stream, extra_body={"sot_test": {"fault": fault}}
        )
    assert caught.value.status_code == int(fault)
    body = caught.value.body
    assert isinstance(body, dict) and body["message"] and body["type"]
    if fault == "429":
        assert caught.value.response.headers["retry-after"] == "1"


async def test_fault_by_header(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError):
        await client.chat.completions.create(
            model="m", messages=[user(QUESTION)], extra_headers={"X-Test-Fault": "429"}
        )
    # The body's choice wins over the header's.
    completion = await client.chat.completions.create(
        model="m",
        messages=[user(QUESTION)],
        extra_headers={"X-Test-Fault": "500"},
        extra_body={"sot_test": {"fault": "none", "tokens": 3}},
    )
    assert completion.choices[0].message.content == "Website matters because."


async def test_cut_ends_the_stream_without_finish_reason(client: openai.AsyncOpenAI, upstream: str) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=[user(QUESTION)], stream=True, extra_body={"sot_test": {"fault": "cut"}}
    )
    pieces, chunks = await collect(stream)
    assert len(pieces) == 3
    assert all(c.choices[0].finish_reason is None for c in chunks)
    # Non-stream: the partial answer with no finish reason.
    completion = await client.chat.completions.create(
        model="m", messages=[user(QUESTION)], extra_body={"sot_test": {"fault": "cut", "fault_after": 2}}
    )
    assert completion.choices[0].finish_reason is None
    assert len((completion.choices[0].message.content or "").split()) == 2
    stats = await async_get_stats(upstream)
    assert stats["faulted"] == 2 and stats["finished"] == 2


async def test_error_mid_stream_raises(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=[user(QUESTION)], stream=True, extra_body={"sot_test": {"fault": "error-mid-stream"}}
    )
    pieces: list[str] = []
    with pytest.raises(openai.APIError) as caught:
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
    assert len([p for p in pieces if p]) == 3
    assert "simulated" in caught.value.message
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="m", messages=[user(QUESTION)], extra_body={"sot_test": {"fault": "error-mid-stream"}}
        )


async def test_stall_times_out_the_client_and_counts_as_cancelled(upstream: str) -> None:
    async with openai.AsyncOpenAI(base_url=upstream, api_key="test", max_retries=0, timeout=0.5) as client:
        stream = await client.chat.completions.create(
            model="m", messages=[user(QUESTION)], stream=True, extra_body={"sot_test": {"fault": "stall"}}
        )
        with pytest.raises(openai.APITimeoutError):
            await collect(stream)
        with pytest.raises(openai.APITimeoutError):
            await client.chat.completions.create(
                model="m", messages=[user(QUESTION)], extra_body={"sot_test": {"fault": "stall"}}
            )
    stats = await async_wait_for_stats(upstream, lambda s: s["cancelled"] == 2 and s["active"] == 0)
    assert [r["status"] for r in stats["requests"]] == ["cancelled", "cancelled"]
    assert all(r["ended_at"] - r["started_at"] < 2 for r in stats["requests"])


async def test_server_wide_fault_first(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(ttft=0.01, tokens_per_second=0, fault="429", fault_first=2)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0) as client:
        for _ in range(2):
            with pytest.raises(openai.RateLimitError):
                await client.chat.completions.create(model="m", messages=[user(QUESTION)])
        completion = await client.chat.completions.create(model="m", messages=[user(QUESTION)])
    assert completion.choices[0].finish_reason == "stop"
    stats = await async_get_stats(base_url)
    assert [r["http_status"] for r in stats["requests"]] == [429, 429, 200]


async def test_fault_rate_applies_to_a_fraction(client: openai.AsyncOpenAI) -> None:
    async def one() -> bool:
        try:
            await client.chat.completions.create(
                model="m",
                messages=[user(QUESTION)],
                extra_body={"sot_test": {"fault": "500", "fault_rate": 0.5, "tokens": 1}},
            )
        except openai.InternalServerError:
            return False
        return True

    outcomes = await asyncio.gather(*(one() for _ in range(40)))
    assert 5 <= sum(outcomes) <= 35


# --- timing and cancellation -------------------------------------------------------------------------------


async def test_ttft_is_honoured(client: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    stream = await client.chat.completions.create(
        model="m", messages=[user(QUESTION)], stream=True, extra_body={"sot_test": {"ttft": 0.3, "tokens": 2}}
    )
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            assert time.monotonic() - started >= 0.28
            break
    await stream.close()


async def test_concurrent_requests_do_not_slow_each_other(client: openai.AsyncOpenAI, upstream: str) -> None:
    # Each request: 0.05 s to the first token, then 24 more at 50/s, about 0.53 s.
    options = {"sot_test": {"ttft": 0.05, "tokens": 25, "tokens_per_second": 50}}

    async def one() -> int:
        stream = await client.chat.completions.create(
            model="m", messages=[user(QUESTION)], stream=True, extra_body=options
        )
        pieces, _ = await collect(stream)
        return len(pieces)

    started = time.monotonic()
    counts = await asyncio.gather(*(one() for _ in range(8)))
    elapsed = time.monotonic() - started
    assert counts == [25] * 8
    assert 0.5 <= elapsed < 2.0, elapsed  # sequential would take over 4 s
    stats = await async_get_stats(upstream)
    assert stats["max_active"] == 8 and stats["finished"] == 8


async def test_closing_a_stream_early_is_counted_as_cancelled(client: openai.AsyncOpenAI, upstream: str) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=[user(QUESTION)],
        stream=True,
        extra_body={"sot_test": {"tokens": 500, "tokens_per_second": 100}},
    )
    received = 0
    async for chunk in stream:
        received += bool(chunk.choices and chunk.choices[0].delta.content)
        if received == 3:
            break
    await stream.close()
    closed_at = time.time()
    stats = await async_wait_for_stats(upstream, lambda s: s["cancelled"] == 1 and s["active"] == 0)
    (record,) = stats["requests"]
    assert record["status"] == "cancelled"
    assert record["ended_at"] - closed_at < 1
    assert record["completion_tokens"] < 100


# --- in-process units --------------------------------------------------------------------------------------


def test_classify_sot_prompts() -> None:
    def kind(*messages: tuple[str, str]) -> str:
        return classify([_Msg(role, content) for role, content in messages])

    assert kind(("user", SKELETON_PROMPT)) == "skeleton"
    assert kind(("user", SKELETON_PROMPT), ("assistant", "1.")) == "skeleton"
    assert kind(("system", "Write an outline."), ("user", QUESTION)) == "skeleton"
    assert kind(("user", POINT_PROMPT)) == "point"
    assert kind(("user", "the skeleton was given"), ("assistant", "3. Use caching")) == "point"
    assert kind(("user", "Expand this point: caching")) == "point"
    assert kind(("user", QUESTION), ("assistant", "Well,")) == "point"
    assert kind(("user", QUESTION)) == "full"


def test_plan_answer_is_deterministic_and_capped() -> None:
    options = UpstreamOptions(tokens_per_answer=10)
    messages = [_Msg("user", QUESTION)]
    first = plan_answer(messages, options)
    assert first == plan_answer(messages, options)
    assert first.kind == "full" and len(first.tokens) == 30 and first.finish_reason == "stop"
    capped = plan_answer(messages, options, max_tokens=4)
    assert capped.tokens == first.tokens[:4] and capped.finish_reason == "length"


def test_cli_rejects_unknown_fault() -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--fault", "explode"])
    args = build_parser().parse_args(["--fault", "error-mid-stream", "--fault-rate", "0.25", "--port", "0"])
    assert args.fault == "error-mid-stream" and args.fault_rate == 0.25
