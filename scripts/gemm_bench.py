"""BERT-base's GEMMs, each backend's best configuration side by side, as the tuner times them.

    python scripts/gemm_bench.py --rows 1024,2048,4096,16384 --output gemm.json

For every row count and BERT-base projection (QKV 2304 x 768, attention output 768 x 768, FFN up
3072 x 768 with GELU, FFN down 768 x 3072 with the residual add), fp16 by default: every
candidate of the tuner is timed with `matmul.time_candidates` (CUDA graphs of back-to-back
launches over weights that do not fit in L2) and the fastest of each backend is printed with
its TFLOP/s: the plain Triton kernel ("triton"), the persistent TMA kernel ("tma"; again with
its output tiles stored per thread instead of by TMA) and cuBLAS with the epilogue as separate
kernels ("cublas"). The last column is the card's floor at
750 TFLOP/s (ANCHORS.md).
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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1024,2048,4096,16384")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    parser.add_argument("--output", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("gemm_bench.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from optimum_disc.kernels import matmul

    dtype = getattr(torch, args.dtype)
    device = torch.device("cuda")
    rows = [int(r) for r in args.rows.split(",")]
    results = []
    print(f"device {torch.cuda.get_device_name()} | {args.dtype} | ms per launch (TFLOP/s)")
    print("| rows | projection | triton | tma | tma, stores per thread | cublas | best | floor |")
    print("|---:|---|---:|---:|---:|---:|---|---:|")
    for m in rows:
        for name, n, k, act, res in PROJECTIONS:
            timed = matmul.time_candidates(m, n, k, dtype, device, act, res)
            # The TMA kernel again with its outputs stored per thread instead of by TMA.
            tma = [cfg for cfg, _ in timed if cfg.backend == "tma"]
            matmul.TMA_STORE = False
            try:
                plain_store = matmul.time_candidates(m, n, k, dtype, device, act, res, tma)
            finally:
                matmul.TMA_STORE = True
            best = {}
            labelled = [(cfg, cfg.backend, ms) for cfg, ms in timed]
            labelled += [(cfg, "tma, stores per thread", ms) for cfg, ms in plain_store]
            for cfg, backend, ms in labelled:
                if ms is not None and ms < best.get(backend, (None, float("inf")))[1]:
                    best[backend] = (cfg, ms)
            flop = 2.0 * m * n * k

            def cell(backend, best=best, flop=flop):
                if backend not in best:
                    return "-"
                ms = best[backend][1]
                return f"{ms * 1e3:.1f} us ({flop / ms / 1e9:.0f})"

            winner = min(
                (best[b] for b in ("triton", "tma", "cublas") if b in best), key=lambda cm: cm[1]
            )[0]
            tiles = f"{winner.block_m}x{winner.block_n}x{winner.block_k}"
            label = f"{winner.backend} {tiles}" if winner.backend != "cublas" else "cublas"
            floor_us = flop / (PEAK_TFLOPS * 1e12) * 1e6
            print(
                f"| {m} | {name} | {cell('triton')} | {cell('tma')} "
                f"| {cell('tma, stores per thread')} | {cell('cublas')} "
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
                }
            )
    if args.output:
        meta = {
            "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
            "dtype": args.dtype,
        }
        with open(args.output, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
