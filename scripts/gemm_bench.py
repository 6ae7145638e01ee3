"""BERT-base's GEMMs, each backend's best configuration side by side, as the tuner times them.

    python scripts/gemm_bench.py --rows 1024,2048,4096,16384 --output gemm.json

For every row count and BERT-base projection (QKV 2304 x 768, attention output 768 x 768, FFN up
3072 x 768 with GELU, FFN down 768 x 3072 with the residual add), fp16 by default: every
candidate of the tuner is timed with `matmul.time_candidates` (CUDA graphs of back-to-back
launches over weights that do not fit in L2) and the fastest of each backend is printed with
its TFLOP/s: the plain Triton kernel ("triton", its split-K tiles apart), the persistent TMA
kernel ("tma"; again with its output tiles stored per thread instead of by TMA) and cuBLAS with
the epilogue as separate kernels ("cublas"). The last column is the card's floor at 750 TFLOP/s
(ANCHORS.md).
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

PROJECTIONS = (
    ("qkv", 2304, 768, None, False),
    ("attn out", 768, 768, None, True),
    ("ffn up", 3072, 768, "gelu", False),
    ("ffn down", 768, 3072, None, True),
)
PEAK_TFLOPS = 750.0


def _tiles(m, k, block_n, block_k, warps, splits, block_m=(32,), stages=lambda bk: 3):
    """Every split-K tile of the grid, block_m cut to the row bucket, each K slice at least one
    K block long; ``warps`` a tuple, or a function of (block_m, block_n) giving one, ``stages``
    a function of block_k."""
    from optimum_disc.kernels import matmul

    bucket = matmul.m_bucket(m)
    found = []
    for bm in sorted({min(b, bucket) for b in block_m}):
        for bn in block_n:
            for bk in block_k:
                for w in warps(bm, bn) if callable(warps) else warps:
                    for split in splits:
                        if k // split < bk:
                            continue
                        found.append(
                            matmul.GemmConfig(
                                block_m=bm,
                                block_n=bn,
                                block_k=bk,
                                group_m=8,
                                num_warps=w,
                                num_stages=stages(bk),
                                split_k=split,
                            )
                        )
    return found


def _wide(m, n, k, dtype):
    """Narrow tiles over many K slices: more programs for few rows, beyond the tuner's list."""
    return _tiles(m, k, block_n=(16, 32), block_k=(32,), warps=(2, 4), splits=(4, 8, 16))


def _sweep(m, n, k, dtype):
    """A grid over block_n, block_k, warps and K slices (fp32 at few rows: how many outputs each
    thread owns and how many programs share K)."""
    return _tiles(
        m,
        k,
        block_n=(16, 32, 64, 128),
        block_k=(16, 32, 64),
        warps=(1, 2, 4),
        splits=(1, 2, 4, 8, 16),
    )


def _sweep16(m, n, k, dtype):
    """A grid for 16-bit inputs at few rows: block_m 16 to 128 (at most the row bucket),
    block_n 16 to 128, block_k 64 to 256, 1 to 8 K slices; 4 warps, also 2 for small tiles and
    8 for large ones; 4 pipeline stages, 3 at block_k 256; those whose operand buffers fit."""
    from optimum_disc.kernels import matmul

    def warps(bm, bn):
        return (4,) + ((2,) if bm * bn <= 32 * 32 else ()) + ((8,) if bm * bn >= 64 * 128 else ())

    grid = _tiles(
        m,
        k,
        block_n=(16, 32, 64, 128),
        block_k=(64, 128, 256),
        warps=warps,
        splits=(1, 2, 4, 8),
        block_m=(16, 32, 64, 128),
        stages=lambda bk: 3 if bk == 256 else 4,
    )
    return [cfg for cfg in grid if cfg.smem_bytes(dtype) <= matmul._SMEM_BUDGET]


