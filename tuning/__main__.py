"""`python -m tuning` runs the `frozen-tune` command."""

from tuning.cli import main

main()
