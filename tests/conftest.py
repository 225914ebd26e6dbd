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


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine, tiny convolutions are far faster without spinning."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
