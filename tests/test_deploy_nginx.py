"""`sot serve --workers 2` in front of a real load balancer: Debian's nginx hashing on `X-SoT-Session` in front of
two test upstream processes (the model replicas). With the routing header, every question's skeleton and points
reach one replica and both replicas get questions; without it, nginx round-robins and a question's points
are split. The nginx configuration is the README's ("Deploying"), read from there.

Everything runs as real processes on 127.0.0.1. nginx is installed by scripts/test; without it the module is
skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from sot.testing.process import ServiceProcess, free_port, serve_command, upstream_command
from upstream_helpers import get_requests, reset_stats

NGINX = shutil.which("nginx") or next((p for p in ("/usr/sbin/nginx",) if os.access(p, os.X_OK)), None)
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not on PATH (scripts/test installs Debian's nginx)")

README = Path(__file__).resolve().parents[1] / "README.md"
QUESTIONS = 40
POINTS = 3
UPSTREAM: dict[str, Any] = {"ttft": 0.01, "tokens_per_second": 2000, "skeleton_points": POINTS, "tokens_per_answer": 20}
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def readme_nginx_block() -> str:
    """The nginx configuration of the README's "Deploying" section."""
    section = README.read_text().split("## Deploying", 1)[1].split("\n## ", 1)[0]
    found = re.search(r"```nginx\n(.*?)```", section, re.S)
    if found is None:
        raise AssertionError("README's Deploying section has no nginx block")
    return found.group(1)


def nginx_config(prefix: Path, listen: int, replicas: list[int]) -> str:
    """The README's block on this test's ports, inside a main configuration that keeps every file in `prefix`."""
    block = readme_nginx_block().replace("listen 127.0.0.1:8080;", f"listen 127.0.0.1:{listen};")
    block = block.replace("server 127.0.0.1:8001;", f"server 127.0.0.1:{replicas[0]};")
    block = block.replace("server 127.0.0.1:8002;", f"server 127.0.0.1:{replicas[1]};")
    temp = "\n".join(f"    {kind}_temp_path {prefix}/{kind}_temp;" for kind in ("client_body", "proxy", "fastcgi"))
    temp += f"\n    uwsgi_temp_path {prefix}/uwsgi_temp;\n    scgi_temp_path {prefix}/scgi_temp;"
    user = "user root;\n" if os.geteuid() == 0 else ""  # as root, workers would switch to `nobody`
    return (
        f"{user}worker_processes 1;\npid {prefix}/nginx.pid;\nerror_log {prefix}/error.log warn;\n"
        "events { worker_connections 1024; }\n"
        f"http {{\n    access_log {prefix}/access.log;\n{temp}\n{block}}}\n"
    )


