"""Seconds from nothing to the first call of each shape: export, Triton compilation, GEMM tuning
and CUDA-graph capture, for BERT-base (``bert-base-multilingual-uncased`` configuration, random
weights) in one precision.

    TRITON_CACHE_DIR=$(mktemp -d) python scripts/first_calls.py --shapes 2x16,1x128,8x128
    TRITON_CACHE_DIR=$(mktemp -d) python scripts/first_calls.py --no-warm-up

Run each in a fresh process with an empty Triton cache (as above), or the compilation is not
counted. ``--no-warm-up`` measures the first calls without the runtime's warm-up of a new shape
bucket (every kernel compiled at its first launch, each GEMM tuned when the run reaches it,
compiling its own candidates), for comparison.

Each first call is also split into its parts, by timers around the runtime's steps: the input
kernel (``prepare_inputs``, which compiles it for a new padded length), the warm-up's compile
pool (``compile pool``: submitting every compilation and waiting for the last), the GEMM timing
(``tune``, compilation done), the first run and the graph capture (``run + capture``), and the
rest (``other``: checks, buffers, the output). With ``--compile-times`` every kernel's
compilation is timed on its own thread as well: the longest one bounds the compile pool.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
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
    parser.add_argument(
        "--compile-times", action="store_true", help="time every kernel's compilation"
    )
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
    parts = _time_parts(args.compile_times)
    config = resolve_config(args.config)
    model = build_model(config, "cuda")
    torch.cuda.synchronize()
    start = time.perf_counter()
    compiled = optimize(model, DiscSettings(precision=args.precision))
    torch.cuda.synchronize()
    seconds = {"optimize": time.perf_counter() - start}
    breakdown = {}
    for shape in parse_shapes(args.shapes):
        inputs = shape_inputs(shape, config.vocab_size, "cuda", seed=0)
        parts.clear()
        start = time.perf_counter()
        compiled(**inputs)
        torch.cuda.synchronize()
        name = f"{shape[0]}x{shape[1]}"
        seconds[name] = time.perf_counter() - start
        breakdown[name] = {**parts, "other": seconds[name] - sum(_summed(parts).values())}
    total = sum(seconds.values())
    threads = matmul.compile_threads()
    listed = ", ".join(f"{name} {s:.1f}" for name, s in seconds.items())
    print(f"{args.precision}, {variant}, {threads} compile threads: {total:.1f} s ({listed})")
    for name, found in breakdown.items():
        summed = _summed(found)
        cells = ", ".join(f"{part} {s:.2f}" for part, s in summed.items())
        slowest = found.get("compilations")
        if slowest:
            cells += f"; {len(slowest)} compilations, the longest {max(slowest):.2f} s"
        print(f"  {name}: {cells}")
    if args.output:
        with open(args.output, "a") as f:
            record = {"precision": args.precision, "variant": variant, "threads": threads}
            record.update(total_s=total, seconds=seconds, parts=breakdown)
            f.write(json.dumps(record) + "\n")
    return 0


def _summed(parts: dict) -> dict:
    """The parts of one call in seconds (the list of compilation times left out)."""
    return {k: v for k, v in parts.items() if k != "compilations"}


class _Parts(dict):
    """Seconds per step of one call; a step inside another timed step counts in the outer one."""

    depth = 0

    @contextlib.contextmanager
    def span(self, name: str):
        if self.depth:
            yield
            return
        self.depth += 1
        start = time.perf_counter()
        try:
            yield
        finally:
            torch.cuda.synchronize()
            self[name] = self.get(name, 0.0) + time.perf_counter() - start
            self.depth -= 1

    def wrap(self, name: str, fn):
        @functools.wraps(fn)
        def wrapper(*a, **k):
            with self.span(name):
                return fn(*a, **k)

        return wrapper


def _time_parts(compile_times: bool) -> _Parts:
    """Put timers around the runtime's steps; they add to the returned dict (clear it before
    each call)."""
    from optimum_disc.compiler.runtime import CompiledModel
    from optimum_disc.kernels import matmul, prologue

    parts = _Parts()
    prologue.prepare_inputs = parts.wrap("input kernel", prologue.prepare_inputs)
    real_pool = matmul.compile_pool

    @contextlib.contextmanager
    def compile_pool(*a, **k):
        # The span closes after the pool, so it holds the wait for the last compilation; the
        # tuner's own pool counts in "tune".
        with parts.span("compile pool"), real_pool(*a, **k) as pooled:
            yield pooled

    matmul.compile_pool = compile_pool
    matmul.tune = parts.wrap("tune", matmul.tune)
    real_capture = CompiledModel._capture

    def capture(self, key, inputs):
        # What follows the warm-up (timed in its parts above) is the first run and the capture.
        real_warm_up = self._warm_up
        ended = []

        def warm_up(static):
            real_warm_up(static)
            torch.cuda.synchronize()
            ended.append((time.perf_counter(), parts.get("tune", 0.0)))

        self._warm_up = warm_up
        try:
            entry = real_capture(self, key, inputs)
        finally:
            del self._warm_up
        torch.cuda.synchronize()
        if ended:
            # Without the warm-up the run tunes; that counts in "tune" alone.
            at, tuned = ended[0]
            tuned_since = parts.get("tune", 0.0) - tuned
            parts["run + capture"] = time.perf_counter() - at - tuned_since
        return entry

    CompiledModel._capture = capture
    if compile_times:
        _time_compilations(parts)
    return parts


def _time_compilations(parts: dict) -> None:
    """Time each kernel's compilation (``triton.compile``, on whichever thread runs it) into
    ``parts["compilations"]``, a list of seconds. Kernels that Triton's launcher has bound to the
    compiler before this runs are not seen."""
    import triton.compiler
    import triton.compiler.compiler

    real = triton.compiler.compile

    def compile(*a, **k):
        start = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            parts.setdefault("compilations", []).append(time.perf_counter() - start)

    triton.compiler.compile = compile
    triton.compiler.compiler.compile = compile


if __name__ == "__main__":
    sys.exit(main())
