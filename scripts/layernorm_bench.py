"""The LayerNorm kernel alone, launch configurations side by side, at BERT-base's width.

    python scripts/layernorm_bench.py --rows 32,128,1024,2048,16384 --configs 1x1,1x4,4x4,8x8

For each row count, fp16 rows of 768 values (the hidden states of BERT-base, as its LayerNorms
read them once the GEMM before has added the residual) are normalised with every configuration
``RxW``: R rows per program over W warps (`layernorm.launch_config` gives the shipped choice for
each row count, marked). Each choice is captured in a CUDA graph of back-to-back launches (PDL as
shipped) whose replays are timed, so the figure is per launch without the host, as inside the
model's graph; the rows are rewritten between launches by nothing, so they stay in L2 as the
GEMM before leaves them.

With ``--model-configs 1x4,4x4`` it then runs the benchmark's disc fp16 peer (BERT-base, shapes
``--model-shapes`` and the movie-review pass, ``--tokenizer``) once per value, in this order, every
LayerNorm kernel of the model launched with that configuration.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch

LAUNCHES = 20


def _configs(text: str) -> list[tuple[int, int]]:
    """``"1x4,4x4"`` -> [(1, 4), (4, 4)]: rows per program x warps."""
    out = []
    for item in text.split(","):
        rows, _, warps = item.partition("x")
        out.append((int(rows), int(warps)))
    return out


def _forced(shipped, rows: int, warps: int):
    """A `launch_config` that launches every size with ``rows`` rows per program over ``warps``
    warps."""
    return lambda m, width: (shipped(m, width)[0], rows, warps)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="32,128,1024,2048,4096,16384")
    parser.add_argument(
        "--configs",
        default="1x1,1x2,1x4,1x8,2x2,4x4,8x4,8x8,16x8",
        help="rows per program x warps, e.g. 1x4,4x4",
    )
    parser.add_argument("--width", type=int, default=768)
    parser.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    parser.add_argument("--output", help="write the timings here as JSON")
    parser.add_argument("--model-configs", default="", help="e.g. 1x4,4x4 (empty: no model runs)")
    parser.add_argument("--model-shapes", default="2x16,1x128,8x128")
    parser.add_argument("--tokenizer", default=None)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")

    from optimum_disc.kernels import layernorm
    from optimum_disc.kernels.matmul import _time_in_graph

    device = torch.device("cuda")
    dtype = getattr(torch, args.dtype)
    shipped = layernorm.launch_config
    configs = _configs(args.configs)
    names = [f"{r}x{w}" for r, w in configs]
    results = []
    print(f"| rows | {' | '.join(f'{n}, us' for n in names)} | best | shipped |")
    print("|---:|" + "---:|" * len(names) + "---|---|")
    try:
        for rows in (int(r) for r in args.rows.split(",")):
            x = torch.randn(rows, args.width, device=device).to(dtype)
            w = (torch.randn(args.width, device=device) * 0.1 + 1).to(dtype)
            b = (torch.randn(args.width, device=device) * 0.1).to(dtype)
            out = torch.empty_like(x)
            want = layernorm.layer_norm_reference(x, w, b, 1e-12)
            _, r0, w0 = shipped(rows, args.width)
            row = {"rows": rows, "shipped": f"{r0}x{w0}", "us": {}}
            for name, (r, n) in zip(names, configs):
                layernorm.launch_config = _forced(shipped, r, n)

                def launches(x=x, w=w, b=b, out=out):
                    for _ in range(LAUNCHES):
                        layernorm.layer_norm(x, w, b, 1e-12, out=out)

                out.fill_(float("nan"))
                ms = _time_in_graph(launches, device, replays=10)
                atol, rtol = layernorm.TOLERANCES[dtype]
                torch.testing.assert_close(out.float(), want.float(), atol=atol, rtol=rtol)
                row["us"][name] = ms * 1000 / LAUNCHES
            best = min(row["us"], key=row["us"].get)
            cells = [f"{v:.2f}{' *' if n == row['shipped'] else ''}" for n, v in row["us"].items()]
            print(f"| {rows} | {' | '.join(cells)} | {best} | {row['shipped']} |", flush=True)
            results.append(row)
    finally:
        layernorm.launch_config = shipped
    print(f"\n* shipped; {args.dtype}, width {args.width}")
    model = _model_runs(args, layernorm, shipped) if args.model_configs else []
    if args.output:
        with open(args.output, "w") as f:
            json.dump({"results": results, "model": model}, f, indent=1)
    return 0


def _model_runs(args, layernorm, shipped) -> list[dict]:
    """The disc fp16 peer of the benchmark once per ``--model-configs`` value."""
    from optimum_disc.benchmark import parse_shapes, run_benchmark

    runs = []
    try:
        for r, n in _configs(args.model_configs):
            layernorm.launch_config = _forced(shipped, r, n)
            res = run_benchmark(
                peers=("disc_fp16",),
                shapes=parse_shapes(args.model_shapes),
                tokenizer=args.tokenizer,
                output_dir=None,
                progress=False,
            )["results"]["disc_fp16"]
            run = {"config": f"{r}x{n}", "shapes": {}, "dataset_ms": res["dataset"]["ms_per_pass"]}
            for name, entry in res["shapes"].items():
                run["shapes"][name] = entry["median_ms"]
            runs.append(run)
            print(f"model, {r}x{n}: {json.dumps(run)}", flush=True)
    finally:
        layernorm.launch_config = shipped
    return runs


if __name__ == "__main__":
    sys.exit(main())
