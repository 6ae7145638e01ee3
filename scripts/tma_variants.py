"""How the persistent TMA GEMM pays inside BERT-base, by rows and by how it takes part in PDL.

    python scripts/tma_variants.py --tokenizer TOKENIZER_DIR

disc fp16 (``bert-base-multilingual-uncased`` configuration, random weights) at 8 x 128,
32 x 128 and 128 x 128 and over the movie-review pass, one process, GEMMs tuned afresh for
each variant: without the TMA kernel; with it as a candidate at every row count (PDL "start",
"end" or "off", see ``matmul.TMA_PDL``); and with it from 8,192 rows only (the rule until the
tuner timed candidates with their epilogue; it is 512 rows now).
Prints one markdown table of milliseconds.
"""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--shapes", default="8x128,32x128,128x128")
    args = parser.parse_args(argv)

    from optimum_disc.benchmark import BenchmarkOptions, parse_shapes, run_benchmark
    from optimum_disc.compiler import runtime
    from optimum_disc.kernels import matmul

    real = matmul.tuning_candidates
    shipped_min_rows, shipped_pdl = matmul._TMA_MIN_ROWS, matmul.TMA_PDL
    variants = {
        "no tma": (None, "start", lambda c: c.backend != "tma"),
        "tma at every row count, pdl start": (0, "start", None),
        "tma at every row count, pdl end": (0, "end", None),
        "tma at every row count, pdl off": (0, "off", None),
        "tma from 8,192 rows, pdl end": (8192, "end", None),
    }
    rows = {}
    try:
        for name, (min_rows, pdl, keep) in variants.items():
            matmul._TMA_MIN_ROWS = shipped_min_rows if min_rows is None else min_rows
            matmul.TMA_PDL = pdl
            matmul.tuning_candidates = (
                (lambda *a, keep=keep: [c for c in real(*a) if keep(c)]) if keep else real
            )
            runtime._TUNED.clear()
            results = run_benchmark(
                BenchmarkOptions(
                    peers=("disc_fp16",),
                    shapes=parse_shapes(args.shapes),
                    dataset="movie-reviews",
                    tokenizer=args.tokenizer,
                    output_dir=None,
                )
            )
            peer = results["results"]["disc_fp16"]
            got = {s: peer["shapes"][s]["median_ms"] for s in results["shapes"]}
            got["data-set pass"] = peer["dataset"]["ms_per_pass"]
            rows[name] = got
            print(f"{name}: {got}", file=sys.stderr, flush=True)
    finally:
        matmul._TMA_MIN_ROWS, matmul.TMA_PDL = shipped_min_rows, shipped_pdl
        matmul.tuning_candidates = real
    columns = list(next(iter(rows.values())))
    print("| variant | " + " | ".join(columns) + " |")
    print("|---|" + "---:|" * len(columns))
    for name, got in rows.items():
        print(f"| {name} | " + " | ".join(f"{got[c]:.3f}" for c in columns) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
