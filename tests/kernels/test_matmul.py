"""The fused linear kernel against its plain-PyTorch reference.

Inputs are fresh random draws each run (the `seed` fixture, quoted in every failure). Shapes are
chosen to be awkward for the tiles: M, N and K are rarely multiples of the block sizes.
"""

import itertools
import math

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
def test_linear_epilogue(activation, has_bias, has_residual, dtype, device, seed):
    m, n, k = 33, 96, 40
    x, w, b, r = _inputs(m, n, k, dtype, device, bias=has_bias, residual=has_residual)
    # Scaled up so that the activations see their non-linear range, not just values near 0.
    x = x * 2
    y = linear(x, w, b, activation=activation, residual=r)
    assert y.dtype == dtype
    ref = linear_reference(x, w, b, activation=activation, residual=r)
    _check(y, ref, seed, f"activation={activation} bias={has_bias} residual={has_residual} {dtype}")


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
    }
    assert GemmConfig.from_dict(d) == cfg
    # Configs saved before the backend field existed still load, as the Triton backend.
    assert GemmConfig.from_dict({k: v for k, v in d.items() if k != "backend"}) == cfg
    with pytest.raises(ValueError, match="backend='cudnn'"):
        GemmConfig(**{**d, "backend": "cudnn"})
    with pytest.raises(ValueError, match=r"missing keys \['num_stages'\]"):
        GemmConfig.from_dict({k: v for k, v in d.items() if k != "num_stages"})
    with pytest.raises(ValueError, match="block_k=24"):
        GemmConfig.from_dict({**d, "block_k": 24})
    with pytest.raises(ValueError, match="num_warps=3"):
        GemmConfig(**{**d, "num_warps": 3})


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
        assert 2 <= len(cands) <= 16, f"{len(cands)} candidates for M={m} N={n} K={k}"
        for c in cands:
            assert c.smem_bytes(dtype) <= 200 * 1024, f"{c} for M={m} N={n} K={k} {dtype}"
            assert c.block_m <= m_bucket(m) and c.block_n <= max(16, 2 ** math.ceil(math.log2(n)))
        if m >= 4096 and n >= 768 and dtype != torch.float32:
            assert default.block_m == 128 and default.block_n == 128, f"{default} for M={m}"


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_cublas_backend_matches_reference(dtype, activation, device, seed):
    m, n, k = 33, 96, 40
    x, w, b, r = _inputs(m, n, k, dtype, device, residual=True)
    out = _poisoned(m, n, dtype, device)
    y = linear(x, w, b, activation=activation, residual=r, out=out, config=CUBLAS)
    ref = linear_reference(x, w, b, activation=activation, residual=r)
    _check(y, ref, seed, f"cublas {activation} {dtype}", CUBLAS_TOLERANCES)
