"""The fused linear kernel against its plain-PyTorch reference.

Inputs are fresh random draws each run (the `seed` fixture, quoted in every failure). Shapes are
chosen to be awkward for the tiles: M, N and K are rarely multiples of the block sizes.
"""

import itertools
import math
import random

import pytest
import torch

from optimum_disc.kernels import interpreted, matmul
from optimum_disc.kernels.matmul import (
    ACTIVATIONS,
    CUBLAS,
    CUBLAS_TOLERANCES,
    TOLERANCES,
    GemmConfig,
    candidate_configs,
    default_config,
    linear,
    linear_reference,
    m_bucket,
    tune,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# K = 40 is not a multiple of any block_k; 16 and 128 are. M and N straddle the tile edges.
SHAPES = list(itertools.product((1, 7, 33, 129), (3, 32, 96, 130), (16, 40, 128)))


def _inputs(m, n, k, dtype, device, bias=True, residual=False):
    """O(1) outputs, as TOLERANCES assume: unit-variance x, weight scaled like nn.Linear's."""
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, device=device).to(dtype) if bias else None
    r = torch.randn(m, n, device=device).to(dtype) if residual else None
    return x, w, b, r


def _poisoned(m, n, dtype, device):
    return torch.full((m, n), float("nan"), dtype=dtype, device=device)


