"""The test upstream (`sot.testing.upstream`) as a real process, driven by the official openai client."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import openai
import pytest

from sot.testing.process import cli_flags
from sot.testing.upstream import (
    Msg,
    Plan,
    RequestRecord,
    UpstreamOptions,
    build_parser,
    classify,
    jittered_length,
    options_from_args,
    plan_answer,
)
from sot.testing.upstream_reply import Reply, stream_reply, tokens_due
from sot.testing.upstream_wire import ChunkEncoder
from upstream_helpers import async_get_requests, async_get_stats, async_wait_for_stats

try:  # the SDK's own HTTP client: httpx2 with openai>=3, httpx before
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

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


def request_body(fault: str | None = None, *, stream: bool = True, **sot_test: Any) -> dict[str, Any]:
    """A raw chat completion request body for QUESTION."""
    options = {"fault": fault, **sot_test} if fault else sot_test
    return {"model": "m", "messages": [user(QUESTION)], "stream": stream, "sot_test": options}


async def raw_post(base_url: str, body: dict[str, Any], **kwargs: Any) -> Any:
    """POST a chat completion with the SDK's HTTP client, without the SDK; the whole response."""
    async with httpx.AsyncClient(timeout=5, trust_env=False) as http:
        return await http.post(base_url + "/chat/completions", json=body, **kwargs)


def sse_events(body: bytes) -> list[str]:
    """The data of each SSE event, in order."""
    assert body.endswith(b"\n\n"), body[-80:]
    return [event.decode().removeprefix("data: ") for event in body.split(b"\n\n") if event]


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


# --- faults a broken upstream or proxy produces --------------------------------------------------------------


async def test_malformed_json_ends_the_stream(client: openai.AsyncOpenAI, upstream: str) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=[user(QUESTION)],
        stream=True,
        extra_body={"sot_test": {"fault": "malformed-json", "fault_after": 4}},
    )
    pieces: list[str] = []
    with pytest.raises(ValueError):  # the SDK's json.JSONDecodeError
        async for chunk in stream:
            pieces.append(chunk.choices[0].delta.content or "")
    assert len([p for p in pieces if p]) == 4
    response = await raw_post(upstream, request_body("malformed-json"))
    events = sse_events(response.content)
    assert response.status_code == 200
    assert len(events) == 1 + 3 + 1  # role chunk, fault_after tokens, the broken line
    assert events[-1] == "{not json" and "[DONE]" not in events
    response = await raw_post(upstream, request_body("malformed-json", stream=False))
    assert response.status_code == 200 and response.content == b"{not json"
    stats = await async_get_stats(upstream)
    assert [r["outcome"] for r in stats["requests"]] == ["faulted"] * 3
    assert [r["completion_tokens"] for r in stats["requests"]] == [4, 3, 0]


async def test_malformed_shape_sends_a_chunk_without_choices(client: openai.AsyncOpenAI, upstream: str) -> None:
    stream = await client.chat.completions.create(
        model="m", messages=[user(QUESTION)], stream=True, extra_body={"sot_test": {"fault": "malformed-shape"}}
    )
    chunks = [chunk async for chunk in stream]
    # The SDK does not validate: the broken chunk reaches the caller, and the stream ends normally.
    assert chunks[-1].choices == "x"
    assert [c.choices[0].delta.content for c in chunks[1:-1]] == ["Website ", "matters ", "because "]
    response = await raw_post(upstream, request_body("malformed-shape"))
    events = sse_events(response.content)
    assert events[-2:] == ['{"choices":"x"}', "[DONE]"]
    assert [json.loads(e)["choices"][0]["finish_reason"] for e in events[:-2]] == [None] * 4
    response = await raw_post(upstream, request_body("malformed-shape", stream=False))
    assert response.status_code == 200 and response.json() == {"choices": "x"}


