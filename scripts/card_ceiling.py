"""The card's ceilings that the floors of docs/performance.md are computed from, measured here.

    python scripts/card_ceiling.py --rows 1024,1700,2048,16384 --output ceiling.json

- the fp16 matrix product at 8,192 x 8,192 x 8,192 through cuBLAS (``torch.matmul``);
- cuBLAS's fp16 ``linear`` (no epilogue) at BERT-base's four projections for each row count, the
  best a GEMM of that shape is known to run at on this card;
- a device-to-device copy of 256 MiB (bytes read plus written per second), the ceiling of the
  memory-bound kernels (LayerNorm, the residual adds);
- a chain of Triton kernels that do no work (each waits for the one before, as this package's
  kernels do under PDL, then copies one value per program), one program or one per SM: the
  time a call spends per kernel of a kernel-per-operation program, whatever its kernels do.

Each is a CUDA graph of back-to-back launches, replayed and timed with CUDA events as the GEMM
tuner times its candidates; the median of the replays is reported. Operands stay in L2 where
they fit, so these are upper bounds.
"""

from __future__ import annotations

import argparse
import json
import sys

import torch
import triton
import triton.language as tl

from optimum_disc.kernels import launch

PROJECTIONS = (
    ("qkv", 2304, 768),
    ("attn out", 768, 768),
    ("ffn up", 3072, 768),
    ("ffn down", 768, 3072),
)


def _time_us(fn, launches: int = 20) -> float:
    """Microseconds per call of ``fn``, from a CUDA graph of ``launches`` calls (the tuner's
    timing, `matmul._time_in_graph`: the median of its replays)."""
    from optimum_disc.kernels.matmul import _time_in_graph

    def calls():
        for _ in range(launches):
            fn()

    return _time_in_graph(calls, torch.device("cuda")) * 1000 / launches


def _matmul_tflops(n: int, device: torch.device) -> float:
    a = torch.randn(n, n, device=device, dtype=torch.float16)
    b = torch.randn(n, n, device=device, dtype=torch.float16)
    c = torch.empty(n, n, device=device, dtype=torch.float16)
    return 2 * n**3 / _time_us(lambda: torch.matmul(a, b, out=c), launches=5) / 1e6


def _copy_tb_per_s(size: int, device: torch.device) -> float:
    src = torch.empty(size, device=device, dtype=torch.uint8)
    dst = torch.empty_like(src)
    return 2 * size / _time_us(lambda: dst.copy_(src), launches=10) / 1e6


@triton.jit
def _step(x_ptr, y_ptr, PDL: tl.constexpr):
    if PDL:
        launch.wait_for_previous()
    i = tl.program_id(0)
    tl.store(y_ptr + i, tl.load(x_ptr + i) + 1.0)


def _chain_us(programs: int, device: torch.device) -> dict:
    """Microseconds per kernel of a chain of kernels that wait for the previous one and copy
    one value per program, with PDL (as this package launches) and without."""
    a = torch.zeros(programs, device=device)
    b = torch.zeros(programs, device=device)
    found = {}
    for pdl, options in (("pdl", launch.options(device)), ("no pdl", {"PDL": False})):

        def chain(options=options):
            for _ in range(42):  # 84 kernels, as a BERT-base call of 12 layers x 7
                _step[(programs,)](a, b, **options)
                _step[(programs,)](b, a, **options)

        found[pdl] = _time_us(chain, launches=5) / 84
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1024,1700,2048,16384")
    parser.add_argument("--output", help="write the figures here as JSON")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    rows = [int(r) for r in args.rows.split(",") if r]
    device = torch.device("cuda")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}

    result["matmul_8192_tflops"] = _matmul_tflops(8192, device)
    result["copy_tb_per_s"] = _copy_tb_per_s(256 << 20, device)
    result["chain_us_per_kernel"] = {p: _chain_us(p, device) for p in (1, 132)}

    print(
        f"{result['device']}: fp16 matmul 8192^3 {result['matmul_8192_tflops']:.0f} TFLOP/s, "
        f"copy {result['copy_tb_per_s']:.2f} TB/s (read + written)"
    )
    for programs, found in result["chain_us_per_kernel"].items():
        print(
            f"chain of kernels doing nothing, {programs} program(s): "
            + ", ".join(f"{k} {v:.2f} us per kernel" for k, v in found.items())
        )
    print("| rows | " + " | ".join(f"{p[0]}, us (TFLOP/s)" for p in PROJECTIONS) + " |")
    print("|---:|" + "---:|" * len(PROJECTIONS))
    result["linear"] = []
    for m in rows:
        cells = []
        for name, out_features, in_features in PROJECTIONS:
            x = torch.randn(m, in_features, device=device, dtype=torch.float16)
            w = torch.randn(out_features, in_features, device=device, dtype=torch.float16)
            y = torch.empty(m, out_features, device=device, dtype=torch.float16)
            us = _time_us(lambda x=x, w=w, y=y: torch.matmul(x, w.t(), out=y))
            tflops = 2 * m * out_features * in_features / us / 1e6
            result["linear"].append({"rows": m, "projection": name, "us": us, "tflops": tflops})
            cells.append(f"{us:.1f} ({tflops:.0f})")
        print(f"| {m} | " + " | ".join(cells) + " |")
    if args.output:
        with open(args.output, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
