"""LayerNorm over the last dimension, optionally of ``x + residual``, in one pass over each row.

>>> import torch
>>> from optimum_disc.kernels.layernorm import layer_norm
>>> x, res = torch.randn(4, 48), torch.randn(4, 48)
>>> w, b = torch.ones(48), torch.zeros(48)
>>> layer_norm(x, w, b, 1e-12, residual=res).shape
torch.Size([4, 48])
"""

import math

import torch
import triton
import triton.language as tl

from optimum_disc.kernels import launch as _pdl

# Both the kernel and the reference compute in fp32 and round once to the storage dtype, so they
# differ by fp32 summation-order noise plus at most one rounding step of the output dtype
# (2^-10 relative for fp16, 2^-7 for bf16).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# One row is held in registers by one program; past this width the row would spill.
MAX_WIDTH = 8192


@triton.jit
def _normalize_row(x, mask, cols, col_ok, w_ptr, b_ptr, N, eps, HAS_BIAS: tl.constexpr):
    """LayerNorm along the last axis of fp32 rows held in registers, one row ``[BLOCK_N]`` or
    several ``[ROWS, BLOCK_N]``; lanes outside ``mask`` must hold 0, ``cols`` ([BLOCK_N]) are the
    columns and ``col_ok`` those below N."""
    mean = tl.sum(x, axis=-1, keep_dims=True) / N
    # Centred second pass: E[x^2] - mean^2 cancels badly when |mean| >> std.
    diff = tl.where(mask, x - mean, 0.0)
    var = tl.sum(diff * diff, axis=-1, keep_dims=True) / N
    rstd = tl.rsqrt(var + eps)
    w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    y = diff * rstd * w
    if HAS_BIAS:
        y += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    return y


