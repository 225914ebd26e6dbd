"""`python -m cli ...` (used by torchrun: `torchrun --nproc_per_node 2 -m cli train ...`)."""

from cli.main import main

main()
