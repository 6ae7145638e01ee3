"""Where the time of one optimum-disc call goes beyond its CUDA graph, per shape.

    python scripts/host_time.py --shapes 2x16,1x128,32x128,128x128

BERT-base (``bert-base-multilingual-uncased`` configuration, random weights) compiled in fp16,
attention mask all ones. For each shape, medians of CUDA-event timings as the benchmark takes
them: ``call`` is ``model(**inputs)``, ``graph alone`` the shape's graph replayed by itself (no
input checks, input kernel, statistics read-back or output copy); ``call - graph alone`` is
what the GPU waits for the host. Then the host's clock over one call made on an idle GPU: time
to the launch of the input kernel, that launch itself (the input table filled and the input
kernel's graph replayed; the first call of a bucket launches the kernel through Triton), time
to the model graph's launch, and the whole call.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch


def _median_ms(fn, iters: int) -> float:
    """Median of ``iters`` calls timed as the benchmark times them, after 10 warm-up calls."""
    from optimum_disc.benchmark import time_calls

    for _ in range(10):
        fn()
    times = time_calls(fn, iters, "cuda")
    return sorted(times)[len(times) // 2]


def _host_stages(compiled, inputs, iters: int) -> dict:
    """Host microseconds of a call up to the launch of the input kernel, that launch (the
    table filled and the input kernel's graph replayed, or the kernel launched through
    Triton), up to the launch of the model's graph, and in all, each the median over calls made
    after the GPU is idle."""
    import time

    prologue = compiled._kernels.prologue
    real_prepare, real_replay = prologue.prepare_inputs, torch.cuda.CUDAGraph.replay
    real_fill = compiled._fill_table
    marks = {}

    def prepare(*a, **k):
        marks["before_input_kernel"] = time.perf_counter()
        try:
            return real_prepare(*a, **k)
        finally:
            marks["after_input_kernel"] = time.perf_counter()

    def fill(*a, **k):
        marks["before_input_kernel"] = time.perf_counter()
        marks["table"] = True
        return real_fill(*a, **k)

    def replay(self):
        now = time.perf_counter()
        if marks.pop("table", False):  # the input kernel's graph
            real_replay(self)
            marks["after_input_kernel"] = time.perf_counter()
            return None
        marks["before_graph"] = now
        return real_replay(self)

    prologue.prepare_inputs, torch.cuda.CUDAGraph.replay = prepare, replay
    compiled._fill_table = fill
    samples = []
    try:
        for _ in range(iters):
            torch.cuda.synchronize()
            marks.clear()
            t0 = time.perf_counter()
            compiled(**inputs)
            t1 = time.perf_counter()
            samples.append(
                {
                    "to_input_kernel": marks["before_input_kernel"] - t0,
                    "input_kernel_launch": marks["after_input_kernel"]
                    - marks["before_input_kernel"],
                    "to_graph_launch": marks["before_graph"] - t0,
                    "whole_call": t1 - t0,
                }
            )
    finally:
        prologue.prepare_inputs, torch.cuda.CUDAGraph.replay = real_prepare, real_replay
        del compiled._fill_table
    return {k: 1e6 * sorted(x[k] for x in samples)[len(samples) // 2] for k in samples[0]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2x16,1x128,32x128,128x128")
    parser.add_argument("--iters", type=int, default=100)
    parser.add_argument("--output", default=None, help="a JSON file for the figures")
    args = parser.parse_args(argv)

    from optimum_disc import optimize
    from optimum_disc.benchmark import build_model, resolve_config

    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    cfg = resolve_config("bert-base-multilingual-uncased")
    compiled = optimize(build_model(cfg, "cuda").half(), precision="fp16")
    rows = {}
    print("| shape | call, ms | graph alone, ms | host part of the call, ms |")
    print("|---|---:|---:|---:|")
    for b, s in shapes:
        g = torch.Generator().manual_seed(b * 1000 + s)
        ids = torch.randint(0, cfg.vocab_size, (b, s), generator=g).cuda()
        inputs = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
        compiled._graphs.clear()
        compiled(**inputs)  # compiles, tunes and captures this shape's one graph
        (entry,) = compiled._graphs.values()
        call = _median_ms(lambda c=compiled, x=inputs: c(**x), args.iters)
        alone = _median_ms(entry[2].replay, args.iters)
        stages = _host_stages(compiled, inputs, args.iters)
        rows[f"{b}x{s}"] = {"call_ms": call, "graph_ms": alone, "host_us": stages}
        print(f"| {b} x {s} | {call:.3f} | {alone:.3f} | {call - alone:.3f} |", flush=True)
    print("host time of a call, us (medians):")
    for shape, row in rows.items():
        print(f"  {shape}: " + ", ".join(f"{k} {v:.1f}" for k, v in row["host_us"].items()))
    if args.output:
        with open(args.output, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
