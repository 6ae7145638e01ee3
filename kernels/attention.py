"""Multi-head attention over variable-length sequences packed as rows (flash-style).

Sequences are packed one after another in the rows of ``q``, ``k`` and ``v``; ``cu_seqlens`` says
where each starts. One program computes one block of query rows of one head of one sequence and
walks the key blocks of that sequence only, keeping the softmax online (running max, running sum
and accumulator in fp32), so no [batch, heads, seq, seq] tensor is ever materialised.

Example (runs on a GPU, or on Triton's CPU interpreter when there is none)::

    import torch
    import optimum_disc.kernels  # decides the interpreter before the kernel module is imported
    from optimum_disc.kernels.attention import TOLERANCES, attention, attention_reference

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    heads, dim = 2, 16
    qkv = torch.randn(10, 3 * heads * dim, device=dev)  # two sequences: rows 0-2 and 3-9
    q, k, v = qkv.split(heads * dim, dim=1)
    cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=dev)
    out = attention(q, k, v, cu, max_seqlen=7, num_heads=heads, head_dim=dim, scale=dim**-0.5)
    ref = attention_reference(q, k, v, cu, heads, dim, dim**-0.5)
    atol, rtol = TOLERANCES[out.dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
"""

import math

import torch
import triton
import triton.language as tl

from optimum_disc.kernels import interpreted
from optimum_disc.kernels import launch as _pdl

# (atol, rtol) of `attention` against `attention_reference`, which sees the same (rounded) inputs
# but computes in fp32 with one exact softmax. fp32: both sides stay in fp32 and differ only by
# summation order, the online rescaling and exp2 (an approximate instruction on GPU); the error
# grows with the logits (scale * |q . k| of a few tens still stays under 1e-5) and with the
# sequence length, hence 5e-5. fp16 / bf16: the probabilities are rounded to the input dtype for
# the P @ V tensor-core dot (as in every flash kernel) and both outputs are rounded to it, so the
# error is about one or two ulps of the output (~1 for unit-variance v): 2**-10 for fp16, 2**-7
# for bf16, times a few for the margin. Real indexing or masking bugs are off by O(1).
TOLERANCES = {
    torch.float32: (5e-5, 5e-5),
    torch.float16: (4e-3, 4e-3),
    torch.bfloat16: (2.5e-2, 2.5e-2),
}

_LOG2E = 1.4426950408889634
_MAX_GRID_Y = 65535  # CUDA's limit on the second grid axis, which counts query blocks
# SMs of an H100 or H200 SXM: fp32 launches of few programs take smaller blocks.
_SM_COUNT = 132


