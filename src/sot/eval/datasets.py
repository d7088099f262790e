"""Named datasets (`vicuna80`, `lima`): public sources fetched once, checked against pinned sums, joined, cached.

Sources: the Skeleton-of-Thought reference repository (imagination-research/sot, MIT) at a pinned commit,
`data/vicuna/router.csv` and `data/lima/router.csv` (`label;request`, `;`-separated CSV, label 1 = the
question suits SoT); and Vicuna's categories and question numbers from FastChat
(`fastchat/llm_judge/data/vicuna_bench/question.jsonl`, lm-sys/FastChat, Apache-2.0), joined by question
text. The result is the project's question format (`sot.eval.dataset`): `vicuna-NN` ids with FastChat's
categories, `lima-NNNN` ids in file order.

Each source file is downloaded on first use, checked against its pinned sum before anything is written,
and stored in the user's cache directory (`platformdirs`: `$XDG_CACHE_HOME/sot/datasets` on Linux) by
writing a temporary file and renaming it, so a failed or interrupted download leaves no partial file. Later
runs read the cache (re-checking the sum) and make no request; offline, a cached copy is all that is
needed, and a missing one is an error that names the files to download and where to put them. The joined
questions are also written there as `<name>.jsonl`, a file any command accepts as a path.

Settings (environment): `SOT_DATASETS_DIR` (the cache directory), `SOT_DATASETS_SOT_URL` and
`SOT_DATASETS_FASTCHAT_URL` (base URLs the source paths are appended to), `SOT_DATASETS_SHA256_<KEY>` (a
source's sum, KEY as in `Source.key`: SOT_VICUNA_ROUTER, SOT_LIMA_ROUTER, FASTCHAT_VICUNA_QUESTIONS).

About the pinned sums: they were derived offline (this project was built without network access) from
the questions of `vicuna80.jsonl` and `lima_router.jsonl` laid out as the public files are (CRLF between
CSV rows, no final newline; FastChat's JSON lines), and agree with text copies of the public files in
length and at every position compared, but were not computed from downloaded bytes. If a download fails
its check, the error says so; set the matching `SOT_DATASETS_SHA256_*` after checking the file, or pass a
path.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sot.eval.dataset import DatasetError, Question, load_dataset, parse_dataset

SOT_COMMIT = "54f506fee30b762f794321f56d9fc1daeac438bf"
FASTCHAT_COMMIT = "589532dcfa83700f950b9aa3983416c543afabc0"
BASE_URLS: dict[str, str] = {
    "sot": f"https://raw.githubusercontent.com/imagination-research/sot/{SOT_COMMIT}/",
    "fastchat": f"https://raw.githubusercontent.com/lm-sys/FastChat/{FASTCHAT_COMMIT}/",
}
DOWNLOAD_TIMEOUT = 30.0


@dataclass(frozen=True, slots=True)
class Source:
    """One public file a named dataset is built from."""

    key: str  # names the file in the cache and in the SHA-256 override
    repo: str  # which base URL: "sot" or "fastchat"
    path: str  # the file's path in its repository
    sha256: str

    @property
    def file_name(self) -> str:
        return self.key.lower().replace("_", "-") + Path(self.path).suffix


VICUNA_ROUTER = Source(
    "SOT_VICUNA_ROUTER",
    "sot",
    "data/vicuna/router.csv",
    "88f28cf079ff2cb2d3e21db62a8dd533dfbf99d1c80c6b48eb736063e5fee42a",
)
LIMA_ROUTER = Source(
    "SOT_LIMA_ROUTER",
    "sot",
    "data/lima/router.csv",
    "3b955ff6c8a61be872d659279e5c60a4136f202782594c3dce5cc5729489e1a5",
)
FASTCHAT_VICUNA = Source(
    "FASTCHAT_VICUNA_QUESTIONS",
    "fastchat",
    "fastchat/llm_judge/data/vicuna_bench/question.jsonl",
    "c248c5c98ba45bb0c2aadae2f270e643bd32679c6c306a3b2a503ac4254cdaa5",
)


def default_cache_dir() -> Path:
    """`$SOT_DATASETS_DIR`, else the user's cache directory for `sot` (platformdirs) + `/datasets`."""
    env = os.environ.get("SOT_DATASETS_DIR")
    if env:
        return Path(env).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("sot", appauthor=False)) / "datasets"