async def test_stall_mid_sends_some_tokens_then_nothing(upstream: str) -> None:
    async with openai.AsyncOpenAI(base_url=upstream, api_key="test", max_retries=0, timeout=0.5) as client:
        stream = await client.chat.completions.create(
            model="m",
            messages=[user(QUESTION)],
            stream=True,
            extra_body={"sot_test": {"fault": "stall-mid", "fault_after": 2}},
        )
        pieces: list[str] = []
        with pytest.raises(openai.APITimeoutError):
            async for chunk in stream:
                pieces.append(chunk.choices[0].delta.content or "")
    assert [p for p in pieces if p] == ["Website ", "matters "]
    # Not streamed: the headers arrive, the body never does.
    async with httpx.AsyncClient(timeout=httpx.Timeout(5, read=0.5), trust_env=False) as http:
        body = request_body("stall-mid", stream=False)
        async with http.stream("POST", upstream + "/chat/completions", json=body) as response:
            assert response.status_code == 200
            with pytest.raises(httpx.ReadTimeout):
                await response.aread()
    stats = await async_wait_for_stats(upstream, lambda s: s["cancelled"] == 2 and s["active"] == 0)
    assert [(r["fault"], r["outcome"], r["completion_tokens"]) for r in stats["requests"]] == [
        ("stall-mid", "cancelled", 2),
        ("stall-mid", "cancelled", 0),
    ]


async def test_empty_stream_sends_only_done(client: openai.AsyncOpenAI, upstream: str) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=[user(QUESTION)],
        stream=True,
        stream_options={"include_usage": True},
        extra_headers={"X-Test-Fault": "empty"},
    )
    assert [chunk async for chunk in stream] == []
    response = await raw_post(upstream, request_body("empty"))
    assert response.status_code == 200 and response.content == b"data: [DONE]\n\n"
    completion = await client.chat.completions.create(
        model="m", messages=[user(QUESTION)], extra_body={"sot_test": {"fault": "empty"}}
    )
    assert completion.choices == []
    stats = await async_get_stats(upstream)
    assert [(r["fault"], r["completion_tokens"]) for r in stats["requests"]] == [("empty", 0)] * 3


async def test_no_finish_ends_with_done_but_no_finish_reason(client: openai.AsyncOpenAI, upstream: str) -> None:
    stream = await client.chat.completions.create(
        model="m",
        messages=[user(QUESTION)],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"sot_test": {"fault": "no-finish", "tokens": 8}},
    )
    pieces, chunks = await collect(stream)
    assert len(pieces) == 8
    assert all(c.choices[0].finish_reason is None for c in chunks if c.choices)
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    response = await raw_post(upstream, request_body("no-finish", tokens=8))
    events = sse_events(response.content)
    assert events[-1] == "[DONE]" and len(events) == 1 + 8 + 1
    assert all(json.loads(e)["choices"][0]["finish_reason"] is None for e in events[:-1])
    # Unlike `cut`, which ends without [DONE].
    cut = sse_events((await raw_post(upstream, request_body("cut", tokens=8))).content)
    assert "[DONE]" not in cut and len(cut) == 1 + 3
    completion = await client.chat.completions.create(
        model="m", messages=[user(QUESTION)], extra_body={"sot_test": {"fault": "no-finish", "tokens": 8}}
    )
    assert completion.choices[0].finish_reason is None
    assert len((completion.choices[0].message.content or "").split()) == 8


async def test_slow_headers_wait_for_the_first_token(client: openai.AsyncOpenAI, upstream: str) -> None:
    async def timings(fault: str) -> tuple[float, float, int]:
        started = time.monotonic()
        stream = await client.chat.completions.create(
            model="m",
            messages=[user(QUESTION)],
            stream=True,
            extra_body={"sot_test": {"fault": fault, "ttft": 0.6, "tokens": 3}},
        )
        headers_at = time.monotonic() - started  # the SDK returns a stream once the headers are in
        first_at = 0.0
        pieces = 0
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first_at = first_at or time.monotonic() - started
                pieces += 1
        return headers_at, first_at, pieces

    headers_at, first_at, pieces = await timings("none")
    assert headers_at < 0.3 and first_at >= 0.58 and pieces == 3
    headers_at, first_at, pieces = await timings("slow-headers")
    assert headers_at >= 0.58 and first_at >= 0.58 and pieces == 3
    stats = await async_get_stats(upstream)
    assert [r["outcome"] for r in stats["requests"]] == ["completed", "faulted"]


