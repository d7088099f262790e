"""Micro-benchmark of the embedded engine: 1 vs N concurrent sequences per weights format, and a SoT-like run.

Usage: PYTHONPATH=src python scripts/bench_local_batching.py [--weights q4_1,f16,bf16] [--tokens 100]
It measures through `LocalBackend` (the real scheduler), prompt processing included; it does not tune.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import statistics
import time
from typing import Any

from sot.backends.base import GenerationRequest, Message, SamplingParams, Usage
from sot.backends.local import LocalBackend
from sot.backends.local.threads import ThreadAdvisor

QUESTIONS = [
    "How can I improve my time management skills?",
    "What are the most effective ways to deal with stress?",
    "What are the main differences between Python and JavaScript?",
    "How can I increase my productivity while working from home?",
    "Can you explain the basics of quantum computing?",
    "What are the differences between plant-based and animal-based protein sources?",
    "How can I develop my critical thinking skills?",
    "What are the major challenges faced by the education sector today?",
]

SKELETON_SYSTEM = "You are a helpful assistant. Reply with a short numbered list of the key points only."
FEW_SHOT = [
    ("How do I make a good cup of tea?", "1. Fresh water\n2. Right temperature\n3. Steep time\n4. Add-ins"),
    ("Why should I exercise?", "1. Heart health\n2. Mood\n3. Sleep\n4. Weight control"),
]


def _req(question: str, max_tokens: int, **kw: Any) -> GenerationRequest:
    return GenerationRequest(
        messages=(Message("user", question),), sampling=SamplingParams(max_tokens=max_tokens), **kw
    )


async def _run(backend: LocalBackend, request: GenerationRequest, *, ignore_eos: bool = False) -> str:
    return (await _run_usage(backend, request, ignore_eos=ignore_eos))[0]


async def _run_usage(
    backend: LocalBackend, request: GenerationRequest, *, ignore_eos: bool = False
) -> tuple[str, Usage]:
    parts, usage = [], Usage()
    async for chunk in backend._stream(request, ignore_eos=ignore_eos):
        parts.append(chunk.text)
        usage = chunk.usage or usage
    return "".join(parts), usage


async def bench_formats(
    formats: list[str], tokens: int, n_seqs: int, threads: int | None, reps: int
) -> dict[str, dict[str, float]]:
    """Median tok/s per format; formats are interleaved within each repetition so that a noisy neighbour
    on the machine hurts them alike."""
    backends = {w: LocalBackend(weights=w, n_threads=threads) for w in formats}  # type: ignore[arg-type]
    for b in backends.values():
        b.load()
        await _run(b, _req("Hello!", 8))  # warm-up: page-in of the weights
    singles: dict[str, list[float]] = {w: [] for w in formats}
    batched: dict[str, list[float]] = {w: [] for w in formats}
    for _ in range(reps):
        for w, backend in backends.items():
            backend.clear_prefix_cache()
            t = time.perf_counter()
            await _run(backend, _req(QUESTIONS[0], tokens), ignore_eos=True)
            singles[w].append(tokens / (time.perf_counter() - t))
            backend.clear_prefix_cache()
            t = time.perf_counter()
            await asyncio.gather(*(_run(backend, _req(q, tokens), ignore_eos=True) for q in (QUESTIONS * 2)[:n_seqs]))
            batched[w].append(n_seqs * tokens / (time.perf_counter() - t))
    out = {}
    for w, backend in backends.items():
        out[w] = {
            "single": statistics.median(singles[w]),
            "batched": statistics.median(batched[w]),
            "threads": backend.counters().get("threads", 0.0),
        }
        await backend.aclose()
    return out


def _skeleton_request(question: str) -> GenerationRequest:
    msgs = [Message("system", SKELETON_SYSTEM)]
    for q, a in FEW_SHOT:
        msgs += [Message("user", q), Message("assistant", a)]
    msgs.append(Message("user", question))
    return GenerationRequest(messages=tuple(msgs), prefill="1.", stop=("\n\n",), sampling=SamplingParams(max_tokens=96))


async def bench_sot(weights: str, threads: int | None) -> None:
    backend = LocalBackend(weights=weights, n_threads=threads)  # type: ignore[arg-type]
    backend.load()
    for question in QUESTIONS[:3]:
        before = backend.counters()
        t0 = time.perf_counter()
        sk_req = _skeleton_request(question)
        sk_text, sk_usage = await _run_usage(backend, sk_req)
        skeleton = "1." + sk_text
        points = [m.group(1).strip() for m in re.finditer(r"^\d+\.\s*(.+)$", skeleton, re.M)][:5]
        t1 = time.perf_counter()
        base = (*sk_req.messages, Message("assistant", skeleton))
        reqs = [
            GenerationRequest(
                messages=(
                    *base,
                    Message("user", f'{question}\nOne tip is: "{p}". Explain this tip in 1-2 short sentences.'),
                ),
                prefill=f"{i}. {p}:",
                stop=("\n\n",),
                sampling=SamplingParams(max_tokens=64),
            )
            for i, p in enumerate(points, 1)
        ]
        pts = await asyncio.gather(*(_run_usage(backend, r) for r in reqs))
        pt_prompt = sum(u.prompt_tokens for _, u in pts)
        pt_computed = sum(u.computed_prompt_tokens or 0 for _, u in pts)
        t2 = time.perf_counter()
        after = backend.counters()
        d = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
        hist = {k.split(".")[1]: int(v) for k, v in sorted(d.items()) if k.startswith("batch_size.") and v}
        print(
            f"  SoT {question[:40]!r}: skeleton {t1 - t0:.2f}s (prompt {sk_usage.prompt_tokens}, computed "
            f"{sk_usage.computed_prompt_tokens}), {len(points)} points {t2 - t1:.2f}s (prompts {pt_prompt}, "
            f"computed {pt_computed}); total prompt {d['prompt_tokens']:.0f}, computed "
            f"{d['prompt_tokens_computed']:.0f}, reused {d['prompt_tokens_reused']:.0f}; generated "
            f"{d['generated_tokens']:.0f}; steps by batch size {hist}"
        )
    await backend.aclose()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--weights", default="q4_1,f16,bf16")
    ap.add_argument("--tokens", type=int, default=100)
    ap.add_argument("--seqs", type=int, default=8)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-sot", action="store_true")
    args = ap.parse_args()
    formats = args.weights.split(",")
    probe = ThreadAdvisor(2)
    probe.measure_now(1.0)
    print(f"other processes use {probe.others:.2f} cores before the run")
    results = await bench_formats(formats, args.tokens, args.seqs, args.threads, args.reps)
    for w, r in results.items():
        print(
            f"{w:5s}: 1 seq {r['single']:6.1f} tok/s | {args.seqs} concurrent {r['batched']:6.1f} tok/s summed "
            f"(x{r['batched'] / r['single']:.2f}); threads at the end: {r['threads']:.0f}"
        )
    if not args.no_sot:
        for w in formats:
            print(f"{w}:")
            await bench_sot(w, args.threads)


if __name__ == "__main__":
    asyncio.run(main())
