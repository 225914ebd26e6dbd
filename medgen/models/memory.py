"""How much memory a registered model needs, estimated without allocating it (built on the meta device)."""

from __future__ import annotations

import os
from typing import Any

import torch

from medgen.errors import MedgenError
from medgen.models.registry import create_model

MEMORY_SHARE = 0.5  # refuse a model whose weights alone would need more than this share of the RAM


def _ram_bytes() -> int:
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return 16 << 30


def model_bytes(name: str, kwargs: dict[str, Any], what: str) -> int:
    """Bytes of the float32 weights of registered model `name` built from `kwargs` (built on the meta device,
    so nothing is allocated); a model that cannot be built gives one line naming `what`."""
    try:
        with torch.device("meta"):
            model = create_model(name, **kwargs)
    except MedgenError:
        raise
    except Exception as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise MedgenError(f"{what}: the model cannot be built with these settings ({first})") from None
    return sum(p.numel() for p in model.parameters()) * 4


def check_model_fits(name: str, kwargs: dict[str, Any], what: str) -> None:
    """Refuse a model whose weights (x4: gradients, Adam moments) exceed MEMORY_SHARE of the RAM."""
    need = model_bytes(name, kwargs, what) * 4
    have = _ram_bytes()
    if need > MEMORY_SHARE * have:
        raise MedgenError(f"{what}: the model needs about {need / 2**30:.1f} GiB for its weights and optimiser "
                          f"state, more than {MEMORY_SHARE:.0%} of this machine's {have / 2**30:.0f} GiB; "
                          "use a smaller base_width")