def wait_for_port(port: int, process: subprocess.Popen[bytes], log: Path, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited with {process.returncode}: {log.read_text(errors='replace')}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nginx did not listen on {port}: {log.read_text(errors='replace')}")


@contextlib.contextmanager
def running_nginx(replicas: list[int]) -> Iterator[str]:
    """nginx in the foreground with the README's configuration; yields its base URL ("http://127.0.0.1:PORT/v1")."""
    if NGINX is None:
        raise RuntimeError("no nginx")
    with tempfile.TemporaryDirectory(prefix="sot-nginx-") as temp:
        prefix, port = Path(temp), free_port()
        conf = prefix / "nginx.conf"
        conf.write_text(nginx_config(prefix, port, replicas))
        log = prefix / "error.log"
        command = [NGINX, "-e", str(log), "-c", str(conf), "-p", str(prefix), "-g", "daemon off;"]
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        try:
            wait_for_port(port, process, log)
            yield f"http://127.0.0.1:{port}/v1"
        finally:
            process.terminate()
            process.wait(timeout=10)


@dataclass
class Deployment:
    replicas: list[str]  # the two upstreams' base URLs
    sticky: str  # sot serve --workers 2 with the routing header
    unsticky: str  # sot serve --workers 2 with --routing-header none


@pytest.fixture(scope="module")
def deployment() -> Iterator[Deployment]:
    ports = [free_port(), free_port()]
    replicas = [
        ServiceProcess(upstream_command(port, **UPSTREAM), name=f"replica{i}").launch() for i, port in enumerate(ports)
    ]
    fronts: list[ServiceProcess] = []
    try:
        urls = [replica.wait_ready() for replica in replicas]
        with running_nginx(ports) as balancer:
            common = {"backend": "openai", "base_url": balancer, "model": "test", "workers": 2, "metrics": True}
            fronts = [
                ServiceProcess(serve_command(**common), name="sticky").launch(),
                ServiceProcess(serve_command(routing_header="none", **common), name="unsticky").launch(),
            ]
            sticky, unsticky = (front.wait_ready().rstrip("/") + "/v1" for front in fronts)
            yield Deployment(replicas=urls, sticky=sticky, unsticky=unsticky)
    finally:
        for process in [*fronts, *replicas]:
            process.terminate()
        for process in [*fronts, *replicas]:
            process.stop()


async def ask_all(base_url: str, questions: list[str], **options: Any) -> list[Any]:
    """Every question as a SoT chat completion, 8 at a time, each with its own X-Request-ID."""
    client = openai.AsyncOpenAI(base_url=base_url, api_key="k", max_retries=0, timeout=60)
    limit = asyncio.Semaphore(8)

    async def ask(i: int, question: str) -> Any:
        async with limit:
            return await client.chat.completions.with_raw_response.create(
                model="sot:test",
                messages=[{"role": "user", "content": question}],
                extra_headers={"X-Request-ID": f"q-{i}", **options.get("headers", {})},
                **{k: v for k, v in options.items() if k != "headers"},
            )

    try:
        return await asyncio.gather(*(ask(i, q) for i, q in enumerate(questions)))
    finally:
        await client.close()


def records(deployment: Deployment) -> list[tuple[int, dict[str, Any]]]:
    """(replica index, record) of every request the replicas saw."""
    return [(i, record) for i, url in enumerate(deployment.replicas) for record in get_requests(url)]


def question_texts(tag: str) -> list[str]:
    topics = ["sleep", "travel", "cooking", "saving money", "learning music", "running", "gardening", "writing"]
    return [f"What are the best tips for {topics[i % len(topics)]}, case {tag}-{i}?" for i in range(QUESTIONS)]


def test_each_questions_skeleton_and_points_reach_one_replica(deployment: Deployment) -> None:
    for url in deployment.replicas:
        reset_stats(url)
    responses = asyncio.run(ask_all(deployment.sticky, question_texts("sticky")))
    assert [r.headers["x-request-id"] for r in responses] == [f"q-{i}" for i in range(QUESTIONS)]
    assert all(r.parse().sot["mode_used"] == "sot" for r in responses)  # type: ignore[attr-defined]
    by_key: dict[str, set[int]] = defaultdict(set)
    kinds: dict[str, Counter[str]] = defaultdict(Counter)
    request_ids: dict[str, set[str]] = defaultdict(set)
    for replica, record in records(deployment):
        key = record["headers"]["x-sot-session"]
        by_key[key].add(replica)
        kinds[key][record["kind"]] += 1
        request_ids[key].add(record["headers"]["x-request-id"])
    assert len(by_key) == QUESTIONS
    assert all(len(replicas) == 1 for replicas in by_key.values()), by_key
    assert all(k == Counter({"skeleton": 1, "point": POINTS}) for k in kinds.values())
    # One key per question: the request id the client sent reached the replica with every request of it.
    assert sorted(len(ids) for ids in request_ids.values()) == [1] * QUESTIONS
    served = Counter(next(iter(replicas)) for replicas in by_key.values())
    assert set(served) == {0, 1}, served  # both replicas answered questions
    metrics = fetch_text(deployment.sticky.removesuffix("/v1") + "/metrics")
    assert 'sot_requests_total{mode_requested="sot",mode_used="sot",outcome="ok"} 40.0' in metrics


def test_without_the_routing_header_a_questions_points_are_split(deployment: Deployment) -> None:
    for url in deployment.replicas:
        reset_stats(url)
    asyncio.run(ask_all(deployment.unsticky, question_texts("round-robin")))
    by_question: dict[str, set[int]] = defaultdict(set)
    for replica, record in records(deployment):
        assert "x-sot-session" not in record["headers"]
        by_question[record["headers"]["x-request-id"]].add(replica)
    assert len(by_question) == QUESTIONS
    split = sum(len(replicas) == 2 for replicas in by_question.values())
    assert split >= QUESTIONS // 2, f"only {split} of {QUESTIONS} questions were split between the replicas"


def test_a_conversation_keeps_its_replica_across_turns(deployment: Deployment) -> None:
    for url in deployment.replicas:
        reset_stats(url)
    turns = [f"Tell me about healthy habits, turn {i}?" for i in range(3)]
    asyncio.run(ask_all(deployment.sticky, turns, user="alice@example.com"))
    asyncio.run(ask_all(deployment.sticky, turns, headers={"X-SoT-Session": "conversation-7"}))
    seen: dict[str, set[int]] = defaultdict(set)
    for replica, record in records(deployment):
        seen[record["headers"]["x-sot-session"]].add(replica)
    assert set(seen) == {"alice@example.com", "conversation-7"}
    assert all(len(replicas) == 1 for replicas in seen.values())


def fetch_text(url: str) -> str:
    with OPENER.open(url, timeout=10) as response:
        return str(response.read().decode())
