"""Triton kernels of optimum-disc, installed as ``optimum_disc.kernels``.

One file per kernel family; each holds the kernel, its launcher and a plain-PyTorch reference.
Without a CUDA device they run on Triton's CPU interpreter (``optimum_disc/__init__.py`` settles
that before Triton loads).
"""

import os


def interpreted() -> bool:
    """Whether kernels run on Triton's CPU interpreter rather than on a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
