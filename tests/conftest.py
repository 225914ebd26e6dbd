"""Shared fixtures: quiet progress bars, deterministic CPU threads."""

import os

import pytest

os.environ.setdefault("MEDGEN_QUIET", "1")


def pytest_collection_modifyitems(config, items):
    """Skip GPU tests cleanly when no CUDA device is present."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
