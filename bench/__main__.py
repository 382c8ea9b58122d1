"""`python -m bench WHICH`: the same command as `overlayctl bench` (bench.cli)."""

from .cli import main

main()
