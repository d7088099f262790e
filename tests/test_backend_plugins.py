"""Backends as plugins: the registry (entry points merged with the built-ins), `sot backends`, and a third-party
backend package (tests/plugin_backend) that `sot ask -b echo` runs through once it is installed."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

from sot.backends import create_backend
from sot.backends.registry import BUILTIN_TARGETS, ENTRY_POINT_GROUP, Capabilities, lookup, refresh, registry
from sot.engine import Engine
from sot.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]
PLUGIN = Path(__file__).resolve().parent / "plugin_backend"
QUESTION = "Why is the sky blue?"


def write_dist_info(site: Path, name: str, entry_points: dict[str, str]) -> None:
    """Entry-point metadata for an installed distribution `name` (what pip writes), in the directory `site`."""
    info = site / f"{name.replace('-', '_')}-0.1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1.0\n")
    lines = [f"[{ENTRY_POINT_GROUP}]", *(f"{key} = {value}" for key, value in entry_points.items())]
    (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def plugin_on_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """The echo package importable and registered by metadata in this process, plus one that claims "openai"."""
    site = tmp_path / "site"
    write_dist_info(site, "sot-echo-backend", {"echo": "sot_echo_backend:EchoBackend"})
    write_dist_info(site, "sot-impostor", {"openai": "sot_echo_backend:EchoBackend"})
    monkeypatch.syspath_prepend(str(PLUGIN))
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    refresh()
    yield site
    refresh()


def test_the_built_ins_are_registered_as_entry_points_in_pyproject() -> None:
    table = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"][ENTRY_POINT_GROUP]
    assert table == BUILTIN_TARGETS


def test_the_built_ins_work_without_any_entry_point_metadata(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda **_: [])
    refresh()
    try:
        assert set(registry()) == set(BUILTIN_TARGETS)
        assert create_backend("scripted").name == "scripted"
    finally:
        refresh()


def test_an_unknown_backend_is_a_config_error_listing_the_installed_ones() -> None:
    with pytest.raises(ConfigError, match="'nope' is not one of the installed backends: anthropic, azure, llm"):
        create_backend("nope")
    with pytest.raises(ConfigError, match="does not take these options"):
        create_backend("scripted", weights="q8_0")


def test_every_built_in_declares_its_capabilities() -> None:
    expected = {
        "local": (True, True, True, True),
        "anthropic": (True, True, False, True),
        "openai": (False, True, False, True),
        "llm": (False, False, False, True),
        "scripted": (True, False, False, True),
    }
    for name, flags in expected.items():
        capabilities = lookup(name).capabilities()
        assert isinstance(capabilities, Capabilities)
        assert (
            capabilities.prefill,
            capabilities.prompt_cache,
            capabilities.batching,
            capabilities.concurrent,
        ) == flags


def test_a_missing_sdk_is_a_config_error_with_an_install_hint(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "anthropic", None)  # as if it were not installed
    with pytest.raises(ConfigError, match=r"pip install 'sot\[anthropic\]'"):
        create_backend("anthropic", model="claude-sonnet-4-5")
    assert "pip install 'sot[anthropic]'" in (lookup("anthropic").missing() or "")


async def test_a_plugin_registered_by_metadata_is_found_and_runs(plugin_on_path: Path) -> None:
    entry = lookup("ECHO")
    assert entry.source == "sot-echo-backend" and entry.capabilities() == Capabilities(concurrent=True)
    backend = create_backend("echo", model="echo-2")
    result = await Engine(backend).run(QUESTION, "sot")
    assert result.backend == "echo" and result.model == "echo-2" and result.mode_used == "sot"
    assert result.points == ["Echo the question", "Echo the skeleton", "Echo every point"]
    assert result.stats.backend == {"echo_calls": 4}
    # A plugin cannot take a built-in name: the built-in stays, the other registration is listed as shadowed.
    assert lookup("openai").target == BUILTIN_TARGETS["openai"]
    assert lookup("openai").shadowed == ["sot-impostor (sot_echo_backend:EchoBackend)"]


def run_sot(*args: str, pythonpath: list[Path]) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(str(p) for p in pythonpath))
    return subprocess.run(
        [sys.executable, "-m", "sot", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
        cwd=ROOT,
    )


def check_ask_and_list(pythonpath: list[Path]) -> None:
    done = run_sot("ask", "-b", "echo", "--json", QUESTION, pythonpath=pythonpath)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["backend"] == "echo" and result["mode_used"] == "sot" and result["complete"]
    assert result["answer"].splitlines()[2] == "3. Echo every point: echoed by a plugin backend."
    listed = run_sot("backends", "--json", pythonpath=pythonpath)
    assert listed.returncode == 0, listed.stderr
    rows = {row["name"]: row for row in json.loads(listed.stdout)}
    assert rows["echo"]["source"] == "sot-echo-backend" and rows["echo"]["status"] == "ok"
    assert rows["echo"]["capabilities"]["prefill"] is False
    assert set(BUILTIN_TARGETS) <= set(rows)


def test_sot_ask_through_a_plugin_registered_by_entry_point_metadata(tmp_path: Path) -> None:
    site = tmp_path / "site"
    write_dist_info(site, "sot-echo-backend", {"echo": "sot_echo_backend:EchoBackend"})
    check_ask_and_list([site, PLUGIN])


@pytest.mark.skipif(
    importlib.util.find_spec("setuptools") is None or importlib.util.find_spec("wheel") is None,
    reason="building the plugin offline needs setuptools and wheel installed",
)
def test_sot_ask_through_a_plugin_package_installed_with_pip(tmp_path: Path) -> None:
    source = tmp_path / "plugin_backend"
    shutil.copytree(PLUGIN, source, ignore=shutil.ignore_patterns("__pycache__", "build", "*.egg-info"))
    site = tmp_path / "site"
    install = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation", "--no-index"]
    done = subprocess.run(
        [*install, "--target", str(site), str(source)], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr
    assert (site / "sot_echo_backend_0_1_0.dist-info").exists() or list(site.glob("sot_echo_backend-*.dist-info"))
    check_ask_and_list([site])
