"""`sot serve` as a real process, used through the official `openai` client: answers in each mode, streamed and
not, usage, mode selection, errors and limits, upstream failures, overload, and cancellation on disconnect.

The fast tests run against `--backend scripted`; everything that involves an upstream runs against the real
test upstream process (`sot.testing.upstream`), whose /stats show which requests started, finished or were
cancelled. All processes start at once, in parallel, for the whole module.
"""

from __future__ import annotations

import asyncio
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionMessageParam

from sot.testing.process import ServiceProcess, free_port, serve_command, upstream_command
from upstream_helpers import async_wait_for_stats, get_stats, reset_stats, wait_for_stats

KEY = "test-server-key"
FAST_UPSTREAM: dict[str, Any] = {"ttft": 0.01, "tokens_per_second": 2000}
# Points take 5 s: long enough to disconnect in the middle of them.
SLOW_UPSTREAM: dict[str, Any] = {"ttft": 0.05, "tokens_per_second": 40, "tokens_per_answer": 200}
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))

# What the scripted backend answers (see sot.backends.scripted.default_responder).
SCRIPTED_SOT = "\n".join(
    f"{i}. {p} idea: A short explanation of this point." for i, p in enumerate(("First", "Second", "Third"), 1)
)
SCRIPTED_NORMAL = "A plain answer in a few words."
QUESTION: list[ChatCompletionMessageParam] = [{"role": "user", "content": "What are some tips for staying healthy?"}]


@dataclass
class Fleet:
    """Base URLs ("http://127.0.0.1:PORT/v1") of every process of the module."""

    scripted: str  # scripted backend, API key, small limits
    fast: str  # in front of a fast upstream
    fast_upstream: str
    slow: str  # in front of a slow upstream, --max-concurrency 2
    slow_upstream: str
    auth_failing: str  # upstream answers 401
    rate_limited: str  # upstream answers 429
    mid_stream: str  # upstream breaks streams with an error object after 3 tokens
    unreachable: str  # nothing listens at its upstream's address


@pytest.fixture(scope="module")
def fleet() -> Iterator[Fleet]:
    ports = {name: free_port() for name in ("fast", "slow", "401", "429", "mid", "nothing")}
    upstream_url = {name: f"http://127.0.0.1:{port}/v1" for name, port in ports.items()}

    def front(name: str, **options: Any) -> list[str]:
        return serve_command(backend="openai", base_url=upstream_url[name], model="test", **options)

    commands = {
        "fast_upstream": upstream_command(ports["fast"], **FAST_UPSTREAM),
        "slow_upstream": upstream_command(ports["slow"], **SLOW_UPSTREAM),
        "401": upstream_command(ports["401"], fault="401", **FAST_UPSTREAM),
        "429": upstream_command(ports["429"], fault="429", retry_after=1, **FAST_UPSTREAM),
        "mid": upstream_command(ports["mid"], fault="error-mid-stream", fault_after=3, **FAST_UPSTREAM),
        "scripted": serve_command(
            backend="scripted",
            server_api_key=KEY,
            max_messages=8,
            max_question_chars=4000,
            max_tokens_limit=1000,
            max_body_bytes=20_000,
            scripted_token_delay=0.001,
        ),
        "fast": front("fast"),
        "slow": front("slow", max_concurrency=2),
        "auth_failing": front("401"),
        "rate_limited": front("429"),
        "mid_stream": front("mid"),
        "unreachable": front("nothing"),
    }
    processes = {name: ServiceProcess(command, name=name).launch() for name, command in commands.items()}
    try:
        urls = {name: process.wait_ready() for name, process in processes.items()}
        served = {name: url.rstrip("/") + ("" if url.endswith("/v1") else "/v1") for name, url in urls.items()}
        yield Fleet(
            scripted=served["scripted"],
            fast=served["fast"],
            fast_upstream=served["fast_upstream"],
            slow=served["slow"],
            slow_upstream=served["slow_upstream"],
            auth_failing=served["auth_failing"],
            rate_limited=served["rate_limited"],
            mid_stream=served["mid_stream"],
            unreachable=served["unreachable"],
        )
    finally:
        for process in processes.values():
            process.terminate()
        for process in processes.values():
            process.stop()


