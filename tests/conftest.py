"""Test set-up shared by every test.

Without a CUDA device the kernels run on Triton's CPU interpreter (``import optimum_disc``
settles that, so it comes first). Tests marked ``gpu`` need a CUDA device and are skipped
without one.
"""

import random

import pytest
import torch

import optimum_disc  # noqa: F401  (settles TRITON_INTERPRET before Triton loads)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

if DEVICE == "cpu":
    # Kernel tests see the interpreter's bf16 rounding that compiled models see (to nearest, as
    # on a GPU; see optimum_disc/kernels/interpreter.py).
    from optimum_disc.kernels import interpreter

    interpreter.round_bf16_to_nearest()


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
