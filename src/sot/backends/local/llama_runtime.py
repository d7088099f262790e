"""The llama.cpp side of the local engine: model and context, batched decode, tokens and text, KV sequence calls.

Everything here is a thin, typed wrapper over llama-cpp-python's low-level (ctypes) API. It owns no
scheduling policy; the scheduler decides what to decode and `kv_cells` decides what the cache keeps.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from sot.backends.local.chat_template import ChatTemplate, template_for_model
from sot.errors import BackendError, ConfigError

log = logging.getLogger(__name__)

BACKEND_NAME = "local"

# ---------------------------------------------------------------------------------------------------------
# llama.cpp logging: routed to Python logging. The callback object must stay referenced for the process
# lifetime (a collected ctypes callback crashes the process on the next log line).
# ggml_log_level in this llama.cpp: NONE 0, DEBUG 1, INFO 2, WARN 3, ERROR 4, CONT 5 (continues the last).
_LOG_LEVELS = {3: logging.WARNING, 4: logging.ERROR}
_log_callback: Any = None
_log_last_level = logging.DEBUG
_llama_log = logging.getLogger("sot.backends.local.llama_cpp")


def _install_log_callback() -> None:
    global _log_callback
    if _log_callback is not None:
        return
    import llama_cpp

    def _cb(level: int, text: bytes, _user: ctypes.c_void_p) -> None:
        global _log_last_level
        lvl = _log_last_level if level == 5 else _LOG_LEVELS.get(level, logging.DEBUG)
        _log_last_level = lvl
        if _llama_log.isEnabledFor(lvl):
            _llama_log.log(lvl, "%s", text.decode("utf-8", errors="replace").rstrip("\n"))

    _log_callback = llama_cpp.llama_log_callback(_cb)
    llama_cpp.llama_log_set(_log_callback, ctypes.c_void_p(0))


def free_native(batch: Any = None, ctx: Any = None, model: Any = None) -> None:
    """Free whichever of a llama.cpp batch, context and model are set, in the order llama.cpp needs (a
    context before the model it was made from). Every owner of native llama.cpp objects closes through this."""
    import llama_cpp as ll

    if batch is not None:
        ll.llama_batch_free(batch)
    if ctx is not None:
        ll.llama_free(ctx)
    if model is not None:
        ll.llama_model_free(model)


@dataclass(frozen=True, slots=True)
class ContextParams:
    """How to build the llama.cpp context."""

    n_ctx: int
    n_batch: int  # tokens per llama_decode call (also the micro-batch size)
    n_seq: int  # sequence ids
    threads: int
    flash_attn: int  # -1 auto, 0 off, 1 on


class LlamaRuntime:
    """One loaded model and its context. Not thread-safe: the scheduler's worker thread is its only user."""

    def __init__(self, path: Path, params: ContextParams) -> None:
        import llama_cpp as ll

        _install_log_callback()
        ll.llama_backend_init()
        self.path = path
        self._model: Any = None
        self._ctx: Any = None
        self._batch: Any = None
        self._pieces: dict[int, bytes] = {}
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self._model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ConfigError(f"llama.cpp could not load the GGUF model {path}")
        try:
            self._ctx = ll.llama_init_from_model(self._model, _context_params(params))
            if not self._ctx:
                raise ConfigError(
                    f"llama.cpp could not create a context (n_ctx={params.n_ctx}, n_seq_max={params.n_seq})"
                )
            self._mem = ll.llama_get_memory(self._ctx)
            self._vocab = ll.llama_model_get_vocab(self._model)
            self.n_vocab = int(ll.llama_vocab_n_tokens(self._vocab))
            self.n_ctx = int(ll.llama_n_ctx(self._ctx))  # llama.cpp may round the requested size up
            self.n_batch = params.n_batch
            self._batch = ll.llama_batch_init(params.n_batch, 0, 1)
            self.bos = int(ll.llama_vocab_bos(self._vocab)) if ll.llama_vocab_get_add_bos(self._vocab) else None
            self._warm_up()
            self.template = self._chat_template()
        except BaseException:
            self.close()
            raise

    @staticmethod
    def max_sequences() -> int:
        import llama_cpp as ll

        return int(ll.llama_max_parallel_sequences())

    def _chat_template(self) -> ChatTemplate:
        import llama_cpp as ll

        raw = ll.llama_model_chat_template(self._model, None)
        eos = int(ll.llama_vocab_eos(self._vocab))
        bos_text = self.piece(self.bos, special=True).decode() if self.bos is not None else ""
        eos_text = self.piece(eos, special=True).decode() if eos >= 0 else ""
        return template_for_model(
            raw.decode("utf-8", errors="replace") if raw else None, bos_token=bos_text, eos_token=eos_text
        )

    def _warm_up(self) -> None:
        """One small prompt and two decode steps, so the first real request does not pay graph setup."""
        n = 16
        for step, (first, count) in enumerate(((0, n), (n, 1), (n + 1, 1))):
            # token ids do not matter; sequence 0 is wiped afterwards
            tokens = [1 + first + i for i in range(count)]
            positions = list(range(first, first + count))
            wants = [i == count - 1 for i in range(count)]
            if self.decode(tokens, positions, [0] * count, wants) != 0:
                raise BackendError(f"warm-up decode {step} failed", backend=BACKEND_NAME)
        self.seq_rm(0, -1, -1)

    def close(self) -> None:
        """Free the batch, the context and the model (idempotent)."""
        free_native(self._batch, self._ctx, self._model)
        self._batch = self._ctx = self._model = None

    # ------------------------------------------------------------------------------------ decoding
    def decode(
        self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int], wants: Sequence[bool]
    ) -> int:
        """One `llama_decode` call: token i at position i of sequence i, with logits where `wants[i]`.

        Returns llama.cpp's code: 0 ok, 1 no KV cells for the batch (nothing was changed), other values are
        errors.
        """
        import llama_cpp as ll

        b = self._batch
        for i, (token, pos, seq, want) in enumerate(zip(tokens, positions, seqs, wants, strict=True)):
            b.token[i] = token
            b.pos[i] = pos
            b.n_seq_id[i] = 1
            b.seq_id[i][0] = seq
            b.logits[i] = 1 if want else 0
        b.n_tokens = len(tokens)
        return int(ll.llama_decode(self._ctx, b))

    def logits(self, batch_index: int) -> np.ndarray:
        """A copy of the logits of the last decode's token `batch_index` (which must have asked for them)."""
        import llama_cpp as ll

        ptr = ll.llama_get_logits_ith(self._ctx, batch_index)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).copy()

    def is_end_of_generation(self, token: int) -> bool:
        import llama_cpp as ll

        return bool(ll.llama_vocab_is_eog(self._vocab, token))

    def set_threads(self, n: int) -> None:
        import llama_cpp as ll

        ll.llama_set_n_threads(self._ctx, n, n)

    # ------------------------------------------------------------------------------------ KV sequences
    def seq_cp(self, src: int, dst: int, p0: int, p1: int) -> None:
        import llama_cpp as ll

        ll.llama_memory_seq_cp(self._mem, src, dst, p0, p1)

    def seq_rm(self, seq: int, p0: int, p1: int) -> None:
        import llama_cpp as ll

        ll.llama_memory_seq_rm(self._mem, seq, p0, p1)

    def seq_pos_range(self, seq: int) -> tuple[int, int]:
        """(min, max) position llama.cpp holds for `seq`; (-1, -1) when it holds none."""
        import llama_cpp as ll

        return int(ll.llama_memory_seq_pos_min(self._mem, seq)), int(ll.llama_memory_seq_pos_max(self._mem, seq))

    def clear_memory(self) -> None:
        import llama_cpp as ll

        ll.llama_memory_clear(self._mem, False)

    # ------------------------------------------------------------------------------------ text
    def tokenize(self, text: str) -> list[int]:
        import llama_cpp as ll

        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (ll.llama_token * cap)()
        n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
        if n < 0:
            cap = -n
            buf = (ll.llama_token * cap)()
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
        if n < 0:
            raise BackendError("tokenization failed", backend=BACKEND_NAME)
        return list(buf[:n])

    def piece(self, token: int, *, special: bool = False) -> bytes:
        import llama_cpp as ll

        if not special and token in self._pieces:
            return self._pieces[token]
        buf = ctypes.create_string_buffer(64)
        n = ll.llama_token_to_piece(self._vocab, token, buf, 64, 0, special)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = ll.llama_token_to_piece(self._vocab, token, buf, -n, 0, special)
        piece = buf.raw[: max(n, 0)]
        if not special:
            self._pieces[token] = piece
        return piece


def _context_params(p: ContextParams) -> Any:
    import llama_cpp as ll

    cparams = ll.llama_context_default_params()
    cparams.n_ctx = p.n_ctx
    cparams.n_batch = p.n_batch
    cparams.n_ubatch = p.n_batch
    cparams.n_seq_max = p.n_seq
    cparams.n_threads = p.threads
    cparams.n_threads_batch = p.threads
    # One cell pool for all sequences: seq_cp then only tags cells (no copy) and any sequence may use the
    # whole context, which is what a shared-prefix fork needs.
    cparams.kv_unified = True
    cparams.flash_attn_type = p.flash_attn
    cparams.no_perf = True
    return cparams
