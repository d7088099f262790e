"""The pieces of `sot serve` in-process: the SSE bytes it writes (exactly OpenAI's chunk shape, without pydantic),
the JSON paths of validation errors, the mode rule of model names, the usage rule of a stream cut at a stop
string, and the choice of uvicorn's event loop and HTTP parser."""

from __future__ import annotations

import json
from typing import Any

import pytest
from openai.types.chat import ChatCompletionChunk

from sot.events import AnswerDelta, Done, PointDelta, Result, RunStarted, Stats
from sot.server.chunks import ChunkWriter, dumps, event_message, sse
from sot.server.errors import ApiError, json_path
from sot.server.parsing import model_mode, resolve_mode
from sot.server.relay import ChatRelay

SOT = {"mode_used": "sot", "points": ["a", "b"], "stats": {"total_seconds": 1.5}}
USAGE = {"prompt_tokens": 7, "completion_tokens": 11, "total_tokens": 18}


def reference_chunk(include_usage: bool, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    """A chunk as OpenAI sends it, built the plain way (the server's pre-template code did this per chunk)."""
    out: dict[str, Any] = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": 'sot:m"odel',
        "system_fingerprint": None,
        "choices": choices,
    }
    if include_usage:
        out["usage"] = None
    out.update(extra)
    return out


def choice(delta: dict[str, Any], finish: str | None = None) -> list[dict[str, Any]]:
    return [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]


def parse_sse(data: bytes) -> Any:
    assert data.startswith(b"data: ") and data.endswith(b"\n\n") and data.count(b"\n") == 2
    return json.loads(data[len(b"data: ") : -2])


@pytest.mark.parametrize("include_usage", [False, True])
def test_chunks_are_openais_shape_key_for_key(include_usage: bool) -> None:
    writer = ChunkWriter("chatcmpl-1", 1700000000, 'sot:m"odel', include_usage=include_usage)
    event = RunStarted(mode="sot", backend="b", model="m")
    text = 'Tab\t, quote ", newline\n, emoji 🙂, é, \u2028'
    cases = [
        (writer.role(), reference_chunk(include_usage, choice({"role": "assistant", "content": ""}))),
        (writer.content(text), reference_chunk(include_usage, choice({"content": text}))),
        (writer.finish("length"), reference_chunk(include_usage, choice({}, "length"))),
        (writer.finish("stop", SOT), reference_chunk(include_usage, choice({}, "stop"), sot=SOT)),
        (writer.engine_event(event), reference_chunk(include_usage, [], sot_event=event.model_dump(mode="json"))),
    ]
    for data, expected in cases:
        parsed = parse_sse(data)
        assert parsed == expected and list(parsed) == list(expected)
        ChatCompletionChunk.model_validate(parsed)  # the SDK's own type accepts it
    for usage in (USAGE, None):
        last = parse_sse(writer.usage(usage))
        assert last == {**reference_chunk(False, []), "usage": usage}
        assert list(last) == [*reference_chunk(False, []), "usage"]
        sdk_usage = ChatCompletionChunk.model_validate(last).usage
        assert (sdk_usage.total_tokens if sdk_usage else None) == (usage and usage["total_tokens"])


def test_text_with_a_lone_surrogate_is_still_sent() -> None:
    # A model can write "\ud83d" as a JSON escape; the decoded text is then not valid UTF-8.
    data = ChunkWriter("c", 1, "m", include_usage=False).content("broken \ud83d emoji")
    assert parse_sse(data)["choices"][0]["delta"]["content"] == "broken \ud83d emoji"
    assert dumps({"a": "é"}) == '{"a":"é"}'.encode()


def test_engine_events_are_sent_as_their_own_json() -> None:
    event = PointDelta(index=2, text='a "b"\n')
    assert event_message(event) == b"event: point_delta\ndata: " + event.model_dump_json().encode() + b"\n\n"
    assert sse(b"[DONE]") == b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    ("loc", "path"),
    [
        (("body", "messages", 2, "content"), "messages[2].content"),
        (("body", "messages", 0, "content", "list[ContentPart]", 1, "text"), "messages[0].content[1].text"),
        (("body", "messages", 0, "content", "str"), "messages[0].content"),
        (("body", "stream_options", "include_usage"), "stream_options.include_usage"),
        (("body", "stop", "list[str]", 3), "stop[3]"),
        (("body", "tool_choice", "dict[str,any]"), "tool_choice"),
        (("body",), None),
        (("body", 32), "[32]"),
    ],
)
def test_validation_errors_name_the_parameter_by_its_json_path(loc: tuple[Any, ...], path: str | None) -> None:
    assert json_path(loc) == path


