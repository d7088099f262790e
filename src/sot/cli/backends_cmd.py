"""`sot backends`: the installed backends (built-in and from plugins), with what each can do and needs."""

from __future__ import annotations

import json
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from sot.backends.registry import ENTRY_POINT_GROUP, BackendEntry, registry
from sot.errors import ConfigError


def describe_entry(entry: BackendEntry) -> dict[str, Any]:
    """One backend as the command shows it: source, target, capabilities, and why it cannot work, if it cannot."""
    info: dict[str, Any] = {
        "name": entry.name,
        "source": entry.source,
        "target": entry.target,
        "capabilities": None,
        "description": "",
        "status": "ok",
    }
    if entry.shadowed:
        info["shadowed"] = list(entry.shadowed)
    try:
        capabilities = entry.capabilities()
        info["capabilities"] = capabilities.as_dict() if capabilities is not None else None
        info["description"] = entry.description()
        missing = entry.missing()
    except ConfigError as exc:
        info["status"] = str(exc)
        return info
    if missing:
        info["status"] = missing
    return info


def _mark(capabilities: dict[str, Any] | None, key: str) -> str:
    if capabilities is None:
        return "?"
    return "yes" if capabilities.get(key) else "no"


def _table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title=f"sot backends (entry-point group {ENTRY_POINT_GROUP!r})", title_justify="left")
    for column in ("name", "from", "prefill", "prompt cache", "batching", "concurrent", "status", "about"):
        table.add_column(column, overflow="fold")
    for row in rows:
        capabilities = row["capabilities"]
        notes = (capabilities or {}).get("notes") or ""
        about = row["description"] + (f" ({notes})" if notes else "")
        if row.get("shadowed"):
            about += f" [ignored, same name: {', '.join(row['shadowed'])}]"
        table.add_row(
            row["name"],
            row["source"],
            _mark(capabilities, "prefill"),
            _mark(capabilities, "prompt_cache"),
            _mark(capabilities, "batching"),
            _mark(capabilities, "concurrent"),
            row["status"],
            about,
        )
    return table


@click.command("backends")
@click.option("--json", "as_json", is_flag=True, help="Print the list as JSON.")
def backends(as_json: bool) -> None:
    """List the installed backends and their capabilities (prefill, prompt cache, batching, concurrency).

    A package adds one through the `sot.backends` entry-point group; `sot ask -b NAME` then uses it.
    """
    rows = [describe_entry(entry) for entry in registry().values()]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    Console().print(_table(rows))
