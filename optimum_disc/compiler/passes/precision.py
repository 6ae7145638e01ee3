"""Mixed precision: matrix weights, embedding tables and activations in fp16 or bf16.

Biases and LayerNorm parameters stay fp32 (the kernels add and scale in fp32); GEMMs and
attention accumulate in fp32; LayerNorm and softmax statistics are fp32. The runtime returns
outputs in fp32. For fp32 the program is unchanged.
"""

from __future__ import annotations

import torch

from ..program import Program

# Which arguments of which kernel are read as half-precision data when precision is reduced.
_HALF_WEIGHTS = {
    "linear": ("weight",),
    "embed_layernorm": ("word", "position", "token_type"),
}


def apply_precision(program: Program, dtype: torch.dtype) -> Program:
    if dtype == torch.float32:
        return program
    half = {
        ref[2:]
        for call in program.calls
        for arg in _HALF_WEIGHTS.get(call.kernel, ())
        if (ref := call.inputs.get(arg)) and ref.startswith("w:")
    }
    dtype_name = str(dtype).removeprefix("torch.")
    program.weights = {
        name: t.to(dtype if name in half else torch.float32) if t.is_floating_point() else t
        for name, t in program.weights.items()
    }
    for buf in program.buffers.values():
        # Values of other shapes are computed by torch calls, in the dtypes PyTorch gives them
        # (their matrix products run in the reduced precision); rows go in `dtype`.
        if buf.layout != "free" and buf.dtype in ("float32", "float16", "bfloat16"):
            buf.dtype = dtype_name
    program.meta["precision"] = dtype_name
    return program
