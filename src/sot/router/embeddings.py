"""Embed a conversation with the embedded model itself: a mean-pooled hidden state of SmolLM2-135M.

The router reads a conversation the way the serving model does: rendered in its chat format (system
prompt, recent turns, latest request; `budget` bounds each part), tokenized by llama.cpp with the model's
own vocabulary, then mapped to one of the model's hidden states and averaged over the tokens.

Which hidden state is a setting of a trained model (`EmbeddingSpec`): block `layers - 1`'s normalised
input (`attn_norm`), its residual stream after attention (`ffn_inp`) or its output (`l_out`). The shipped
router reads `attn_norm` of block 0: the model's token embeddings, RMS-normalised and scaled by the first
block's norm weights. That state is read straight from the packaged GGUF here (`TokenEmbedder`, ~0.1 ms);
a test checks it against llama.cpp's own `attn_norm-0` tensor. Deeper states run llama.cpp's graph
(`sot.router.llama_embedder`) and cost more: the README has the measured trade-off. The budget that
decides is `auto` mode's: at most +5% on a normal answer's time to first token (~25 ms here).

Why not llama.cpp's embedding mode (`embeddings = true`, mean pooling)? For a generative model it also
computes the vocabulary projection for every token (49,152 x 576 each), ~10 ms for a 20-token question:
40% of the whole time to first token it is meant to protect.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from sot.errors import ConfigError
from sot.router.base import RouterInput, model_turns

# Chat-format markers of the SmolLM2 family (ChatML); they tokenize to single special tokens.
TURN_START = "<|im_start|>"
TURN_END = "<|im_end|>"
PACKAGED = "packaged"  # the packaged GGUF's tensors as they are (no re-encoding)


@dataclass(frozen=True)
class EmbeddingSpec:
    """Which hidden state the router reads, and how much of a conversation it reads."""

    layers: int = 1  # a hidden state of block `layers - 1` (0-based) is pooled
    stage: str = "attn_norm"  # llama.cpp's tensor name: "attn_norm", "ffn_inp" or "l_out"
    # The weights: "packaged" (as shipped), or for the graph path "auto" (the local backend's rule: BF16
    # where the CPU has BF16 dot products, else F16), "bf16", "f16". A model records what it was fit with.
    weights: str = PACKAGED
    max_tokens: int = 128  # the whole rendered conversation, at most
    context_tokens: int = 48  # of which the system prompt and earlier turns, at most
    system_tokens: int = 24  # of which the system prompt, at most

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "pooling": "mean", "tensor": self.tensor_name}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EmbeddingSpec:
        keys = ("layers", "stage", "weights", "max_tokens", "context_tokens", "system_tokens")
        return cls(**{k: data[k] for k in keys})

    @property
    def tensor_name(self) -> str:
        return f"{self.stage}-{self.layers - 1}"

    @property
    def reads_tokens_only(self) -> bool:
        """Whether the state is a function of each token alone (read from the file, no graph to run)."""
        return self.stage == "attn_norm" and self.layers == 1

    def for_this_cpu(self) -> EmbeddingSpec:
        """The spec with a concrete weights format: "auto" resolved as the local backend resolves it, and
        BF16 replaced by F16 where the CPU would emulate BF16 (scores then move by ~0.002; see README)."""
        from sot.backends.local.model_files import cpu_has_native_bf16, resolve_auto

        weights = resolve_auto("auto") if self.weights == "auto" else self.weights
        if weights == "bf16" and not cpu_has_native_bf16():
            weights = "f16"
        return replace(self, weights=weights)


class ConversationEmbedder(Protocol):
    """What the router and training need: one vector per conversation."""

    dim: int

    def embed(self, view: RouterInput) -> list[float]: ...


def _install_logging(ll: Any) -> None:
    from sot.backends.local.llama_runtime import _install_log_callback

    _install_log_callback()  # llama.cpp's log lines go to Python logging, as the local backend's do
    ll.llama_backend_init()


class ChatTokenizer:
    """The model's tokenizer and chat format over a llama.cpp vocabulary."""

    def __init__(self, vocab: Any, spec: EmbeddingSpec) -> None:
        self._vocab = vocab
        self.spec = spec
        self._markers: dict[str, tuple[list[int], list[int]]] = {}
        self._lock = threading.Lock()

    def tokenize(self, text: str) -> list[int]:
        import llama_cpp as ll

        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (ll.llama_token * cap)()
        with self._lock:
            n = ll.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
        if n < 0:
            raise ConfigError("the router could not tokenize its input")
        return list(buf[:n])

    def markers(self, role: str) -> tuple[list[int], list[int]]:
        """The tokens that open and close a `role` turn (tokenized once)."""
        if role not in self._markers:
            self._markers[role] = (self.tokenize(f"{TURN_START}{role}\n"), self.tokenize(f"{TURN_END}\n"))
        return self._markers[role]

    def conversation_tokens(self, view: RouterInput) -> list[int]:
        """The conversation in the model's chat format, within the spec's token budgets (see `budget`)."""
        rendered = []
        for role, text in model_turns(view):
            start, end = self.markers(role)
            rendered.append((role, start, self.tokenize(text), end))
        return budget(rendered, self.spec)


