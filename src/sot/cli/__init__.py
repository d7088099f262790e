"""The `sot` command line: a click group whose commands are thin views of the engine's event stream."""

from __future__ import annotations

import click

from sot import __version__
from sot.cli.ask import ask
from sot.cli.backends_cmd import backends
from sot.cli.bench import bench
from sot.cli.eval_cmd import eval_group
from sot.cli.router_cmd import router
from sot.cli.serve import serve


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="sot")
def cli() -> None:
    """Skeleton-of-Thought: answer faster by writing a skeleton, then expanding its points in parallel."""


cli.add_command(ask)
cli.add_command(backends)
cli.add_command(bench)
cli.add_command(eval_group)
cli.add_command(router)
cli.add_command(serve)


def main() -> None:
    """Console-script entry point."""
    cli()