@triton.jit
def _attention_kernel(
    Q,
    K,
    V,
    Out,
    CuSeqlens,
    KeyValid,
    stride_q,
    stride_k,
    stride_v,
    stride_o,
    stride_kv,
    qk_scale,  # scale * log2(e): the softmax is taken with exp2
    num_heads,
    HEAD_DIM: tl.constexpr,  # constexpr: lets the compiler prove the row loads vectorise
    HAS_KEY_VALID: tl.constexpr,
    FP32_DOT: tl.constexpr,
    UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    FIRST_ONLY: tl.constexpr = False,
    PDL: tl.constexpr = False,
):
    if PDL:
        _pdl.wait_for_previous()
    # (batch, head) on the first grid axis: it is the one that can exceed 65535.
    pid_bh = tl.program_id(0)
    pid_m = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    seq_start = tl.load(CuSeqlens + b)
    seqlen = tl.load(CuSeqlens + b + 1) - seq_start
    if FIRST_ONLY:
        # One query per sequence, its first row; output row b, zeros for an empty sequence.
        queries = tl.minimum(seqlen, 1)
    else:
        # max_seqlen is only an upper bound, so blocks past this sequence's end have nothing to
        # do.
        if pid_m * BLOCK_M >= seqlen:
            return
        queries = seqlen

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_mask = offs_m < queries
    d_mask = offs_d < HEAD_DIM
    col = h * HEAD_DIM + offs_d

    # 64-bit row offsets: rows * row stride of a packed [R, 3 * hidden] buffer can pass 2**31.
    rows_m = (seq_start + offs_m).to(tl.int64)
    q = tl.load(
        Q + rows_m[:, None] * stride_q + col[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    for start_n in range(0, seqlen, BLOCK_N):
        n_idx = start_n + offs_n
        n_mask = n_idx < seqlen
        rows_n = (seq_start + n_idx).to(tl.int64)
        kv_mask = n_mask[:, None] & d_mask[None, :]
        # Zeros in the padded channels keep them out of q . k; padded key rows are masked below.
        k = tl.load(K + rows_n[:, None] * stride_k + col[None, :], mask=kv_mask, other=0.0)
        if UPCAST_DOT:
            k = k.to(tl.float32)
        if FP32_DOT:
            qk = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            qk = tl.dot(q, tl.trans(k))
        qk = qk * qk_scale

        valid = n_mask
        if HAS_KEY_VALID:
            kv = tl.load(KeyValid + rows_n * stride_kv, mask=n_mask, other=0)
            valid = valid & (kv != 0)
        qk = tl.where(valid[None, :], qk, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(qk, axis=1))
        # While every key seen so far is masked, m_new is -inf and (-inf) - (-inf) would be NaN;
        # subtracting 0 instead gives p = 0 and alpha = 0, which leave l_i and acc at zero.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_safe)
        p = tl.math.exp2(qk - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None]

        v = tl.load(V + rows_n[:, None] * stride_v + col[None, :], mask=kv_mask, other=0.0)
        if UPCAST_DOT:
            v = v.to(tl.float32)
        if FP32_DOT:
            acc = tl.dot(p, v, acc, input_precision="ieee")
        else:
            # fp16/bf16 operands for the tensor cores, fp32 accumulation.
            acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new

    # l_i is 0 only for queries with no valid key, whose acc is 0 too: their output is 0, not NaN.
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]
    if FIRST_ONLY:
        rows_o = (b + offs_m).to(tl.int64)
        o_mask = offs_m == 0
    else:
        rows_o = rows_m
        o_mask = m_mask
    tl.store(
        Out + rows_o[:, None] * stride_o + col[None, :],
        out.to(Out.dtype.element_ty),
        mask=o_mask[:, None] & d_mask[None, :],
    )


def _launch_config(
    block_d: int, dtype: torch.dtype, max_seqlen: int, batch_heads: int
) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) for one head width, dtype, longest sequence and
    number of (sequence, head) pairs.

    fp32 attention of few short sequences takes small query blocks: more programs where 64-row
    blocks would leave most SMs idle, and less of each tile spent past the sequence's end. On an
    H200, BERT-base fp32 (12 heads of 64 channels; docs/performance.md): 8.0 -> 3.0 us per
    launch at 2 x 16 and 26.9 -> 11.3 us at 1 x 128 (`scripts/attention_bench.py`); per call
    1.217 -> 1.174 ms and 2.387 -> 2.208 ms (`scripts/levers.py`, ``attention_small_blocks``).
    Smaller blocks were faster alone in two more places, and not in the model: fp32 at 8 x 128
    (32 x 16 blocks, 42 against 50 us alone, 6.657 against 6.670 ms per call) and fp16 at
    1 x 128 (64 rows, 3.3 against 4.2 us alone, 0.492 against 0.486 ms per call); those keep
    their blocks.
    """
    if interpreted():
        # The interpreter runs each program in numpy: small tiles keep CPU tests quick and make
        # short test sequences cross several query and key blocks.
        return 16, 16, 4, 1
    if dtype == torch.float32:
        # "ieee" fp32 dots run on the FMA units, not the tensor cores, with their operands in
        # registers: at most 64 x 32 tiles over 8 warps, which do not spill.
        if block_d > 128:
            return 32, 16, 8, 2
        if batch_heads * triton.cdiv(max_seqlen, 64) <= _SM_COUNT // 2:
            # Under half the SMs would be busy with 64-row blocks.
            return (16, 16, 4, 1) if max_seqlen <= 16 else (16, 32, 2, 2)
        return 64, 32, 8, 2
    if block_d <= 128:
        if max_seqlen <= 64:
            # Short sequences (most BERT inputs once unpadded) would leave most of a 128-row
            # tile idle; one warpgroup on 64 rows halves the waste and doubles the programs.
            # Key blocks of 32: on an H200, batches of 64 sequences of 27 tokens on average
            # (the movie-review pass) took 6.2 us per launch against 7.0 with 64-key blocks
            # (`scripts/attention_bench.py`, 64x56r27 and 64x64r27), 2.4 against 2.6 at 2 x 16.
            return 64, 32, 4, 3
        # Two warpgroups, 64 query rows each (the wgmma M); 4 warps on 128 rows would need
        # every one of the 255 registers.
        return 128, 64, 8, 3
    # 256 channels: the [64, 256] fp32 accumulator fills the registers of 8 warps, and each K/V
    # stage takes 64 KiB of shared memory, so two stages.
    return 64, 64, 8, 2


def _first_only_config(dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, num_warps, num_stages) of ``first_only``: one query row per (sequence,
    head), in the smallest tile a dot takes (16 rows)."""
    if interpreted():
        return 16, 16, 4, 1
    if dtype == torch.float32:
        return 16, 32, 4, 1
    return 16, 64, 4, 2


