"""The router's view of a conversation through the embedded model: the GGUF reader and cutter, the token
budgets, and (slow) the token-table embedding against llama.cpp's own tensors."""

from __future__ import annotations

import struct
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from sot.backends.base import Message
from sot.errors import ConfigError
from sot.router import embeddings
from sot.router.base import router_input
from sot.router.embeddings import EmbeddingSpec, budget, model_file
from sot.router.gguf_file import (
    BF16,
    block_count,
    metadata_float,
    metadata_string,
    parse,
    read_tensor,
    rows_as_float32,
    slice_layers,
)


def packaged() -> Path:
    from sot.backends.local.model_files import packaged_model_path

    return packaged_model_path()


# -- the spec -----------------------------------------------------------------------------------------


def test_spec_round_trips_and_names_its_tensor() -> None:
    spec = EmbeddingSpec()
    assert spec.tensor_name == "attn_norm-0" and spec.reads_tokens_only
    assert EmbeddingSpec.from_dict(spec.to_dict()) == spec
    deep = EmbeddingSpec(layers=4, stage="l_out", weights="auto")
    assert deep.tensor_name == "l_out-3" and not deep.reads_tokens_only
    assert EmbeddingSpec.from_dict(deep.to_dict()) == deep


def test_bf16_becomes_f16_where_the_cpu_would_emulate_it(monkeypatch: pytest.MonkeyPatch) -> None:
    import sot.backends.local.model_files as model_files

    monkeypatch.setattr(model_files, "cpu_has_native_bf16", lambda: False)
    assert EmbeddingSpec(weights="bf16").for_this_cpu().weights == "f16"
    assert EmbeddingSpec(weights="auto").for_this_cpu().weights == "f16"
    assert EmbeddingSpec().for_this_cpu().weights == "packaged"
    monkeypatch.setattr(model_files, "cpu_has_native_bf16", lambda: True)
    assert EmbeddingSpec(weights="auto").for_this_cpu().weights == "bf16"


# -- budgets ------------------------------------------------------------------------------------------


def test_budget_keeps_the_request_and_the_most_recent_context() -> None:
    spec = EmbeddingSpec(max_tokens=20, context_tokens=8, system_tokens=4)
    turns = [
        ("system", [1], [9] * 10, [2]),
        ("user", [1], [3] * 5, [2]),
        ("assistant", [1], [4] * 5, [2]),
        ("user", [1], [5] * 30, [2]),
    ]
    out = budget(turns, spec)
    assert len(out) == 20
    assert out[:4] == [1, 9, 9, 9]  # the system prompt's head
    assert out[4:8] == [4, 4, 4, 2]  # the tail of the most recent earlier turn
    assert out[8] == 1 and out[-1] == 2 and out.count(5) == 10  # the request, cut in its middle
    assert budget([], spec) == []
    assert budget([("user", [1], [5, 5], [2])], spec) == [1, 5, 5, 2]


# -- the GGUF file ------------------------------------------------------------------------------------


def test_reads_the_packaged_gguf() -> None:
    parsed = parse(packaged())
    assert block_count(packaged()) == 30
    assert metadata_string(parsed, "general.architecture") == "llama"
    assert metadata_float(parsed, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5)
    norm = read_tensor(packaged(), parsed, "blk.0.attn_norm.weight")
    assert norm.shape == (1, 576) and norm.dtype == np.float32
    table = read_tensor(packaged(), parsed, "token_embd.weight")
    assert table.shape == (49152, 18)  # Q8_0: 18 blocks of 32 values a row
    rows = rows_as_float32(table, [0, 1, 49151])
    assert rows.shape == (3, 576) and rows.dtype == np.float32 and np.isfinite(rows).all()
    with pytest.raises(ConfigError, match="no tensor"):
        read_tensor(packaged(), parsed, "blk.99.attn_norm.weight")
    with pytest.raises(ConfigError):
        read_tensor(packaged(), parsed, "blk.0.ffn_up.weight")  # Q4_1: not a type the router reads


def test_bf16_rows_decode_like_ggml() -> None:
    values = np.array([[1.0, -2.5, 0.15625, 2.0**100]], dtype=np.float32)  # exact in BF16
    bits = (values.view(np.uint32) >> 16).astype(np.uint16)
    assert np.array_equal(rows_as_float32(bits, [0]), values)
    assert BF16 == 30


