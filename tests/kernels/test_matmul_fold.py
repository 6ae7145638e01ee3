"""`linear` with a LayerNorm folded into its input (`FoldedNorm`) or applied to its residual
(`NormedResidual`), against plain PyTorch in fp32.

Inputs are fresh random draws (the `seed` fixture). The rows before the LayerNorm get a large
mean of their own (up to about 20 standard deviations of the row), which is where computing the
statistics on the fly could cancel.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from optimum_disc.kernels import matmul
from optimum_disc.kernels.layernorm import TOLERANCES as LN_TOLERANCES
from optimum_disc.kernels.layernorm import layer_norm_reference
from optimum_disc.kernels.matmul import (
    TOLERANCES,
    FoldedNorm,
    GemmConfig,
    NormedResidual,
    fold_layer_norm,
    linear,
    linear_reference,
)

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# M, N, K: K = 40 and 130 are multiples of no block_k; M and N straddle the tile edges.
SHAPES = [(1, 3, 16), (7, 40, 48), (33, 130, 128), (70, 24, 130)]
# Folded, the 16-bit product multiplies (y - p) * g rounded to the dtype, p the row's first
# element, where the unfolded one multiplies LayerNorm(y) rounded: a value up to about sqrt(2)
# larger (y - p spreads twice as wide as y - mean), so its rounding error may be twice as large.
# Against an fp32 reference that rounds nothing in between: the output's rounding plus that,
# two ulps of the output dtype at O(1) outputs; fp32 as `matmul.TOLERANCES` with a floor for
# the statistics' rounding.
FOLD_TOLERANCES = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (3.2e-2, 3.2e-2),
}


def _norm_inputs(m, k, device, dtype):
    """Rows y with their own large means, and a LayerNorm's weight and bias (fp32 values that
    the dtype holds exactly, so that a kernel may be given either)."""
    y = torch.randn(m, k, device=device) * 3 + torch.randn(m, 1, device=device) * 20
    g = torch.randn(k, device=device) * 0.5 + 1
    beta = torch.randn(k, device=device) * 0.1
    return y.to(dtype), g.to(dtype).float(), beta.to(dtype).float()


def _stats(y, eps):
    """Mean and 1/std of each row, in float64, as float32 [M, 2]."""
    yd = y.double()
    mean = yd.mean(1)
    rstd = torch.rsqrt(yd.var(1, unbiased=False) + eps)
    return torch.stack([mean, rstd], 1).float().contiguous()


def _assert_close(got, want, tolerances, what, seed):
    assert got.shape == want.shape, what
    bad = (~torch.isfinite(got)).sum().item()
    assert bad == 0, f"{what}, seed={seed}: {bad} outputs not finite"
    atol, rtol = tolerances
    torch.testing.assert_close(
        got.float(),
        want.float(),
        atol=atol,
        rtol=rtol,
        msg=lambda msg: f"{what}, seed={seed}\n{msg}",
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_folded_layer_norm(m, n, k, activation, dtype, device, seed):
    """act(LayerNorm(y) @ W.T + b) computed from y, every output element against fp32; the
    statistics stored for the rows against float64."""
    eps = 1e-12
    y, g, beta = _norm_inputs(m, k, device, dtype)
    w = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, device=device)
    h = F.layer_norm(y.float(), (k,), g, beta, eps)
    want = linear_reference(h, w, b, activation=activation, out_dtype=torch.float32)
    colsum, folded = fold_layer_norm(w, b, g, beta)
    stats = torch.full((m, 2), float("nan"), device=device)
    out = torch.full((m, n), float("nan"), dtype=dtype, device=device)
    got = linear(
        y,
        w,
        folded,
        activation=activation,
        out=out,
        fold=FoldedNorm(g.to(dtype), colsum, eps, stats),
    )
    what = f"fold M={m} N={n} K={k} {activation} {dtype}"
    _assert_close(got, want, FOLD_TOLERANCES[dtype], what, seed)
    _assert_close(stats, _stats(y, eps), (1e-5, 1e-5), f"stats of {what}", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_folded_layer_norm_without_stats_and_with_other_configs(dtype, device, seed):
    """Without a statistics buffer nothing is stored; a split-K config runs without split-K, a
    cuBLAS or TMA config on the default tiles, all with the same result."""
    m, n, k, eps = 19, 48, 96, 1e-5
    y, g, beta = _norm_inputs(m, k, device, dtype)
    w = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype)
    want = linear_reference(
        F.layer_norm(y.float(), (k,), g, beta, eps), w, None, out_dtype=torch.float32
    )
    colsum, folded = fold_layer_norm(w, None, g, beta)
    split = GemmConfig(16, 16, 16, 8, num_warps=4, num_stages=2, split_k=2)
    configs = [None, split, matmul.CUBLAS, GemmConfig(16, 32, 32, 8, 4, 2, backend="tma")]
    for config in configs:
        got = linear(y, w, folded, config=config, fold=FoldedNorm(g, colsum, eps))
        _assert_close(got, want, FOLD_TOLERANCES[dtype], f"{config} {dtype}", seed)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("split_k", [1, 2])
def test_normed_residual(m, n, k, split_k, dtype, device, seed):
    """x @ W.T + b + LayerNorm(r) from r's statistics: the same as adding the output of a
    LayerNorm kernel (its rounding to the dtype included), within the GEMM's tolerance plus the
    LayerNorm's, since the statistics come from elsewhere; split-K's last program applies it."""
    eps = 1e-12
    x = torch.randn(m, k, device=device).to(dtype)
    w = (torch.randn(n, k, device=device) / math.sqrt(k)).to(dtype)
    b = torch.randn(n, device=device)
    r, g, beta = _norm_inputs(m, n, device, dtype)
    want = linear_reference(x, w, b, residual=layer_norm_reference(r, g, beta, eps))
    config = GemmConfig(16, 16, 16, 8, num_warps=4, num_stages=2, split_k=split_k)
    got = linear(
        x,
        w,
        b,
        residual=r,
        out=torch.full((m, n), float("nan"), dtype=dtype, device=device),
        config=config if k // split_k >= 16 else None,
        normed_residual=NormedResidual(_stats(r, eps), g.to(dtype), beta),
    )
    atol = TOLERANCES[dtype][0] + LN_TOLERANCES[dtype][0]
    rtol = TOLERANCES[dtype][1] + LN_TOLERANCES[dtype][1]
    _assert_close(got, want, (atol, rtol), f"normed residual M={m} N={n} K={k} {dtype}", seed)


def test_fold_then_normed_residual_is_a_layer(device, seed):
    """The two together, as a folded BERT layer runs them: FFN up folds LayerNorm(y) and stores
    the statistics, FFN down adds LayerNorm(y) from them."""
    m, width, inner, eps = 37, 64, 96, 1e-12
    y, g, beta = _norm_inputs(m, width, device, torch.float32)
    w1 = torch.randn(inner, width, device=device) / math.sqrt(width)
    w2 = torch.randn(width, inner, device=device) / math.sqrt(inner)
    b1, b2 = torch.randn(inner, device=device), torch.randn(width, device=device)
    h = F.layer_norm(y, (width,), g, beta, eps)
    want = F.linear(F.gelu(F.linear(h, w1, b1)), w2, b2) + h
    colsum, folded = fold_layer_norm(w1, b1, g, beta)
    stats = torch.empty(m, 2, device=device)
    up = linear(y, w1, folded, activation="gelu", fold=FoldedNorm(g, colsum, eps, stats))
    got = linear(up, w2, b2, residual=y, normed_residual=NormedResidual(stats, g, beta))
    _assert_close(got, want, (3e-5, 1e-5), "layer", seed)


def test_fold_layer_norm_vectors(device):
    w = torch.tensor([[1.0, 2.0], [3.0, -1.0]], device=device)
    colsum, folded = fold_layer_norm(
        w,
        torch.tensor([0.5, 1.0], device=device),
        *(
            torch.tensor([2.0, 3.0], device=device),
            torch.tensor([1.0, -1.0], device=device),
        ),
    )
    assert colsum.tolist() == [8.0, 3.0] and folded.tolist() == [-0.5, 5.0]
    assert colsum.dtype == folded.dtype == torch.float32
    _, no_bias = fold_layer_norm(w, None, torch.ones(2, device=device), None)
    assert no_bias.tolist() == [0.0, 0.0]


@pytest.mark.parametrize(
    "case,message",
    [
        ("stats_shape", r"fold.stats has shape \(5, 3\), expected \(5, 2\)"),
        ("stats_dtype", "fold.stats must be a contiguous float32 tensor"),
        ("weight_shape", r"fold.weight has shape \(7,\), expected \(8,\)"),
        ("colsum_dtype", "fold.colsum has dtype torch.float16"),
        ("eps", "fold.eps=-1.0"),
        ("both", "cannot be given together"),
        ("no_residual", "normed_residual needs the residual's rows"),
        ("not_a_fold", "fold must be a FoldedNorm"),
    ],
)
def test_norm_arguments_are_checked(case, message, device):
    m, n, k = 5, 4, 8
    x, w = torch.randn(m, k, device=device), torch.randn(n, k, device=device)
    g, c, st = torch.ones(k, device=device), torch.ones(n, device=device), torch.zeros(m, 2)
    st = st.to(device)
    fold = FoldedNorm(g, c, 1e-5, st)
    normed = NormedResidual(st, torch.ones(n, device=device), torch.zeros(n, device=device))
    kwargs = {
        "stats_shape": {"fold": FoldedNorm(g, c, 1e-5, torch.zeros(m, 3, device=device))},
        "stats_dtype": {"fold": FoldedNorm(g, c, 1e-5, st.double())},
        "weight_shape": {"fold": FoldedNorm(g[:7], c, 1e-5)},
        "colsum_dtype": {"fold": FoldedNorm(g, c.half(), 1e-5)},
        "eps": {"fold": FoldedNorm(g, c, -1.0)},
        "both": {"fold": fold, "normed_residual": normed, "residual": torch.randn(m, n)},
        "no_residual": {"normed_residual": normed},
        "not_a_fold": {"fold": (g, c, 1e-5)},
    }[case]
    if "residual" in kwargs:
        kwargs["residual"] = kwargs["residual"].to(device)
    with pytest.raises(ValueError, match=message):
        linear(x, w, None, **kwargs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("m", [32, 128, 256])
def test_folded_layer_norm_gpu_bert_shapes(m, dtype, device, seed):
    """BERT-base's folded GEMMs (QKV and FFN up, K = 768) and normed residuals (attention
    output and FFN down) with the tuned configs at the row counts where the runtime folds."""
    eps = 1e-12
    y, g, beta = _norm_inputs(m, 768, device, dtype)
    h = F.layer_norm(y.float(), (768,), g, beta, eps)
    stats = torch.empty(m, 2, device=device)
    for n, activation in ((2304, None), (3072, "gelu")):
        w = (torch.randn(n, 768, device=device) / math.sqrt(768)).to(dtype)
        b = torch.randn(n, device=device)
        colsum, folded = fold_layer_norm(w, b, g, beta)
        config = matmul.tune(m, n, 768, dtype, device, activation, False)
        got = linear(
            y,
            w,
            folded,
            activation=activation,
            config=config,
            fold=FoldedNorm(g.to(dtype), colsum, eps, stats),
        )
        want = linear_reference(h, w, b, activation=activation, out_dtype=torch.float32)
        _assert_close(got, want, FOLD_TOLERANCES[dtype], f"fold N={n} {config}", seed)
    _assert_close(stats, _stats(y, eps), (1e-5, 1e-5), "stats", seed)
    for k in (768, 3072):
        x = torch.randn(m, k, device=device).to(dtype)
        w = (torch.randn(768, k, device=device) / math.sqrt(k)).to(dtype)
        b = torch.randn(768, device=device)
        config = matmul.tune(m, 768, k, dtype, device, None, True)
        got = linear(
            x,
            w,
            b,
            residual=y,
            config=config,
            normed_residual=NormedResidual(stats, g.to(dtype), beta),
        )
        want = linear_reference(x, w, b, residual=layer_norm_reference(y, g, beta, eps))
        atol = TOLERANCES[dtype][0] + LN_TOLERANCES[dtype][0]
        rtol = TOLERANCES[dtype][1] + LN_TOLERANCES[dtype][1]
        _assert_close(got, want, (atol, rtol), f"normed residual K={k} {config}", seed)
