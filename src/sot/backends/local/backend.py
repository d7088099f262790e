"""`LocalBackend`: the `Backend` protocol over the embedded batching engine (async side only).

It plans which weights to load, starts the engine's worker thread on first use and bridges its results
into async generators. Batching and admission live in `scheduler.py`, KV-cell bookkeeping in `kv_cells.py`.
"""

from __future__ import annotations

import asyncio
import os
import threading
import weakref
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from sot.backends.base import Chunk, GenerationRequest, SamplingParams
from sot.backends.local.model_files import (
    WeightsChoice,
    WeightsFormat,
    default_cache_dir,
    ensure_reencoded,
    select_model_file,
)
from sot.backends.local.scheduler import BACKEND_NAME, Scheduler, SchedulerConfig
from sot.errors import BackendError, ConfigError


class LocalBackend:
    """The embedded model (SmolLM2-135M-Instruct by default), batched across concurrent streams.

    Loading is lazy: the first `stream()` (or `load()`) starts a worker thread that re-encodes the packaged
    weights if needed, loads the model and then serves every request. Many streams may be open at once;
    they are decoded together and share KV cache for common prompt prefixes (the SoT skeleton conversation).
    A stream starts once the KV cache (`n_ctx` cells) can hold its prompt and `max_tokens` more on top of
    what running streams hold and may still need; until then it waits, for at most `admission_wait`
    seconds, and then raises BackendCapacityError (at once if it could never fit). Running streams are
    never cut to make room.
    """

    name = BACKEND_NAME
    supports_prefill = True
    # Greedy with a mild repetition penalty: measured on 10 SoT-suitable Vicuna questions (512-token cap),
    # penalty 1.0 left 4/10 normal answers looping to the cap, 1.1 left 1/10; 1.2 and 1.3 looped as often
    # (5/10, 3/10) and wrote run-on sentences. Both modes use the same settings.
    default_sampling = SamplingParams(max_tokens=512, temperature=0.0, repeat_penalty=1.1)

    def __init__(
        self,
        model_path: str | os.PathLike[str] | None = None,
        *,
        weights: WeightsChoice = "auto",
        n_ctx: int = 8192,
        n_threads: int | None = None,
        max_sequences: int = 16,
        admission_wait: float = 60.0,
        cache_dir: str | os.PathLike[str] | None = None,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        if weights not in ("auto", "bf16", "f16", "q8_0", "q4_1"):
            raise ConfigError(f"unknown weights format {weights!r}; use auto, bf16, f16, q8_0 or q4_1")
        if n_ctx < 64:
            raise ConfigError(f"n_ctx={n_ctx} is too small")
        if max_sequences < 1:
            raise ConfigError("max_sequences must be at least 1")
        if admission_wait < 0:
            raise ConfigError("admission_wait must not be negative")
        cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        source, fmt, final = select_model_file(model_path, weights, cache)
        self.model = final.stem
        # The concrete format loaded ("bf16", "f16", "q8_0", "q4_1"), or None for an explicit file used as-is.
        self.weights: WeightsFormat | None = fmt if fmt is not None else (None if model_path else "q4_1")
        self.model_path = final
        self._progress = progress

        def model_file() -> Path:  # runs on the worker thread
            if fmt is None:
                return source
            return ensure_reencoded(source, fmt, cache, progress=progress)

        self._scheduler = Scheduler(
            model_file,
            SchedulerConfig(
                n_ctx=n_ctx, n_threads=n_threads, max_sequences=max_sequences, admission_wait=admission_wait
            ),
        )
        self._lock = threading.Lock()
        self._closed = False
        # Dropped without aclose(): still stop the worker, so the thread and the model do not leak. Not at
        # interpreter exit, though: freeing llama.cpp objects while Python tears down is asking for a crash.
        weakref.finalize(self, self._scheduler.stop).atexit = False

    # ---------------------------------------------------------------- lifecycle
    def _started_scheduler(self) -> Scheduler:
        with self._lock:  # one worker, however many threads or loops call in first
            if self._closed:
                raise BackendError("the local backend is closed", backend=BACKEND_NAME)
            self._scheduler.start()
            return self._scheduler

    def load(self, timeout: float | None = None) -> None:
        """Load the model now (blocking) instead of on the first request; raises what loading raised."""
        self._started_scheduler().wait_ready(timeout)

    async def aclose(self) -> None:
        """Stop the worker (open streams end with BackendError) and free the model and context."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            started = self._scheduler.started
        if started:
            self._scheduler.stop()
            await asyncio.to_thread(self._scheduler.join)

    # ---------------------------------------------------------------- the protocol
    async def stream(self, request: GenerationRequest) -> AsyncGenerator[Chunk, None]:
        """Generate a reply; an empty chunk once the request is admitted, then chunks of new text only (never
        the prefill); the last one has `finish_reason` and `usage`. Closing the iterator early cancels the
        request and frees its slot."""
        async for chunk in self._stream(request):
            yield chunk

    async def _stream(self, request: GenerationRequest, *, ignore_eos: bool = False) -> AsyncGenerator[Chunk, None]:
        # `ignore_eos` is for benchmarks only: it forces a fixed number of generated tokens.
        handle = self._started_scheduler().submit(request, ignore_eos=ignore_eos)
        finished = False
        try:
            while True:
                item = await handle.sink.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                if item.finish_reason is not None:
                    finished = True
                    yield item
                    return
                yield item
        finally:
            if not finished:
                self._scheduler.cancel(handle)

    # ---------------------------------------------------------------- introspection
    def counters(self) -> dict[str, float]:
        """Cumulative engine counters (diff two snapshots for one run).

        requests, prompt_tokens, prompt_tokens_computed, prompt_tokens_reused (from the prefix cache),
        decode_steps (llama_decode calls), decoded_tokens (generation-phase tokens decoded), batch_tokens
        (all tokens decoded, prompts included), generated_tokens, busy_seconds (worker wall time in steps),
        cancelled, evictions (prefix-cache sequences freed to make room), admission_waits (requests that
        had to wait for KV cells), capacity_errors (requests refused with BackendCapacityError),
        decode_no_room (llama_decode found no free cell: should stay 0), errors, and `batch_size.N`: steps
        whose batch held N distinct sequences.
        """
        return self._scheduler.counters()

    def kv_cells_used(self) -> int:
        """KV cache cells in use (prefix-shared cells counted once), as of the last engine step."""
        return self._scheduler.kv_cells_used()

    def kv_sequence_lengths(self) -> dict[int, int]:
        """Sequence id -> positions held, read from llama.cpp's cache itself (for checks and debugging)."""
        if not self._scheduler.started:
            return {}
        result = self._started_scheduler().call(self._scheduler.seq_lengths)
        return result if isinstance(result, dict) else {}  # None when the model failed to load

    def clear_prefix_cache(self) -> None:
        """Drop every retained (finished) sequence; running requests are untouched. Blocks briefly."""
        if not self._scheduler.started:
            return
        self._started_scheduler().call(self._scheduler.clear_prefix_cache)

    def __repr__(self) -> str:
        return f"LocalBackend(model={self.model!r}, weights={self.weights!r})"