def _check_rows(name: str, t: torch.Tensor, width: int, dtype: torch.dtype, rows: int, device):
    if t.dim() != 2:
        raise ValueError(
            f"{name} must be 2-D [rows, >= num_heads * head_dim]; got shape "
            f"{tuple(t.shape)}. Reshape it to [rows, hidden]."
        )
    if t.dtype != dtype:
        raise ValueError(
            f"{name}.dtype is {t.dtype} but q.dtype is {dtype}; cast all of q, k, v "
            "(and out) to one dtype."
        )
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but q is on {device}; move them to one device.")
    if t.shape[0] != rows:
        raise ValueError(
            f"{name} has {t.shape[0]} rows but q has {rows}; q, k, v and out must "
            "hold the same packed rows."
        )
    if t.shape[1] < width:
        raise ValueError(
            f"{name} is {t.shape[1]} wide, narrower than num_heads * head_dim = "
            f"{width}; pass the full hidden width or fix num_heads / head_dim."
        )
    if t.stride(1) != 1:
        raise ValueError(
            f"{name}.stride(1) is {t.stride(1)}; channels must be contiguous "
            f"(stride(1) == 1). Pass {name}.contiguous() or a column slice."
        )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    max_seqlen: int,
    num_heads: int,
    head_dim: int,
    scale: float,
    key_valid: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    first_only: bool = False,
) -> torch.Tensor:
    """softmax(scale * q k^T) v per head, within each packed sequence.

    Args:
        q, k, v: [R, >= num_heads * head_dim] with stride(1) == 1, one dtype (fp32, fp16 or
            bf16); element (r, h * head_dim + d) is channel d of head h of row r. Row strides may
            differ (column slices of one packed [R, 3 * hidden] QKV buffer are fine).
        cu_seqlens: int32 [B + 1], nondecreasing from 0 to at most R; sequence b owns rows
            cu_seqlens[b] .. cu_seqlens[b + 1] - 1 (it may be empty). Not checked on the host,
            which would need a device sync.
        max_seqlen: a host int at least as large as the longest sequence (larger is fine).
        num_heads, head_dim: head count (>= 1) and width (8 to 256).
        scale: applied to q k^T before the softmax (usually head_dim ** -0.5).
        key_valid: optional [R] tensor (bool or integer, nonzero = valid) of the rows that may be
            attended to as keys. A query whose sequence has no valid key gets zeros.
        out: optional [R, num_heads * head_dim] destination of q's dtype with stride(1) == 1
            (it may be a strided view). Only rows of sequences are written. With
            ``first_only``, [B, num_heads * head_dim], every row written.
        first_only: compute the first query of each sequence only (the row a first-token
            pooling reads): row b of the result is the attention of query row cu_seqlens[b]
            over the keys of sequence b, zeros for an empty sequence.

    Returns:
        ``out``, or a new [R, num_heads * head_dim] tensor whose rows past cu_seqlens[B] are
        left uninitialised; with ``first_only``, a new [B, num_heads * head_dim] one.

    Example (see the module docstring for one that also checks the result)::

        dev = "cuda" if torch.cuda.is_available() else "cpu"
        qkv = torch.randn(10, 96, device=dev)
        cu = torch.tensor([0, 3, 10], dtype=torch.int32, device=dev)
        o = attention(qkv[:, :32], qkv[:, 32:64], qkv[:, 64:], cu, 7, 2, 16, 0.25)
    """
    if not isinstance(q, torch.Tensor) or q.dim() != 2:
        raise ValueError(
            f"q must be a 2-D tensor [rows, >= num_heads * head_dim]; got "
            f"{getattr(q, 'shape', type(q))}."
        )
    dtype, device, rows = q.dtype, q.device, q.shape[0]
    if dtype not in TOLERANCES:
        raise ValueError(
            f"q.dtype is {dtype}; attention supports float32, float16 and bfloat16. "
            "Cast q, k and v to one of them."
        )
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads is {num_heads!r}; pass a positive int.")
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or not 8 <= head_dim <= 256:
        raise ValueError(f"head_dim is {head_dim!r}; pass an int from 8 to 256.")
    if isinstance(max_seqlen, bool) or not isinstance(max_seqlen, int) or max_seqlen < 0:
        raise ValueError(
            f"max_seqlen is {max_seqlen!r}; pass a host int >= 0 (an upper bound on "
            "the longest sequence), e.g. int((cu[1:] - cu[:-1]).max())."
        )
    if not isinstance(scale, (int, float)) or isinstance(scale, bool) or not math.isfinite(scale):
        raise ValueError(
            f"scale is {scale!r}; pass a finite Python float such as head_dim ** -0.5."
        )
    if device.type != "cuda" and not interpreted():
        raise ValueError(
            f"q is on {device}; without TRITON_INTERPRET=1 the kernel needs CUDA "
            "tensors. Move the inputs to the GPU."
        )
    if not isinstance(first_only, bool):
        raise ValueError(f"first_only is {first_only!r}; pass True or False.")
    width = num_heads * head_dim
    _check_rows("q", q, width, dtype, rows, device)
    _check_rows("k", k, width, dtype, rows, device)
    _check_rows("v", v, width, dtype, rows, device)
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1:
        raise ValueError(
            f"cu_seqlens must be a 1-D tensor [B + 1]; got "
            f"{getattr(cu_seqlens, 'shape', type(cu_seqlens))}."
        )
    if cu_seqlens.dtype != torch.int32:
        raise ValueError(
            f"cu_seqlens.dtype is {cu_seqlens.dtype}; pass cu_seqlens.to(torch.int32)."
        )
    if cu_seqlens.numel() < 1:
        raise ValueError("cu_seqlens is empty; it needs B + 1 >= 1 entries starting with 0.")
    if cu_seqlens.device != device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {device}; move it.")
    if key_valid is not None:
        if not isinstance(key_valid, torch.Tensor) or key_valid.dim() != 1:
            raise ValueError(
                f"key_valid must be a 1-D tensor [R]; got "
                f"{getattr(key_valid, 'shape', type(key_valid))}."
            )
        if key_valid.shape[0] != rows:
            raise ValueError(
                f"key_valid has {key_valid.shape[0]} entries but q has {rows} rows; "
                "pass one flag per packed row."
            )
        if key_valid.dtype not in (torch.bool, torch.int8, torch.int32, torch.int64):
            raise ValueError(
                f"key_valid.dtype is {key_valid.dtype}; pass bool, int8, int32 or "
                "int64 (nonzero = valid)."
            )
        if key_valid.device != device:
            raise ValueError(f"key_valid is on {key_valid.device} but q is on {device}; move it.")
        if key_valid.dtype == torch.bool:
            key_valid = key_valid.view(torch.uint8)  # same bytes; Triton loads bytes reliably
    batch = cu_seqlens.numel() - 1
    out_rows = batch if first_only else rows
    if out is None:
        out = torch.empty((out_rows, width), dtype=dtype, device=device)
    else:
        shape = tuple(getattr(out, "shape", ()))
        if not isinstance(out, torch.Tensor) or out.dim() != 2 or shape != (out_rows, width):
            what = "sequences of cu_seqlens" if first_only else "rows of q"
            raise ValueError(
                f"out has shape {shape}; it must be [{out_rows}, {width}] ({what}, "
                "num_heads * head_dim)."
            )
        _check_rows("out", out, width, dtype, out_rows, device)

    if batch == 0 or max_seqlen == 0 or rows == 0:
        if first_only:
            out.zero_()  # every sequence is empty
        return out
    block_d = max(16, triton.next_power_of_2(head_dim))  # tl.dot needs K >= 16
    if first_only:
        block_m, block_n, num_warps, num_stages = _first_only_config(dtype)
        grid = (batch * num_heads, 1)
    else:
        block_m, block_n, num_warps, num_stages = _launch_config(
            block_d, dtype, max_seqlen, batch * num_heads
        )
        grid = (batch * num_heads, triton.cdiv(max_seqlen, block_m))
    if grid[1] > _MAX_GRID_Y:
        raise ValueError(
            f"max_seqlen is {max_seqlen}, which needs {grid[1]} query blocks of "
            f"{block_m} rows, more than the grid allows ({_MAX_GRID_Y}); split the "
            "sequences."
        )
    _pdl.launcher(_attention_kernel, grid)(
        q,
        k,
        v,
        out,
        cu_seqlens,
        key_valid if key_valid is not None else cu_seqlens,  # never read without HAS_KEY_VALID
        q.stride(0),
        k.stride(0),
        v.stride(0),
        out.stride(0),
        key_valid.stride(0) if key_valid is not None else 0,
        float(scale) * _LOG2E,
        num_heads,
        HEAD_DIM=head_dim,
        HAS_KEY_VALID=key_valid is not None,
        FP32_DOT=dtype == torch.float32,
        # The interpreter's tl.dot multiplies bf16 bit patterns as integers; exact fp32 operands
        # stand in for the bf16 tensor-core dot there.
        UPCAST_DOT=dtype == torch.bfloat16 and interpreted(),
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        FIRST_ONLY=first_only,
        num_warps=num_warps,
        num_stages=num_stages,
        **_pdl.options(q.device),
    )
    return out


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens: torch.Tensor,
    num_heads: int,
    head_dim: int,
    scale: float,
    key_valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """Plain-PyTorch `attention` in fp32, one sequence and one head at a time.

    Rows past cu_seqlens[B] are zero. Example::

        qkv = torch.randn(10, 96)
        cu = torch.tensor([0, 3, 10], dtype=torch.int32)
        ref = attention_reference(qkv[:, :32], qkv[:, 32:64], qkv[:, 64:], cu, 2, 16, 0.25)
    """
    width = num_heads * head_dim
    out = torch.zeros((q.shape[0], width), dtype=torch.float32, device=q.device)
    bounds = cu_seqlens.tolist()
    for b in range(len(bounds) - 1):
        start, end = bounds[b], bounds[b + 1]
        if end == start:
            continue
        valid = None if key_valid is None else key_valid[start:end] != 0
        if valid is not None and not bool(valid.any()):
            continue  # no key to attend to: zeros
        for h in range(num_heads):
            cols = slice(h * head_dim, (h + 1) * head_dim)
            qh = q[start:end, cols].float()
            kh = k[start:end, cols].float()
            vh = v[start:end, cols].float()
            scores = scale * (qh @ kh.T)
            if valid is not None:
                scores = scores.masked_fill(~valid[None, :], float("-inf"))
            out[start:end, cols] = torch.softmax(scores, dim=-1) @ vh
    return out.to(q.dtype)
