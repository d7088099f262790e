"""Named datasets: the whole fetch path against a local HTTP server, checksums, the cache, offline errors.

The sources here are small synthetic files in the public files' layout; whether the real sources join into
`../shared`'s files is tested in `test_eval_shared_data.py`.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from sot.eval.dataset import DatasetError, Question
from sot.eval.datasets import (
    FASTCHAT_VICUNA,
    LIMA_ROUTER,
    NAMED,
    VICUNA_ROUTER,
    DatasetSettings,
    Source,
    dataset_stem,
    join_vicuna,
    load_named,
    open_dataset,
    router_rows,
    sha256_hex,
)

VICUNA_ROWS = [
    (1, "generic", "How can I improve my focus?", True),
    (2, "generic", 'What is a "good" habit; and why?', True),
    (3, "coding", "Write a program that prints\nhello.", False),
]


def router_csv(rows: list[tuple[bool, str]]) -> bytes:
    """A `label;request` file as the public ones are laid out: CSV quoting, CRLF between rows, no final newline."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, delimiter=";")
    writer.writerow(["label", "request"])
    for suitable, question in rows:
        writer.writerow([int(suitable), question])
    return buffer.getvalue().removesuffix("\r\n").encode()


def fastchat_jsonl(rows: list[tuple[int, str, str, bool]]) -> bytes:
    lines = [json.dumps({"question_id": n, "category": c, "turns": [q]}) + "\n" for n, c, q, _ in rows]
    return "".join(lines).encode()


def synthetic_sources() -> dict[str, bytes]:
    return {
        VICUNA_ROUTER.key: router_csv([(s, q) for _, _, q, s in VICUNA_ROWS]),
        FASTCHAT_VICUNA.key: fastchat_jsonl(VICUNA_ROWS),
        LIMA_ROUTER.key: router_csv([(False, "Can brain cells move?"), (True, " Why is the sky blue? ")]),
    }


class FileServer:
    """A 127.0.0.1 HTTP server for files by URL path; counts the requests it gets."""

    def __init__(self, files: dict[str, bytes]) -> None:
        self.files = files
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                server.requests.append(self.path)
                body = server.files.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def serve(files: dict[str, bytes], server: FileServer) -> None:
    """Put the sources where the settings' base URLs point (one base per repository)."""
    for source in (VICUNA_ROUTER, LIMA_ROUTER, FASTCHAT_VICUNA):
        server.files[f"/{source.repo}/{source.path}"] = files[source.key]


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    """Requests to 127.0.0.1 go straight to the test server, whatever proxy the environment names."""
    for name in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def server() -> Iterator[FileServer]:
    running = FileServer({})
    yield running
    running.close()


def settings_for(cache: Path, url: str, files: dict[str, bytes]) -> DatasetSettings:
    """Settings that fetch from `url` and expect the sums of `files`."""
    return DatasetSettings(
        cache_dir=cache,
        base_urls={"sot": f"{url}/sot/", "fastchat": f"{url}/fastchat/"},
        sums={key: sha256_hex(data) for key, data in files.items()},
        timeout=5.0,
    )


def test_fetch_check_join_and_cache(tmp_path: Path, server: FileServer) -> None:
    files = synthetic_sources()
    serve(files, server)
    settings = settings_for(tmp_path / "cache", server.url, files)
    questions = load_named("vicuna80", settings=settings)
    assert questions == [
        Question("vicuna-01", "How can I improve my focus?", "generic", True),
        Question("vicuna-02", 'What is a "good" habit; and why?', "generic", True),
        Question("vicuna-03", "Write a program that prints\nhello.", "coding", False),
    ]
    assert sorted(server.requests) == ["/fastchat/" + FASTCHAT_VICUNA.path, "/sot/" + VICUNA_ROUTER.path]
    cached = sorted(p.name for p in (tmp_path / "cache").iterdir())
    assert cached == ["fastchat-vicuna-questions.jsonl", "sot-vicuna-router.csv", "vicuna80.jsonl"]
    assert (tmp_path / "cache" / "sot-vicuna-router.csv").read_bytes() == files[VICUNA_ROUTER.key]
    # The joined copy is a dataset file like any other.
    assert open_dataset(tmp_path / "cache" / "vicuna80.jsonl") == questions

    # A second run reads the cache and sends nothing.
    server.requests.clear()
    assert load_named("vicuna80", settings=settings) == questions
    assert server.requests == []


