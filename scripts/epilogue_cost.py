"""What a GEMM's epilogue costs, per kernel and tile.

    python scripts/epilogue_cost.py --rows 2048,16384 --output epilogue.json

BERT-base's FFN up projection (3072 x 768, fp16) with and without its exact GELU: every
candidate of the tuner timed as the tuner times it (`matmul.time_candidates`: CUDA graphs over
weights that do not fit in L2). Prints the best configuration of the plain kernel (or cuBLAS)
and of the persistent TMA kernel, in us per launch, and the GELU's cost for each.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

N, K = 3072, 768


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="2048,16384")
    parser.add_argument("--output", default=None, help="write every timing as JSON here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("epilogue_cost.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from optimum_disc.kernels import matmul

    device, dtype = torch.device("cuda"), torch.float16
    results = []
    for m in (int(r) for r in args.rows.split(",")):
        for act in (None, "gelu"):
            for cfg, ms in matmul.time_candidates(m, N, K, dtype, device, act, False):
                us = None if ms is None else ms * 1e3
                results.append({"rows": m, "activation": act, "config": cfg.to_dict(), "us": us})
    best: dict = {}
    for r in results:
        kernel = "tma" if r["config"]["backend"] == "tma" else "plain kernel or cuBLAS"
        key = (r["rows"], kernel, r["activation"])
        if r["us"] is not None and (key not in best or r["us"] < best[key]["us"]):
            best[key] = r
    print("| rows | kernel | best, no epilogue | us | best, GELU | us | GELU costs |")
    print("|---:|---|---|---:|---|---:|---:|")
    for (m, kernel, act), r in best.items():
        if act is not None:
            continue
        g = best.get((m, kernel, "gelu"))
        if g is None:
            continue
        print(
            f"| {m} | {kernel} | {_name(r['config'])} | {r['us']:.1f} | {_name(g['config'])} | "
            f"{g['us']:.1f} | {g['us'] - r['us']:.1f} |"
        )
    if args.output:
        with open(args.output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


def _name(c: dict) -> str:
    if c["backend"] == "cublas":
        return "cublas"
    tiles = f"{c['block_m']}x{c['block_n']}x{c['block_k']}"
    return f"{c['backend']} {tiles} w{c['num_warps']} s{c['num_stages']}"


if __name__ == "__main__":
    sys.exit(main())