@dataclass(frozen=True)
class DatasetSettings:
    """Where named datasets are cached and fetched from, and the sums they must have."""

    cache_dir: Path
    base_urls: Mapping[str, str] = field(default_factory=lambda: dict(BASE_URLS))
    sums: Mapping[str, str] = field(default_factory=dict)  # overrides by Source.key
    timeout: float = DOWNLOAD_TIMEOUT

    @classmethod
    def from_env(cls) -> DatasetSettings:
        """The defaults, overridden by the `SOT_DATASETS_*` environment variables (module docstring)."""
        urls = dict(BASE_URLS)
        for repo in urls:
            override = os.environ.get(f"SOT_DATASETS_{repo.upper()}_URL")
            if override:
                urls[repo] = override if override.endswith("/") else override + "/"
        sums = {
            source.key: os.environ[f"SOT_DATASETS_SHA256_{source.key}"].strip().lower()
            for source in (VICUNA_ROUTER, LIMA_ROUTER, FASTCHAT_VICUNA)
            if os.environ.get(f"SOT_DATASETS_SHA256_{source.key}")
        }
        return cls(cache_dir=default_cache_dir(), base_urls=urls, sums=sums)

    def url(self, source: Source) -> str:
        return self.base_urls[source.repo] + source.path

    def sha256(self, source: Source) -> str:
        return self.sums.get(source.key, source.sha256)

    def cached(self, source: Source) -> Path:
        return self.cache_dir / source.file_name


# -- joining the sources -----------------------------------------------------------------------------------


def router_rows(data: bytes, where: str) -> list[tuple[bool, str]]:
    """(suits SoT, question) from a `label;request` file, in file order."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{where}: not UTF-8 ({exc.reason})") from None
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=";")
    header = next(reader, None)
    if header != ["label", "request"]:
        raise DatasetError(f"{where}: expected the header 'label;request', got {header!r}")
    rows: list[tuple[bool, str]] = []
    for number, row in enumerate(reader, start=2):
        if len(row) != 2 or row[0] not in ("0", "1"):
            raise DatasetError(f"{where}: row {number} is not 'label;request' with label 0 or 1")
        rows.append((row[0] == "1", row[1]))
    return rows


def fastchat_questions(data: bytes, where: str) -> dict[str, tuple[int, str]]:
    """{question text: (question_id, category)} from FastChat's question.jsonl."""
    out: dict[str, tuple[int, str]] = {}
    for number, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            out[row["turns"][0]] = (int(row["question_id"]), str(row["category"]))
        except (ValueError, KeyError, IndexError, TypeError):
            raise DatasetError(f"{where}:{number}: not a FastChat question record") from None
    return out


def join_vicuna(files: Mapping[str, bytes]) -> list[dict[str, Any]]:
    """The 80 Vicuna questions: SoT's labels and text, FastChat's numbers and categories."""
    labels = router_rows(files[VICUNA_ROUTER.key], VICUNA_ROUTER.path)
    known = fastchat_questions(files[FASTCHAT_VICUNA.key], FASTCHAT_VICUNA.path)
    records: list[dict[str, Any]] = []
    for suitable, question in labels:
        if question not in known:
            raise DatasetError(f"{VICUNA_ROUTER.path}: {question[:60]!r} is not in {FASTCHAT_VICUNA.path}")
        number, category = known[question]
        records.append(
            {"id": f"vicuna-{number:02d}", "category": category, "question": question, "sot_suitable": suitable}
        )
    return records


def join_lima(files: Mapping[str, bytes]) -> list[dict[str, Any]]:
    """LIMA's questions with SoT's labels, numbered in file order."""
    rows = router_rows(files[LIMA_ROUTER.key], LIMA_ROUTER.path)
    return [
        {"id": f"lima-{n:04d}", "question": question, "sot_suitable": suitable}
        for n, (suitable, question) in enumerate(rows, start=1)
    ]


@dataclass(frozen=True)
class NamedDataset:
    """A dataset that `--dataset NAME` fetches: its sources and how they are joined."""

    name: str
    description: str
    sources: tuple[Source, ...]
    join: Callable[[Mapping[str, bytes]], list[dict[str, Any]]]


NAMED: dict[str, NamedDataset] = {
    d.name: d
    for d in (
        NamedDataset(
            "vicuna80",
            "the 80 Vicuna questions of the SoT paper, with its suitability labels (37 suitable)",
            (VICUNA_ROUTER, FASTCHAT_VICUNA),
            join_vicuna,
        ),
        NamedDataset(
            "lima",
            "1,030 LIMA questions with the SoT paper's router labels (371 suitable)",
            (LIMA_ROUTER,),
            join_lima,
        ),
    )
}