def test_lima_keeps_the_file_order_and_labels(tmp_path: Path, server: FileServer) -> None:
    files = synthetic_sources()
    serve(files, server)
    questions = load_named("lima", settings=settings_for(tmp_path, server.url, files))
    assert [(q.id, q.question, q.sot_suitable, q.category) for q in questions] == [
        ("lima-0001", "Can brain cells move?", False, "uncategorized"),
        ("lima-0002", "Why is the sky blue?", True, "uncategorized"),
    ]
    # The joined file keeps the source's text as it is (the loader strips it).
    assert '"question": " Why is the sky blue? "' in (tmp_path / "lima.jsonl").read_text()


def test_a_checksum_mismatch_is_an_error_and_caches_nothing(tmp_path: Path, server: FileServer) -> None:
    files = synthetic_sources()
    serve({**files, VICUNA_ROUTER.key: files[VICUNA_ROUTER.key] + b"\r\n1;An extra question?"}, server)
    cache = tmp_path / "cache"
    with pytest.raises(DatasetError) as failure:
        load_named("vicuna80", settings=settings_for(cache, server.url, files))
    message = str(failure.value)
    assert "router.csv: SHA-256" in message and "does not match the pinned" in message
    assert "SOT_DATASETS_SHA256_SOT_VICUNA_ROUTER" in message and "nothing was cached" in message
    leftovers = [p.name for p in cache.rglob("*")] if cache.exists() else []
    assert "sot-vicuna-router.csv" not in leftovers
    assert not [name for name in leftovers if name.endswith(".part")]  # no half-written file either


def test_offline_the_cache_is_enough(tmp_path: Path, server: FileServer) -> None:
    files = synthetic_sources()
    serve(files, server)
    online = settings_for(tmp_path, server.url, files)
    first = load_named("vicuna80", settings=online)
    offline = settings_for(tmp_path, "http://127.0.0.1:9", files)  # nothing listens on port 9
    assert load_named("vicuna80", settings=offline) == first


def test_offline_without_a_cache_says_what_to_download(tmp_path: Path) -> None:
    files = synthetic_sources()
    settings = settings_for(tmp_path / "empty", "http://127.0.0.1:9", files)
    with pytest.raises(DatasetError) as failure:
        load_named("vicuna80", settings=settings)
    message = str(failure.value)
    assert "dataset 'vicuna80' is not cached and could not be downloaded" in message
    assert "http://127.0.0.1:9/sot/data/vicuna/router.csv as " in message
    assert str(tmp_path / "empty" / "sot-vicuna-router.csv") in message
    assert "--dataset path/to/questions.jsonl" in message
    with pytest.raises(DatasetError, match="downloads are off"):
        load_named("lima", settings=settings, fetch=False)


def test_a_corrupt_cached_file_is_fetched_again(tmp_path: Path, server: FileServer) -> None:
    files = synthetic_sources()
    serve(files, server)
    settings = settings_for(tmp_path, server.url, files)
    (tmp_path / "sot-lima-router.csv").write_bytes(b"label;request\r\n1;truncat")
    assert len(load_named("lima", settings=settings)) == 2
    assert server.requests == ["/sot/" + LIMA_ROUTER.path]
    assert (tmp_path / "sot-lima-router.csv").read_bytes() == files[LIMA_ROUTER.key]


