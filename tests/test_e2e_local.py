"""End to end on the real embedded model: `sot ask` in sot mode gives a real multi-point answer, offline."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow

QUESTION = "How can I improve my time management skills?"


def run_sot(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    # No network for the model: hub variables set as a hub-using library would need them, and no proxy.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_PROXY": "*"}
    return subprocess.run(
        [sys.executable, "-m", "sot", *args], capture_output=True, text=True, timeout=timeout, env=env, check=False
    )


def test_sot_ask_on_the_embedded_model_gives_at_least_three_ordered_points() -> None:
    done = run_sot("ask", QUESTION, "--json")
    assert done.returncode in (0, 3), done.stderr  # 3: complete=False, reported rather than hidden
    result = json.loads(done.stdout)
    assert result["backend"] == "local" and result["mode_used"] == "sot", result.get("fallback_reason")
    assert len(result["points"]) >= 3
    assert all(p.strip() for p in result["points"])
    assert all(e.strip() for e in result["expansions"]), result["expansions"]
    # One numbered item per point, in order; an expansion's own extra lines are indented under its item.
    lines = [line for line in result["answer"].splitlines() if not line.startswith("   ")]
    assert [int(re.match(r"(\d+)\. ", line).group(1)) for line in lines] == list(range(1, len(lines) + 1))
    for line, point in zip(lines, result["points"], strict=True):
        assert line.startswith(f"{lines.index(line) + 1}. {point}")
    stats = result["stats"]
    assert stats["skeleton_seconds"] < stats["total_seconds"]
    assert len(stats["points"]) == len(result["points"])
    # The fork: point prompts reused the skeleton's KV cache instead of recomputing it.
    assert stats["computed_prompt_tokens"] < stats["prompt_tokens"] / 2
    assert result["complete"] == (done.returncode == 0)


def test_sot_ask_plain_output_and_summary() -> None:
    done = run_sot("ask", "--mode", "normal", "--max-tokens", "40", "Name three colours.")
    assert done.returncode in (0, 3), done.stderr
    assert done.stdout.strip()
    assert "mode normal" in done.stderr and "tokens" in done.stderr
    if done.returncode == 3:
        assert "TRUNCATED" in done.stderr
