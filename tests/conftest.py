"""Test set-up shared by every test.

Without a CUDA device the kernels run on Triton's CPU interpreter (set in optimum_disc.kernels,
imported here first so that it decides before any kernel module is decorated). Tests marked
``gpu`` need a CUDA device and are skipped without one.
"""

import random

import pytest
import torch

import optimum_disc.kernels  # noqa: F401  (decides TRITON_INTERPRET before any kernel import)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture
def seed() -> int:
    """A fresh seed for every test, printed on failure so that a failing draw can be replayed."""
    s = random.SystemRandom().randrange(2**31)
    torch.manual_seed(s)
    return s