def client(base_url: str, **options: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=options.pop("api_key", KEY), max_retries=0, **options)


def aclient(base_url: str, **options: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=base_url, api_key=options.pop("api_key", KEY), max_retries=0, **options)


def root(base_url: str) -> str:
    return base_url.removesuffix("/v1")


def http(
    method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """A raw request (no SDK): status, headers, body."""
    request = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with OPENER.open(request, timeout=30) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers), exc.read()


def collect_stream(stream: Any) -> tuple[str, list[Any]]:
    chunks = list(stream)
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    return content, chunks


# -- the scripted backend: the wire format -----------------------------------------------------------------


def test_health_page_and_static_files_are_open(fleet: Fleet) -> None:
    status, _, body = http("GET", root(fleet.scripted) + "/health")
    assert status == 200
    health = json.loads(body)
    assert health["backend"] == "scripted" and health["auth"] is True and health["default_mode"] == "sot"
    status, headers, body = http("GET", root(fleet.scripted) + "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert b"Skeleton-of-Thought" in body and b"/static/app.js" in body
    for name in ("app.js", "style.css"):
        assert http("GET", root(fleet.scripted) + "/static/" + name)[0] == 200


def test_models_are_listed_per_mode(fleet: Fleet) -> None:
    with client(fleet.scripted) as c:
        ids = [m.id for m in c.models.list().data]
        assert ids == ["scripted", "sot:scripted", "normal:scripted", "auto:scripted"]
        assert c.models.retrieve("normal:scripted").id == "normal:scripted"
        with pytest.raises(openai.NotFoundError) as error:
            c.models.retrieve("gpt-nothing")
    assert error.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("mode", "expected", "used"),
    [("sot", SCRIPTED_SOT, "sot"), ("normal", SCRIPTED_NORMAL, "normal"), ("auto", SCRIPTED_SOT, "sot")],
)
def test_answers_in_each_mode_streamed_and_not(fleet: Fleet, mode: str, expected: str, used: str) -> None:
    with client(fleet.scripted) as c:
        completion = c.chat.completions.create(model=f"{mode}:scripted", messages=QUESTION)
        stream = c.chat.completions.create(
            model=f"{mode}:scripted",
            messages=QUESTION,
            stream=True,
            stream_options={"include_usage": True},
        )
        content, chunks = collect_stream(stream)

    choice = completion.choices[0]
    assert choice.message.content == expected and choice.finish_reason == "stop"
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == f"{mode}:scripted"
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    sot = completion.to_dict()["sot"]  # the extra object standard clients ignore
    assert sot["mode_requested"] == mode and sot["mode_used"] == used
    assert len(sot["points"]) == (3 if used == "sot" else 0)

    # The stream carries the same text, in order, and ends the way clients expect.
    assert content == expected
    assert len({c.id for c in chunks}) == 1 and chunks[0].choices[0].delta.role == "assistant"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage == usage
    assert all(c.usage is None for c in chunks[:-1])
    if used == "sot":
        texts = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
        # Point 1 streams live: its number and text go out as soon as the skeleton is done, then its expansion.
        assert texts[0] == "1. First idea" and texts[1].startswith(":")
        assert len(texts) > 3  # token by token, not one chunk per point


def test_stream_without_usage_option_has_no_usage_chunk(fleet: Fleet) -> None:
    with client(fleet.scripted) as c:
        content, chunks = collect_stream(
            c.chat.completions.create(model="sot:scripted", messages=QUESTION, stream=True)
        )
    assert content == SCRIPTED_SOT
    assert all(c.choices for c in chunks) and all(c.usage is None for c in chunks)


