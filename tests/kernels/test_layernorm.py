import pytest
import torch

from optimum_disc.kernels import layernorm
from optimum_disc.kernels.layernorm import TOLERANCES, layer_norm, layer_norm_reference

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (rows, hidden) pairs rather than their product: every awkward size appears, the CPU run stays
# short.
SHAPES = [(1, 768), (7, 48), (33, 384), (129, 32), (7, 1024)]


def _inputs(M, N, dtype, device):
    # An offset mean and a spread scale, so that a variance taken as E[x^2] - mean^2 would show.
    x = (torch.randn(M, N) * 3 + 2).to(dtype=dtype, device=device)
    residual = torch.randn(M, N).to(dtype=dtype, device=device)
    weight = (torch.randn(N) * 0.5 + 1).to(device)
    bias = torch.randn(N).to(device)
    return x, residual, weight, bias


def _assert_close(out, ref, dtype, seed):
    assert torch.isfinite(out).all(), f"non-finite output (seed={seed})"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(
        out.float(), ref.float(), atol=atol, rtol=rtol, msg=lambda m: f"seed={seed}: {m}"
    )


@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_layer_norm(shape, dtype, with_residual, device, seed):
    M, N = shape
    x, residual, weight, bias = _inputs(M, N, dtype, device)
    residual = residual if with_residual else None
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    got = layer_norm(x, weight, bias, 1e-12, residual=residual, out=out)
    assert got is out
    ref = layer_norm_reference(x, weight, bias, 1e-12, residual=residual)
    _assert_close(out, ref, dtype, seed)


@pytest.mark.parametrize("rows_per_program", [2, 4, 8])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(1, 768), (7, 48), (33, 384), (13, 1000)], ids=str)
def test_layer_norm_rows_per_program(
    shape, dtype, with_bias, rows_per_program, device, seed, monkeypatch
):
    """The several-rows-per-program path (taken from `MULTI_ROW_MIN_M` rows), forced at every
    row count: rows past M in the last program (M not a multiple of the rows), masked columns,
    row-strided views of x, residual and out."""
    monkeypatch.setattr(layernorm, "MULTI_ROW_MIN_M", 0)
    monkeypatch.setattr(layernorm, "MULTI_ROW_ROWS", rows_per_program)
    M, N = shape
    assert layernorm.launch_config(M, N)[1] == rows_per_program
    x, residual, weight, bias = _inputs(M, N + 8, dtype, device)
    x, residual = x[:, 8:], residual[:, :N]
    weight, bias = weight[:N], bias[:N] if with_bias else None
    out_buf = torch.full((M + 3, N + 4), float("nan"), dtype=dtype, device=device)
    out = out_buf[:M, 4:]
    layer_norm(x, weight, bias, 1e-12, residual=residual, out=out)
    ref = layer_norm_reference(x, weight, bias, 1e-12, residual=residual)
    _assert_close(out, ref, dtype, seed)
    assert torch.isnan(out_buf[:, :4]).all() and torch.isnan(out_buf[M:]).all(), (
        f"wrote outside the out view (seed={seed})"
    )


def test_layer_norm_launch_config():
    """One row per program below `MULTI_ROW_MIN_M` rows, and where a row is wider than a warp
    holds; several from there."""
    big = layernorm.MULTI_ROW_MIN_M
    assert layernorm.launch_config(big - 1, 768) == (1024, 1, 4)
    if layernorm.MULTI_ROW:
        rows = layernorm.MULTI_ROW_ROWS
        assert layernorm.launch_config(big, 768) == (1024, rows, rows)
    assert layernorm.launch_config(big, 4096)[1] == 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layer_norm_strided_no_bias(dtype, device, seed):
    """Row-strided views of x, residual and out, weight in the storage dtype, no bias."""
    M, N = 33, 48
    x_buf = (torch.randn(M, N + 16) * 2 - 1).to(dtype=dtype, device=device)
    res_buf = torch.randn(M, 2 * N).to(dtype=dtype, device=device)
    x, residual = x_buf[:, 8 : 8 + N], res_buf[:, N:]
    weight = torch.randn(N).to(dtype=dtype, device=device)
    out_buf = torch.full((M, N + 24), float("nan"), dtype=torch.float32, device=device)
    out = out_buf[:, 24:]
    got = layer_norm(x, weight, None, 1e-5, residual=residual, out=out)
    assert got.dtype == torch.float32 and got.data_ptr() == out.data_ptr()
    # Upcasting the inputs is exact, so an fp32 reference is held to fp32 tolerances.
    ref = layer_norm_reference(x.float(), weight, None, 1e-5, residual=residual.float())
    _assert_close(out, ref, torch.float32, seed)
    assert torch.isnan(out_buf[:, :24]).all(), f"wrote outside the out view (seed={seed})"


def test_layer_norm_default_out_and_width_one(device, seed):
    x = torch.randn(7, 1, dtype=torch.float16, device=device)
    weight, bias = torch.randn(1, device=device), torch.randn(1, device=device)
    got = layer_norm(x, weight, bias, 1e-5)
    assert got.dtype == torch.float16 and got.shape == (7, 1)
    _assert_close(got, layer_norm_reference(x, weight, bias, 1e-5), torch.float16, seed)


def test_layer_norm_empty(device):
    x = torch.empty(0, 384, device=device)
    got = layer_norm(x, torch.ones(384, device=device), None, 1e-5)
    assert got.shape == (0, 384)


def test_layer_norm_rejects_bad_arguments(device):
    x = torch.randn(4, 32, device=device)
    w = torch.ones(32, device=device)
    with pytest.raises(ValueError, match="residual"):
        layer_norm(x, w, None, 1e-5, residual=torch.randn(4, 16, device=device))
    with pytest.raises(ValueError, match="weight"):
        layer_norm(x, torch.ones(16, device=device), None, 1e-5)
    with pytest.raises(ValueError, match="column stride"):
        layer_norm(torch.randn(32, 4, device=device).t(), w, None, 1e-5)
    with pytest.raises(ValueError, match="eps"):
        layer_norm(x, w, None, -1.0)
    with pytest.raises(ValueError, match="int64"):
        layer_norm(x.long(), w, None, 1e-5)
    with pytest.raises(ValueError, match="width"):
        layer_norm(
            torch.randn(2, 16384, device=device), torch.ones(16384, device=device), None, 1e-5
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(8192, 768), (4096, 1024), (2048, 4096), (1000, 8192)])
def test_layer_norm_large(shape, dtype, device, seed):
    M, N = shape
    x, residual, weight, bias = _inputs(M, N, dtype, device)
    out = torch.full((M, N), float("nan"), dtype=dtype, device=device)
    layer_norm(x, weight, bias, 1e-12, residual=residual, out=out)
    ref = layer_norm_reference(x, weight, bias, 1e-12, residual=residual)
    _assert_close(out, ref, dtype, seed)
