"""Deeper hidden states for the router: run the first blocks of SmolLM2 in llama.cpp, stop at the wanted one.

`GraphEmbedder` owns one llama.cpp context over a copy of the packaged model cut to its first blocks
(`sot.router.embeddings.model_file`). It decodes a conversation's tokens with no output requested, and
the graph's eval callback copies the wanted tensor (e.g. `l_out-0`, block 0's output) as soon as it is
computed, then stops the graph: nothing after that state is computed, the vocabulary projection least
of all. One thread: the graph is small, and threads would cost more in synchronisation than they save.
"""

from __future__ import annotations

import ctypes
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from sot.backends.local.llama_runtime import free_native
from sot.errors import ConfigError
from sot.router.base import RouterInput
from sot.router.embeddings import ChatTokenizer, EmbeddingSpec, _install_logging


def _ggml() -> Any:
    """libggml with the few tensor functions the eval callback needs, typed."""
    from llama_cpp._ggml import libggml

    lib = libggml
    lib.ggml_get_name.restype = ctypes.c_char_p
    lib.ggml_get_name.argtypes = [ctypes.c_void_p]
    lib.ggml_nelements.restype = ctypes.c_int64
    lib.ggml_nelements.argtypes = [ctypes.c_void_p]
    lib.ggml_nrows.restype = ctypes.c_int64
    lib.ggml_nrows.argtypes = [ctypes.c_void_p]
    lib.ggml_nbytes.restype = ctypes.c_size_t
    lib.ggml_nbytes.argtypes = [ctypes.c_void_p]
    lib.ggml_backend_tensor_get.restype = None
    lib.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t]
    return lib


class GraphEmbedder:
    """One llama.cpp context, run one conversation at a time (thread-safe)."""

    def __init__(self, spec: EmbeddingSpec, path: Path) -> None:
        import llama_cpp as ll

        _install_logging(ll)
        self.spec = spec
        self.path = path
        self._lock = threading.Lock()
        self._lib = _ggml()
        self._want = spec.tensor_name.encode()
        self._captured: np.ndarray | None = None
        self._callback = ll.ggml_backend_sched_eval_callback(self._on_tensor)  # referenced for its lifetime
        self._ctx: Any = None
        self._batch: Any = None
        mparams = ll.llama_model_default_params()
        mparams.n_gpu_layers = 0
        self._model: Any = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ConfigError(f"llama.cpp could not load the router's embedding model {path}")
        try:
            self._init_context(ll)
        except BaseException:
            self.close()
            raise

    def _init_context(self, ll: Any) -> None:
        cparams = ll.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = self.spec.max_tokens
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = 1
        cparams.no_perf = True
        cparams.cb_eval = self._callback
        cparams.cb_eval_user_data = None
        self._ctx = ll.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            raise ConfigError("llama.cpp could not create the router's embedding context")
        self._mem = ll.llama_get_memory(self._ctx)
        self.dim = int(ll.llama_model_n_embd(self._model))
        self._batch = ll.llama_batch_init(self.spec.max_tokens, 0, 1)
        self.tokenizer = ChatTokenizer(ll.llama_model_get_vocab(self._model), self.spec)

    def _on_tensor(self, tensor: int, ask: bool, _user: Any) -> bool:
        # ask=True: "do you want this node's data?"; ask=False: here it is, go on (True) or stop (False).
        name = self._lib.ggml_get_name(tensor)
        if ask:
            return bool(name == self._want)
        if name != self._want:
            return True
        n = int(self._lib.ggml_nelements(tensor))
        rows = int(self._lib.ggml_nrows(tensor))
        if n <= 0 or rows <= 0 or int(self._lib.ggml_nbytes(tensor)) != 4 * n:
            return False  # not the float32 activations expected: capture nothing, stop
        data = np.empty(n, dtype=np.float32)
        self._lib.ggml_backend_tensor_get(tensor, data.ctypes.data, 0, 4 * n)
        self._captured = data.reshape(rows, n // rows)
        return False  # everything after this state is not needed

    def embed_tokens(self, tokens: Sequence[int]) -> list[float]:
        """The mean over `tokens` of the spec's tensor (raises `ConfigError` if it was not captured)."""
        import llama_cpp as ll

        if not tokens:
            return [0.0] * self.dim
        with self._lock:
            ll.llama_memory_clear(self._mem, False)
            b = self._batch
            for i, token in enumerate(tokens):
                b.token[i], b.pos[i], b.n_seq_id[i], b.logits[i] = token, i, 1, 0  # no logits: nothing to copy out
                b.seq_id[i][0] = 0
            b.n_tokens = len(tokens)
            self._captured = None
            rc = ll.llama_decode(self._ctx, b)
            captured, self._captured = self._captured, None
        if captured is None or captured.shape != (len(tokens), self.dim):
            raise ConfigError(f"llama.cpp did not expose {self.spec.tensor_name} (decode returned {rc})")
        return [float(x) for x in captured.mean(axis=0, dtype=np.float64)]

    def embed(self, view: RouterInput) -> list[float]:
        return self.embed_tokens(self.tokenizer.conversation_tokens(view))

    def close(self) -> None:
        """Free the batch, context and model (idempotent)."""
        free_native(self._batch, self._ctx, self._model)
        self._batch = self._ctx = self._model = None