def test_mode_choice_body_beats_header_beats_model_prefix(fleet: Fleet) -> None:
    with client(fleet.scripted) as c:

        def used(model: str, **extra: Any) -> tuple[str, str]:
            raw = c.chat.completions.with_raw_response.create(model=model, messages=QUESTION, **extra)
            return raw.parse().to_dict()["sot"]["mode_used"], raw.headers["x-sot-mode"]

        assert used("scripted") == ("sot", "sot")  # the server default
        assert used("normal:anything") == ("normal", "normal")
        assert used("normal") == ("normal", "normal")
        assert used("sot:scripted", extra_headers={"X-SoT-Mode": "normal"}) == ("normal", "normal")
        assert used("normal:scripted", extra_headers={"X-SoT-Mode": "normal"}, extra_body={"sot_mode": "sot"}) == (
            "sot",
            "sot",
        )
        with pytest.raises(openai.BadRequestError) as error:
            used("scripted", extra_headers={"X-SoT-Mode": "fastest"})
    assert error.value.body["code"] == "invalid_mode" and error.value.body["param"] == "X-SoT-Mode"


@pytest.mark.parametrize(
    ("options", "param"),
    [
        ({"n": 2}, "n"),
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"logprobs": True}, "logprobs"),
        ({"temperature": 3.5}, "temperature"),
        ({"max_tokens": 5000}, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
            "messages[0].content",
        ),
        ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "t"}]}, "messages[0]"),
        ({"messages": [*QUESTION, {"role": "assistant", "content": "Sure."}]}, "messages"),
        ({"messages": [{"role": "user", "content": "   "}]}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": QUESTION * 9}, "messages"),
        ({"messages": [{"role": "user", "content": "why? " * 900}]}, "messages"),
        ({"extra_body": {"sot_mode": "fast"}}, "sot_mode"),
        # Validation errors name the parameter by its JSON path.
        (
            {"messages": [*QUESTION, {"role": "assistant", "content": "Sure."}, {"role": "user", "content": 5}]},
            "messages[2].content",
        ),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}, "messages[0].content[0].text"),
        ({"stream_options": {"include_usage": "maybe"}, "stream": True}, "stream_options.include_usage"),
        ({"stop": ["a", 3]}, "stop[1]"),
        # An unknown mode is a 400 however it is given, the model's prefix included.
        ({"model": "fast:scripted"}, "model"),
        ({"model": "fast:scripted", "stream": True}, "model"),
    ],
)
def test_requests_the_server_cannot_honour_get_a_clear_400(fleet: Fleet, options: dict[str, Any], param: str) -> None:
    request: dict[str, Any] = {"model": "sot:scripted", "messages": QUESTION, **options}
    with client(fleet.scripted) as c, pytest.raises(openai.BadRequestError) as error:
        c.chat.completions.create(**request)
    assert error.value.status_code == 400
    body = error.value.body
    assert isinstance(body, dict) and body["param"] == param and body["message"].strip()
    assert body["type"] == "invalid_request_error"


def test_http_level_errors_are_error_objects(fleet: Fleet) -> None:
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    url = fleet.scripted + "/chat/completions"
    cases = [
        (http("POST", url, b"{not json", auth), 400, "invalid_value"),
        (
            http("POST", url, json.dumps({"messages": QUESTION, "pad": "x" * 30_000}).encode(), auth),
            413,
            "request_too_large",
        ),
        (http("GET", url, None, auth), 405, "method_not_allowed"),
        (http("GET", fleet.scripted + "/nothing-here", None, auth), 404, "not_found"),
    ]
    for (status, headers, body), expected_status, code in cases:
        assert status == expected_status, body
        assert headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert error["code"] == code and error["message"] and error["type"] == "invalid_request_error"
        assert error["param"] is None  # not a character offset into the body
    assert "could not parse the JSON body" in json.loads(cases[0][0][2])["error"]["message"]


def test_model_is_required(fleet: Fleet) -> None:
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    for body in ({"messages": QUESTION}, {"messages": QUESTION, "model": ""}):
        status, _, raw = http("POST", fleet.scripted + "/chat/completions", json.dumps(body).encode(), auth)
        error = json.loads(raw)["error"]
        assert status == 400 and error["param"] == "model" and error["type"] == "invalid_request_error"


@pytest.mark.parametrize("model", ["llama3:8b", "mistral:latest", "ft:gpt-4o-mini:acme::abc123", "org/model:v1"])
def test_model_names_with_a_colon_are_names_unless_the_prefix_is_a_word(fleet: Fleet, model: str) -> None:
    with client(fleet.scripted) as c:
        raw = c.chat.completions.with_raw_response.create(model=model, messages=QUESTION)
    completion = raw.parse()
    assert completion.model == model and raw.headers["x-sot-mode"] == "sot"  # the server's default mode