def _column(cfg) -> str:
    """The table column of a config: its backend, split-K apart from the plain Triton tiles."""
    return "triton, split-K" if cfg.backend == "triton" and cfg.split_k > 1 else cfg.backend


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1024,2048,4096,16384")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument(
        "--fp32-dot",
        default="ieee",
        choices=("ieee", "tf32x3"),
        help="how the Triton kernel multiplies fp32 (matmul.FP32_DOT); cuBLAS is always fp32",
    )
    parser.add_argument(
        "--wide",
        action="store_true",
        help="at up to 256 rows, also time narrow tiles with 2 or 4 warps and 4 to 16 K slices",
    )
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="at up to 256 rows, also time a grid of tiles at block_m 32: block_n 16 to 128, "
        "block_k 16 to 64, 1 to 4 warps, 1 to 16 K slices",
    )
    parser.add_argument(
        "--sweep16",
        action="store_true",
        help="at up to 256 rows, also time a grid for 16-bit inputs: block_m 16 to 128, "
        "block_n 16 to 128, block_k 64 to 256, 1 to 8 K slices (`_sweep16`)",
    )
    parser.add_argument(
        "--hot",
        action="store_true",
        help="every launch over one weight, which stays in L2 (default: over enough copies that "
        "each launch reads its weight from device memory, as in the model)",
    )
    parser.add_argument(
        "--tma-prefetch",
        action="store_true",
        help="also time the TMA kernel without its L2 prefetch of the weight",
    )
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from optimum_disc.kernels import matmul

    dtype = getattr(torch, args.dtype)
    matmul.FP32_DOT = args.fp32_dot
    device = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"device {torch.cuda.get_device_name()} | {args.dtype} | ms per launch (TFLOP/s)")
    print(
        "| rows | projection | triton | triton, split-K | tma | tma, stores per thread | cublas "
        "| tma, no prefetch | best | floor |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---|---:|")
    for m in rows:
        for name, n, k, act, res in PROJECTIONS:
            candidates = matmul.tuning_candidates(m, n, k, dtype, device)
            if args.wide and matmul.m_bucket(m) <= 256:
                candidates += [c for c in _wide(m, n, k, dtype) if c not in candidates]
            if args.sweep and matmul.m_bucket(m) <= 256:
                candidates += [c for c in _sweep(m, n, k, dtype) if c not in candidates]
            if args.sweep16 and matmul.m_bucket(m) <= 256:
                candidates += [c for c in _sweep16(m, n, k, dtype) if c not in candidates]
            timed = matmul.time_candidates(m, n, k, dtype, device, act, res, candidates, args.hot)
            # The TMA kernel again with its outputs stored per thread instead of by TMA.
            tma = [cfg for cfg, _ in timed if cfg.backend == "tma"]
            plain_store = []
            if tma:
                matmul.TMA_STORE = False
                try:
                    plain_store = matmul.time_candidates(
                        m, n, k, dtype, device, act, res, tma, args.hot
                    )
                finally:
                    matmul.TMA_STORE = True
            no_prefetch = []
            if tma and args.tma_prefetch:
                saved, matmul.TMA_PREFETCH = matmul.TMA_PREFETCH, False
                try:
                    no_prefetch = matmul.time_candidates(
                        m, n, k, dtype, device, act, res, tma, args.hot
                    )
                finally:
                    matmul.TMA_PREFETCH = saved
            best = {}
            labelled = [(cfg, _column(cfg), ms) for cfg, ms in timed]
            labelled += [(cfg, "tma, stores per thread", ms) for cfg, ms in plain_store]
            labelled += [(cfg, "tma, no prefetch", ms) for cfg, ms in no_prefetch]
            for cfg, backend, ms in labelled:
                if ms is not None and ms < best.get(backend, (None, float("inf")))[1]:
                    best[backend] = (cfg, ms)
            flop = 2.0 * m * n * k

            def cell(backend, best=best, flop=flop):
                if backend not in best:
                    return "-"
                ms = best[backend][1]
                return f"{ms * 1e3:.1f} us ({flop / ms / 1e9:.0f})"

            columns = ("triton", "triton, split-K", "tma", "cublas")
            winner = min((best[b] for b in columns if b in best), key=lambda cm: cm[1])[0]
            tiles = f"{winner.block_m}x{winner.block_n}x{winner.block_k}"
            if winner.split_k > 1:
                tiles += f" split {winner.split_k}"
            label = f"{winner.backend} {tiles}" if winner.backend != "cublas" else "cublas"
            floor_us = flop / (PEAK_TFLOPS * 1e12) * 1e6
            print(
                f"| {m} | {name} | {cell('triton')} | {cell('triton, split-K')} | {cell('tma')} "
                f"| {cell('tma, stores per thread')} | {cell('cublas')} "
                f"| {cell('tma, no prefetch')} "
                f"| {label} | {floor_us:.1f} us |"
            )
            results.append(
                {
                    "rows": m,
                    "projection": name,
                    "n": n,
                    "k": k,
                    "timed": [{"config": c.to_dict(), "ms": ms} for c, ms in timed],
                    "tma_stores_per_thread": [
                        {"config": c.to_dict(), "ms": ms} for c, ms in plain_store
                    ],
                    "tma_no_prefetch": [{"config": c.to_dict(), "ms": ms} for c, ms in no_prefetch],
                }
            )
    if args.output:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "dtype": args.dtype,
            "fp32_dot": args.fp32_dot,
        }
        with open(args.output, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
