"""Shared CLI pieces: option types, the error wrapper, stdout/stderr helpers.

Only typer and the standard library are imported here so that `medgen --help` stays fast; each
command imports the medgen library inside its function body.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer

F = TypeVar("F", bound=Callable[..., Any])

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help="YAML config file or preset name (smoke, quick, paper)."),
]
SeedOpt = Annotated[int | None, typer.Option("--seed", help="Random seed (overrides the config).")]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", help="auto, cpu or cuda (overrides the config).")
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="A `medgen phantom` folder, a MONAI datalist JSON, a CSV/TSV table, or a `medgen scenes` folder.",
    ),
]
ImageColumnOpt = Annotated[
    str | None, typer.Option("--image-column", help="Table column holding image paths (default: image).")
]
LabelColumnOpt = Annotated[
    str | None, typer.Option("--label-column", help="Table column holding class labels (default: label).")
]
GroupColumnOpt = Annotated[
    str | None,
    typer.Option("--group-column", help="Table column holding the subject id for repeated scans."),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]


def override_data(cfg: Any, *, data: str | None, image_column: str | None, label_column: str | None,
                  group_column: str | None, **more: Any) -> None:
    """Apply the shared --data/--image-column/--label-column/--group-column options (and `more`
    section__key=value overrides, e.g. seed=..., train__iterations=...) to a loaded config; None leaves a key."""
    from medgen.config import override

    override(cfg, data__path=data, data__image_column=image_column, data__label_column=label_column,
             data__group_column=group_column, **more)


def fail(message: str, code: int = 1) -> None:
    """Print one error line to stderr and exit with `code`."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code)


def handle_errors(fn: F) -> F:
    """Turn known errors into one clear line and exit 1 (full traceback only with MEDGEN_DEBUG=1)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from medgen.errors import MedgenError

        debug = os.environ.get("MEDGEN_DEBUG", "") == "1"
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except MedgenError as e:
            if debug:
                raise
            fail(str(e))
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:  # an unexpected failure still ends in one line, not a traceback
            if debug:
                raise
            first = (str(e).strip().splitlines() or [""])[0]
            fail(f"{type(e).__name__}: {first} (set MEDGEN_DEBUG=1 for the traceback)")

    return wrapper  # type: ignore[return-value]


def echo_json(obj: Any) -> None:
    """Print a result as JSON on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()
