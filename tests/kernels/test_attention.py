"""Tests of kernels/attention.py against its plain-PyTorch reference.

Every case draws fresh inputs from the ``seed`` fixture (named in each failure message), writes
into a NaN-poisoned ``out`` and checks that every row of every sequence is finite and within
TOLERANCES, while rows past cu_seqlens[B] (and the columns around a strided ``out``) keep their
NaNs. On the CPU interpreter the tiles are 16 x 16, so short sequences already cross blocks.
"""

from dataclasses import dataclass

import pytest
import torch

from optimum_disc.kernels.attention import TOLERANCES, attention, attention_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@dataclass(frozen=True)
class Case:
    lengths: tuple[int, ...] | int  # an int n draws n random lengths from 1 to 9
    num_heads: int
    head_dim: int
    layout: str = "contiguous"  # "packed": column slices of one [R, 3H]; "strided": unequal strides
    # "random": random 0/1; "dead": also a sequence with no valid key; "prefix": also the first
    # 17 keys of every sequence invalid, so whole leading key blocks are masked.
    key_valid: str | None = None
    extra_seqlen: int = 0  # max_seqlen passed = true max + extra_seqlen
    tail: int = 0  # rows past cu_seqlens[B], which belong to no sequence
    scale: float | None = None  # None: head_dim ** -0.5


CASES = [
    pytest.param(Case((1,), 1, 16), id="len1-h1-d16"),
    pytest.param(Case((7,), 2, 32, layout="packed", tail=5), id="len7-h2-d32-packed"),
    pytest.param(Case((129,), 2, 64, layout="strided"), id="len129-h2-d64-strided"),
    pytest.param(Case((512,), 1, 16, key_valid="random"), id="len512-h1-d16"),
    pytest.param(
        Case((5, 0, 17, 1, 40), 12, 24, extra_seqlen=23, tail=3), id="mixed-empty-h12-d24"
    ),
    pytest.param(Case(33, 2, 16, layout="packed", key_valid="random"), id="batch33-h2-d16"),
    pytest.param(
        Case((7, 20, 33), 2, 80, layout="packed", key_valid="random", tail=2),
        id="kv-random-h2-d80",
    ),
    pytest.param(
        Case((4, 9, 0, 6, 18), 3, 32, key_valid="dead", extra_seqlen=40), id="kv-dead-h3-d32"
    ),
    pytest.param(Case((20, 40, 5), 2, 32, key_valid="prefix"), id="kv-prefix-h2-d32"),
    pytest.param(Case((3, 11), 1, 8, layout="strided"), id="d8"),
    pytest.param(Case((19,), 1, 256, key_valid="random"), id="d256"),
    # Peaky softmax (logits of a few tens): the running max has to keep exp2 in range.
    pytest.param(Case((2, 30), 2, 64, scale=1.0), id="peaky-h2-d64"),
]

GPU_CASES = [
    # fp32 attention of few short sequences takes small blocks (`attention._launch_config`):
    # 24 (sequence, head) pairs of 16 rows, and 12 of 128.
    pytest.param(
        Case((16, 16), 12, 64, layout="packed", key_valid="random"),
        id="b2-s16-h12-d64",
        marks=pytest.mark.gpu,
    ),
    pytest.param(
        Case((128,), 12, 64, layout="packed"), id="b1-s128-h12-d64", marks=pytest.mark.gpu
    ),
    pytest.param(Case((512,), 2, 64), id="len512", marks=pytest.mark.gpu),
    pytest.param(
        Case((128,) * 32, 12, 64, layout="packed"), id="b32-s128-h12-d64", marks=pytest.mark.gpu
    ),
    pytest.param(
        Case((512,) * 8, 12, 64, layout="packed", key_valid="random"),
        id="b8-s512-h12-d64-kv",
        marks=pytest.mark.gpu,
    ),
    pytest.param(
        Case((300, 0, 512, 1, 77, 128, 129, 255), 16, 128, layout="strided", tail=7),
        id="mixed-h16-d128",
        marks=pytest.mark.gpu,
    ),
    pytest.param(
        Case((384, 17, 256), 12, 96, key_valid="dead", extra_seqlen=100),
        id="mixed-h12-d96-dead",
        marks=pytest.mark.gpu,
    ),
    pytest.param(Case((200, 511), 4, 256, layout="packed"), id="h4-d256", marks=pytest.mark.gpu),
    pytest.param(
        Case((33, 64, 5), 32, 32, layout="packed"), id="h32-d32-short", marks=pytest.mark.gpu
    ),
    pytest.param(
        Case(200, 12, 80, key_valid="random", tail=1), id="b200-h12-d80", marks=pytest.mark.gpu
    ),
    # A batch of the movie-review pass: 64 sequences of 6 to 55 tokens (16-bit: 64 x 32 blocks).
    pytest.param(
        Case(tuple((7 * i) % 50 + 6 for i in range(64)), 12, 64, layout="packed", tail=3),
        id="b64-short-h12-d64",
        marks=pytest.mark.gpu,
    ),
]


