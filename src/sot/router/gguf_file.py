"""Read tensors from a llama-architecture GGUF, and cut one down to its first blocks: the router's model files.

The router needs two things from the packaged SmolLM2 GGUF: its first hidden state (the token embeddings
and the first block's input norm, read here straight from the file, see `sot.router.embeddings`) and, for
deeper routers, a copy of the file with only its first `layers` transformer blocks, so that llama.cpp
loads and builds only what it runs. The copy keeps the token embeddings, those blocks and the final norm,
with `<arch>.block_count` set to match; everything else (tokenizer, metadata, tensor bytes) is copied
unchanged, so it computes exactly what those blocks of the original compute.

Only the GGUF container is parsed (version 2 or 3): header, metadata, tensor table. Cutting copies tensor
data by byte ranges; reading decodes the few tensor types the router reads (F32, F16, BF16, Q8_0).
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from sot.errors import ConfigError

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
# GGUF metadata value types with a fixed size; 8 is a string and 9 an array.
_FIXED = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_STRING, _ARRAY, _UINT32 = 8, 9, 4
_BLOCK = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor table: its name, shape and type as stored, and where its bytes start."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int

    def encode(self, offset: int) -> bytes:
        """The table entry, with the data `offset` given (relative to the start of the data section)."""
        out = _string(self.name) + struct.pack("<I", len(self.dims))
        out += b"".join(struct.pack("<Q", d) for d in self.dims)
        return out + struct.pack("<IQ", self.ggml_type, offset)


@dataclass(frozen=True)
class Parsed:
    version: int
    kv_raw: list[tuple[str, int, bytes]]  # (key, value type, encoded value) in file order
    tensors: list[TensorInfo]
    alignment: int
    data_start: int
    size: int


def _string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def _read(fh: BinaryIO, n: int) -> bytes:
    data = fh.read(n)
    if len(data) != n:
        raise ConfigError("truncated GGUF file")
    return data


def _read_string(fh: BinaryIO) -> str:
    (n,) = struct.unpack("<Q", _read(fh, 8))
    return _read(fh, n).decode("utf-8")


def _skip_value(fh: BinaryIO, vtype: int) -> None:
    if vtype in _FIXED:
        _read(fh, _FIXED[vtype])
    elif vtype == _STRING:
        (n,) = struct.unpack("<Q", _read(fh, 8))
        fh.seek(n, os.SEEK_CUR)
    elif vtype == _ARRAY:
        item, count = struct.unpack("<IQ", _read(fh, 12))
        if item in _FIXED:
            fh.seek(_FIXED[item] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(fh, item)
    else:
        raise ConfigError(f"unknown GGUF metadata type {vtype}")


def parse(path: Path) -> Parsed:
    with path.open("rb") as fh:
        if _read(fh, 4) != MAGIC:
            raise ConfigError(f"{path} is not a GGUF file")
        version, n_tensors, n_kv = struct.unpack("<IQQ", _read(fh, 20))
        if version not in (2, 3):
            raise ConfigError(f"{path}: GGUF version {version} is not supported")
        kv_raw: list[tuple[str, int, bytes]] = []
        alignment = DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = _read_string(fh)
            (vtype,) = struct.unpack("<I", _read(fh, 4))
            start = fh.tell()
            _skip_value(fh, vtype)
            end = fh.tell()
            fh.seek(start)
            raw = _read(fh, end - start)
            kv_raw.append((key, vtype, raw))
            if key == "general.alignment" and vtype == _UINT32:
                (alignment,) = struct.unpack("<I", raw)
        tensors = []
        for _ in range(n_tensors):
            name = _read_string(fh)
            (n_dims,) = struct.unpack("<I", _read(fh, 4))
            dims = struct.unpack(f"<{n_dims}Q", _read(fh, 8 * n_dims))
            ggml_type, offset = struct.unpack("<IQ", _read(fh, 12))
            tensors.append(TensorInfo(name, tuple(dims), ggml_type, offset))
        data_start = -(-fh.tell() // alignment) * alignment
    return Parsed(version, kv_raw, tensors, alignment, data_start, path.stat().st_size)


def block_count(path: Path) -> int:
    """The number of transformer blocks the GGUF declares (`<arch>.block_count`)."""
    for key, vtype, raw in parse(path).kv_raw:
        if key.endswith(".block_count") and vtype == _UINT32:
            return int(struct.unpack("<I", raw)[0])
    raise ConfigError(f"{path}: no block_count in the GGUF metadata")


def slice_layers(source: Path, target: Path, layers: int) -> Path:
    """Write to `target` a copy of `source` with only its first `layers` blocks (atomically: temp + rename)."""
    parsed = parse(source)
    declared = next((k for k, t, _ in parsed.kv_raw if k.endswith(".block_count") and t == _UINT32), None)
    if declared is None:
        raise ConfigError(f"{source}: no block_count in the GGUF metadata")
    ends = sorted({t.offset for t in parsed.tensors} | {parsed.size - parsed.data_start})

    def keep(t: TensorInfo) -> bool:
        match = _BLOCK.match(t.name)
        return match is None or int(match.group(1)) < layers

    kept = [t for t in parsed.tensors if keep(t)]
    spans = [(t, t.offset, ends[ends.index(t.offset) + 1]) for t in kept]
    header = MAGIC + struct.pack("<IQQ", parsed.version, len(kept), len(parsed.kv_raw))
    for key, vtype, raw in parsed.kv_raw:
        value = struct.pack("<I", layers) if key == declared else raw
        header += _string(key) + struct.pack("<I", vtype) + value
    offsets, position = [], 0
    for _, start, end in spans:
        offsets.append(position)
        position += -(-(end - start) // parsed.alignment) * parsed.alignment
    header += b"".join(t.encode(o) for (t, _, _), o in zip(spans, offsets, strict=True))
    header += b"\0" * (-len(header) % parsed.alignment)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with source.open("rb") as src, tmp.open("wb") as out:
            out.write(header)
            for (_, start, end), offset in zip(spans, offsets, strict=True):
                out.seek(len(header) + offset)
                src.seek(parsed.data_start + start)
                out.write(src.read(end - start))
            out.truncate(len(header) + position)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


# ggml type ids of the tensor types `read_tensor` decodes, and their bytes per block of values.
F32, F16, Q8_0, BF16 = 0, 1, 8, 30


def metadata_string(parsed: Parsed, key: str) -> str:
    """A string metadata value (e.g. `general.architecture`)."""
    for name, vtype, raw in parsed.kv_raw:
        if name == key and vtype == _STRING:
            return raw[8:].decode("utf-8")
    raise ConfigError(f"no string metadata {key!r} in the GGUF file")


def metadata_float(parsed: Parsed, key: str) -> float:
    """A float32 metadata value (e.g. `llama.attention.layer_norm_rms_epsilon`)."""
    for name, vtype, raw in parsed.kv_raw:
        if name == key and vtype == 6:
            return float(struct.unpack("<f", raw)[0])
    raise ConfigError(f"no float metadata {key!r} in the GGUF file")


def read_tensor(path: Path, parsed: Parsed, name: str) -> np.ndarray:
    """A tensor as stored, memory-mapped (nothing is read until used): float32 for F32, float16 for F16,
    uint16 bit patterns for BF16 (see `bf16_to_float32`), and (scale, 32 int8) blocks for Q8_0. Rows are
    the first dimension (GGUF lists dimensions innermost first)."""
    info = next((t for t in parsed.tensors if t.name == name), None)
    if info is None:
        raise ConfigError(f"{path}: no tensor {name!r}")
    inner = info.dims[0]
    rows = 1
    for d in info.dims[1:]:
        rows *= d
    offset = parsed.data_start + info.offset
    if info.ggml_type == Q8_0:
        if inner % 32:
            raise ConfigError(f"{path}: {name} is Q8_0 with rows of {inner} values")
        block = np.dtype([("d", "<f2"), ("q", "i1", (32,))])
        return np.memmap(path, dtype=block, mode="r", offset=offset, shape=(rows, inner // 32))
    dtypes = {F32: "<f4", F16: "<f2", BF16: "<u2"}
    if info.ggml_type not in dtypes:
        raise ConfigError(f"{path}: {name} has ggml type {info.ggml_type}, which the router does not read")
    return np.memmap(path, dtype=dtypes[info.ggml_type], mode="r", offset=offset, shape=(rows, inner))


def rows_as_float32(table: np.ndarray, ids: list[int]) -> np.ndarray:
    """Rows `ids` of a table from `read_tensor`, dequantized to float32 as ggml does it."""
    picked = np.asarray(table[ids])
    if picked.dtype.names == ("d", "q"):
        return (picked["d"].astype(np.float32)[:, :, None] * picked["q"].astype(np.float32)).reshape(len(ids), -1)
    if picked.dtype == np.uint16:
        return (picked.astype(np.uint32) << 16).view(np.float32)
    return picked.astype(np.float32)