async def test_server_wide_new_fault(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(ttft=0.01, tokens_per_second=0, fault="no-finish", fault_first=1)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0) as client:
        finishes = [
            (await client.chat.completions.create(model="m", messages=[user(QUESTION)])).choices[0].finish_reason
            for _ in range(2)
        ]
    assert finishes == [None, "stop"]
    stats = await async_get_stats(base_url)
    assert [r["fault"] for r in stats["requests"]] == ["no-finish", None]


async def test_retry_after_allows_fractions(client: openai.AsyncOpenAI, upstream_factory: Callable[..., str]) -> None:
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(
            model="m", messages=[user(QUESTION)], extra_body={"sot_test": {"fault": "429", "retry_after": 0.5}}
        )
    assert caught.value.response.headers["retry-after"] == "0.5"
    # Server-wide; the SDK honours it before retrying, and /stats shows when each attempt arrived.
    base_url = upstream_factory(ttft=0.01, tokens_per_second=0, fault="429", fault_first=1, retry_after=0.75)
    async with openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=1) as retrying:
        completion = await retrying.chat.completions.create(model="m", messages=[user(QUESTION)])
    assert completion.choices[0].finish_reason == "stop"
    first, second = (await async_get_stats(base_url))["requests"]
    assert (first["http_status"], first["outcome"]) == (429, "faulted")
    assert (second["http_status"], second["outcome"]) == (200, "completed")
    assert 0.7 <= second["started_monotonic"] - first["ended_monotonic"] < 2


# --- /stats records ----------------------------------------------------------------------------------------


async def test_stats_records_times_headers_and_outcomes(client: openai.AsyncOpenAI, upstream: str) -> None:
    before, wall_before = time.monotonic(), time.time()
    await client.chat.completions.create(
        model="m",
        messages=[user(QUESTION)],
        extra_headers={"X-SoT-Session": "s-1", "X-Request-ID": "r-1"},
        extra_body={"prompt_cache_key": "k-1", "user": "alice", "sot_test": {"tokens": 4, "ttft": 0.05}},
    )
    after, wall_after = time.monotonic(), time.time()
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="m", messages=[user(SKELETON_PROMPT)], stream=True, extra_headers={"X-Test-Fault": "500"}
        )
    ok, failed = (await async_get_stats(upstream))["requests"]
    # time.monotonic() is one clock for all processes of the machine (Linux), so it brackets the server's.
    assert before <= ok["started_monotonic"] < ok["first_token_monotonic"] <= ok["ended_monotonic"] <= after
    assert ok["first_token_monotonic"] - ok["started_monotonic"] >= 0.04
    assert wall_before <= ok["started_at"] <= ok["first_token_at"] <= ok["ended_at"] <= wall_after
    assert ok["headers"] == {"x-sot-session": "s-1", "x-request-id": "r-1"}
    assert (ok["prompt_cache_key"], ok["user"]) == ("k-1", "alice")
    assert (ok["kind"], ok["fault"], ok["http_status"], ok["status"], ok["outcome"]) == (
        "full",
        None,
        200,
        "finished",
        "completed",
    )
    assert ok["completion_tokens"] == ok["planned_tokens"] == 4 and ok["finish_reason"] == "stop"
    assert (failed["kind"], failed["fault"], failed["http_status"], failed["outcome"]) == (
        "skeleton",
        "500",
        500,
        "faulted",
    )
    assert failed["headers"] == {} and failed["user"] is None and failed["completion_tokens"] == 0
    assert ok["started_monotonic"] < failed["started_monotonic"] and failed["ended_monotonic"] is not None
    assert await async_get_requests(upstream, outcome="faulted") == [failed]
    assert await async_get_requests(upstream, kind="full", user="alice") == [ok]