class TokenEmbedder:
    """Block 0's normalised input, `attn_norm-0`, mean-pooled: read from the GGUF, no graph to run.

    For each token: its row of `token_embd` (dequantized as ggml does), divided by its root mean square
    (plus the model's epsilon; the sum of squares in double, as ggml sums it), times
    `blk.0.attn_norm.weight`; then the mean over the tokens. Tokenization is llama.cpp's, from a
    vocabulary-only load of the same file. Thread-safe.
    """

    def __init__(self, spec: EmbeddingSpec, path: Path) -> None:
        import llama_cpp as ll

        from sot.router.gguf_file import metadata_float, metadata_string, parse, read_tensor

        _install_logging(ll)
        self.spec = spec
        self.path = path
        parsed = parse(path)
        arch = metadata_string(parsed, "general.architecture")
        # Held in memory (30 MB as packaged): a memory-mapped table page-faults on the rows of every question.
        self._table = np.array(read_tensor(path, parsed, "token_embd.weight"))
        self._norm = np.asarray(read_tensor(path, parsed, "blk.0.attn_norm.weight")[0], dtype=np.float32)
        self._eps = np.float32(metadata_float(parsed, f"{arch}.attention.layer_norm_rms_epsilon"))
        self.dim = int(self._norm.shape[0])
        self._scales = np.full(len(self._table), np.nan, dtype=np.float32)
        mparams = ll.llama_model_default_params()
        mparams.vocab_only = True
        self._model = ll.llama_model_load_from_file(str(path).encode(), mparams)
        if not self._model:
            raise ConfigError(f"llama.cpp could not load the vocabulary of {path}")
        self.tokenizer = ChatTokenizer(ll.llama_model_get_vocab(self._model), spec)

    def _scales_of(self, ids: list[int], rows: np.ndarray) -> np.ndarray:
        """1 / RMS of each token's embedding row (float32, as ggml's rms_norm computes it), remembered per
        token: a token's scale never changes, and most questions reuse common tokens."""
        scales = self._scales[ids]
        missing = np.isnan(scales)
        if missing.any():
            x = rows[missing]
            mean_square = (np.square(x.astype(np.float64)).sum(axis=1) / x.shape[1]).astype(np.float32)
            scales[missing] = np.float32(1.0) / np.sqrt(mean_square + self._eps)
            self._scales[np.asarray(ids)[missing]] = scales[missing]
        return scales

    def embed_tokens(self, tokens: Sequence[int]) -> list[float]:
        """The mean of the tokens' normalised embeddings: norm weights x sum(scale_t x row_t) / n (one
        product for the rows: few numpy calls, which matters when caches are cold after an answer)."""
        from sot.router.gguf_file import rows_as_float32

        if not tokens:
            return [0.0] * self.dim
        ids = list(tokens)
        rows = rows_as_float32(self._table, ids)
        pooled = self._scales_of(ids, rows) @ rows
        return [float(v) for v in pooled.astype(np.float64) * self._norm / len(ids)]

    def embed(self, view: RouterInput) -> list[float]:
        return self.embed_tokens(self.tokenizer.conversation_tokens(view))

    def close(self) -> None:
        """Free the vocabulary-only model (idempotent)."""
        from sot.backends.local.llama_runtime import free_native

        free_native(model=self._model)
        self._model = None


