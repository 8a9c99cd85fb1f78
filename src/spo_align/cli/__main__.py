"""`python -m spo_align.cli ...`: the `spo` command without its console script."""

from spo_align.cli import main

main()