async def test_record_headers_option(upstream_factory: Callable[..., str]) -> None:
    base_url = upstream_factory(ttft=0.01, tokens_per_second=0, record_headers=["X-Tenant", "X-Stainless-Retry-Count"])
    async with openai.AsyncOpenAI(base_url=base_url, api_key="test", max_retries=0) as client:
        await client.chat.completions.create(
            model="m", messages=[user(QUESTION)], extra_headers={"X-Tenant": "t-1", "X-SoT-Session": "s-1"}
        )
    (record,) = (await async_get_stats(base_url))["requests"]
    assert record["headers"] == {"x-sot-session": "s-1", "x-tenant": "t-1", "x-stainless-retry-count": "0"}


# --- answer lengths ----------------------------------------------------------------------------------------


async def test_tokens_jitter_varies_lengths_deterministically(client: openai.AsyncOpenAI) -> None:
    questions = [f"How do I speed up build number {i}?" for i in range(12)]

    async def length(question: str, **options: Any) -> int:
        completion = await client.chat.completions.create(
            model="m", messages=[user(question)], extra_body={"sot_test": {"tokens_jitter": 0.5, **options}}
        )
        assert completion.usage is not None
        return completion.usage.completion_tokens

    lengths = await asyncio.gather(*(length(q) for q in questions))
    assert len(set(lengths)) > 4
    assert all(90 <= n <= 270 for n in lengths)  # a full answer, 180 tokens +- 50%
    # The same request gets the same length, again and when planned in this (another) process.
    assert await asyncio.gather(*(length(q) for q in questions)) == lengths
    planned = [len(plan_answer([Msg("user", q)], UpstreamOptions(tokens_jitter=0.5)).tokens) for q in questions]
    assert planned == lengths
    # An exact length is exact.
    assert await length(questions[0], tokens=7) == 7


def test_jittered_length_is_deterministic_and_bounded() -> None:
    def lengths(seed: int, jitter: float = 0.3) -> list[int]:
        return [jittered_length(100, jitter, seed, [Msg("user", f"Question {i}?")]) for i in range(300)]

    first = lengths(7)
    assert first == lengths(7)
    assert first != lengths(8)
    assert all(70 <= n <= 130 for n in first)
    assert min(first) < 75 and max(first) > 125  # spread over the whole range
    assert lengths(7, jitter=0.0) == [100] * 300
    assert min(jittered_length(1, 1.0, s, [Msg("user", "q")]) for s in range(50)) == 1
    options = UpstreamOptions(tokens_per_answer=10, tokens_jitter=0.5, seed=3)
    plan = plan_answer([Msg("user", QUESTION)], options)
    assert len(plan.tokens) == jittered_length(30, 0.5, 3, [Msg("user", QUESTION)])
    assert len(plan_answer([Msg("user", QUESTION)], options, tokens=12).tokens) == 12


# --- wire format and pacing --------------------------------------------------------------------------------