def model_file(
    spec: EmbeddingSpec, *, cache_dir: Path | None = None, progress: Callable[[str], None] | None = None
) -> Path:
    """The GGUF file `spec` is computed from: the packaged one, or for the graph path a copy cut to its
    first blocks and re-encoded as `spec.weights` says, made once and cached next to the local backend's
    re-encodings. Raises `ConfigError` when the packaged model is missing or cannot be cut or re-encoded."""
    from sot.backends.local.model_files import default_cache_dir, ensure_reencoded, packaged_model_path
    from sot.router.gguf_file import slice_layers

    source = packaged_model_path()
    if spec.reads_tokens_only:
        return source
    if spec.weights not in (PACKAGED, "f16", "bf16", "q8_0"):
        raise ConfigError(f"unsupported router embedding weights {spec.weights!r} (resolve 'auto' first)")
    import hashlib

    st = source.stat()
    key = hashlib.sha256(f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:12]
    cache = (cache_dir or default_cache_dir()) / "router"
    # One block more than is read: llama.cpp keeps only the output tokens' rows inside the last block, and
    # the router asks for no output (no logits to copy out, ~200 kB a token otherwise).
    blocks = spec.layers + 1
    cut = cache / key / f"{source.stem}.first-{blocks}.gguf"
    if not cut.is_file():
        if progress is not None:
            progress(f"Cutting {source.name} to its first {blocks} blocks for the router (once) ...")
        slice_layers(source, cut, blocks)
    if spec.weights == PACKAGED:
        return cut
    fmt: Any = spec.weights
    return ensure_reencoded(cut, fmt, cache, progress=progress)


def open_embedder(spec: EmbeddingSpec, path: Path | None = None) -> ConversationEmbedder:
    """A new embedder for a concrete `spec` (see `for_this_cpu`), on `path` or `model_file(spec)`."""
    file = path or model_file(spec)
    if spec.reads_tokens_only:
        return TokenEmbedder(spec, file)
    from sot.router.llama_embedder import GraphEmbedder

    return GraphEmbedder(spec, file)


def budget(rendered: Sequence[tuple[str, list[int], list[int], list[int]]], spec: EmbeddingSpec) -> list[int]:
    """Token ids of (role, start, body, end) turns within the budgets; the last turn is the request.

    The system prompt keeps its head within `system_tokens`; the earlier turns fill what is left of
    `context_tokens`, from the most recent backwards; the request gets the rest of `max_tokens`, its body
    cut to its head (3/4) and tail. The kept pieces stay in conversation order.

    >>> spec = EmbeddingSpec(max_tokens=18, context_tokens=6, system_tokens=3)
    >>> budget([("system", [1], [5, 5, 5, 5], [2]), ("user", [1], [6, 6], [2]), ("user", [1], [7] * 20, [2])], spec)
    [1, 5, 5, 6, 6, 2, 1, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 2]
    """
    if not rendered:
        return []
    system: list[int] = []
    earlier: list[int] = []
    for role, t_start, t_body, t_end in rendered[:-1]:
        if role == "system":
            system = (t_start + t_body + t_end)[: spec.system_tokens]
        else:
            earlier.extend(t_start + t_body + t_end)
    turns_room = max(spec.context_tokens - len(system), 0)
    earlier = earlier[len(earlier) - turns_room :] if turns_room else []
    _, start, body, end = rendered[-1]
    room = max(spec.max_tokens - len(system) - len(earlier) - len(start) - len(end), 1)
    if len(body) > room:
        head = room * 3 // 4
        body = body[:head] + body[len(body) - (room - head) :]
    return system + earlier + start + body + end


_SHARED: dict[EmbeddingSpec, ConversationEmbedder | Exception] = {}
_SHARED_LOCK = threading.Lock()


def shared_embedder(spec: EmbeddingSpec) -> ConversationEmbedder:
    """The process's one embedder for `spec` (made concrete for this CPU), loaded on first call; a failure
    is remembered and re-raised."""
    spec = spec.for_this_cpu()
    with _SHARED_LOCK:
        found = _SHARED.get(spec)
        if found is None:
            try:
                found = open_embedder(spec)
            except Exception as exc:
                found = exc
            _SHARED[spec] = found
    if isinstance(found, Exception):
        raise found
    return found
