"""The `medgen` command: a typer app; each command parses options and calls one medgen function."""

from __future__ import annotations

from typing import Annotated

import typer

import medgen

ENVIRONMENT = (
    "Environment: MEDGEN_QUIET=1 turns off progress bars and log lines on stderr (batch jobs, tests); "
    "MEDGEN_DEBUG=1 shows the full traceback of an error; MEDGEN_CACHE_DIR is where the built-in phantom "
    "cohort is cached (default ~/.cache/medgen). Exit codes: 0 ok, 1 a known error (one line), 2 a usage error."
)

app = typer.Typer(
    name="medgen",
    help="3D generative models for brain MRI synthesis as data augmentation, and unsupervised "
    "scene segmentation with a parallel-decoder VAE.",
    epilog=ENVIRONMENT,
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"medgen {medgen.__version__}")
        raise typer.Exit()


@app.callback()
def root(
    version: Annotated[
        bool, typer.Option("--version", "-V", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """medgen command-line interface."""


def _register() -> None:
    # Command modules import only typer at module level; the library is imported when a command runs.
    from medgen.cli.commands import COMMANDS

    for module in COMMANDS:
        module.register(app)


_register()


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
