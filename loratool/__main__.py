"""`python -m loratool` — what `accelerate launch -m loratool train ...` runs on each process."""

from loratool.cli import main

main()
