"""Shared CLI pieces: option types, the error wrapper, stdout/stderr helpers.

Only typer, the standard library and medgen.config (no torch) are imported here so that `medgen --help`
stays fast; each command imports the rest of the library inside its function body. Options whose
default comes from the config show the built-in config's value (`config_default`).
"""

from __future__ import annotations

import functools
import json
import os
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import typer

from medgen.config import PRECISION_NAMES, PRESETS, Config

F = TypeVar("F", bound=Callable[..., Any])

_DEFAULTS = Config()


def config_default(key: str) -> str:
    """The default shown in --help for an option the config provides: the built-in config's value
    (a --config file or preset may set another), e.g. "config train.iterations = 1000"."""
    value: Any = _DEFAULTS
    for part in key.split("."):
        value = getattr(value, part)
    shown = (",".join(map(str, value)) if isinstance(value, list) else "none" if value is None
             else str(value).lower() if isinstance(value, bool) else value)
    return f"config {key} = {shown}"


# The generative models `medgen train` takes: the registry's list (models/registry.py), spelled out here
# so that --help can show them without importing torch; tests/cli/test_cli_habits.py checks they agree.
GenerativeModel = Literal["vae", "gan", "alpha-gan", "parallel-vae"]
Precision = Literal[PRECISION_NAMES]  # auto, fp32, tf32, bf16, fp16 (medgen.config)

ConfigOpt = Annotated[
    str | None,
    typer.Option("--config", "-c", help=f"YAML config file or preset name ({', '.join(PRESETS)}).",
                 show_default="built-in defaults"),
]
SeedOpt = Annotated[
    int | None, typer.Option("--seed", min=0, max=2**32 - 1, help="Random seed (overrides the config).",
                             show_default=config_default("seed"))
]
DeviceOpt = Annotated[
    str | None, typer.Option("--device", metavar="auto|cpu|cuda[:N]", help="Where to run (overrides the config).",
                             show_default=f"{_DEFAULTS.device}, or the config's device")
]
DataOpt = Annotated[
    str | None,
    typer.Option(
        "--data",
        help="A `medgen phantom` folder, a MONAI datalist JSON, a CSV/TSV table, or a `medgen scenes` folder.",
        show_default="config data.path, else the built-in phantom cohort",
    ),
]
ImageColumnOpt = Annotated[
    str | None, typer.Option("--image-column", help="Table column holding image paths.",
                             show_default=config_default("data.image_column"))
]
LabelColumnOpt = Annotated[
    str | None, typer.Option("--label-column", help="Table column holding class labels.",
                             show_default=config_default("data.label_column"))
]
GroupColumnOpt = Annotated[
    str | None,
    typer.Option("--group-column", help="Table column holding the subject id for repeated scans.",
                 show_default="config data.group_column = none: one subject per row"),
]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing output folder.")]
OutOpt = Annotated[Path, typer.Option("--out", "-o", help="Output folder.")]


def load_config(path: str | Path | None) -> Any:
    """Load a config (YAML file or preset name) and check its `models.<name>` / `steps.<name>` sections
    against the model and Step registries (did-you-mean names and keys), before any output is made."""
    from medgen.config import load_config as load
    from medgen.training.preflight import check_model_sections

    cfg = load(path)
    check_model_sections(cfg, "config" if path is None else str(path))
    return cfg


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


def _raise_terminated(signum: int, frame: Any) -> None:
    from medgen.errors import Terminated

    raise Terminated()


def handle_errors(fn: F) -> F:
    """Turn known errors into one clear line and exit 1 (full traceback only with MEDGEN_DEBUG=1).

    SIGTERM is handled like Ctrl-C (partial output removed) and exits 143; Ctrl-C exits 130.
    """

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from medgen.errors import MedgenError, Terminated, explain

        debug = os.environ.get("MEDGEN_DEBUG", "") == "1"
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGTERM, _raise_terminated)
        try:
            return fn(*args, **kwargs)
        except typer.Exit:
            raise
        except MedgenError as e:
            if debug:
                raise
            fail(str(e))
        except Terminated:
            typer.echo("error: terminated (SIGTERM); partial output removed", err=True)
            raise typer.Exit(143) from None
        except KeyboardInterrupt:
            typer.echo("error: interrupted", err=True)
            raise typer.Exit(130) from None
        except Exception as e:  # an unexpected failure still ends in one line, not a traceback
            if debug:
                raise
            known = explain(e)
            if known is not None:
                fail(known)
            first = (str(e).strip().splitlines() or [""])[0]
            fail(f"{type(e).__name__}: {first} (set MEDGEN_DEBUG=1 for the traceback)")
        finally:
            if previous is not None:
                signal.signal(signal.SIGTERM, previous)

    return wrapper  # type: ignore[return-value]


def echo_json(obj: Any) -> None:
    """Print a result as JSON on stdout."""
    sys.stdout.write(json.dumps(obj, indent=2) + "\n")
    sys.stdout.flush()
