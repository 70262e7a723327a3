"""`python -m memscan` runs the CLI."""

from memscan.cli import main

main()