def test_settings_from_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SOT_DATASETS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("SOT_DATASETS_SOT_URL", "http://127.0.0.1:1/mirror")
    monkeypatch.setenv("SOT_DATASETS_SHA256_SOT_LIMA_ROUTER", "AB" * 32)
    settings = DatasetSettings.from_env()
    assert settings.cache_dir == tmp_path / "xdg" / "sot" / "datasets"
    assert settings.url(LIMA_ROUTER) == "http://127.0.0.1:1/mirror/data/lima/router.csv"
    assert settings.url(FASTCHAT_VICUNA).startswith("https://raw.githubusercontent.com/lm-sys/FastChat/")
    assert settings.sha256(LIMA_ROUTER) == "ab" * 32 and settings.sha256(VICUNA_ROUTER) == VICUNA_ROUTER.sha256
    monkeypatch.setenv("SOT_DATASETS_DIR", str(tmp_path / "mine"))
    assert DatasetSettings.from_env().cache_dir == tmp_path / "mine"


def test_the_pinned_sources_are_the_published_ones() -> None:
    assert VICUNA_ROUTER.path == "data/vicuna/router.csv" and LIMA_ROUTER.path == "data/lima/router.csv"
    settings = DatasetSettings(cache_dir=Path("."))
    assert settings.url(VICUNA_ROUTER) == (
        "https://raw.githubusercontent.com/imagination-research/sot/"
        "54f506fee30b762f794321f56d9fc1daeac438bf/data/vicuna/router.csv"
    )
    for source in (VICUNA_ROUTER, LIMA_ROUTER, FASTCHAT_VICUNA):
        assert len(source.sha256) == 64 and int(source.sha256, 16) >= 0
    assert set(NAMED) == {"vicuna80", "lima"}


def test_join_errors_name_the_file() -> None:
    files = synthetic_sources()
    with pytest.raises(DatasetError, match="expected the header 'label;request'"):
        router_rows(b"question;label\r\n", "x.csv")
    with pytest.raises(DatasetError, match="row 2 is not 'label;request' with label 0 or 1"):
        router_rows(b"label;request\r\nyes;Why?", "x.csv")
    unknown = {**files, FASTCHAT_VICUNA.key: fastchat_jsonl(VICUNA_ROWS[:2])}
    with pytest.raises(DatasetError, match=r"is not in fastchat/llm_judge/data/vicuna_bench/question\.jsonl"):
        join_vicuna(unknown)


def test_a_name_or_a_path(tmp_path: Path) -> None:
    path = tmp_path / "mine.jsonl"
    path.write_text('{"id": "a", "question": "Why?"}\n')
    assert open_dataset(str(path)) == [Question("a", "Why?")]
    assert dataset_stem("vicuna80") == "vicuna80" and dataset_stem(str(path)) == "mine"
    with pytest.raises(DatasetError, match="no such dataset file"):
        open_dataset(str(tmp_path / "lima.jsonl"))


def seed_cache(cache: Path, files: dict[str, bytes]) -> dict[str, str]:
    """Fill a dataset cache as a download would have, and the environment that trusts those files."""
    env = {}
    for source in (VICUNA_ROUTER, LIMA_ROUTER, FASTCHAT_VICUNA):
        cache.mkdir(parents=True, exist_ok=True)
        (cache / source.file_name).write_bytes(files[source.key])
        env[f"SOT_DATASETS_SHA256_{source.key}"] = hashlib.sha256(files[source.key]).hexdigest()
    return env


def test_the_cache_file_names(tmp_path: Path) -> None:
    names = {Source("SOT_LIMA_ROUTER", "sot", "data/lima/router.csv", "0" * 64).file_name}
    assert names == {"sot-lima-router.csv"}
    env = seed_cache(tmp_path, synthetic_sources())
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "fastchat-vicuna-questions.jsonl",
        "sot-lima-router.csv",
        "sot-vicuna-router.csv",
    ]
    assert len(env) == 3


def test_an_unwritable_cache_is_a_clear_error(tmp_path: Path, server: FileServer) -> None:
    files = synthetic_sources()
    serve(files, server)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(DatasetError, match="cannot write the dataset cache"):
        load_named("lima", settings=settings_for(blocker / "cache", server.url, files))