@triton.jit
def _layer_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    M,
    N,
    stride_x,
    stride_res,
    stride_out,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROWS: tl.constexpr = 1,
    PDL: tl.constexpr = False,
):
    if PDL:
        _pdl.wait_for_previous()
    if ROWS == 1:
        # int64 so that row * stride cannot wrap for tensors past 2^31 elements.
        row = tl.program_id(0).to(tl.int64)
        cols = tl.arange(0, BLOCK_N)
        mask = cols < N
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            x += tl.load(res_ptr + row * stride_res + cols, mask=mask, other=0.0).to(tl.float32)
        y = _normalize_row(x, mask, cols, mask, w_ptr, b_ptr, N, eps, HAS_BIAS)
        tl.store(out_ptr + row * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        # ROWS rows per program, a [ROWS, BLOCK_N] block: with as many warps as rows each warp
        # holds one row, so both reductions stay inside a warp (no shared memory, no barrier),
        # and a large M takes ROWS times fewer programs.
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
        cols = tl.arange(0, BLOCK_N)
        col_ok = cols < N
        mask = (rows < M)[:, None] & col_ok[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(
            tl.float32
        )
        if HAS_RESIDUAL:
            x += tl.load(
                res_ptr + rows[:, None] * stride_res + cols[None, :], mask=mask, other=0.0
            ).to(tl.float32)
        y = _normalize_row(x, mask, cols, col_ok, w_ptr, b_ptr, N, eps, HAS_BIAS)
        tl.store(
            out_ptr + rows[:, None] * stride_out + cols[None, :],
            y.to(out_ptr.dtype.element_ty),
            mask=mask,
        )


def row_launch_config(width: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that keeps one row of ``width`` elements per program."""
    # At least 16 lanes so that a narrow row still fills one vectorised access.
    block = max(triton.next_power_of_2(width), 16)
    # About 8 to 32 elements per thread: enough in flight per thread to saturate HBM on an H100,
    # few enough to stay in registers.
    num_warps = min(max(block // 256, 1), 16)
    return block, num_warps


# From this many rows, `layer_norm` gives each program `MULTI_ROW_ROWS` rows (a warp per row) where
# the row fits a warp's registers (`MULTI_ROW_MAX_BLOCK`); below it one row per program, whose
# launch needs only as many programs as rows. False: one row per program at every size.
MULTI_ROW = True
MULTI_ROW_MIN_M = 1024
MULTI_ROW_ROWS = 2
MULTI_ROW_MAX_BLOCK = 1024


def launch_config(m: int, width: int) -> tuple[int, int, int]:
    """(BLOCK_N, rows per program, num_warps) of the LayerNorm kernel for ``m`` rows of
    ``width`` elements."""
    block, num_warps = row_launch_config(width)
    if MULTI_ROW and m >= MULTI_ROW_MIN_M and block <= MULTI_ROW_MAX_BLOCK:
        return block, MULTI_ROW_ROWS, MULTI_ROW_ROWS
    return block, 1, num_warps


def _check_eps(eps) -> float:
    if isinstance(eps, bool) or not isinstance(eps, (int, float)):
        raise ValueError(f"eps must be a float, got {eps!r}; pass the model's layer_norm_eps")
    if not (math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps must be finite and >= 0, got {eps!r}")
    return float(eps)


def _check_rows(name: str, t, M: int, N: int, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    if t.dim() != 2 or tuple(t.shape) != (M, N):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({M}, {N})")
    if N > 1 and t.stride(1) != 1:
        raise ValueError(
            f"{name} has column stride {t.stride(1)}; rows must be contiguous "
            f"(call .contiguous() first)"
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like x")


def _check_vector(name: str, t, N: int, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    if tuple(t.shape) != (N,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({N},)")
    if N > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} has stride {t.stride(0)}; call .contiguous() first")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like x")


def layer_norm(x, weight, bias, eps: float, *, residual=None, out=None) -> torch.Tensor:
    """LayerNorm(x + residual) over the last dim with mean and biased variance in fp32.

    ``x`` and ``residual`` are [M, N] with contiguous rows (any row stride); ``weight`` and
    ``bias`` are [N] in fp32 or the storage dtype, ``bias`` may be None. The result has
    ``out.dtype`` when ``out`` (a [M, N] tensor or view with contiguous rows) is given, else
    ``x.dtype``.

        >>> import torch
        >>> x = torch.randn(3, 32, dtype=torch.float16)
        >>> y = layer_norm(x, torch.ones(32), None, 1e-5)
        >>> y.dtype, y.shape
        (torch.float16, torch.Size([3, 32]))
    """
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"x must be a 2-D [M, N] tensor, got {shape}; flatten leading dims first")
    M, N = x.shape
    if not 1 <= N <= MAX_WIDTH:
        raise ValueError(f"x has width {N}; layer_norm supports widths 1 to {MAX_WIDTH}")
    eps = _check_eps(eps)
    _check_rows("x", x, M, N, x.device)
    if residual is not None:
        _check_rows("residual", residual, M, N, x.device)
    _check_vector("weight", weight, N, x.device)
    if bias is not None:
        _check_vector("bias", bias, N, x.device)
    if out is None:
        out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    else:
        _check_rows("out", out, M, N, x.device)
    if M == 0:
        return out

    block, rows, num_warps = launch_config(M, N)
    res = residual if residual is not None else x
    _pdl.launcher(_layer_norm_kernel, (triton.cdiv(M, rows),))(
        x,
        res,
        weight,
        bias if bias is not None else weight,
        out,
        M,
        N,
        x.stride(0),
        res.stride(0),
        out.stride(0),
        eps,
        HAS_RESIDUAL=residual is not None,
        HAS_BIAS=bias is not None,
        BLOCK_N=block,
        ROWS=rows,
        num_warps=num_warps,
        **_pdl.options(x.device),
    )
    return out


def layer_norm_reference(x, weight, bias, eps, *, residual=None) -> torch.Tensor:
    """Plain-PyTorch LayerNorm(x + residual) in fp32, cast to ``x.dtype``.

    >>> import torch
    >>> layer_norm_reference(torch.randn(2, 8), torch.ones(8), None, 1e-5).shape
    torch.Size([2, 8])
    """
    h = x.float()
    if residual is not None:
        h = h + residual.float()
    y = torch.nn.functional.layer_norm(
        h,
        (h.shape[-1],),
        weight.float(),
        bias.float() if bias is not None else None,
        eps,
    )
    return y.to(x.dtype)