@pytest.mark.parametrize(
    ("model", "mode"),
    [
        ("sot:gpt-4o", "sot"),
        ("NORMAL:x", "normal"),
        ("auto", "auto"),
        ("gpt-4o", None),
        ("ft:gpt-4o-mini:acme::abc123", None),  # an OpenAI fine-tune
        ("llama3:8b", None),  # Ollama names and tags
        ("mistral:latest", None),
        ("mistral:7b-instruct", None),
        ("qwen2.5:0.5b", None),
        ("org/model:v1", None),
        ("My-Model:x", None),
        ("deep-seek:r1", None),
    ],
)
def test_model_names_with_a_colon_choose_a_mode_only_with_a_mode_prefix(model: str, mode: str | None) -> None:
    assert model_mode(model) == mode
    assert resolve_mode(None, None, model, "sot") == (mode or "sot")


@pytest.mark.parametrize("model", ["fast:gpt-4o", "skeleton:m", "sott:test", "fast:"])
def test_a_word_before_a_colon_is_a_mode_and_an_unknown_one_is_a_400(model: str) -> None:
    with pytest.raises(ApiError) as error:
        model_mode(model)
    assert error.value.status == 400 and error.value.param == "model" and error.value.code == "invalid_mode"
    # The body field and the header come first: then the model name is only a name.
    assert resolve_mode("normal", None, model, "sot") == "normal"
    assert resolve_mode(None, "auto", model, "sot") == "auto"


def result(prompt_tokens: int, completion_tokens: int) -> Result:
    stats = Stats(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens)
    answer = "Hello world. Bye"
    return Result(
        mode_requested="normal",
        mode_used="normal",
        answer=answer,
        complete=True,
        finish_reason="stop",
        backend="b",
        model="m",
        stats=stats,
    )


def relayed(batches: list[list[Any]], stops: list[str]) -> tuple[str, dict[str, Any]]:
    """The text and the usage chunk's usage of a stream of `batches`."""
    relay = ChatRelay(ChunkWriter("c", 1, "m", include_usage=True), stops, sot_events=False)
    out = b""
    for batch in batches:
        out += relay.batch(batch)
        if relay.cut.hit:
            break
    out += relay.closing(include_usage=True)
    chunks = [json.loads(part[len("data: ") :]) for part in out.decode().split("\n\n") if part and "[DONE]" not in part]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    return text, chunks[-1]


def test_usage_is_the_engines_count_never_an_estimate() -> None:
    deltas = [AnswerDelta(text="Hello "), AnswerDelta(text="world. "), AnswerDelta(text="Bye")]
    done = Done(result=result(7, 11))
    # The run finished: its measured usage, stop string or not.
    assert relayed([deltas, [done]], []) == ("Hello world. Bye", {**reference_usage_chunk(), "usage": USAGE})
    text, last = relayed([[*deltas, done]], ["world"])
    assert text == "Hello" and last["usage"] == USAGE  # cut, but the engine had finished in the same batch
    # Cut before the engine finished: the run is cancelled uncounted, so there is no usage to report.
    text, last = relayed([deltas, [done]], ["world"])
    assert text == "Hello" and last["choices"] == [] and last["usage"] is None


def reference_usage_chunk() -> dict[str, Any]:
    return {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "system_fingerprint": None,
        "choices": [],
    }


def test_serve_uses_uvloop_and_httptools_when_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    import importlib
    import importlib.util

    serve = importlib.import_module("sot.cli.serve")  # `sot.cli.serve` the attribute is the click command

    assert serve.event_loop_and_http() == (
        "uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
        "httptools" if importlib.util.find_spec("httptools") else "h11",
    )
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: object())
    assert serve.event_loop_and_http() == ("uvloop", "httptools")
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert serve.event_loop_and_http() == ("asyncio", "h11")


def test_the_served_models_own_name_is_never_a_mode_attempt() -> None:
    # An Ollama model named like "<word>:<word>" is the server's own model, not an unknown mode.
    assert resolve_mode(None, None, "mistral:instruct", "sot", served="mistral:instruct") == "sot"
    with pytest.raises(ApiError):
        resolve_mode(None, None, "mistral:instruct", "sot", served="llama3")
