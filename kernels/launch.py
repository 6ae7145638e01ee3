"""Programmatic dependent launch (PDL) on Hopper and newer GPUs.

A kernel launched with PDL may start while the kernel before it on the stream is still running:
its programs get scheduled as soon as every program of the previous kernel has passed
``wait_for_previous`` (below). Each PDL kernel of this package therefore follows one rule: it
reads nothing that an earlier kernel writes, and writes nothing at all, before calling
``wait_for_previous``, which blocks until the previous kernel has finished and its writes are
visible. Since every PDL kernel waits so, finishing is ordered along the stream as without PDL.
What may run early is only the kernel's start-up and reads of memory no kernel writes: the
weights (``linear`` prefetches its slice of the weight into L2). In a CUDA graph of a hundred
small kernels (BERT at a few dozen tokens), this hides most of each launch's latency behind the
previous kernel.

``OPTIMUM_DISC_PDL=0`` turns it off.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import torch
import triton
import triton.language as tl

from . import interpreted

try:  # Triton >= 3.3
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # pragma: no cover - older Triton: PDL stays off
    gdc_launch_dependents = gdc_wait = None


# While set, every kernel of this package compiles (Triton's warm-up) instead of launching:
# see `compile_only`.
_COMPILE_ONLY = contextvars.ContextVar("optimum_disc_compile_only", default=False)


def launcher(kernel, grid):
    """``kernel[grid]``, or inside `compile_only` its compilation alone (Triton's warm-up, which
    an active ``AsyncCompileMode`` runs on its thread pool)."""
    if _COMPILE_ONLY.get():
        return functools.partial(kernel.warmup, grid=grid)
    return kernel[grid]


def compiling_only() -> bool:
    """Whether kernels compile instead of launching here (inside `compile_only`)."""
    return _COMPILE_ONLY.get()


@contextlib.contextmanager
def compile_only():
    """Kernels called inside compile and are not launched: their outputs stay as they were.
    Host-side work of the kernels' wrappers (checks, allocations) still runs."""
    token = _COMPILE_ONLY.set(True)
    try:
        yield
    finally:
        _COMPILE_ONLY.reset(token)


@functools.cache
def _supported(index: int) -> bool:
    if gdc_wait is None or torch.cuda.get_device_capability(index) < (9, 0):
        return False
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:  # pragma: no cover
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


def enabled(device: torch.device) -> bool:
    """Whether kernels on ``device`` launch with PDL: a CUDA GPU of compute capability 9.0 or
    newer, a Triton that supports it, and ``OPTIMUM_DISC_PDL`` not set to ``0``."""
    if device.type != "cuda" or interpreted() or os.environ.get("OPTIMUM_DISC_PDL") == "0":
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def options(device: torch.device) -> dict:
    """The launch options of a PDL kernel: ``{"PDL": flag, "launch_pdl": True}`` when enabled.

    The kernel takes ``PDL: tl.constexpr`` and calls ``wait_for_previous()`` under it."""
    if enabled(device):
        return {"PDL": True, "launch_pdl": True}
    return {"PDL": False}


@triton.jit
def wait_for_previous():
    """Block until the previous kernel of the stream has finished (its writes visible), then let
    the next PDL kernel start; before this, a PDL kernel may only read memory no kernel writes."""
    gdc_wait()
    gdc_launch_dependents()


@triton.jit
def wait_only():
    """`wait_for_previous` without letting the next PDL kernel start (see `let_next_start`)."""
    gdc_wait()


@triton.jit
def let_next_start():
    """Let the next PDL kernel of the stream start (its programs get scheduled, and wait)."""
    gdc_launch_dependents()


@triton.jit
def prefetch_l2(ptrs):
    """Ask for the cache lines at ``ptrs`` to be brought into L2 (no registers, no wait)."""
    tl.inline_asm_elementwise(
        "prefetch.global.L2 [$1];\n\tmov.u32 $0, 0;",
        "=r,l",
        [ptrs],
        dtype=tl.int32,
        is_pure=False,
        pack=1,
    )