def _check(y, ref, seed, what, tolerances=TOLERANCES):
    assert y.shape == ref.shape and y.dtype == ref.dtype, (
        f"{what}: got {tuple(y.shape)} {y.dtype}, expected {tuple(ref.shape)} {ref.dtype}"
    )
    bad = (~torch.isfinite(y)).sum().item()
    assert bad == 0, f"{what}, seed={seed}: {bad} of {y.numel()} outputs not finite"
    atol, rtol = tolerances[y.dtype]
    torch.testing.assert_close(
        y, ref, atol=atol, rtol=rtol, msg=lambda msg: f"{what}, seed={seed}\n{msg}"
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n, k", SHAPES)
def test_linear_shapes(m, n, k, dtype, device, seed):
    x, w, b, _ = _inputs(m, n, k, dtype, device)
    out = _poisoned(m, n, dtype, device)
    y = linear(x, w, b, out=out)
    assert y is out
    _check(y, linear_reference(x, w, b), seed, f"M={m} N={n} K={k} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "has_bias, has_residual", [(False, False), (True, False), (False, True), (True, True)]
)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("m", [33, 300], ids=["epilogue-at-run-time", "epilogue-compiled-in"])
def test_linear_epilogue(m, activation, has_bias, has_residual, dtype, device, seed):
    # Up to 256 rows (`matmul._RUNTIME_EPILOGUE_MAX_M`) the kernel reads its epilogue at run
    # time, above it the epilogue is a compile-time constant: both paths, every epilogue.
    n, k = 96, 40
    x, w, b, r = _inputs(m, n, k, dtype, device, bias=has_bias, residual=has_residual)
    # Scaled up so that the activations see their non-linear range, not just values near 0.
    x = x * 2
    y = linear(x, w, b, activation=activation, residual=r)
    assert y.dtype == dtype
    ref = linear_reference(x, w, b, activation=activation, residual=r)
    _check(y, ref, seed, f"activation={activation} bias={has_bias} residual={has_residual} {dtype}")


def test_gelu_epilogue_matches_float64_over_a_wide_range(device, seed):
    """The exact GELU of the epilogue (erfc from a fitted polynomial, not libdevice's erf) is as
    accurate as fp32 allows over [-12, 12]: x @ I puts fresh random values straight into it,
    checked against GELU computed in float64."""
    m, k = 33, 64
    x = (torch.rand(m, k, device=device) * 24 - 12).float()
    x[0, :] = torch.linspace(-12, 12, k)  # the polynomial's clamp at |x| = 4 sqrt(2) included
    eye = torch.eye(k, device=device)
    y = linear(x, eye, None, activation="gelu").double()
    x64 = x.double()
    exact = 0.5 * x64 * torch.erfc(-x64 / math.sqrt(2))
    err = (y - exact).abs()
    # 4e-7 absolute (fp32 rounds 1 - erfc/2 to 6e-8 steps, times |x| <= 12), and 1e-5 relative
    # for outputs past 1e-3, where the tail of Phi must keep its relative accuracy.
    assert err.max().item() <= 5e-7, f"seed={seed}: max |error| {err.max().item():.2e}"
    big = exact.abs() > 1e-3
    rel = (err[big] / exact[big].abs()).max().item()
    assert rel <= 1e-5, f"seed={seed}: max relative error {rel:.2e}"


@pytest.mark.parametrize(
    "x_dtype, bias_dtype, residual_dtype, out_dtype",
    [
        (torch.float16, torch.float32, torch.float16, torch.float16),
        (torch.bfloat16, torch.float32, torch.float32, torch.float32),
        (torch.float16, torch.float16, torch.bfloat16, torch.float32),
        (torch.float32, torch.float32, torch.float16, torch.bfloat16),
    ],
    ids=str,
)
def test_linear_mixed_dtypes(x_dtype, bias_dtype, residual_dtype, out_dtype, device, seed):
    m, n, k = 7, 130, 40
    x, w, _, _ = _inputs(m, n, k, x_dtype, device, bias=False)
    b = torch.randn(n, device=device).to(bias_dtype)
    r = torch.randn(m, n, device=device).to(residual_dtype)
    out = _poisoned(m, n, out_dtype, device)
    y = linear(x, w, b, activation="gelu_tanh", residual=r, out=out)
    ref = linear_reference(x, w, b, activation="gelu_tanh", residual=r, out_dtype=out_dtype)
    _check(y, ref, seed, f"x {x_dtype} bias {bias_dtype} residual {residual_dtype} out {out_dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_strided(dtype, device, seed):
    """x, residual and out as column slices of wider buffers (e.g. Q of a fused QKV buffer)."""
    m, n, k = 33, 32, 40
    x_buf = torch.randn(m, k + 24, device=device).to(dtype)
    x = x_buf[:, 8 : 8 + k]
    _, w, b, _ = _inputs(m, n, k, dtype, device)
    r_buf = torch.randn(m, 3 * n, device=device).to(dtype)
    r = r_buf[:, n : 2 * n]
    out_buf = torch.full((m, n + 11), 7.0, dtype=dtype, device=device)
    out = out_buf[:, 5 : 5 + n]
    out.fill_(float("nan"))
    assert x.stride() == (k + 24, 1) and out.stride() == (n + 11, 1)
    y = linear(x, w, b, activation="relu", residual=r, out=out)
    assert y.data_ptr() == out.data_ptr()
    _check(y, linear_reference(x, w, b, activation="relu", residual=r), seed, f"strided {dtype}")
    outside = torch.cat([out_buf[:, :5], out_buf[:, 5 + n :]], dim=1)
    assert (outside == 7.0).all(), f"seed={seed}: the kernel wrote outside the out slice"


def test_linear_in_place_residual(device, seed):
    m, n, k = 33, 96, 128
    x, w, b, r = _inputs(m, n, k, torch.float32, device, residual=True)
    ref = linear_reference(x, w, b, residual=r)
    y = linear(x, w, b, residual=r, out=r)
    assert y is r
    _check(y, ref, seed, "out=residual")


def test_unknown_fp32_pdl_mode_is_refused(monkeypatch, device):
    monkeypatch.setattr(matmul, "FP32_PDL", "sometimes")
    x, w = torch.randn(4, 32, device=device), torch.randn(16, 32, device=device)
    with pytest.raises(ValueError, match=r"FP32_PDL is 'sometimes'.*'off', 'wait', 'on'"):
        linear(x, w)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_linear_explicit_config(dtype, device, seed):
    """Small group_m and block_k: several partial row groups and a K tail in every program."""
    m, n, k = 129, 96, 40
    cfg = GemmConfig(block_m=16, block_n=16, block_k=16, group_m=3, num_warps=4, num_stages=2)
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    out = _poisoned(m, n, dtype, device)
    y = linear(x, w, b, activation="gelu", residual=r, out=out, config=cfg)
    ref = linear_reference(x, w, b, activation="gelu", residual=r)
    _check(y, ref, seed, f"{cfg} {dtype}")


def _tma_config(block_m=16, block_n=32, block_k=32, group_m=3) -> GemmConfig:
    return GemmConfig(block_m, block_n, block_k, group_m, num_warps=4, num_stages=3, backend="tma")


# The persistent TMA kernel: M = 129 and N = 130 leave partial tiles on both edges (TMA reads
# them as zeros, the store drops them), K = 40 ends in a partial K block, and 9 x 5 = 45 tiles
# over the programs (4 on the interpreter, 132 on an H100) give each program several tiles
# in the interpreter, in the order of partial row groups (group_m = 3). The 16-bit outputs of
# N = 32 and 96 leave by TMA store, those of N = 130 (rows not 16-byte aligned) per thread.
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m, n, k", [(129, 130, 40), (7, 32, 128), (300, 96, 72)])
@pytest.mark.parametrize("activation", [None, "gelu", "tanh"])
def test_linear_tma(m, n, k, activation, dtype, device, seed):
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=activation != "tanh")
    out = _poisoned(m, n, dtype, device)
    cfg = _tma_config()
    y = linear(x, w, b, activation=activation, residual=r, out=out, config=cfg)
    ref = linear_reference(x, w, b, activation=activation, residual=r)
    # fp32 runs the plain kernel with the same tiles (TMA is for 16-bit operands).
    _check(y, ref, seed, f"tma M={m} N={n} K={k} {activation} {dtype}")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_linear_tma_strided_and_unaligned(dtype, device, seed):
    """A column slice of a wider buffer goes through TMA when its rows are 16-byte aligned;
    one that is not (odd offset) runs the plain kernel: both give the reference's result."""
    m, n, k = 65, 48, 40
    _, w, b, _ = _inputs(m, n, k, dtype, device)
    buf = torch.randn(m, k + 24, device=device).to(dtype)
    for offset, fits in ((8, True), (3, False)):
        x = buf[:, offset : offset + k]
        assert matmul._tma_fits(x, w) is (fits and matmul.TensorDescriptor is not None), offset
        y = linear(x, w, b, activation="relu", config=_tma_config())
        ref = linear_reference(x, w, b, activation="relu")
        _check(y, ref, seed, f"tma x offset {offset} {dtype}")


# Split-K on tiny shapes (the interpreter runs every program of every K slice). M = 20 is not a
# multiple of block_m = 16, N = 48 not of block_n = 32, and K = 200 is 7 blocks of 32, the last
# one short: split 2 gives slices of 4 and 3 blocks, split 4 slices of 2, 2, 2 and 1.
SPLIT_SHAPE = (20, 48, 200)


def _split_config(split_k: int, block_k: int = 32) -> GemmConfig:
    return GemmConfig(
        block_m=16, block_n=32, block_k=block_k, group_m=8, num_warps=4, num_stages=2,
        split_k=split_k,
    )  # fmt: skip


def _counters_are_zero() -> bool:
    return all(int(c.count_nonzero()) == 0 for c in matmul._COUNTERS.values())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [2, 4])
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_linear_split_k_epilogue(activation, split_k, dtype, device, seed):
    m, n, k = SPLIT_SHAPE
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    x = x * 2  # the activations' non-linear range
    out = _poisoned(m, n, dtype, device)
    y = linear(x, w, b, activation=activation, residual=r, out=out, config=_split_config(split_k))
    assert y is out
    ref = linear_reference(x, w, b, activation=activation, residual=r)
    _check(y, ref, seed, f"split_k={split_k} activation={activation} {dtype}")
    assert _counters_are_zero(), "the last program of a tile did not reset its counter"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [2, 4])