def _lengths(case: Case) -> list[int]:
    if isinstance(case.lengths, int):
        return torch.randint(1, 10, (case.lengths,)).tolist()
    return list(case.lengths)


def _dead_sequence(lengths: list[int]) -> int:
    """The sequence whose keys a "dead" case marks all invalid: the first non-empty one."""
    return next(i for i, n in enumerate(lengths) if n)


def _inputs(case: Case, lengths: list[int], dtype: torch.dtype, device: str):
    width = case.num_heads * case.head_dim
    rows = sum(lengths) + case.tail
    if case.layout == "packed":
        qkv = torch.randn(rows, 3 * width, device=device).to(dtype)
        q, k, v = qkv[:, :width], qkv[:, width : 2 * width], qkv[:, 2 * width :]
    elif case.layout == "strided":
        q = torch.randn(rows, width + 5, device=device).to(dtype)[:, :width]
        k = torch.randn(rows, width + 19, device=device).to(dtype)[:, 3 : 3 + width]
        v = torch.randn(rows, width, device=device).to(dtype)
    else:
        q, k, v = (torch.randn(rows, width, device=device).to(dtype) for _ in range(3))
    cu = torch.zeros(len(lengths) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths, dtype=torch.int32).cumsum(0)
    key_valid = None
    if case.key_valid is not None:
        key_valid = torch.rand(rows, device=device) < 0.7
        if case.key_valid == "dead":
            b = _dead_sequence(lengths)
            key_valid[cu[b] : cu[b + 1]] = False
        if case.key_valid == "prefix":
            for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
                key_valid[start : min(end, start + 17)] = False
    return q, k, v, cu.to(device), key_valid


def _check(case: Case, dtype: torch.dtype, device: str, seed: int):
    lengths = _lengths(case)
    q, k, v, cu, key_valid = _inputs(case, lengths, dtype, device)
    rows, width, n = q.shape[0], q.shape[1], sum(lengths)
    scale = case.head_dim**-0.5 if case.scale is None else case.scale
    max_seqlen = max(lengths) + case.extra_seqlen
    # A strided destination inside a wider NaN buffer: nothing around it may be written either.
    buf = torch.full((rows, width + 7), float("nan"), dtype=dtype, device=device)
    out = buf[:, 4 : 4 + width]
    what = f"seed={seed} lengths={lengths} dtype={dtype}"

    got = attention(
        q, k, v, cu, max_seqlen, case.num_heads, case.head_dim, scale, key_valid=key_valid, out=out
    )
    ref = attention_reference(q, k, v, cu, case.num_heads, case.head_dim, scale, key_valid)

    assert got.data_ptr() == out.data_ptr(), what
    assert torch.isfinite(got[:n]).all(), f"{what}: non-finite output in sequence rows"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        got[:n].float(), ref[:n].float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )
    assert torch.isnan(buf[n:]).all(), f"{what}: rows past cu_seqlens[B] were written"
    assert torch.isnan(buf[:, :4]).all() and torch.isnan(buf[:, 4 + width :]).all(), (
        f"{what}: columns outside the out view were written"
    )
    for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
        if key_valid is not None and end > start and not key_valid[start:end].any():
            assert (got[start:end] == 0).all(), (
                f"{what}: rows {start}..{end - 1} have no valid key and must be zeros"
            )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES + GPU_CASES)
def test_attention_matches_reference(case, dtype, device, seed):
    _check(case, dtype, device, seed)