def test_api_key_is_required_on_v1_only(fleet: Fleet) -> None:
    with client(fleet.scripted, api_key="wrong") as c, pytest.raises(openai.AuthenticationError) as error:
        c.chat.completions.create(model="sot", messages=QUESTION)
    assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
    for method, path in (("GET", "/models"), ("POST", "/chat/completions"), ("POST", "/sot/stream")):
        status, headers, body = http(method, fleet.scripted + path, b"{}" if method == "POST" else None)
        assert status == 401 and headers["www-authenticate"] == "Bearer", (path, body)
        assert "Missing API key" in json.loads(body)["error"]["message"]
    assert http("GET", root(fleet.scripted) + "/health")[0] == 200


def read_sse(response: Any) -> Iterator[tuple[str, str]]:
    """(event, data) pairs of an SSE response read with urllib."""
    event, data = "message", []
    for raw in response:
        line = raw.decode().rstrip("\r\n")
        if not line:
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[6:].strip()
        elif line.startswith("data:"):
            data.append(line[5:].strip())


def sot_events(base_url: str, body: dict[str, Any], key: str = KEY) -> list[dict[str, Any]]:
    request = urllib.request.Request(
        base_url + "/sot/stream",
        data=json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with OPENER.open(request, timeout=30) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = []
        for name, data in read_sse(response):
            event = json.loads(data)
            assert event["type"] == name
            events.append(event)
        return events


def test_event_stream_sends_the_engines_own_events(fleet: Fleet) -> None:
    events = sot_events(fleet.scripted, {"question": QUESTION[0]["content"], "mode": "sot"})
    types = [e["type"] for e in events]
    assert types[0] == "run_started" and types[-1] == "done"
    assert types.index("skeleton_delta") < types.index("skeleton_done") < types.index("point_started")
    assert types.count("point_started") == 3 and types.count("point_done") == 3 and "point_delta" in types
    assert events[-1]["result"]["answer"] == SCRIPTED_SOT
    normal = sot_events(fleet.scripted, {"messages": QUESTION, "mode": "normal"})
    assert [e["type"] for e in normal][-1] == "done" and "answer_delta" in [e["type"] for e in normal]
    assert normal[-1]["result"]["answer"] == SCRIPTED_NORMAL


def test_opt_in_engine_events_inside_the_standard_stream(fleet: Fleet) -> None:
    with client(fleet.scripted) as c:
        content, chunks = collect_stream(
            c.chat.completions.create(
                model="sot:scripted",
                messages=QUESTION,
                stream=True,
                extra_body={"sot_events": True},
            )
        )
    assert content == SCRIPTED_SOT
    events = [c.to_dict()["sot_event"] for c in chunks if not c.choices]
    assert events[0]["type"] == "run_started" and events[-1]["type"] == "done"
    assert {"skeleton_done", "point_delta", "point_done"} <= {e["type"] for e in events}


# -- in front of a real upstream ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["sot", "normal"])
def test_answers_through_an_upstream(fleet: Fleet, mode: str) -> None:
    reset_stats(fleet.fast_upstream)
    with client(fleet.fast) as c:
        completion = c.chat.completions.create(model=f"{mode}:test", messages=QUESTION)
        content, chunks = collect_stream(
            c.chat.completions.create(
                model=f"{mode}:test",
                messages=QUESTION,
                stream=True,
                stream_options={"include_usage": True},
            )
        )
    answer = completion.choices[0].message.content
    assert answer and content == answer
    stats = get_stats(fleet.fast_upstream)
    # SoT: one skeleton request and one per point (the test upstream writes 5 points); normal: one request.
    assert stats["started"] == stats["finished"] == (12 if mode == "sot" else 2)
    if mode == "sot":
        lines = answer.split("\n")
        assert len(lines) == 5 and lines[0].startswith("1. Point one about")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0
    assert chunks[-1].usage == usage  # the same question costs the same, streamed or not


@pytest.mark.parametrize("mode", ["sot", "normal"])
def test_a_truncated_answer_finishes_with_length(fleet: Fleet, mode: str) -> None:
    with client(fleet.fast) as c:
        completion = c.chat.completions.create(model=f"{mode}:test", messages=QUESTION, max_tokens=5)
        _, chunks = collect_stream(
            c.chat.completions.create(model=f"{mode}:test", messages=QUESTION, max_tokens=5, stream=True)
        )
    assert completion.choices[0].finish_reason == "length"
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    # max_tokens bounds the whole answer in every mode: in SoT, the skeleton and all points together.
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= 5


@pytest.mark.parametrize("max_tokens", [30, 60, 120])
def test_max_tokens_bounds_the_completion_tokens_of_a_sot_answer(fleet: Fleet, max_tokens: int) -> None:
    with client(fleet.fast) as c:
        completion = c.chat.completions.create(model="sot:test", messages=QUESTION, max_tokens=max_tokens)
    assert completion.usage is not None and 0 < completion.usage.completion_tokens <= max_tokens
    assert completion.choices[0].finish_reason == "length"  # the test upstream's answers are longer than that
    if max_tokens >= 120:  # room for the skeleton and a share for every point: still a SoT answer
        assert completion.to_dict()["sot"]["mode_used"] == "sot"


def test_stop_sequences_cut_the_answer(fleet: Fleet) -> None:
    with client(fleet.fast) as c:
        full = c.chat.completions.create(model="normal:test", messages=QUESTION).choices[0].message.content
        assert full is not None and "works best" in full
        cut = c.chat.completions.create(model="normal:test", messages=QUESTION, stop=["works best"])
        streamed, _ = collect_stream(
            c.chat.completions.create(model="normal:test", messages=QUESTION, stop="works best", stream=True)
        )
    expected = full[: full.index("works best")].rstrip()  # an answer never ends in whitespace
    assert cut.choices[0].message.content == expected and cut.choices[0].finish_reason == "stop"
    assert streamed == expected
    # Not streamed, the engine runs to its end, and its count of the whole run is the usage.
    assert cut.usage is not None and cut.usage.completion_tokens > 0


def _cut_stream(base_url: str, model: str, stop: str) -> tuple[str, list[Any]]:
    with client(base_url) as c:
        return collect_stream(
            c.chat.completions.create(
                model=model, messages=QUESTION, stop=stop, stream=True, stream_options={"include_usage": True}
            )
        )


def test_a_client_stop_goes_upstream_in_normal_mode_which_stops_there_and_counts_what_it_sent(fleet: Fleet) -> None:
    with client(fleet.fast) as c:
        full = c.chat.completions.create(model="normal:test", messages=QUESTION).choices[0].message.content
    assert full is not None
    reset_stats(fleet.slow_upstream)
    content, chunks = _cut_stream(fleet.slow, "normal:test", "works best")
    assert content == full[: full.index("works best")].rstrip()
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    # The upstream stopped at the string itself (nothing generated past it, nothing cancelled), and the usage
    # is its own count of what it sent.
    stats = wait_for_stats(fleet.slow_upstream, lambda s: s["active"] == 0)
    assert stats["finished"] == 1 and stats["cancelled"] == 0
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == stats["requests"][-1]["completion_tokens"] > 0


def test_a_sot_stream_cut_at_a_stop_string_reports_no_usage_it_did_not_measure(fleet: Fleet) -> None:
    with client(fleet.slow) as c:
        full = c.chat.completions.create(model="sot:test", messages=QUESTION).choices[0].message.content
    assert full is not None
    second_point = full.split("\n")[1][:12]  # points are not the answer: the stop stays with the server
    assert second_point and full.index(second_point) > 0
    reset_stats(fleet.slow_upstream)
    content, chunks = _cut_stream(fleet.slow, "sot:test", second_point)
    assert content == full[: full.index(second_point)].rstrip()  # the same text as where the upstream stops
    # The stop string ended the answer before the points' requests did: the run was cancelled before the engine
    # counted anything, so the last chunk has no usage rather than a guess.
    assert chunks[-1].choices == [] and chunks[-1].usage is None
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    # The skeleton holds the stop string too, but did not get it: it was written whole, and points followed.
    stats = wait_for_stats(fleet.slow_upstream, lambda s: s["active"] == 0)
    skeleton = [r for r in stats["requests"] if r["kind"] == "skeleton"]
    assert len(skeleton) == 1 and skeleton[0]["completion_tokens"] == skeleton[0]["planned_tokens"]
    assert any(r["kind"] == "point" for r in stats["requests"])


async def test_upstream_failures_become_the_right_errors(fleet: Fleet) -> None:
    async def refused() -> None:
        async with aclient(fleet.auth_failing) as c:
            with pytest.raises(openai.InternalServerError) as error:
                await c.chat.completions.create(model="sot:test", messages=QUESTION)
        assert error.value.status_code == 502
        assert error.value.body["code"] == "upstream_authentication_failed"

    async def rate_limited() -> None:
        async with aclient(fleet.rate_limited) as c:
            with pytest.raises(openai.RateLimitError) as error:
                await c.chat.completions.create(model="normal:test", messages=QUESTION, stream=True)
        assert error.value.status_code == 429 and error.value.response.headers["retry-after"] == "1"
        assert error.value.body["code"] == "upstream_rate_limited"

    async def unreachable() -> None:
        async with aclient(fleet.unreachable) as c:
            with pytest.raises(openai.InternalServerError) as error:
                await c.chat.completions.create(model="normal:test", messages=QUESTION)
        assert error.value.status_code == 502 and error.value.body["code"] == "upstream_unreachable"

    async def broken_mid_stream() -> None:
        async with aclient(fleet.mid_stream) as c:
            stream = await c.chat.completions.create(model="normal:test", messages=QUESTION, stream=True)
            received = ""
            with pytest.raises(openai.APIError) as error:
                async for chunk in stream:
                    received += chunk.choices[0].delta.content or "" if chunk.choices else ""
            assert received  # the answer had started: the error arrives inside the stream
            assert "mid-stream" in error.value.message
            with pytest.raises(openai.InternalServerError):  # not streamed: a plain 502
                await c.chat.completions.create(model="normal:test", messages=QUESTION)

    await asyncio.gather(refused(), rate_limited(), unreachable(), broken_mid_stream())


async def first_content(stream: Any) -> str:
    async for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            return str(chunk.choices[0].delta.content)
    raise AssertionError("the stream ended without content")


async def test_overload_is_a_429_with_retry_after(fleet: Fleet) -> None:
    reset_stats(fleet.slow_upstream)
    async with aclient(fleet.slow) as c:
        # --max-concurrency 2: two questions in flight fill the server.
        streams = [await c.chat.completions.create(model="sot:test", messages=QUESTION, stream=True) for _ in range(2)]
        started = time.perf_counter()
        with pytest.raises(openai.RateLimitError) as error:
            await c.chat.completions.create(model="sot:test", messages=QUESTION)
        assert time.perf_counter() - started < 1.0  # refused at once, not queued
        assert error.value.response.headers["retry-after"] == "1"
        assert error.value.body["code"] == "server_overloaded"
        for stream in streams:
            await stream.close()
    # Closing the streams ended their questions: every upstream request is gone, the slots are free.
    await async_wait_for_stats(fleet.slow_upstream, lambda s: s["started"] > 0 and s["active"] == 0)
    health = json.loads(http("GET", root(fleet.slow) + "/health")[2])
    assert health["in_flight"] == 0


async def test_a_client_that_disconnects_cancels_every_upstream_request(fleet: Fleet) -> None:
    reset_stats(fleet.slow_upstream)
    async with aclient(fleet.slow) as c:
        stream = await c.chat.completions.create(model="sot:test", messages=QUESTION, stream=True)
        assert (await first_content(stream)).startswith("1. Point one")
        # all five points are being expanded
        await async_wait_for_stats(fleet.slow_upstream, lambda s: s["active"] == 5, seconds=5)
        await stream.close()
    stats = await async_wait_for_stats(fleet.slow_upstream, lambda s: s["active"] == 0, seconds=5)
    assert stats["cancelled"] == 5 and stats["finished"] == 1  # the skeleton had finished; no point did

    # Not streamed: the client gives up waiting; the server notices and cancels all the same.
    reset_stats(fleet.slow_upstream)
    async with aclient(fleet.slow, timeout=1.5) as c:
        with pytest.raises(openai.APITimeoutError):
            await c.chat.completions.create(model="sot:test", messages=QUESTION)
    stats = await async_wait_for_stats(fleet.slow_upstream, lambda s: s["active"] == 0, seconds=5)
    assert stats["cancelled"] == 5 and stats["finished"] == 1
    wait_for_stats(fleet.slow_upstream, lambda s: s["started"] == 6)  # and nothing was started afterwards


# -- in-process: the text a standard stream sends adds up to the engine's answer ---------------------------

ECHO_STYLES = ("plain", "numbered", "bold", "dash")


class _EchoingBackend:
    """Skeleton from `titles`; point i answered in echo style `styles[i]`, word by word, `delays[i]` ms apart,
    so points finish in any order and echo their number and title the ways models do."""

    name = "echoing"
    model = "echoing"
    supports_prefill = True

    def __init__(self, titles: list[str], texts: list[str], styles: list[str], delays: list[int]) -> None:
        self.titles, self.texts, self.styles, self.delays = titles, texts, styles, delays

    async def stream(self, request: Any) -> Any:
        from sot.backends.base import Chunk

        last = request.messages[-1].content
        if "skeleton" in last.lower():
            text = "\n".join(f"{i}. {t}" for i, t in enumerate(self.titles, 1))
            text = text[len(request.prefill) :] + "\n\n"
            delay = 0
        else:
            i = int(last.split("expand point ")[1].split(",")[0]) - 1
            title, body = self.titles[i], self.texts[i]
            text = {
                "plain": f" {body}",
                "numbered": f"\n{i + 1}. {title}: {body}",
                "bold": f" **{title}**: {body}",
                "dash": f" {title} - {body}",
            }[self.styles[i]]
            delay = self.delays[i]
        for word in text.split(" "):
            await asyncio.sleep(delay / 1000)
            yield Chunk(text=word + " ")
        yield Chunk(finish_reason="stop")

    async def aclose(self) -> None:
        return None


words = st.sampled_from(["sleep", "well", "eat", "greens", "Daily", "walks", "help.", "a", "lot", "2.5", "x"])


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    data=st.data(),
    n=st.integers(min_value=2, max_value=5),
)
async def test_streamed_sot_text_adds_up_to_the_final_answer(data: st.DataObject, n: int) -> None:
    from sot.engine import Engine
    from sot.events import Done
    from sot.server.app import AnswerText

    titles = [" ".join(data.draw(st.lists(words, min_size=1, max_size=3))).capitalize() + str(i) for i in range(n)]
    texts = [" ".join(data.draw(st.lists(words, min_size=1, max_size=8))) for _ in range(n)]
    styles = data.draw(st.lists(st.sampled_from(ECHO_STYLES), min_size=n, max_size=n))
    delays = data.draw(st.lists(st.integers(0, 3), min_size=n, max_size=n))
    engine = Engine(_EchoingBackend(titles, texts, styles, delays))
    text = AnswerText()
    sent_before_done = ""
    result = None
    async for event in engine.stream("How do I stay healthy?", "sot"):
        if isinstance(event, Done):
            result = event.result
            sent_before_done = text.sent
            text.finish(result)
        else:
            text.feed(event)
    assert result is not None and result.mode_used == "sot"
    assert text.sent == result.answer
    assert sent_before_done.startswith("1. ")  # point 1 went out before the end


@pytest.mark.parametrize(
    ("pieces", "stops", "expected", "hit"),
    [
        (["Hello wor", "ld. Bye"], ["world"], "Hello", True),  # no whitespace right before the cut
        (["Hello  ", " wor", "ld"], ["orl"], "Hello   w", True),  # whitespace held is sent when text follows
        (["Hello w", "ombat"], ["world"], "Hello wombat", False),
        (["abc"], [], "abc", False),
        (["a", "b", "STO", "P", "c"], ["STOP", "bS"], "a", True),
    ],
)
def test_stop_filter_never_sends_a_stop_string(pieces: list[str], stops: list[str], expected: str, hit: bool) -> None:
    from sot.server.app import StopFilter

    cut = StopFilter(stops)
    out = "".join(cut.push(p) for p in pieces) + cut.flush()
    assert out == expected and cut.hit == hit