def test_linear_split_k_plain(split_k, dtype, device, seed):
    """No bias, no activation, no residual: the sum of the slices alone."""
    m, n, k = SPLIT_SHAPE
    x, w, _, _ = _inputs(m, n, k, dtype, device, bias=False)
    y = linear(x, w, config=_split_config(split_k))
    _check(y, linear_reference(x, w), seed, f"split_k={split_k} plain {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [2, 4])
def test_linear_split_k_in_place_residual(split_k, dtype, device, seed):
    m, n, k = SPLIT_SHAPE
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    ref = linear_reference(x, w, b, activation="gelu_tanh", residual=r)
    y = linear(x, w, b, activation="gelu_tanh", residual=r, out=r, config=_split_config(split_k))
    assert y is r
    _check(y, ref, seed, f"split_k={split_k} out=residual {dtype}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("split_k", [2, 4])
@pytest.mark.parametrize(
    "m, n, k, block_k",
    [
        (1, 48, 200, 32),  # a single row (M = 1 is specialised by Triton)
        (20, 48, 40, 32),  # 2 K blocks: with split 4, two slices are empty
        (20, 48, 256, 32),  # K a multiple of block_k * split_k: even slices, no K mask
        (33, 72, 392, 64),  # 7 K blocks of 64, the last one short; 3 x 3 tiles
    ],
)
def test_linear_split_k_shapes(m, n, k, block_k, split_k, dtype, device, seed):
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    out = _poisoned(m, n, dtype, device)
    cfg = _split_config(split_k, block_k)
    y = linear(x, w, b, activation="relu", residual=r, out=out, config=cfg)
    ref = linear_reference(x, w, b, activation="relu", residual=r)
    _check(y, ref, seed, f"M={m} N={n} K={k} {cfg} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("split_k", [2, 4])
def test_linear_split_k_reuses_counters(split_k, dtype, device, seed):
    """Consecutive launches count on the same counters: right only if each launch resets them."""
    m, n, k = SPLIT_SHAPE
    cfg = _split_config(split_k)
    dev = torch.empty(0, device=device).device  # with its index, as the tensors' devices are
    counters = matmul._tile_counters(dev, 4)
    results = []
    for call in range(2):
        x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
        out = _poisoned(m, n, dtype, device)
        y = linear(x, w, b, activation="tanh", residual=r, out=out, config=cfg)
        ref = linear_reference(x, w, b, activation="tanh", residual=r)
        _check(y, ref, seed, f"call {call + 1} with split_k={split_k} {dtype}")
        results.append((x, w, b, r, y))
        # Another shape in between, on the same counters (other tiles, another split).
        x2, w2, _, _ = _inputs(1, 40, 96, dtype, device, bias=False)
        y2 = linear(x2, w2, config=_split_config(6 - split_k))
        _check(y2, linear_reference(x2, w2), seed, f"M=1 between calls {call + 1}, {dtype}")
    assert matmul._tile_counters(dev, 4) is counters and len(matmul._COUNTERS) >= 1
    assert _counters_are_zero()
    # The same inputs again give the same bits: the slices are summed in a fixed order.
    x, w, b, r, y = results[-1]
    again = linear(x, w, b, activation="tanh", residual=r, config=cfg)
    assert torch.equal(again, y), f"seed={seed}: split-K is not deterministic"


@pytest.mark.skipif(not interpreted(), reason="reorders the programs of the CPU interpreter")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear_split_k_any_program_order(dtype, device, seed, monkeypatch):
    """The interpreter runs programs in grid order, so the last K slice always finishes its
    tile; a GPU runs them in any order. Run them in reverse (slice 0 finishes every tile) and
    shuffled (any slice may): the result must be the same bits as in grid order."""
    from triton.runtime import interpreter

    m, n, k = SPLIT_SHAPE
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    cfg = _split_config(4)
    in_order = linear(x, w, b, activation="gelu", residual=r, config=cfg)

    builder = interpreter.InterpreterBuilder
    set_dim, set_idx = builder.set_grid_dim, builder.set_grid_idx
    rng = random.Random(seed)
    for order in ("reversed", "shuffled"):

        def reordered_dim(self, nx, ny, nz, order=order):
            set_dim(self, nx, ny, nz)
            grid = list(itertools.product(range(nx), range(ny), range(nz)))
            runs = grid[::-1] if order == "reversed" else rng.sample(grid, len(grid))
            self.program_order = dict(zip(grid, runs))

        def reordered_idx(self, x, y, z):
            set_idx(self, *self.program_order[(x, y, z)])

        monkeypatch.setattr(builder, "set_grid_dim", reordered_dim)
        monkeypatch.setattr(builder, "set_grid_idx", reordered_idx)
        out = _poisoned(m, n, dtype, device)
        y = linear(x, w, b, activation="gelu", residual=r, out=out, config=cfg)
        ref = linear_reference(x, w, b, activation="gelu", residual=r)
        _check(y, ref, seed, f"programs {order}, {dtype}")
        assert torch.equal(y, in_order), f"seed={seed}: the result depends on the program order"
    assert _counters_are_zero()


@pytest.mark.parametrize("with_out", [False, True])
def test_linear_empty_m(with_out, device):
    x = torch.empty(0, 40, device=device)
    w = torch.randn(24, 40, device=device)
    out = torch.empty(0, 24, device=device) if with_out else None
    y = linear(x, w, torch.randn(24, device=device), activation="gelu", out=out)
    assert y.shape == (0, 24) and y.dtype == torch.float32
    if with_out:
        assert y is out


def _error_cases(device):
    x = torch.randn(4, 8, device=device)
    w = torch.randn(6, 8, device=device)
    return [
        ({"x": x, "weight": torch.randn(6, 9, device=device)}, r"weight has shape \(6, 9\)"),
        ({"x": x, "weight": w.half()}, r"weight has dtype torch.float16"),
        ({"x": x[0], "weight": w}, r"x must be 2-D, got shape \(8,\)"),
        ({"x": x.int(), "weight": w.int()}, r"x has dtype torch.int32"),
        ({"x": torch.randn(8, 4, device=device).t(), "weight": w}, r"x has strides \(1, 4\)"),
        ({"x": x, "weight": w, "bias": torch.randn(5, device=device)}, r"bias has shape \(5,\)"),
        ({"x": x, "weight": w, "activation": "swish"}, r"activation='swish'.*'gelu_tanh'"),
        (
            {"x": x, "weight": w, "residual": torch.randn(4, 5, device=device)},
            r"residual has shape \(4, 5\), expected \(4, 6\)",
        ),
        (
            {"x": x, "weight": w, "out": torch.empty(6, 4, device=device).t()},
            r"out has strides \(1, 4\)",
        ),
    ]


@pytest.mark.parametrize("case", range(9))
def test_linear_rejects(case, device):
    kwargs, match = _error_cases(device)[case]
    with pytest.raises(ValueError, match=match):
        linear(**kwargs)


def test_reference_rejects_unknown_activation():
    with pytest.raises(ValueError, match="activation='silu'"):
        linear_reference(torch.ones(2, 3), torch.ones(4, 3), activation="silu")


def test_gemm_config_round_trip():
    cfg = GemmConfig(block_m=64, block_n=128, block_k=32, group_m=8, num_warps=4, num_stages=3)
    d = cfg.to_dict()
    assert d == {
        "block_m": 64,
        "block_n": 128,
        "block_k": 32,
        "group_m": 8,
        "num_warps": 4,
        "num_stages": 3,
        "backend": "triton",
        "split_k": 1,
    }
    assert GemmConfig.from_dict(d) == cfg
    # Configs saved before the backend and split_k fields existed still load, as the Triton
    # backend without split-K.
    assert GemmConfig.from_dict({k: v for k, v in d.items() if k != "backend"}) == cfg
    old = {k: v for k, v in d.items() if k not in ("backend", "split_k")}
    assert GemmConfig.from_dict(old) == cfg and GemmConfig.from_dict(old).split_k == 1
    split = GemmConfig(**{**d, "split_k": 4})
    assert GemmConfig.from_dict(split.to_dict()) == split and split.to_dict()["split_k"] == 4
    with pytest.raises(ValueError, match="backend='cudnn'"):
        GemmConfig(**{**d, "backend": "cudnn"})
    tma = GemmConfig(**{**d, "backend": "tma"})
    assert GemmConfig.from_dict(tma.to_dict()) == tma
    with pytest.raises(ValueError, match="split_k must be 1 with backend='tma'"):
        GemmConfig(**{**d, "backend": "tma", "split_k": 2})
    with pytest.raises(ValueError, match=r"missing keys \['num_stages'\]"):
        GemmConfig.from_dict({k: v for k, v in d.items() if k != "num_stages"})
    with pytest.raises(ValueError, match="block_k=24"):
        GemmConfig.from_dict({**d, "block_k": 24})
    with pytest.raises(ValueError, match="num_warps=3"):
        GemmConfig(**{**d, "num_warps": 3})


@pytest.mark.parametrize("split_k", [0, 3, 6, 32, -2, 2.0, "4", True])
def test_gemm_config_rejects_split_k(split_k):
    tiles = {"block_m": 16, "block_n": 32, "block_k": 32, "group_m": 8}
    tiles.update(num_warps=4, num_stages=2)
    with pytest.raises(ValueError, match=rf"split_k={split_k!r}: use a power of two from 1 to 16"):
        GemmConfig(**tiles, split_k=split_k)


def test_gemm_config_from_dict_rejects_split_k():
    d = GemmConfig(16, 32, 32, 8, 4, 2).to_dict()
    with pytest.raises(ValueError, match="split_k=3: use a power of two from 1 to 16"):
        GemmConfig.from_dict({**d, "split_k": 3})
    with pytest.raises(ValueError, match=r"unknown keys \['splitk'\]"):
        GemmConfig.from_dict({**d, "splitk": 2})


def test_m_bucket():
    expected = {0: 16, 1: 16, 15: 16, 16: 16, 17: 32, 128: 128, 129: 256, 65536: 65536}
    expected.update({65537: 65536, 10**7: 65536})
    assert {m: m_bucket(m) for m in expected} == expected
    with pytest.raises(ValueError, match="m=-1"):
        m_bucket(-1)


# BERT-base/large shapes: QKV, attention output, FFN up and down, pooler, classifiers.
_BERT_NK = [(2304, 768), (768, 768), (3072, 768), (768, 3072), (3072, 1024), (1024, 4096)]
_BERT_NK += [(2, 768), (3, 768), (5, 768)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_gpu_heuristics_fit_hopper(dtype, monkeypatch):
    """The GPU default and candidates are valid tiles within H100 shared memory, on any host."""
    monkeypatch.setattr(matmul, "interpreted", lambda: False)
    for m, (n, k) in itertools.product([1, 8, 33, 128, 512, 2048, 4096, 65536], _BERT_NK):
        default = default_config(m, n, k, dtype)
        cands = candidate_configs(m, n, k, dtype)
        assert cands[0] == default and len(set(cands)) == len(cands)
        assert 2 <= len(cands) <= 20, f"{len(cands)} candidates for M={m} N={n} K={k}"
        for c in cands:
            assert c.smem_bytes(dtype) <= 200 * 1024, f"{c} for M={m} N={n} K={k} {dtype}"
            assert c.block_m <= m_bucket(m) and c.block_n <= max(16, 2 ** math.ceil(math.log2(n)))
            # Split-K for few rows only; every K slice spans at least one whole K block.
            if c.split_k > 1:
                assert m_bucket(m) <= 256, f"{c} for M={m} N={n} K={k}"
                assert k // c.split_k >= c.block_k, f"{c} for M={m} N={n} K={k}"
        if m_bucket(m) <= 256 and k >= 2048:
            assert any(c.split_k > 1 for c in cands), f"no split-K candidate for M={m} K={k}"
        # The persistent TMA kernel: 16-bit inputs and at least 512 rows only.
        tma = any(c.backend == "tma" for c in cands)
        assert tma == (dtype != torch.float32 and m_bucket(m) >= 512), f"M={m} {dtype}"
        assert not any(c.backend == "tma" for c in candidate_configs(m, n, k, dtype, tma=False))
        if m >= 4096 and n >= 768 and dtype != torch.float32:
            assert default.block_m == 128 and default.block_n == 128, f"{default} for M={m}"
    # BERT-base FFN down at batch 2 x seq 16: a few dozen tiles, so the default splits K.
    default = default_config(32, 768, 3072, dtype)
    assert default.split_k in (2, 4, 8), default
    tiles = math.ceil(32 / default.block_m) * math.ceil(768 / default.block_n)
    assert tiles * default.split_k <= 132, default
    assert default_config(4096, 768, 3072, dtype).split_k == 1
    assert default_config(32, 768, 768, dtype).split_k == 1


def test_interpreter_default_has_no_split_k():
    """The CPU interpreter keeps its cheap default (one program per tile)."""
    if not interpreted():
        pytest.skip("interpreter heuristics")
    for m, (n, k) in itertools.product([1, 33, 512], _BERT_NK):
        assert default_config(m, n, k, torch.float16).split_k == 1


def test_tune_returns_candidate(device):
    m, n, k, dtype = 33, 96, 128, torch.float16
    cfg = tune(m, n, k, dtype, device)
    assert cfg in [*candidate_configs(m, n, k, dtype), CUBLAS]
    if interpreted():
        assert cfg == default_config(m, n, k, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "m, n, k, activation, has_residual",
    [
        (4096, 3072, 768, "gelu", False),
        (4096, 768, 3072, None, True),
        (1000, 2304, 768, None, False),
        (8, 768, 768, "tanh", False),
        (8, 3, 768, None, False),
    ],
)
def test_linear_gpu_bert_shapes(m, n, k, activation, has_residual, dtype, device, seed):
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=has_residual)
    out = _poisoned(m, n, dtype, device)
    y = linear(x, w, b, activation=activation, residual=r, out=out)
    ref = linear_reference(x, w, b, activation=activation, residual=r)
    _check(y, ref, seed, f"M={m} N={n} K={k} {activation} {dtype}")


def test_compile_threads_reads_the_environment(monkeypatch):
    monkeypatch.setenv("OPTIMUM_DISC_COMPILE_THREADS", "3")
    assert matmul.compile_threads() == 3
    monkeypatch.delenv("OPTIMUM_DISC_COMPILE_THREADS")
    assert 1 <= matmul.compile_threads() <= 16
    for bad in ("0", "-2", "many"):
        monkeypatch.setenv("OPTIMUM_DISC_COMPILE_THREADS", bad)
        with pytest.raises(ValueError, match=f"OPTIMUM_DISC_COMPILE_THREADS='{bad}'"):
            matmul.compile_threads()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=str)
def test_candidates_compiled_side_by_side_then_run_right_gpu(dtype, device, seed):
    """`compile_candidates` compiles without launching (the output stays poisoned), and every
    candidate it compiled then runs right."""
    m, n, k = 512, 768, 768
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    ref = linear_reference(x, w, b, activation="gelu", residual=r)
    cands = [c for c in matmul.tuning_candidates(m, n, k, dtype, device) if c.backend != "cublas"]
    out = _poisoned(m, n, dtype, device)

    def run(cfg):
        linear(x, w, b, activation="gelu", residual=r, out=out, config=cfg)

    matmul.compile_candidates(run, cands, threads=4)
    torch.cuda.synchronize(device)
    assert torch.isnan(out).all(), "compiling a candidate launched it"
    for cfg in cands:
        y = linear(
            x, w, b, activation="gelu", residual=r, out=_poisoned(m, n, dtype, device), config=cfg
        )
        _check(y, ref, seed, f"{cfg} {dtype}")


@pytest.mark.gpu
def test_one_compiled_kernel_serves_every_epilogue_at_few_rows_gpu(device, seed):
    """At up to 256 rows one compiled kernel per tile serves every epilogue (what keeps a new
    shape bucket's compilations to one per candidate); above it each epilogue compiles its own.
    Every output is checked."""
    cfg = matmul.GemmConfig(
        block_m=32, block_n=32, block_k=32, group_m=8, num_warps=8, num_stages=2, split_k=1
    )
    kernels = matmul._linear_kernel.device_caches[torch.cuda.current_device()][0]
    epilogues = [(None, False), ("gelu", False), (None, True), ("tanh", True), ("relu", False)]
    for m, compiled in ((48, 1), (300, len(epilogues))):
        before = len(kernels)
        for activation, has_residual in epilogues:
            x, w, b, r = _inputs(m, 96, 64, torch.float16, device, residual=has_residual)
            y = linear(x, w, b, activation=activation, residual=r, config=cfg)
            ref = linear_reference(x, w, b, activation=activation, residual=r)
            _check(y, ref, seed, f"M={m} {activation} residual={has_residual}")
        assert len(kernels) - before == compiled, f"M={m}: {len(kernels) - before} compilations"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_tuned_configs_run_gpu(dtype, device, seed):
    m, n, k = 512, 768, 768
    cfg = tune(m, n, k, dtype, device)
    assert cfg in [*candidate_configs(m, n, k, dtype), CUBLAS]
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    out = _poisoned(m, n, dtype, device)
    y = linear(x, w, b, activation="gelu", residual=r, out=out, config=cfg)
    tolerances = CUBLAS_TOLERANCES if cfg.backend == "cublas" else TOLERANCES
    ref = linear_reference(x, w, b, activation="gelu", residual=r)
    _check(y, ref, seed, f"{cfg} {dtype}", tolerances)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n, k", [(2304, 768), (768, 768), (3072, 768), (768, 3072)])
def test_linear_split_k_gpu_bert_shapes(n, k, dtype, device, seed):
    """Every split-K candidate at BERT-base batch 2 x seq 16 (32 rows): right, and the same bits
    on every call (no call may see another's counters or partials)."""
    m = 32
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    ref = linear_reference(x, w, b, activation="gelu", residual=r)
    configs = [c for c in candidate_configs(m, n, k, dtype) if c.split_k > 1]
    assert configs, f"no split-K candidate for M={m} N={n} K={k}"
    for cfg in configs:
        out = _poisoned(m, n, dtype, device)
        y = linear(x, w, b, activation="gelu", residual=r, out=out, config=cfg)
        _check(y, ref, seed, f"M={m} N={n} K={k} {cfg} {dtype}")
        for _ in range(20):
            again = linear(x, w, b, activation="gelu", residual=r, config=cfg)
            assert torch.equal(again, y), f"{cfg} {dtype}, seed={seed}: results differ"
    assert _counters_are_zero()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m, k", [(1100, 3072), (1100, 768), (4000, 3072)])
def test_linear_split_k_gpu_many_rows(m, k, dtype, device, seed):
    """Split-K tiles for many rows (N = 768, a partial row tile; not tuner candidates there,
    but the kernel takes them, as `scripts/gemm_bench.py` does): right, with the residual
    epilogue of the model, and the same bits on every call."""
    n = 768
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    ref = linear_reference(x, w, b, residual=r)
    tiles = [(128, 128, 64, 8, 3, 2), (128, 128, 64, 8, 3, 4), (128, 64, 64, 4, 4, 2)]
    configs = [matmul._clamp(t, matmul.m_bucket(m), n, k) for t in tiles]
    for cfg in configs:
        out = _poisoned(m, n, dtype, device)
        y = linear(x, w, b, residual=r, out=out, config=cfg)
        _check(y, ref, seed, f"M={m} N={n} K={k} {cfg} {dtype}")
        for _ in range(5):
            again = linear(x, w, b, residual=r, config=cfg)
            assert torch.equal(again, y), f"{cfg} {dtype}, seed={seed}: results differ"
    assert _counters_are_zero()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n, k", [(2304, 768), (768, 768), (3072, 768), (768, 3072)])
@pytest.mark.parametrize("tma_store", [True, False], ids=["tma-store", "thread-store"])
def test_linear_tma_gpu_bert_shapes(n, k, tma_store, dtype, device, seed, monkeypatch):
    """Every TMA candidate at BERT-base shapes with 8,200 rows (a partial row tile), eagerly
    and replayed from a CUDA graph with new inputs (descriptors are kernel parameters, so a
    replay must read the same buffers' new contents); output tiles stored by TMA or per
    thread."""
    monkeypatch.setattr(matmul, "TMA_STORE", tma_store)
    m = 8200
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    configs = [c for c in candidate_configs(m, n, k, dtype) if c.backend == "tma"]
    assert configs and matmul._tma_fits(x, w), f"no TMA candidate for M={m} N={n} K={k}"
    for cfg in configs:
        out = _poisoned(m, n, dtype, device)
        y = linear(x, w, b, activation="gelu", residual=r, out=out, config=cfg)
        _check(y, linear_reference(x, w, b, activation="gelu", residual=r), seed, f"{cfg}")
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            linear(x, w, b, activation="gelu", residual=r, out=out, config=cfg)
        x.copy_(torch.randn(m, k, device=device).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        ref = linear_reference(x, w, b, activation="gelu", residual=r)
        _check(out, ref, seed, f"replay, {cfg}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_linear_split_k_cuda_graph(dtype, device, seed):
    """Replays of a captured split-K launch reuse its counters and workspace, as the runtime's
    graphs do; eager calls in between share the counters too."""
    m, n, k = 32, 768, 3072
    cfg = default_config(m, n, k, dtype)
    assert cfg.split_k > 1, cfg
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    out = torch.empty(m, n, device=device, dtype=dtype)
    linear(x, w, b, activation="relu", residual=r, out=out, config=cfg)  # compiles
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        linear(x, w, b, activation="relu", residual=r, out=out, config=cfg)
    for replay in range(3):
        x.copy_(torch.randn(m, k, device=device).to(dtype))
        out.fill_(float("nan"))
        graph.replay()
        ref = linear_reference(x, w, b, activation="relu", residual=r)
        _check(out, ref, seed, f"replay {replay + 1}, {cfg} {dtype}")
        eager = linear(x, w, b, activation="relu", residual=r, config=cfg)
        assert torch.equal(eager, out), f"replay {replay + 1}, seed={seed}: eager differs"
    torch.cuda.synchronize()
    assert _counters_are_zero()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cublas_backend_matches_reference(dtype, activation, device, seed):
    m, n, k = 33, 96, 40
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    out = _poisoned(m, n, dtype, device)
    y = linear(x, w, b, activation=activation, residual=r, out=out, config=CUBLAS)
    ref = linear_reference(x, w, b, activation=activation, residual=r)
    _check(y, ref, seed, f"cublas {activation} {dtype}", CUBLAS_TOLERANCES)


def _cublas_through_temporaries(x, w, b, activation, r):
    """The cuBLAS backend's steps with a new tensor each, as torch computes them unfused."""
    y = torch.addmm(b.to(x.dtype), x, w.t()) if b is not None else x @ w.t()
    if activation is not None:
        y = matmul._TORCH_ACTIVATIONS[activation](y)
    return y + r if r is not None else y


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("bias, residual", [(True, True), (True, False), (False, True)])
def test_cublas_backend_in_place_is_the_unfused_torch_result(
    dtype, activation, bias, residual, device, seed
):
    """Written straight into ``out`` and finished there, the cuBLAS backend gives what torch's
    ops give through temporaries: bit for bit on the CPU (the same kernels); on a GPU cuBLAS
    may pick another algorithm for another output address, so there within the tolerances."""
    m, n, k = 37, 96, 40
    x, w, b, r = _inputs(m, n, k, dtype, device, bias=bias, residual=residual)
    out = _poisoned(m, n, dtype, device)
    y = linear(x, w, b, activation=activation, residual=r, out=out, config=CUBLAS)
    assert y is out
    expected = _cublas_through_temporaries(x, w, b, activation, r)
    if torch.device(device).type == "cpu":
        assert torch.equal(out, expected), f"seed={seed}: in place differs from unfused"
    ref = linear_reference(x, w, b, activation=activation, residual=r)
    _check(out, ref, seed, f"cublas in place {activation} {dtype}", CUBLAS_TOLERANCES)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", ["out-is-residual", "out-strided", "out-other-dtype"])
def test_cublas_backend_outputs_it_cannot_compute_in(dtype, case, device, seed):
    """An ``out`` that is the residual's own buffer (the product would overwrite the residual
    before the add reads it), a view with longer rows, or of another dtype than x goes through
    temporaries, and is still right in every element."""
    m, n, k = 21, 64, 48
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    expected = _cublas_through_temporaries(x, w, b, "gelu", r)
    if case == "out-is-residual":
        out = r.clone()
        y = linear(x, w, b, activation="gelu", residual=out, out=out, config=CUBLAS)
    elif case == "out-strided":
        out = torch.full((m, 2 * n), float("nan"), dtype=dtype, device=device)[:, :n]
        y = linear(x, w, b, activation="gelu", residual=r, out=out, config=CUBLAS)
    else:
        other = torch.float32 if dtype != torch.float32 else torch.float16
        out = _poisoned(m, n, other, device)
        y = linear(x, w, b, activation="gelu", residual=r, out=out, config=CUBLAS)
        expected = expected.to(other)
    assert y is out
    assert torch.equal(out, expected), f"{case}, seed={seed}: differs from unfused"
