"""Seconds from nothing to the first call of each shape: export, Triton compilation, GEMM tuning
and CUDA-graph capture, for BERT-base (``bert-base-multilingual-uncased`` configuration, random
weights) in one precision.

    TRITON_CACHE_DIR=$(mktemp -d) python scripts/first_calls.py --shapes 2x16,1x128,8x128
    TRITON_CACHE_DIR=$(mktemp -d) python scripts/first_calls.py --no-warm-up

Run each in a fresh process with an empty Triton cache (as above), or the compilation is not
counted. ``--no-warm-up`` measures the first calls without the runtime's warm-up of a new shape
bucket (every kernel compiled at its first launch, each GEMM tuned when the run reaches it,
compiling its own candidates), for comparison.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2x16,1x128,8x128,32x128,128x128,8x512")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument("--config", default="bert-base-multilingual-uncased")
    parser.add_argument("--no-warm-up", action="store_true")
    parser.add_argument("--output", default=None, help="append the result as a JSON line here")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("first_calls.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from optimum_disc import DiscSettings, optimize
    from optimum_disc.benchmark import build_model, parse_shapes, resolve_config, shape_inputs
    from optimum_disc.compiler.runtime import CompiledModel
    from optimum_disc.kernels import matmul

    if args.no_warm_up:
        CompiledModel._warm_up = lambda self, static: None
    variant = "without warm-up" if args.no_warm_up else "with warm-up"
    config = resolve_config(args.config)
    model = build_model(config, "cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    compiled = optimize(model, DiscSettings(precision=args.precision))
    torch.cuda.synchronize()
    seconds = {"optimize": time.perf_counter() - start}
    for shape in parse_shapes(args.shapes):
        inputs = shape_inputs(shape, config.vocab_size, "cuda", seed=0)
        start = time.perf_counter()
        compiled(**inputs)
        torch.cuda.synchronize()
        seconds[f"{shape[0]}x{shape[1]}"] = time.perf_counter() - start
    total = sum(seconds.values())
    parts = ", ".join(f"{name} {s:.1f}" for name, s in seconds.items())
    threads = matmul.compile_threads()
    print(f"{args.precision}, {variant}, {threads} compile threads: {total:.1f} s ({parts})")
    if args.output:
        with open(args.output, "a") as f:
            record = {"precision": args.precision, "variant": variant, "threads": threads}
            f.write(json.dumps({**record, "total_s": total, "seconds": seconds}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
