"""Programmatic dependent launch: when it is on, and that kernels chained with it (under a CUDA
graph, with buffers reused as soon as they are read) compute what they compute without it."""

import math

import pytest
import torch

from optimum_disc.kernels import launch, matmul
from optimum_disc.kernels.attention import attention
from optimum_disc.kernels.layernorm import layer_norm
from optimum_disc.kernels.matmul import GemmConfig, default_config, linear


def test_pdl_is_off_on_the_cpu_and_when_disabled(monkeypatch):
    assert not launch.enabled(torch.device("cpu"))
    assert launch.options(torch.device("cpu")) == {"PDL": False}
    monkeypatch.setenv("OPTIMUM_DISC_PDL", "0")
    if torch.cuda.is_available():
        assert not launch.enabled(torch.device("cuda", torch.cuda.current_device()))
    assert launch.options(torch.device("cpu")) == {"PDL": False}


def _layers(rows, hidden, ffn, heads, depth, dtype, device):
    """A BERT-like chain: QKV, attention, output projection + residual, LayerNorm, FFN up
    (split-K when rows are few), FFN down + residual, LayerNorm; every intermediate lives in
    one of a few buffers that the next kernel overwrites right after the last read."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def w(n, k):
        return (torch.randn(n, k, generator=g) / math.sqrt(k)).to(device, dtype)

    layers = []
    for _ in range(depth):
        layers.append(
            {
                "qkv": w(3 * hidden, hidden),
                "o": w(hidden, hidden),
                "up": w(ffn, hidden),
                "down": w(hidden, ffn),
                "ln": torch.ones(hidden, device=device, dtype=dtype),
            }
        )
    split = None
    if rows <= 64:
        base = default_config(rows, hidden, ffn, dtype)
        split = GemmConfig(base.block_m, 32, 64, 8, 4, 3, split_k=4)
    buffers = {
        "h": torch.empty(rows, hidden, device=device, dtype=dtype),
        "qkv": torch.empty(rows, 3 * hidden, device=device, dtype=dtype),
        "ctx": torch.empty(rows, hidden, device=device, dtype=dtype),
        "up": torch.empty(rows, ffn, device=device, dtype=dtype),
    }

    def run(x, cu_seqlens, max_seqlen):
        h, qkv, ctx, up = (buffers[k] for k in ("h", "qkv", "ctx", "up"))
        h.copy_(x)
        for p in layers:
            linear(h, p["qkv"], None, out=qkv)
            attention(
                qkv[:, :hidden],
                qkv[:, hidden : 2 * hidden],
                qkv[:, 2 * hidden :],
                cu_seqlens,
                max_seqlen,
                heads,
                hidden // heads,
                (hidden // heads) ** -0.5,
                out=ctx,
            )
            # Written while the attention kernel before it reads qkv: the WAR hazard of PDL.
            linear(ctx, p["o"], None, residual=h, out=qkv[:, :hidden])
            layer_norm(qkv[:, :hidden], p["ln"], None, 1e-5, out=h)
            linear(h, p["up"], None, activation="gelu", out=up)
            linear(up, p["down"], None, residual=h, out=ctx, config=split)
            layer_norm(ctx, p["ln"], None, 1e-5, out=h)
        return h.clone()

    return run


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [24, 1000])
@pytest.mark.parametrize(
    "dtype, fp32_pdl",
    # fp32 GEMMs launch as `matmul.FP32_PDL` says; every way must give the same bits.
    [
        (torch.float32, "off"),
        (torch.float32, "wait"),
        (torch.float32, "on"),
        (torch.float16, "off"),
    ],
    ids=["fp32-gemm-plain", "fp32-gemm-pdl-wait", "fp32-gemm-pdl", "fp16"],
)
def test_pdl_chain_matches_plain_launches(rows, dtype, fp32_pdl, device, seed, monkeypatch):
    dev = torch.device(device)
    if not launch.enabled(dev):
        pytest.skip("programmatic dependent launch needs a GPU of compute capability 9.0+")
    monkeypatch.setattr(matmul, "FP32_PDL", fp32_pdl)
    hidden, ffn, heads, depth = 128, 512, 4, 6
    run = _layers(rows, hidden, ffn, heads, depth, dtype, device)
    lengths = [rows // 3, rows // 3, rows - 2 * (rows // 3)]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu = cu.to(device)
    inputs = [torch.randn(rows, hidden, device=device).to(dtype) for _ in range(3)]

    monkeypatch.setenv("OPTIMUM_DISC_PDL", "0")
    expected = [run(x, cu, max(lengths)) for x in inputs]
    monkeypatch.delenv("OPTIMUM_DISC_PDL")

    static = torch.empty_like(inputs[0])
    static.copy_(inputs[0])
    run(static, cu, max(lengths))  # compiles the PDL variants outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = run(static, cu, max(lengths))
    for x, want in zip(inputs, expected):
        static.copy_(x)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.isfinite(out).all(), f"seed={seed}: non-finite outputs"
        # Same kernels, same tiles, same order of every sum: any difference is a hazard.
        torch.testing.assert_close(out, want, rtol=0, atol=0, msg=lambda m: f"seed={seed}\n{m}")
        eager = run(x, cu, max(lengths))  # PDL launches outside a graph, too
        torch.testing.assert_close(eager, want, rtol=0, atol=0, msg=lambda m: f"seed={seed}\n{m}")
