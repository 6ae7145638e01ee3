"""Input preparation: the caller's ids, mask and segment ids copied into the padded buffers of a
shape bucket, with the statistics the runtime checks, in one launch.

Every call needs the id ranges (to refuse ids outside the vocabulary with a clear error instead
of a device-side fault) and the number of real tokens (to pick the bucket of rows), so it has to
read a few numbers back to the host. One launch computes them while it copies: each program
handles one row of the batch and writes its partial statistics; the last program to finish
(counted with an atomic ticket) reduces them into seven numbers.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from optimum_disc.kernels import interpreted
from optimum_disc.kernels import launch as _launch

try:
    from triton.compiler import CompiledKernel
except ImportError:  # pragma: no cover - every launch goes through Triton's launcher
    CompiledKernel = ()

# Order of the statistics in the result. ``first_min`` is min(1, attention_mask[:, 0]): 1 when
# position 0 is a real token in every sequence.
STATS = (
    "id_min",
    "id_max",
    "type_min",
    "type_max",
    "real_tokens",
    "first_min",
    "bad_mask",
    "pad_before_real",
)
_BIG = tl.constexpr(2**62)


@triton.jit
def _field(values, index, k: tl.constexpr):
    # Element k of a small vector, as a scalar.
    return tl.sum(tl.where(index == k, values, 0), axis=0)


# Every integer argument is a run-time value (no specialization on it), so that one compiled kernel
# serves every shape: `prepare_inputs` launches it directly after the first call (see
# `_COMPILED`).
@triton.jit(
    do_not_specialize=[
        "B",
        "S",
        "stride_ids_b",
        "stride_ids_s",
        "stride_mask_b",
        "stride_mask_s",
        "stride_types_b",
        "stride_types_s",
        "S_PAD",
        "NPROG",
        "PAD_ID",
        "ID_LIMIT",
        "TYPE_LIMIT",
    ]
)
def _prepare_inputs_kernel(
    ids_ptr,
    mask_ptr,
    types_ptr,
    B,
    S,
    stride_ids_b,
    stride_ids_s,
    stride_mask_b,
    stride_mask_s,
    stride_types_b,
    stride_types_s,
    out_ids_ptr,
    out_mask_ptr,
    out_types_ptr,
    S_PAD,
    partial_ptr,
    ticket_ptr,
    stats_ptr,
    NPROG,
    PAD_ID,
    ID_LIMIT,
    TYPE_LIMIT,
    table_ptr,
    HAS_MASK: tl.constexpr,
    HAS_TYPES: tl.constexpr,
    HAS_PAD: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_R: tl.constexpr,
    TABLE: tl.constexpr = False,
):
    if TABLE:
        # The caller's tensors, shape and strides come from the table (`InputTable.fill`), not
        # from the arguments, which only give the element types: a CUDA graph of this launch
        # then serves every call of the bucket, whatever tensors it is given. The table lives in
        # host memory: one vector load per warp brings all eleven values over the bus, where a
        # scalar load each would be eleven requests per warp and program.
        f = tl.arange(0, 16)
        v = tl.load(table_ptr + f, mask=f < 11, other=0)
        ids_ptr = _field(v, f, 0).to(tl.pointer_type(ids_ptr.dtype.element_ty))
        mask_ptr = _field(v, f, 1).to(tl.pointer_type(mask_ptr.dtype.element_ty))
        types_ptr = _field(v, f, 2).to(tl.pointer_type(types_ptr.dtype.element_ty))
        B = _field(v, f, 3)
        S = _field(v, f, 4)
        stride_ids_b = _field(v, f, 5)
        stride_ids_s = _field(v, f, 6)
        stride_mask_b = _field(v, f, 7)
        stride_mask_s = _field(v, f, 8)
        stride_types_b = _field(v, f, 9)
        stride_types_s = _field(v, f, 10)
    b = tl.program_id(0)
    cols = tl.arange(0, BLOCK_S)
    in_row = b < B
    valid = cols < tl.where(in_row, S, 0)
    ids = tl.load(ids_ptr + b * stride_ids_b + cols * stride_ids_s, mask=valid, other=0)
    ids = ids.to(tl.int64)
    if HAS_MASK:
        m = tl.load(mask_ptr + b * stride_mask_b + cols * stride_mask_s, mask=valid, other=0)
        m = m.to(tl.int64)
    else:
        m = valid.to(tl.int64)
    if HAS_TYPES:
        t = tl.load(types_ptr + b * stride_types_b + cols * stride_types_s, mask=valid, other=0)
        t = t.to(tl.int64)
    else:
        t = tl.zeros([BLOCK_S], tl.int64)
    inside = cols < S_PAD
    # The buffers get ids clamped into [0, limit): the statistics below see the caller's values
    # (and the runtime refuses ids outside the tables), but the kernels that read the buffers
    # never index past an embedding table, even when they run before that check.
    tl.store(
        out_ids_ptr + b * S_PAD + cols, tl.minimum(tl.maximum(ids, 0), ID_LIMIT - 1), mask=inside
    )
    tl.store(out_mask_ptr + b * S_PAD + cols, m, mask=inside)
    tl.store(
        out_types_ptr + b * S_PAD + cols,
        tl.minimum(tl.maximum(t, 0), TYPE_LIMIT - 1),
        mask=inside,
    )

    big = tl.full([BLOCK_S], _BIG, tl.int64)
    first = tl.sum(tl.where(cols == 0, m, 0), axis=0)
    first = tl.where(in_row, first, 1)
    bad = tl.sum((valid & (m != 0) & (m != 1)).to(tl.int64), axis=0)
    row = partial_ptr + b * 8
    tl.store(row + 0, tl.min(tl.where(valid, ids, big), axis=0))
    tl.store(row + 1, tl.max(tl.where(valid, ids, -big), axis=0))
    tl.store(row + 2, tl.min(tl.where(valid, t, big), axis=0))
    tl.store(row + 3, tl.max(tl.where(valid, t, -big), axis=0))
    tl.store(row + 4, tl.sum(tl.where(valid, m, 0), axis=0))
    tl.store(row + 5, first)
    tl.store(row + 6, bad)
    if HAS_PAD:
        # Real tokens at or after a padding token of their sequence (left padding, or padding
        # inside a sequence), which RoBERTa-style positions cannot number.
        pad = (valid & (ids == PAD_ID)).to(tl.int32)
        after_pad = tl.cumsum(pad, axis=0) > 0
        tl.store(row + 7, tl.sum((after_pad & valid & (m != 0)).to(tl.int64), axis=0))
    else:
        tl.store(row + 7, tl.zeros([], tl.int64))

    # The last program to take a ticket sees every partial (acquire/release ordering of the
    # atomic) and reduces them; it resets the ticket for the next launch.
    ticket = tl.atomic_add(ticket_ptr, 1)
    if ticket == NPROG - 1:
        acc_min_id = tl.full([BLOCK_R], _BIG, tl.int64)
        acc_max_id = tl.full([BLOCK_R], -_BIG, tl.int64)
        acc_min_t = tl.full([BLOCK_R], _BIG, tl.int64)
        acc_max_t = tl.full([BLOCK_R], -_BIG, tl.int64)
        acc_sum = tl.zeros([BLOCK_R], tl.int64)
        acc_first = tl.full([BLOCK_R], 1, tl.int64)
        acc_bad = tl.zeros([BLOCK_R], tl.int64)
        acc_early = tl.zeros([BLOCK_R], tl.int64)
        for start in range(0, NPROG, BLOCK_R):
            r = start + tl.arange(0, BLOCK_R)
            ok = r < NPROG
            p = partial_ptr + r * 8
            acc_min_id = tl.minimum(
                acc_min_id, tl.load(p + 0, mask=ok, other=_BIG, cache_modifier=".cg")
            )
            acc_max_id = tl.maximum(
                acc_max_id, tl.load(p + 1, mask=ok, other=-_BIG, cache_modifier=".cg")
            )
            acc_min_t = tl.minimum(
                acc_min_t, tl.load(p + 2, mask=ok, other=_BIG, cache_modifier=".cg")
            )
            acc_max_t = tl.maximum(
                acc_max_t, tl.load(p + 3, mask=ok, other=-_BIG, cache_modifier=".cg")
            )
            acc_sum += tl.load(p + 4, mask=ok, other=0, cache_modifier=".cg")
            acc_first = tl.minimum(
                acc_first, tl.load(p + 5, mask=ok, other=1, cache_modifier=".cg")
            )
            acc_bad += tl.load(p + 6, mask=ok, other=0, cache_modifier=".cg")
            acc_early += tl.load(p + 7, mask=ok, other=0, cache_modifier=".cg")
        tl.store(stats_ptr + 0, tl.min(acc_min_id, axis=0))
        tl.store(stats_ptr + 1, tl.max(acc_max_id, axis=0))
        tl.store(stats_ptr + 2, tl.min(acc_min_t, axis=0))
        tl.store(stats_ptr + 3, tl.max(acc_max_t, axis=0))
        tl.store(stats_ptr + 4, tl.sum(acc_sum, axis=0))
        tl.store(stats_ptr + 5, tl.min(acc_first, axis=0))
        tl.store(stats_ptr + 6, tl.sum(acc_bad, axis=0))
        tl.store(stats_ptr + 7, tl.sum(acc_early, axis=0))
        tl.atomic_xchg(ticket_ptr, 0)


class InputTable:
    """Where the input kernel finds the caller's tensors when launched with ``table=``: their
    addresses, the ``[B, S]`` shape and the strides, eleven int64 values in host memory (pinned
    for a GPU launch, which reads them in place over the bus).

    The values are the host's at the time the kernel runs, so one table serves one launch at a
    time: fill it, launch (or replay a graph of the launch), and wait for that launch to finish
    before filling it again. The tensors it names must stay alive until then.
    """

    FIELDS = 11

    def __init__(self, pin: bool = False):
        self.tensor = torch.zeros(self.FIELDS, dtype=torch.int64, pin_memory=pin)
        self._values = self.tensor.numpy()

    def fill(self, input_ids, attention_mask=None, token_type_ids=None) -> None:
        """Write the addresses, shape and strides of these inputs (a missing mask or segment ids
        is never read: the input ids stand in for it)."""
        mask = attention_mask if attention_mask is not None else input_ids
        types = token_type_ids if token_type_ids is not None else input_ids
        self._values[:] = (
            input_ids.data_ptr(),
            mask.data_ptr(),
            types.data_ptr(),
            *input_ids.shape,
            *input_ids.stride(),
            *mask.stride(),
            *types.stride(),
        )


class InputBuffers:
    """The padded ``[b_pad, s_pad]`` int64 buffers of one shape bucket and the scratch of the
    statistics (the ticket starts at zero and is left at zero by every launch)."""

    def __init__(self, b_pad: int, s_pad: int, device):
        self.b_pad, self.s_pad = b_pad, s_pad
        z = lambda *shape: torch.zeros(*shape, dtype=torch.int64, device=device)  # noqa: E731
        self.ids, self.mask, self.types = z(b_pad, s_pad), z(b_pad, s_pad), z(b_pad, s_pad)
        self.partial, self.stats = z(b_pad, 8), z(8)
        self.ticket = torch.zeros(1, dtype=torch.int32, device=device)


def prepare_inputs(
    input_ids,
    attention_mask,
    token_type_ids,
    buffers: InputBuffers,
    pad_token_id=None,
    id_limit: int | None = None,
    type_limit: int | None = None,
    stats_out: torch.Tensor | None = None,
    table: InputTable | None = None,
) -> torch.Tensor:
    """Copy ``[B, S]`` inputs into ``buffers`` (zeros past B and S) and return the eight
    statistics of ``STATS`` as an int64 tensor on the device (``pad_before_real`` counts real
    tokens at or after a ``pad_token_id`` of their sequence; 0 when it is None).

    Ids and segment ids are stored clamped into ``[0, id_limit)`` and ``[0, type_limit)`` (into
    ``[0, 2**31 - 1)`` when the limit is None); the statistics are those of the caller's values.

    ``stats_out`` (an int64 tensor of 8 elements) receives the statistics instead, and is
    returned. For a GPU launch it may be pinned host memory, which the kernel writes directly:
    the host then reads the numbers without a copy, once the launch has finished (after an
    event recorded behind it has completed).

    ``table`` (an `InputTable`) is filled with the inputs' addresses, shape and strides, and
    the kernel reads them from there instead of from its arguments: a CUDA graph captured around
    such a launch computes, at each replay, on the inputs the table holds then (see
    `InputTable.fill`). The graph is only valid for inputs of the same dtypes, with the same
    arguments given or left out, and of a shape that fits ``buffers``.

    >>> import torch
    >>> buf = InputBuffers(4, 16, "cpu")
    >>> ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    >>> mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    >>> prepare_inputs(ids, mask, None, buf)[:5].tolist()
    [0, 9, 0, 0, 5]
    """
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids has shape {tuple(input_ids.shape)}; expected [batch, seq].")
    b, s = input_ids.shape
    if b > buffers.b_pad or s > buffers.s_pad:
        raise ValueError(f"inputs [{b}, {s}] do not fit buffers {buffers.b_pad}x{buffers.s_pad}")
    for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
        if t is not None and t.shape != input_ids.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)}, input_ids {tuple(input_ids.shape)}"
            )
    if stats_out is None:
        stats_out = buffers.stats
    elif stats_out.dtype != torch.int64 or stats_out.numel() != len(STATS):
        raise ValueError(
            f"stats_out is {stats_out.dtype} with {stats_out.numel()} elements; pass an int64 "
            f"tensor of {len(STATS)}"
        )
    mask = attention_mask if attention_mask is not None else input_ids
    types = token_type_ids if token_type_ids is not None else input_ids
    if table is not None:
        if not isinstance(table, InputTable):
            raise TypeError(f"table is a {type(table).__name__}; pass an InputTable")
        if input_ids.is_cuda and not table.tensor.is_pinned():
            raise ValueError("a GPU launch reads its table in place: make it InputTable(pin=True)")
        table.fill(input_ids, attention_mask, token_type_ids)
    block_s = max(16, triton.next_power_of_2(buffers.s_pad))
    args = (
        input_ids,
        mask,
        types,
        b,
        s,
        input_ids.stride(0),
        input_ids.stride(1),
        mask.stride(0),
        mask.stride(1),
        types.stride(0),
        types.stride(1),
        buffers.ids,
        buffers.mask,
        buffers.types,
        buffers.s_pad,
        buffers.partial,
        buffers.ticket,
        stats_out,
        buffers.b_pad,
        pad_token_id if pad_token_id is not None else 0,
        _limit(id_limit, "id_limit"),
        _limit(type_limit, "type_limit"),
        table.tensor if table is not None else buffers.ticket,
    )
    consts = (attention_mask is not None, token_type_ids is not None, pad_token_id is not None)
    consts += (block_s, 256, table is not None)  # HAS_MASK, HAS_TYPES, HAS_PAD, BLOCK_S, BLOCK_R,
    # TABLE
    num_warps = 4 if block_s <= 1024 else 8
    grid = (buffers.b_pad, 1, 1)
    if interpreted() or _launch.compiling_only():
        _launch.launcher(_prepare_inputs_kernel, grid)(*args, *consts, num_warps=num_warps)
        return stats_out
    # What the compiled kernel is specialized on besides the constants: the dtypes of the
    # caller's tensors and whether their addresses (and the statistics') are 16-byte aligned
    # (the buffers are).
    key = (input_ids.device, num_warps, consts, stats_out.data_ptr() % 16 == 0)
    key += (args[-1].data_ptr() % 16 == 0,)  # the table (or a stand-in)
    key += tuple((t.dtype, t.data_ptr() % 16 == 0) for t in (input_ids, mask, types))
    compiled = _COMPILED.get(key)
    if compiled is not None:
        compiled[grid](*args, *consts)
        return stats_out
    compiled = _prepare_inputs_kernel[grid](*args, *consts, num_warps=num_warps)
    if isinstance(compiled, CompiledKernel):
        _COMPILED[key] = compiled
    return stats_out


def _limit(value: int | None, name: str) -> int:
    # No limit is the largest int32: the compiled kernel of `_COMPILED` types the argument by the
    # first value it met (a table size), so every value must fit that type.
    if value is None:
        return _NO_LIMIT
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= _NO_LIMIT:
        raise ValueError(
            f"{name}={value!r} must be a positive int below 2**31 (a table's number of rows)"
        )
    return value


_NO_LIMIT = 2**31 - 1


# The input kernel compiled per key of `prepare_inputs`: each call launches it directly, which
# takes a few microseconds of the host where Triton's launcher (binding and specializing 25
# arguments) took 40 to 50 (H200 host, scripts/host_time.py); it runs before the CUDA graph of
# every call, so its launch delays every call.
_COMPILED: dict = {}


def prepare_inputs_reference(
    input_ids,
    attention_mask,
    token_type_ids,
    b_pad,
    s_pad,
    pad_token_id=None,
    id_limit=None,
    type_limit=None,
):
    """(ids, mask, types, stats) as ``prepare_inputs`` computes them, with torch ops."""
    b, s = input_ids.shape
    dev = input_ids.device
    mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
    types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
    out = []
    limits = (_limit(id_limit, "id_limit"), None, _limit(type_limit, "type_limit"))
    for t, limit in zip((input_ids, mask, types), limits):
        padded = torch.zeros(b_pad, s_pad, dtype=torch.int64, device=dev)
        padded[:b, :s] = t if limit is None else t.clamp(0, limit - 1)
        out.append(padded)
    bad = ((mask != 0) & (mask != 1)).sum()
    early = torch.zeros((), dtype=torch.int64, device=dev)
    if pad_token_id is not None:
        early = (((input_ids == pad_token_id).cumsum(1) > 0) & (mask != 0)).sum()
    stats = torch.stack(
        [
            input_ids.min(),
            input_ids.max(),
            types.min(),
            types.max(),
            mask.sum(),
            mask[:, 0].min().clamp(max=1),
            bad,
            early,
        ]
    ).to(torch.int64)
    return (*out, stats)


@triton.jit
def _derive_rows_kernel(
    mask_ptr,
    rows_ptr,
    cu_ptr,
    first_ptr,
    N,
    S_PAD,
    ROWS,
    BLOCK: tl.constexpr,
):
    # One program walks the [B_PAD * S_PAD] mask in blocks, carrying two running counts: real
    # tokens go to rows[0 .. real), in order, and padding positions after them, in order (a
    # stable partition); the real count at the end of each sequence is its cu_seqlens entry.
    offs = tl.arange(0, BLOCK)
    total = tl.zeros((BLOCK,), dtype=tl.int32)
    for start in range(0, N, BLOCK):
        idx = start + offs
        total += (tl.load(mask_ptr + idx, mask=idx < N, other=0) != 0).to(tl.int32)
    n_real = tl.sum(total, axis=0)
    tl.store(cu_ptr, 0)
    seen_real = 0
    seen_pad = 0
    for start in range(0, N, BLOCK):
        idx = start + offs
        valid = idx < N
        real = (tl.load(mask_ptr + idx, mask=valid, other=0) != 0).to(tl.int32)
        pad = valid.to(tl.int32) - real
        real_incl = tl.cumsum(real, axis=0)
        pad_incl = tl.cumsum(pad, axis=0)
        dest = tl.where(real != 0, seen_real + real_incl - 1, n_real + seen_pad + pad_incl - 1)
        tl.store(rows_ptr + dest, idx.to(tl.int64), mask=valid & (dest < ROWS))
        before = seen_real + real_incl - real  # real tokens before this position
        b = idx // S_PAD
        pos = idx - b * S_PAD
        tl.store(cu_ptr + b + 1, before + real, mask=valid & (pos == S_PAD - 1))
        first = tl.minimum(before, ROWS - 1).to(tl.int64)
        tl.store(first_ptr + b, first, mask=valid & (pos == 0))
        seen_real += tl.sum(real, axis=0)
        seen_pad += tl.sum(pad, axis=0)


def derive_rows(
    mask: torch.Tensor, rows: torch.Tensor, cu_seqlens: torch.Tensor, first_rows: torch.Tensor
) -> None:
    """From a ``[B, S]`` 0/1 mask, in one launch: ``rows`` (int64 ``[R]``) the flat positions
    of the real tokens in order, then of the padding, cut at R; ``cu_seqlens`` (int32
    ``[B + 1]``) 0 and the running count of real tokens at the end of each sequence; and
    ``first_rows`` (int64 ``[B]``) the row of each sequence's first token, at most R - 1.

    >>> import torch
    >>> mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    >>> rows, first = torch.empty(4, dtype=torch.long), torch.empty(2, dtype=torch.long)
    >>> cu = torch.empty(3, dtype=torch.int32)
    >>> derive_rows(mask, rows, cu, first)
    >>> rows.tolist(), cu.tolist(), first.tolist()
    ([0, 1, 3, 2], [0, 2, 3], [0, 2])
    """
    b, s = mask.shape
    if not mask.is_contiguous():
        raise ValueError("mask must be contiguous")
    if cu_seqlens.numel() != b + 1 or first_rows.numel() != b or rows.numel() < 1:
        raise ValueError(
            f"buffers do not fit a [{b}, {s}] mask: rows {tuple(rows.shape)}, cu_seqlens "
            f"{tuple(cu_seqlens.shape)}, first_rows {tuple(first_rows.shape)}"
        )
    n = b * s
    block = min(max(triton.next_power_of_2(n), 16), 2048)
    _launch.launcher(_derive_rows_kernel, (1,))(
        mask,
        rows,
        cu_seqlens,
        first_rows,
        n,
        s,
        rows.numel(),
        BLOCK=block,
        num_warps=4 if block <= 1024 else 8,
    )


def derive_rows_reference(mask: torch.Tensor, n_rows: int):
    """(rows, cu_seqlens, first_rows) of ``derive_rows``, with torch ops."""
    order = torch.argsort((mask.reshape(-1) == 0).to(torch.int8), stable=True)
    cu = torch.zeros(mask.shape[0] + 1, dtype=torch.int32, device=mask.device)
    cu[1:] = torch.cumsum((mask != 0).sum(1), 0)
    return order[:n_rows], cu, cu[:-1].to(torch.int64).clamp(max=n_rows - 1)
