"""The LayerNorm kernel alone, warps per row side by side, at BERT-base's width.

    python scripts/layernorm_bench.py --rows 32,128,1024,2048,16384 --warps 1,2,4,8

For each row count, fp16 rows of 768 values (the hidden states of BERT-base, as its LayerNorms
read them once the GEMM before has added the residual) are normalised with every number of warps
per program (one row per program; `layernorm.row_launch_config` gives the shipped choice, marked).
Each choice is captured in a CUDA graph of back-to-back launches (PDL as shipped) whose replays
are timed, so the figure is per launch without the host, as inside the model's graph; the rows
are rewritten between launches by nothing, so they stay in L2 as the GEMM before leaves them.

With ``--model-warps 4,1,4`` it then runs the benchmark's disc fp16 peer (BERT-base, shapes
``--model-shapes`` and the movie-review pass, ``--tokenizer``) once per value, in this order, the
LayerNorm kernels of the model launched with that many warps per row.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

LAUNCHES = 20


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,128,1024,2048,16384")
    parser.add_argument("--warps", default="1,2,4,8")
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--output", help="write the timings here as JSON")
    parser.add_argument("--model-warps", default="", help="e.g. 4,1,4 (empty: no model runs)")
    parser.add_argument("--model-shapes", default="2x16,1x128,8x128")
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    from optimum_disc.kernels import layernorm
    from optimum_disc.kernels.matmul import _time_in_graph

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    shipped_config = layernorm.row_launch_config
    block, shipped = shipped_config(args.width)
    warps = [int(w) for w in args.warps.split(",")]
    results = []
    print(f"| rows | {' | '.join(f'{w} warps, us' for w in warps)} | best |")
    print("|---:|" + "---:|" * (len(warps) + 1))
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, args.width, device=device).to(dtype)
            w = (torch.randn(args.width, device=device) * 0.1 + 1).to(dtype)
            b = (torch.randn(args.width, device=device) * 0.1).to(dtype)
            out = torch.empty_like(x)
            want = layernorm.layer_norm_reference(x, w, b, 1e-12)
            row = {"rows": rows, "us": {}}
            for n in warps:
                layernorm.row_launch_config = lambda width, n=n: (shipped_config(width)[0], n)

                def launches(x=x, w=w, b=b, out=out):
                    for _ in range(LAUNCHES):
                        layernorm.layer_norm(x, w, b, 1e-12, out=out)

                ms = _time_in_graph(launches, device, replays=10)
                atol, rtol = layernorm.TOLERANCES[dtype]
                torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=rtol)
                row["us"][n] = ms * 1000 / LAUNCHES
            best = min(row["us"], key=row["us"].get)
            cells = [f"{v:.2f}{' *' if n == shipped else ''}" for n, v in row["us"].items()]
            print(f"| {rows} | {' | '.join(cells)} | {best} |", flush=True)
            results.append(row)
    finally:
        layernorm.row_launch_config = shipped_config
    print(f"\n* shipped: {shipped} warps, block {block}; {args.dtype}, width {args.width}")
    model = _model_runs(args, layernorm, shipped_config) if args.model_warps else []
    if args.output:
        with open(args.output, "w") as f:
            json.dump(
                {"shipped_warps": shipped, "block": block, "results": results, "model": model},
                f,
                indent=1,
            )
    return 0


def _model_runs(args, layernorm, shipped_config) -> list[dict]:
    """The disc fp16 peer of the benchmark once per ``--model-warps`` value."""
    from optimum_disc.benchmark import parse_shapes, run_benchmark

    runs = []
    try:
        for n in (int(w) for w in args.model_warps.split(",")):
            layernorm.row_launch_config = lambda width, n=n: (shipped_config(width)[0], n)
            res = run_benchmark(
                peers=("disc_fp16",),
                shapes=parse_shapes(args.model_shapes),
                tokenizer=args.tokenizer,
                output_dir=None,
                progress=False,
            )["results"]["disc_fp16"]
            run = {"warps": n, "shapes": {}, "dataset_ms": res["dataset"]["ms_per_pass"]}
            for name, entry in res["shapes"].items():
                run["shapes"][name] = entry["median_ms"]
            runs.append(run)
            print(f"model, {n} warps: {json.dumps(run)}", flush=True)
    finally:
        layernorm.row_launch_config = shipped_config
    return runs


if __name__ == "__main__":
    sys.exit(main())