def test_cutting_keeps_the_first_blocks_and_everything_else(tmp_path: Path) -> None:
    out = slice_layers(packaged(), tmp_path / "cut.gguf", 2)
    assert block_count(out) == 2 and out.stat().st_size < packaged().stat().st_size / 2
    full, cut = parse(packaged()), parse(out)
    names = {t.name for t in cut.tensors}
    assert "blk.1.attn_q.weight" in names and "blk.2.attn_q.weight" not in names
    assert {"token_embd.weight", "output_norm.weight"} <= names
    for name in ("token_embd.weight", "blk.1.attn_norm.weight", "output_norm.weight"):
        assert np.array_equal(np.asarray(read_tensor(packaged(), full, name)), np.asarray(read_tensor(out, cut, name)))
    again = slice_layers(packaged(), tmp_path / "again.gguf", 2)
    assert again.read_bytes() == out.read_bytes()
    assert not list(tmp_path.glob(".*.tmp"))


def test_not_a_gguf_is_a_config_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"NOPE" + b"\0" * 64)
    with pytest.raises(ConfigError, match="not a GGUF"):
        parse(bad)
    truncated = tmp_path / "short.gguf"
    truncated.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 1, 5))
    with pytest.raises(ConfigError, match="truncated"):
        parse(truncated)


def test_the_shared_embedder_remembers_a_failure(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def failing(spec: EmbeddingSpec, path: Path | None = None) -> object:
        calls.append(spec)
        raise ConfigError("no model here")

    monkeypatch.setattr(embeddings, "open_embedder", failing)
    monkeypatch.setattr(embeddings, "_SHARED", {})
    spec = EmbeddingSpec(max_tokens=77)
    for _ in range(2):
        with pytest.raises(ConfigError, match="no model here"):
            embeddings.shared_embedder(spec)
    assert len(calls) == 1


# -- against llama.cpp (slow: loads the model) --------------------------------------------------------

CONVERSATIONS = [
    [Message(role="user", content="What are some ways to save money on groceries?")],
    [Message(role="user", content="Solve 3x + 4 = 19.")],
    [
        Message(role="system", content="Answer in one sentence."),
        Message(role="user", content="Tips for sleep?"),
        Message(role="assistant", content="Keep a regular schedule."),
        Message(role="user", content="And for naps? " + "very " * 200),
    ],
]


@pytest.mark.slow
def test_the_token_table_state_equals_llama_cpps_attn_norm_0() -> None:
    from sot.router.embeddings import TokenEmbedder
    from sot.router.llama_embedder import GraphEmbedder

    spec = EmbeddingSpec()
    fast = TokenEmbedder(spec, packaged())
    graph = GraphEmbedder(spec, packaged())  # llama.cpp's graph on the packaged file, stopped at attn_norm-0
    try:
        for conversation in CONVERSATIONS:
            view = router_input(conversation)
            tokens = fast.tokenizer.conversation_tokens(view)
            assert tokens == graph.tokenizer.conversation_tokens(view) and len(tokens) <= spec.max_tokens
            assert np.allclose(fast.embed(view), graph.embed(view), rtol=0, atol=1e-6)
    finally:
        fast.close()
        graph.close()


@pytest.mark.slow
def test_a_cut_model_computes_what_the_full_model_computes(tmp_path: Path) -> None:
    from sot.router.llama_embedder import GraphEmbedder

    spec = EmbeddingSpec(layers=2, stage="l_out", weights="packaged")
    cut = model_file(spec, cache_dir=tmp_path)
    assert block_count(cut) == 3 and cut.parent.parent == tmp_path / "router"
    full = GraphEmbedder(spec, packaged())
    small = GraphEmbedder(spec, cut)
    try:
        view = router_input(CONVERSATIONS[0])
        assert full.embed(view) == small.embed(view)
    finally:
        full.close()
        small.close()
    other = replace(spec, stage="no_such_tensor")
    graph = GraphEmbedder(other, cut)
    try:
        with pytest.raises(ConfigError, match="did not expose no_such_tensor-1"):
            graph.embed(router_input(CONVERSATIONS[0]))
    finally:
        graph.close()