def to_jsonl(records: list[dict[str, Any]]) -> str:
    """Records as JSON lines, as the project's dataset files are written."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)


# -- fetching and caching ----------------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to a temporary file next to `path`, then rename it: readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def download(url: str, timeout: float) -> bytes:
    """The body of a GET; `OSError` (URLError, HTTPError, timeouts) when it cannot be had."""
    request = urllib.request.Request(url, headers={"User-Agent": "sot-datasets"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        body: bytes = response.read()
    return body


class SourceUnavailable(Exception):
    """A source is neither cached nor downloadable; the reason is the message."""


def read_cached(source: Source, settings: DatasetSettings) -> bytes | None:
    """The cached file's bytes when it is there and has the expected sum."""
    path = settings.cached(source)
    try:
        data = path.read_bytes()
    except OSError:  # absent, or unreadable: fetched (and written) again, which reports a cache it cannot use
        return None
    return data if sha256_hex(data) == settings.sha256(source) else None


def fetch_source(source: Source, settings: DatasetSettings, *, fetch: bool = True) -> bytes:
    """A source's bytes: from the cache, else downloaded, checked and cached."""
    cached = read_cached(source, settings)
    if cached is not None:
        return cached
    if not fetch:
        raise SourceUnavailable("not cached, and downloads are off")
    url = settings.url(source)
    try:
        data = download(url, settings.timeout)
    except (OSError, ValueError) as exc:
        raise SourceUnavailable(f"{url}: {getattr(exc, 'reason', None) or exc}") from None
    got, expected = sha256_hex(data), settings.sha256(source)
    if got != expected:
        raise DatasetError(
            f"{url}: SHA-256 {got} does not match the pinned {expected}; nothing was cached. If the file "
            f"changed on purpose, check it and set SOT_DATASETS_SHA256_{source.key}, or pass a JSONL path."
        )
    try:
        write_atomically(settings.cached(source), data)
    except OSError as exc:
        raise DatasetError(
            f"cannot write the dataset cache {settings.cache_dir} ({exc}); set SOT_DATASETS_DIR elsewhere"
        ) from None
    return data


def missing_message(dataset: NamedDataset, settings: DatasetSettings, reason: str) -> str:
    """What to do when a named dataset can be neither read from the cache nor downloaded."""
    files = ", ".join(f"{settings.url(s)} as {settings.cached(s)}" for s in dataset.sources)
    return (
        f"dataset {dataset.name!r} is not cached and could not be downloaded ({reason}). Download {files} "
        f"(SHA-256 checked on use), or pass a JSONL dataset file instead, e.g. --dataset path/to/questions.jsonl"
    )


def load_named(name: str, *, settings: DatasetSettings | None = None, fetch: bool = True) -> list[Question]:
    """A named dataset's questions, fetching and caching its sources if needed."""
    dataset = NAMED[name]
    settings = settings or DatasetSettings.from_env()
    try:
        files = {s.key: fetch_source(s, settings, fetch=fetch) for s in dataset.sources}
    except SourceUnavailable as exc:
        raise DatasetError(missing_message(dataset, settings, str(exc))) from None
    text = to_jsonl(dataset.join(files))
    joined = settings.cache_dir / f"{name}.jsonl"
    with contextlib.suppress(OSError):  # a convenience copy; the sources are what is checked
        if not joined.exists() or joined.read_text(encoding="utf-8") != text:
            write_atomically(joined, text.encode("utf-8"))
    return parse_dataset(text.splitlines(), source=f"{name} ({settings.cache_dir})")


def open_dataset(spec: str | os.PathLike[str], *, fetch: bool = True) -> list[Question]:
    """`vicuna80` or `lima` (named, fetched on first use), or the path of a JSONL dataset file.

    A name wins over a file of the same name in the working directory: pass `./vicuna80` for that.
    """
    text = os.fspath(spec)
    if text in NAMED:
        return load_named(text, fetch=fetch)
    return load_dataset(text)


def dataset_stem(spec: str | os.PathLike[str]) -> str:
    """The base name a results file is named after: the dataset's name, or the file's stem."""
    text = os.fspath(spec)
    return text if text in NAMED else Path(text).stem
