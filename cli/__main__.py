"""`python -m medgen.cli ...`, the same as `python -m medgen ...`."""

from medgen.cli.main import main

main()
