"""`python -m sot`: the same as the `sot` command."""

from sot.cli import main

main()
