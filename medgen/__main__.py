"""`python -m medgen ...` runs the CLI (also under torchrun: `torchrun --nproc_per_node 2 -m medgen train ...`)."""

from medgen.cli.main import main

main()