def test_chunk_encoder_writes_openai_chunks() -> None:
    encoder = ChunkEncoder("chatcmpl-1", 123, 'model "x"', include_usage=True)

    def events(data: bytes) -> list[Any]:
        return [json.loads(event) for event in sse_events(data)]

    head = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 123,
        "model": 'model "x"',
        "system_fingerprint": "fp_sot_test",
    }

    def chunk(delta: dict[str, str], finish_reason: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        return {**head, "choices": [choice], "usage": None}

    assert events(encoder.role()) == [chunk({"role": "assistant", "content": ""})]
    texts = ['say "hi"\n', "café\\ ", "</script>"]
    assert events(encoder.tokens(texts)) == [chunk({"content": t}) for t in texts]
    assert encoder.tokens([]) == b""
    assert events(encoder.finish("length")) == [chunk({}, "length")]
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert events(encoder.usage(3, 4)) == [{**head, "choices": [], "usage": usage}]
    assert b"usage" not in ChunkEncoder("i", 1, "m", include_usage=False).tokens(["a"])


def test_tokens_due_counts_from_absolute_deadlines() -> None:
    assert tokens_due(0.0, 40, 0, 300) == 1
    assert tokens_due(0.0249999, 40, 1, 300) == 2  # woken a hair before token 1's deadline: still sent
    assert tokens_due(0.26, 40, 1, 300) == 11  # 0.235 s late: tokens 1 to 10 are overdue and go together
    assert tokens_due(100.0, 40, 1, 300) == 300
    assert tokens_due(0.0, 0, 0, 300) == 300  # no rate: everything at once


async def test_a_slow_send_does_not_delay_later_tokens() -> None:
    loop = asyncio.get_running_loop()
    record = RequestRecord(
        id="chatcmpl-x",
        index=0,
        kind="point",
        stream=True,
        fault=None,
        model="m",
        max_tokens=None,
        prompt_tokens=1,
        prompt_cache_key=None,
        last_user="",
        started_at=time.time(),
    )
    reply = Reply(
        record=record,
        plan=Plan("point", [f"w{i} " for i in range(40)], "stop"),
        fault=None,
        options=UpstreamOptions(ttft=0.02, tokens_per_second=100),
        model="m",
        include_usage=False,
        arrived=loop.time(),
        created=0,
    )
    sends: list[tuple[float, int]] = []

    async def send(message: Any) -> None:
        sends.append((loop.time() - reply.arrived, message.get("body", b"").count(b'"content":"w')))
        if len(sends) == 5:
            await asyncio.sleep(0.3)  # the event loop was busy elsewhere for 30 token intervals

    await stream_reply(reply, send)
    assert sum(n for _, n in sends) == 40 == record.completion_tokens
    assert max(n for _, n in sends) >= 20  # the overdue tokens went out together
    last = max(t for t, n in sends if n)
    # The last token is due at 0.02 + 39 / 100 = 0.41 s, stall or not (relative sleeps would add 0.3 s).
    assert 0.40 <= last < 0.65


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
    assert record["status"] == record["outcome"] == "cancelled"
    assert record["ended_at"] - closed_at < 1
    assert 3 <= record["completion_tokens"] < 100


# --- in-process units --------------------------------------------------------------------------------------


def test_classify_sot_prompts() -> None:
    def kind(*messages: tuple[str, str]) -> str:
        return classify([Msg(role, content) for role, content in messages])

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
    messages = [Msg("user", QUESTION)]
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


def test_cli_new_options() -> None:
    args = build_parser().parse_args(
        [
            "--retry-after",
            "0.5",
            "--tokens-jitter",
            "0.2",
            "--record-headers",
            "X-Tenant, X-Other",
            "--fault",
            "stall-mid",
        ]
    )
    options = options_from_args(args)
    assert (options.retry_after, options.tokens_jitter, options.fault) == (0.5, 0.2, "stall-mid")
    assert options.record_headers == ("x-tenant", "x-other")
    for fault in ("malformed-json", "malformed-shape", "empty", "no-finish", "slow-headers", "503"):
        assert build_parser().parse_args(["--fault", fault]).fault == fault
    assert options_from_args(build_parser().parse_args(["--retry-after", "2"])).retry_after == 2
    for bad in (["--tokens-jitter", "1.5"], ["--retry-after", "-1"]):
        with pytest.raises(SystemExit):
            build_parser().parse_args(bad)
    assert cli_flags({"record_headers": ["X-A", "X-B"], "retry_after": 0.5}) == [
        "--record-headers",
        "X-A,X-B",
        "--retry-after",
        "0.5",
    ]