@pytest.mark.parametrize("kv_dtype", [torch.bool, torch.int8, torch.int32, torch.int64])
def test_key_valid_dtypes(kv_dtype, device, seed):
    heads, dim = 2, 16
    lengths = [9, 20]
    q, k, v, cu, _ = _inputs(Case(tuple(lengths), heads, dim), lengths, torch.float32, device)
    flags = torch.rand(q.shape[0], device=device) < 0.5
    # Values other than 1 count as valid too.
    key_valid = flags.to(kv_dtype) if kv_dtype == torch.bool else flags.to(kv_dtype) * 3
    got = attention(q, k, v, cu, 20, heads, dim, 0.25, key_valid=key_valid)
    ref = attention_reference(q, k, v, cu, heads, dim, 0.25, key_valid=flags)
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda m: f"seed={seed}: {m}")


def test_fresh_output_and_degenerate_batches(device, seed):
    heads, dim = 2, 16
    lengths = [6, 3]
    q, k, v, cu, _ = _inputs(Case(tuple(lengths), heads, dim), lengths, torch.float16, device)
    got = attention(q, k, v, cu, 6, heads, dim, 0.25)
    assert got.shape == (9, heads * dim) and got.dtype == torch.float16
    ref = attention_reference(q, k, v, cu, heads, dim, 0.25)
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda m: f"seed={seed}: {m}")

    out = torch.full((9, heads * dim), float("nan"), dtype=torch.float16, device=device)
    for empty_cu in ([0], [0, 0, 0]):
        cu0 = torch.tensor(empty_cu, dtype=torch.int32, device=device)
        attention(q, k, v, cu0, 0, heads, dim, 0.25, out=out)
        attention(q, k, v, cu0, 4, heads, dim, 0.25, out=out)
        assert torch.isnan(out).all(), f"seed={seed}: no sequence, yet rows were written"


def _check_first_only(case: Case, dtype: torch.dtype, device: str, seed: int):
    lengths = _lengths(case)
    q, k, v, cu, key_valid = _inputs(case, lengths, dtype, device)
    width, batch = q.shape[1], len(lengths)
    scale = case.head_dim**-0.5 if case.scale is None else case.scale
    max_seqlen = max(lengths) + case.extra_seqlen
    buf = torch.full((batch + 2, width + 7), float("nan"), dtype=dtype, device=device)
    out = buf[1 : 1 + batch, 4 : 4 + width]
    what = f"seed={seed} lengths={lengths} dtype={dtype} first_only"

    got = attention(
        q,
        k,
        v,
        cu,
        max_seqlen,
        case.num_heads,
        case.head_dim,
        scale,
        key_valid=key_valid,
        out=out,
        first_only=True,
    )
    ref = attention_reference(q, k, v, cu, case.num_heads, case.head_dim, scale, key_valid)
    # Row b: the first query of sequence b; an empty sequence has none and gets zeros.
    starts = cu[:-1].long().cpu()
    expected = torch.stack(
        [ref[s] if n else torch.zeros_like(ref[0]) for s, n in zip(starts.tolist(), lengths)]
    )
    assert got.data_ptr() == out.data_ptr(), what
    assert torch.isfinite(got).all(), f"{what}: a row was left unwritten or is not finite"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        got.float(), expected.float(), atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}"
    )
    assert torch.isnan(buf[0]).all() and torch.isnan(buf[1 + batch :]).all(), (
        f"{what}: rows outside the out view were written"
    )
    assert torch.isnan(buf[:, :4]).all() and torch.isnan(buf[:, 4 + width :]).all(), (
        f"{what}: columns outside the out view were written"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d).removeprefix("torch."))
@pytest.mark.parametrize("case", CASES + GPU_CASES)
def test_first_only_matches_the_first_rows(case, dtype, device, seed):
    """``first_only``: the first query of each sequence, as the full attention computes it."""
    _check_first_only(case, dtype, device, seed)


def test_first_only_fresh_output_and_empty_batches(device, seed):
    heads, dim = 2, 16
    lengths = [6, 3]
    q, k, v, cu, _ = _inputs(Case(tuple(lengths), heads, dim), lengths, torch.float16, device)
    got = attention(q, k, v, cu, 6, heads, dim, 0.25, first_only=True)
    assert got.shape == (2, heads * dim) and got.dtype == torch.float16
    ref = attention_reference(q, k, v, cu, heads, dim, 0.25)[[0, 6]]
    atol, rtol = TOLERANCES[torch.float16]
    torch.testing.assert_close(got, ref, atol=atol, rtol=rtol, msg=lambda m: f"seed={seed}: {m}")
    # Every sequence empty (max_seqlen 0, or no rows at all): every row is zeros.
    out = torch.full((2, heads * dim), float("nan"), dtype=torch.float16, device=device)
    cu0 = torch.zeros(3, dtype=torch.int32, device=device)
    attention(q, k, v, cu0, 0, heads, dim, 0.25, out=out, first_only=True)
    assert (out == 0).all(), f"seed={seed}: empty sequences must give zeros"
    out.fill_(float("nan"))
    attention(q, k, v, cu0, 4, heads, dim, 0.25, out=out, first_only=True)
    assert (out == 0).all(), f"seed={seed}: empty sequences must give zeros"


