"""Triton's CPU interpreter, made to round like a GPU.

Without a CUDA device every kernel runs on Triton's interpreter. Its fp32 to bf16 conversion
drops the low 16 bits (rounds toward zero) where a GPU and PyTorch round to nearest even, so
bf16 outputs err by up to a whole ulp, always toward zero; through a residual stream that is
rounded once per sub-layer (ModernBERT's pre-LayerNorm layers), the error grows layer by layer.
``round_bf16_to_nearest`` replaces that one conversion; the runtime applies it when it first
loads the kernels on the interpreter, and the tests do for every kernel test.
"""

from __future__ import annotations


def bf16_bits_rounded_to_nearest_even(x):
    """The bits (uint16) of fp32 values rounded to bf16, ties to even, NaN kept a quiet NaN:
    what PyTorch's ``.to(torch.bfloat16)`` and a GPU's ``cvt.rn.bf16.f32`` give."""
    import numpy as np  # the interpreter's own array type

    bits = np.asarray(x, dtype=np.float32).view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) >> 16
    nan = ((bits >> 16) | np.uint32(0x40)) & np.uint32(0xFFFF)
    return np.where(np.isnan(x), nan, rounded).astype(np.uint16)


def round_bf16_to_nearest() -> None:
    """Make Triton's CPU interpreter round fp32 to bf16 as a GPU does.

    The interpreter (Triton 3.x) converts fp32 to bf16 by dropping the low 16 bits, that is
    rounding toward zero, where a GPU and PyTorch round to nearest even. Every bf16 kernel output
    (``acc.to(out.dtype)`` before the store) then errs by up to one ulp, always toward zero: in a
    pre-LayerNorm encoder (ModernBERT) the residual stream takes one such rounding per sub-layer
    and drifts by up to an ulp each time, where a GPU's error stays within half an ulp. Only the
    fp32 to bf16 cast changes here; every other conversion is the interpreter's own.
    """
    from triton import language as tl
    from triton.runtime import interpreter

    builder = getattr(interpreter, "InterpreterBuilder", None)
    cast = getattr(builder, "cast_impl", None)
    if cast is None or getattr(cast, "rounds_bf16_to_nearest", False):
        return

    def cast_impl(self, src, dst_type):
        if src.dtype.scalar == tl.float32 and dst_type.scalar == tl.bfloat16:
            bits = bf16_bits_rounded_to_nearest_even(src.data)
            return interpreter.TensorHandle(bits, dst_type.scalar)
        return cast(self, src, dst_type)

    cast_impl.rounds_bf16_to_nearest = True
    builder.cast_impl = cast_impl
