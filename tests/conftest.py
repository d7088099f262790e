"""Shared pytest configuration: the test-upstream fixtures, and a guard that no test leaks asyncio tasks."""

from __future__ import annotations

pytest_plugins = ["upstream_helpers"]
