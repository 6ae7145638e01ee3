"""The BERT embedding block in one kernel: word, position and token-type gathers, sum, LayerNorm.

>>> import torch
>>> from optimum_disc.kernels.embedding import embed_layernorm
>>> ids = torch.randint(0, 100, (2, 5))
>>> word, pos, tt = torch.randn(100, 32), torch.randn(16, 32), torch.randn(2, 32)
>>> embed_layernorm(ids, word, pos, torch.ones(32), torch.zeros(32), 1e-12, token_type=tt).shape
torch.Size([10, 32])
"""

import torch
import triton
import triton.language as tl

from optimum_disc.kernels import launch as _pdl
from optimum_disc.kernels.layernorm import (
    FLOAT_DTYPES,
    MAX_WIDTH,
    _check_eps,
    _normalize_row,
    layer_norm_reference,
    row_launch_config,
)

# The sum of three table rows and the LayerNorm are both done in fp32 by kernel and reference,
# each rounding once to the output dtype: they differ by fp32 summation-order noise plus at most
# one rounding step of that dtype (2^-10 relative for fp16, 2^-7 for bf16).
TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}

INDEX_DTYPES = (torch.int32, torch.int64)


@triton.jit
def _embed_layernorm_kernel(
    ids_ptr,
    rows_ptr,
    tt_ids_ptr,
    word_ptr,
    pos_ptr,
    tt_ptr,
    w_ptr,
    b_ptr,
    out_ptr,
    S,
    H,
    stride_ids_b,
    stride_ids_s,
    stride_tt_ids_b,
    stride_tt_ids_s,
    stride_word,
    stride_pos,
    stride_tt,
    stride_out,
    position_offset,
    eps,
    HAS_ROWS: tl.constexpr,
    HAS_TOKEN_TYPE: tl.constexpr,
    HAS_TOKEN_TYPE_IDS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_H: tl.constexpr,
    PDL: tl.constexpr = False,
):
    if PDL:
        _pdl.wait_for_previous()
    # int64 throughout the address arithmetic: vocab * hidden passes 2^31 for large vocabularies.
    i = tl.program_id(0).to(tl.int64)
    if HAS_ROWS:
        r = tl.load(rows_ptr + i).to(tl.int64)
    else:
        r = i
    b = r // S
    s = r - b * S
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H

    token = tl.load(ids_ptr + b * stride_ids_b + s * stride_ids_s).to(tl.int64)
    x = tl.load(word_ptr + token * stride_word + cols, mask=mask, other=0.0).to(tl.float32)
    pos = s + position_offset
    x += tl.load(pos_ptr + pos * stride_pos + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_TOKEN_TYPE:
        if HAS_TOKEN_TYPE_IDS:
            tt = tl.load(tt_ids_ptr + b * stride_tt_ids_b + s * stride_tt_ids_s).to(tl.int64)
            x += tl.load(tt_ptr + tt * stride_tt + cols, mask=mask, other=0.0).to(tl.float32)
        else:
            x += tl.load(tt_ptr + cols, mask=mask, other=0.0).to(tl.float32)

    y = _normalize_row(x, mask, cols, mask, w_ptr, b_ptr, H, eps, HAS_BIAS)
    tl.store(out_ptr + i * stride_out + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


def _check_table(name: str, t, H, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    if t.dim() != 2 or (H is not None and t.shape[1] != H):
        want = f"[rows, {H}]" if H is not None else "[rows, hidden]"
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {want}")
    if t.shape[1] > 1 and t.stride(1) != 1:
        raise ValueError(f"{name} has column stride {t.stride(1)}; call .contiguous() first")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like input_ids")


def _check_ids(name: str, t, shape, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; use int32 or int64")
    if shape is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like input_ids")


def _check_vector(name: str, t, H: int, device) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} has dtype {t.dtype}; use float32, float16 or bfloat16")
    if tuple(t.shape) != (H,):
        raise ValueError(f"{name} has shape {tuple(t.shape)}, expected ({H},)")
    if H > 1 and t.stride(0) != 1:
        raise ValueError(f"{name} has stride {t.stride(0)}; call .contiguous() first")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device} like input_ids")


def _validate(
    input_ids,
    word,
    position,
    ln_weight,
    ln_bias,
    rows,
    token_type_ids,
    token_type,
    position_offset,
    out,
    out_dtype,
):
    """Checks shapes, dtypes and devices; returns (number of output rows, output dtype)."""
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else input_ids
        raise ValueError(f"input_ids must be a [batch, seq] tensor, got {shape!r}")
    device = input_ids.device
    _check_ids("input_ids", input_ids, None, device)
    B, S = input_ids.shape
    _check_table("word", word, None, device)
    H = word.shape[1]
    if not 1 <= H <= MAX_WIDTH:
        raise ValueError(f"word has hidden size {H}; embed_layernorm supports 1 to {MAX_WIDTH}")
    _check_table("position", position, H, device)
    if isinstance(position_offset, bool) or not isinstance(position_offset, int):
        raise ValueError(f"position_offset must be an int, got {position_offset!r}")
    if position_offset < 0:
        raise ValueError(f"position_offset must be >= 0, got {position_offset}")
    if S + position_offset > position.shape[0]:
        raise ValueError(
            f"sequence length {S} with position_offset {position_offset} needs "
            f"{S + position_offset} positions but the position table has {position.shape[0]}; "
            f"truncate input_ids to at most {position.shape[0] - position_offset} tokens"
        )
    if token_type is not None:
        _check_table("token_type", token_type, H, device)
        if token_type.shape[0] == 0:
            raise ValueError("token_type has no rows; pass token_type=None to skip the term")
        if token_type_ids is not None:
            _check_ids("token_type_ids", token_type_ids, (B, S), device)
    elif token_type_ids is not None:
        raise ValueError("token_type_ids given without a token_type table; pass token_type too")
    _check_vector("ln_weight", ln_weight, H, device)
    if ln_bias is not None:
        _check_vector("ln_bias", ln_bias, H, device)
    if rows is not None:
        _check_ids("rows", rows, None, device)
        if rows.dim() != 1:
            raise ValueError(f"rows has shape {tuple(rows.shape)}; pass a 1-D tensor of indices")
        if rows.shape[0] > 1 and rows.stride(0) != 1:
            raise ValueError(f"rows has stride {rows.stride(0)}; call .contiguous() first")
        R = rows.shape[0]
    else:
        R = B * S
    if out_dtype is not None and out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"out_dtype is {out_dtype}; use float32, float16 or bfloat16")
    if out is not None:
        if not isinstance(out, torch.Tensor):
            raise ValueError(f"out must be a torch.Tensor, got {type(out).__name__}")
        if out.dtype not in FLOAT_DTYPES:
            raise ValueError(f"out has dtype {out.dtype}; use float32, float16 or bfloat16")
        if out_dtype is not None and out.dtype != out_dtype:
            raise ValueError(
                f"out has dtype {out.dtype} but out_dtype is {out_dtype}; pass only one of them"
            )
        if tuple(out.shape) != (R, H):
            raise ValueError(f"out has shape {tuple(out.shape)}, expected ({R}, {H})")
        if H > 1 and out.stride(1) != 1:
            raise ValueError(f"out has column stride {out.stride(1)}; rows must be contiguous")
        if out.device != device:
            raise ValueError(f"out is on {out.device}, expected {device} like input_ids")
        return R, out.dtype
    return R, out_dtype if out_dtype is not None else word.dtype


def embed_layernorm(
    input_ids,
    word,
    position,
    ln_weight,
    ln_bias,
    eps: float,
    *,
    rows=None,
    token_type_ids=None,
    token_type=None,
    position_offset: int = 0,
    out=None,
    out_dtype=None,
) -> torch.Tensor:
    """LayerNorm(word[id] + position[s + position_offset] + token_type[type]) for each token.

    ``input_ids`` is [B, S]; output row r is the token at flat index r = b * S + s, or, when
    ``rows`` (1-D int32/int64 flat indices) is given, output row i is the token at ``rows[i]``
    (the real tokens once padding is removed). ``token_type=None`` skips the token-type term;
    ``token_type_ids=None`` with a table means type 0 everywhere. Ids are not range-checked
    here: validate them before the call. The result is [len(rows) or B*S, H] in ``out.dtype``,
    else ``out_dtype``, else ``word.dtype``.

        >>> import torch
        >>> ids = torch.tensor([[5, 7, 0], [3, 0, 0]])
        >>> word, pos = torch.randn(10, 32), torch.randn(8, 32)
        >>> y = embed_layernorm(ids, word, pos, torch.ones(32), None, 1e-5,
        ...                     rows=torch.tensor([0, 1, 3]), position_offset=2)
        >>> y.shape
        torch.Size([3, 32])
    """
    eps = _check_eps(eps)
    R, dtype = _validate(
        input_ids,
        word,
        position,
        ln_weight,
        ln_bias,
        rows,
        token_type_ids,
        token_type,
        position_offset,
        out,
        out_dtype,
    )
    H = word.shape[1]
    if out is None:
        out = torch.empty((R, H), dtype=dtype, device=input_ids.device)
    if R == 0:
        return out

    B, S = input_ids.shape
    block, num_warps = row_launch_config(H)
    has_tt = token_type is not None
    has_tt_ids = has_tt and token_type_ids is not None
    tt_ids = token_type_ids if has_tt_ids else input_ids
    _pdl.launcher(_embed_layernorm_kernel, (R,))(
        input_ids,
        rows if rows is not None else input_ids,
        tt_ids,
        word,
        position,
        token_type if has_tt else word,
        ln_weight,
        ln_bias if ln_bias is not None else ln_weight,
        out,
        S,
        H,
        input_ids.stride(0),
        input_ids.stride(1),
        tt_ids.stride(0),
        tt_ids.stride(1),
        word.stride(0),
        position.stride(0),
        token_type.stride(0) if has_tt else 0,
        out.stride(0),
        position_offset,
        eps,
        HAS_ROWS=rows is not None,
        HAS_TOKEN_TYPE=has_tt,
        HAS_TOKEN_TYPE_IDS=has_tt_ids,
        HAS_BIAS=ln_bias is not None,
        BLOCK_H=block,
        num_warps=num_warps,
        **_pdl.options(input_ids.device),
    )
    return out


def embed_layernorm_reference(
    input_ids,
    word,
    position,
    ln_weight,
    ln_bias,
    eps: float,
    *,
    rows=None,
    token_type_ids=None,
    token_type=None,
    position_offset: int = 0,
    out=None,
    out_dtype=None,
) -> torch.Tensor:
    """Plain-PyTorch embedding sum and LayerNorm in fp32, with the arguments of embed_layernorm.

    >>> import torch
    >>> ids = torch.randint(0, 10, (2, 3))
    >>> embed_layernorm_reference(ids, torch.randn(10, 8), torch.randn(4, 8),
    ...                           torch.ones(8), None, 1e-5).shape
    torch.Size([6, 8])
    """
    B, S = input_ids.shape
    flat = torch.arange(B * S, device=input_ids.device) if rows is None else rows.long()
    b, s = flat // S, flat % S
    ids = input_ids.long()[b, s]
    h = word.float()[ids] + position.float()[s + position_offset]
    if token_type is not None:
        if token_type_ids is None:
            h = h + token_type.float()[0]
        else:
            h = h + token_type.float()[token_type_ids.long()[b, s]]
    if out is not None:
        dtype = out.dtype
    elif out_dtype is not None:
        dtype = out_dtype
    else:
        dtype = word.dtype
    y = layer_norm_reference(h, ln_weight, ln_bias, eps)
    return y.to(dtype)
