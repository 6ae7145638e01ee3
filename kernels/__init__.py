"""Triton kernels of optimum-disc, installed as ``optimum_disc.kernels``.

One file per kernel family; each holds the kernel, its launcher and a plain-PyTorch reference.
"""

import os
import sys

import torch

# The package's __init__ sets TRITON_INTERPRET=1 on machines without CUDA before Triton loads.
# If Triton was loaded earlier without it, its own library functions are compiled-mode objects
# that the interpreter cannot call: say so instead of failing inside a kernel.
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    raise ImportError(
        "no CUDA device is available and Triton was imported before optimum_disc without "
        "TRITON_INTERPRET=1; import optimum_disc first or set TRITON_INTERPRET=1 in the "
        "environment to run the kernels on the CPU interpreter."
    )


def interpreted() -> bool:
    """Whether kernels run on Triton's CPU interpreter rather than on a GPU."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
