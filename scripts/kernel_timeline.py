"""Kernel by kernel, one call of BERT-base under two GEMM candidate sets, side by side.

    python scripts/kernel_timeline.py --shapes 8x128,16x128 --output timeline

disc fp16 by default (``--precision``; ``bert-base-multilingual-uncased`` configuration, random
weights), PDL off so that each kernel's profiled time is its own (no wait for the kernel before
it). For each variant the
GEMMs are tuned afresh; then each shape's call is timed (median of 50) and profiled (20 calls):
every kernel of a call in launch order, its mean duration and the idle gap before it. Variants
(``--variants``, two of): ``no-tma`` (the TMA kernel is no candidate), ``tma`` (a candidate at
every row count), ``shipped`` (the tuner as it is) and ``tf32x3`` (as shipped, with fp32
products taken as three TF32 tensor-core products, ``matmul.FP32_DOT``). The
table puts the two timelines side by side, position by position (the programs are the same,
only the GEMM launches differ), with totals per kernel family, so a slowdown shows where it is:
in the GEMMs, in the kernels after them, or in the gaps.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from pathlib import Path

import torch


def _timeline(fn, n: int) -> list[dict]:
    """Per kernel position of one call: name, mean us, mean idle gap before it (us)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
            torch.cuda.synchronize()
    events = sorted(
        (e for e in prof.events() if getattr(e, "device_type", None) == DeviceType.CUDA),
        key=lambda e: e.time_range.start,
    )
    per_call = len(events) // n
    if per_call * n != len(events):
        raise RuntimeError(f"{len(events)} kernels over {n} calls: not the same per call")
    rows = []
    for i in range(per_call):
        durs, gaps = [], []
        for c in range(n):
            e = events[c * per_call + i]
            durs.append(e.time_range.end - e.time_range.start)
            if i:
                prev = events[c * per_call + i - 1]
                gaps.append(max(e.time_range.start - prev.time_range.end, 0.0))
        durs.sort()
        gaps.sort()
        rows.append(
            {
                "name": events[i].name,
                "us": durs[len(durs) // 2],
                "gap_us": gaps[len(gaps) // 2] if gaps else 0.0,
            }
        )
    return rows


def _alone(tuning: dict, rows: int) -> list[dict]:
    """Each GEMM of ``tuning`` (a compiled model's table) at ``rows``' bucket, timed alone as
    the tuner times it (`matmul.time_candidates`), without and with the model's epilogue
    (activation, residual add): if the model runs a GEMM slower than this, its neighbours are
    why."""
    from optimum_disc.kernels import matmul

    found = []
    for key, cfg in sorted(tuning.items()):
        nk, dtype_name, epilogue, bucket = key.split("|", 1)[-1].split(":")
        if int(bucket[1:]) != matmul.m_bucket(rows):
            continue
        n, k = (int(v) for v in nk.split("x"))
        activation = epilogue.split("+")[0]
        activation = None if activation == "none" else activation
        residual = epilogue.endswith("+residual")
        dtype, config = getattr(torch, dtype_name), [matmul.GemmConfig.from_dict(cfg)]
        ((_, bare),) = matmul.time_candidates(rows, n, k, dtype, "cuda", None, False, config)
        ((_, full),) = matmul.time_candidates(
            rows, n, k, dtype, "cuda", activation, residual, config
        )
        found.append(
            {"gemm": f"{nk} {epilogue}", "config": cfg, "bare_us": bare * 1e3, "us": full * 1e3}
        )
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="8x128,16x128")
    parser.add_argument("--pdl", action="store_true", help="keep PDL on (times then overlap)")
    parser.add_argument("--precision", default="fp16", choices=("fp32", "fp16", "bf16"))
    parser.add_argument(
        "--variants",
        default="no-tma,tma",
        help="GEMM candidate sets, two of: no-tma, tma, shipped (the tuner as it is), tf32x3 "
        "(shipped, fp32 products as three TF32 products)",
    )
    parser.add_argument("--output", default=None, help="folder for timeline.json and .md")
    args = parser.parse_args(argv)
    if not args.pdl:
        os.environ["OPTIMUM_DISC_PDL"] = "0"

    from optimum_disc.benchmark import (
        build_model,
        gemm_choices,
        kernel_family,
        parse_shapes,
        resolve_config,
        shape_inputs,
        shape_name,
        time_calls,
    )
    from optimum_disc.compiler import optimize, runtime
    from optimum_disc.kernels import matmul

    config = resolve_config("bert-base-multilingual-uncased")
    model = build_model(config, "cuda")
    shapes = parse_shapes(args.shapes)
    real, shipped = matmul.tuning_candidates, matmul._TMA_MIN_ROWS
    known = {
        "no-tma": (shipped, lambda *a: [c for c in real(*a) if c.backend != "tma"], "ieee"),
        "tma": (0, real, "ieee"),
        "shipped": (shipped, real, "ieee"),
        # fp32 GEMMs as three TF32 tensor-core products (matmul.FP32_DOT), for comparison.
        "tf32x3": (shipped, real, "tf32x3"),
    }
    names = args.variants.split(",")
    if len(names) != 2 or not set(names) <= set(known):
        parser.error(f"--variants {args.variants!r}: give two of {sorted(known)}")
    variants = {name: known[name] for name in names}
    results: dict = {}
    try:
        for name, (min_rows, candidates, fp32_dot) in variants.items():
            matmul._TMA_MIN_ROWS, matmul.tuning_candidates = min_rows, candidates
            matmul.FP32_DOT = fp32_dot
            runtime._TUNED.clear()
            compiled = optimize(model, precision=args.precision)
            results[name] = {}
            for shape in shapes:
                inputs = shape_inputs(shape, config.vocab_size, "cuda", 0, config.pad_token_id)
                call = functools.partial(compiled, **inputs)
                for _ in range(10):
                    call()
                times = sorted(time_calls(call, 50, "cuda"))
                results[name][shape_name(shape)] = {
                    "median_ms": times[len(times) // 2],
                    "kernels": _timeline(call, 20),
                }
                print(f"{name} {shape_name(shape)}: {times[len(times) // 2]:.3f} ms", flush=True)
            results[name]["gemms"] = gemm_choices(compiled)
            results[name]["alone"] = {
                shape_name(shape): _alone(compiled.program.tuning, shape[0] * shape[1])
                for shape in shapes
            }
    finally:
        matmul._TMA_MIN_ROWS, matmul.tuning_candidates = shipped, real
        matmul.FP32_DOT = "ieee"

    lines = []
    a, b = list(variants)
    for shape in shapes:
        s = shape_name(shape)
        ka, kb = results[a][s]["kernels"], results[b][s]["kernels"]
        lines += [
            f"### {s}: call {results[a][s]['median_ms']:.3f} ms ({a}) vs "
            f"{results[b][s]['median_ms']:.3f} ms ({b})",
            "",
            "| family | " + f"{a} us | {b} us | {a} gaps us | {b} gaps us |",
            "|---|---:|---:|---:|---:|",
        ]
        # Each variant's kernels summed by their own family (the two may launch different
        # kernels, e.g. cuBLAS and its epilogue for one GEMM against one Triton launch).
        fam: dict = {}
        for side, kernels in enumerate((ka, kb)):
            for r in kernels:
                t = fam.setdefault(kernel_family(r["name"]), [0.0, 0.0, 0.0, 0.0])
                t[side] += r["us"]
                t[2 + side] += r["gap_us"]
        for f, t in sorted(fam.items(), key=lambda kv: -kv[1][0]):
            lines.append(f"| {f} | " + " | ".join(f"{v:.1f}" for v in t) + " |")
        if len(ka) != len(kb):
            lines.append(f"\n{len(ka)} against {len(kb)} kernels: positions not compared.\n")
            continue
        lines += [
            "",
            "First layer, kernel by kernel (us; gap = idle time before the kernel):",
            "",
            f"| # | {a} kernel | {a} | gap | {b} kernel | {b} | gap |",
            "|---:|---|---:|---:|---|---:|---:|",
        ]
        for i, (ra, rb) in enumerate(zip(ka[:12], kb[:12])):
            lines.append(
                f"| {i} | {ra['name'][:40]} | {ra['us']:.1f} | {ra['gap_us']:.1f} | "
                f"{rb['name'][:40]} | {rb['us']:.1f} | {rb['gap_us']:.1f} |"
            )
        lines.append("")
    for name in variants:
        lines.append(f"GEMM choices, {name}: " + json.dumps(results[name]["gemms"]))
        lines.append("")
    lines += [
        "Each GEMM alone (us per launch, CUDA graph, cold weights): as the tuner times it "
        "(no epilogue) and with the model's epilogue; the model's own times are above.",
        "",
        "| variant | shape | GEMM | config | alone, no epilogue | alone, with epilogue |",
        "|---|---|---|---|---:|---:|",
    ]
    for name in variants:
        for s, entries in results[name]["alone"].items():
            for e in entries:
                c = e["config"]
                cfg = f"{c.get('backend')} {c['block_m']}x{c['block_n']}x{c['block_k']}"
                lines.append(
                    f"| {name} | {s} | {e['gemm']} | {cfg} | {e['bare_us']:.1f} | {e['us']:.1f} |"
                )
    lines.append("")
    table = "\n".join(lines)
    print(table)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "timeline.json").write_text(json.dumps(results, indent=1) + "\n")
        (out / "timeline.md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
