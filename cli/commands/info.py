"""`medgen info`: versions, device, registered models and presets."""

from __future__ import annotations

import typer

from medgen.cli.common import echo_json, handle_errors


def register(app: typer.Typer) -> None:
    app.command("info")(info)


@handle_errors
def info() -> None:
    """Print versions, the resolved device, registered models and config presets (JSON)."""
    import monai
    import torch

    import medgen
    from medgen.config import PRESETS
    from medgen.models import list_models
    from medgen.runtime import default_precision, resolve_device

    device = resolve_device("auto")
    echo_json(
        {
            "medgen": medgen.__version__,
            "torch": torch.__version__,
            "monai": monai.__version__,
            "device": str(device),
            "default_precision": default_precision(device),
            "models": list_models(),
            "presets": list(PRESETS),
        }
    )