def _bad_inputs(device):
    heads, dim = 2, 16
    width = heads * dim
    q, k, v = (torch.randn(8, width, device=device) for _ in range(3))
    cu = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    return dict(
        q=q, k=k, v=v, cu_seqlens=cu, max_seqlen=5, num_heads=heads, head_dim=dim, scale=0.25
    )


def _bad(id_, mutate, match):
    return pytest.param(mutate, match, id=id_)


BAD = [
    _bad("k-dtype", lambda a, d: a.update(k=a["k"].half()), r"k\.dtype is torch\.float16"),
    _bad(
        "fp64",
        lambda a, d: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()),
        r"q\.dtype is torch\.float64",
    ),
    _bad("narrow", lambda a, d: a.update(v=a["v"][:, :31]), r"v is 31 wide, narrower than .* 32"),
    _bad("rows", lambda a, d: a.update(k=a["k"][:7]), r"k has 7 rows but q has 8"),
    _bad("3-D", lambda a, d: a.update(k=a["k"][None]), r"k must be 2-D"),
    _bad(
        "stride",
        lambda a, d: a.update(q=torch.randn(8, 64, device=d)[:, ::2]),
        r"q\.stride\(1\) is 2",
    ),
    _bad(
        "cu-int64",
        lambda a, d: a.update(cu_seqlens=a["cu_seqlens"].long()),
        r"cu_seqlens\.dtype is torch\.int64",
    ),
    _bad(
        "cu-2-D",
        lambda a, d: a.update(cu_seqlens=a["cu_seqlens"][None]),
        r"cu_seqlens must be a 1-D",
    ),
    _bad(
        "kv-length",
        lambda a, d: a.update(key_valid=torch.ones(7, dtype=torch.bool, device=d)),
        r"key_valid has 7 entries",
    ),
    _bad(
        "kv-float",
        lambda a, d: a.update(key_valid=torch.ones(8, device=d)),
        r"key_valid\.dtype is torch\.float32",
    ),
    _bad(
        "out-shape",
        lambda a, d: a.update(out=torch.empty(8, 33, device=d)),
        r"out has shape \(8, 33\)",
    ),
    _bad(
        "out-dtype",
        lambda a, d: a.update(out=torch.empty(8, 32, dtype=torch.half, device=d)),
        r"out\.dtype is torch\.float16",
    ),
    _bad(
        "out-stride",
        lambda a, d: a.update(out=torch.empty(32, 8, device=d).T),
        r"out\.stride\(1\) is 8",
    ),
    _bad("head-dim-4", lambda a, d: a.update(head_dim=4, num_heads=8), r"head_dim is 4"),
    _bad(
        "head-dim-512",
        lambda a, d: a.update(head_dim=512, num_heads=1, q=torch.randn(8, 512, device=d)),
        r"head_dim is 512",
    ),
    _bad("heads-0", lambda a, d: a.update(num_heads=0), r"num_heads is 0"),
    _bad(
        "max-seqlen-tensor",
        lambda a, d: a.update(max_seqlen=torch.tensor(5)),
        r"max_seqlen is tensor\(5\)",
    ),
    _bad("max-seqlen-negative", lambda a, d: a.update(max_seqlen=-1), r"max_seqlen is -1"),
    _bad(
        "first-only-out-rows",
        lambda a, d: a.update(first_only=True, out=torch.empty(8, 32, device=d)),
        r"out has shape \(8, 32\); it must be \[2, 32\] \(sequences of cu_seqlens",
    ),
    _bad("first-only-int", lambda a, d: a.update(first_only=1), r"first_only is 1"),
]


@pytest.mark.parametrize("mutate, match", BAD)
def test_refuses_bad_inputs(mutate, match, device):
    args = _bad_inputs(device)
    mutate(args, device)
    with pytest.raises(ValueError, match=match):
        attention(**args)
