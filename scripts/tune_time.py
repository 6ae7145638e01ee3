"""How long the GEMM tuner takes for BERT-base's four projections, compilation included.

    TRITON_CACHE_DIR=$(mktemp -d) python scripts/tune_time.py --rows 32,2048

Run it with an empty Triton cache (as above) to count compilation, and once per
``OPTIMUM_DISC_COMPILE_THREADS`` setting to compare compiling the candidates one at a time (1)
with compiling them side by side (the default: one thread per core, at most 16).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch
from gemm_bench import PROJECTIONS  # BERT-base's four projections (scripts/ is on sys.path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,2048")
    parser.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"))
    parser.add_argument("--output", default=None, help="append the result as a JSON line here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_time.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from optimum_disc.kernels import matmul

    dtype = getattr(torch, args.dtype)
    threads = matmul.compile_threads()
    torch.zeros(1, device="cuda")
    found = []
    for m in (int(r) for r in args.rows.split(",")):
        for name, n, k, act, res in PROJECTIONS:
            start = time.perf_counter()
            cfg = matmul.tune(m, n, k, dtype, "cuda", act, res)
            seconds = time.perf_counter() - start
            found.append({"rows": m, "projection": name, "s": seconds, "config": cfg.to_dict()})
            print(f"{threads} threads | {m} rows | {name}: {seconds:.1f} s", flush=True)
    total = sum(f["s"] for f in found)
    print(f"{threads} compile threads, {args.dtype}: {total:.1f} s in all", flush=True)
    if args.output:
        with open(args.output, "a") as f:
            f.write(
                json.dumps(
                    {"threads": threads, "dtype": args.dtype, "total_s": total, "tuned": found}
                )
                + "\n"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
