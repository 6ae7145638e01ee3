"""Registers, spills and shared memory per thread of the persistent TMA GEMM kernel, compiled for
a GPU architecture without a GPU.

    python scripts/kernel_registers.py --arch 90

For each tile of the TMA candidates (`matmul._TMA_CANDIDATES`), each epilogue of BERT's GEMMs
(bias and residual: attention output and FFN down; bias and GELU: FFN up) and each way out
(through a TMA store, or stored per thread), the kernel is compiled by the installed Triton for
the architecture and assembled with its ``ptxas -v``, which reports the registers and the bytes
of spill stores. A kernel that spills keeps part of its epilogue in local memory; one that needs
more than the SM's shared memory cannot launch. The kernels are loaded without importing
``optimum_disc`` itself, which on a machine without a GPU switches Triton to its interpreter.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import subprocess
import sys
import tempfile
import types
from pathlib import Path


def _matmul():
    """`optimum_disc.kernels.matmul`, its package's __init__ not run (see above)."""
    spec = importlib.util.find_spec("optimum_disc")
    if spec is None:
        raise SystemExit("optimum_disc is not installed: pip install -e . first")
    stub = types.ModuleType("optimum_disc")
    stub.__path__ = list(spec.submodule_search_locations)
    sys.modules["optimum_disc"] = stub
    from optimum_disc.kernels import matmul

    return matmul


def _compile(matmul, arch, tile, residual, tma_store, dtype="fp16", prefetch=False):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    bm, bn, bk, warps, stages = tile
    fn = matmul._linear_tma_kernel
    names = fn.arg_names
    signature = dict.fromkeys(names, "constexpr")
    signature.update(
        x_desc=f"tensordesc<{dtype}[{bm},{bk}]>",
        w_desc=f"tensordesc<{dtype}[{bn},{bk}]>",
        y_desc=f"tensordesc<{dtype}[{bm},{bn}]>",
        b_ptr=f"*{dtype}",
        r_ptr=f"*{dtype}",
        y_ptr=f"*{dtype}",
        w_ptr=f"*{dtype}",
        M="i32",
        N="i32",
        K="i32",
        stride_rm="i32",
        stride_ym="i32",
        stride_wn="i32",
    )
    constexprs = {
        "HAS_BIAS": True,
        "HAS_RESIDUAL": residual,
        "ACTIVATION": 0 if residual else 1,  # GELU without a residual, as FFN up
        "UPCAST": False,
        "BLOCK_M": bm,
        "BLOCK_N": bn,
        "BLOCK_K": bk,
        "GROUP_M": 8,
        "NUM_PROGRAMS": 132,
        "TMA_STORE": tma_store,
        "PDL": True,
        "LET_NEXT_START_AT_END": True,
        "PREFETCH": prefetch,
        "PF_ELEMS": 64,
        "PF_BLOCK": 256,
    }
    source = ASTSource(
        fn, signature, constexprs={(names.index(k),): v for k, v in constexprs.items()}
    )
    target = GPUTarget("cuda", arch, 32)
    return triton.compile(source, target=target, options={"num_warps": warps, "num_stages": stages})


def _ptxas_report(ptx: str, arch: int) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(arch).path
    suffix = "a" if arch >= 90 else ""
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run(
            [ptxas, f"-arch=sm_{arch}{suffix}", "-v", str(src), "-o", str(Path(tmp) / "k.cubin")],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", out).group(1)),
        "spill_store_bytes": int(re.search(r"(\d+) bytes spill stores", out).group(1)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability, e.g. 90")
    parser.add_argument(
        "--prefetch", action="store_true", help="with the L2 prefetch of the weight before the wait"
    )
    parser.add_argument("--output", help="write the table here as JSON")
    args = parser.parse_args(argv)
    matmul = _matmul()
    rows = []
    print("| tile (m x n x k, warps, stages) | epilogue | store | registers | spill stores, B | "
          "shared memory, B |")  # fmt: skip
    print("|---|---|---|---:|---:|---:|")
    for tile in matmul._TMA_CANDIDATES:
        for residual in (True, False):
            for tma_store in (True, False):
                compiled = _compile(
                    matmul, args.arch, tile, residual, tma_store, prefetch=args.prefetch
                )
                row = {
                    "tile": list(tile),
                    "epilogue": "bias + residual" if residual else "bias + GELU",
                    "store": "TMA" if tma_store else "per thread",
                    **_ptxas_report(compiled.asm["ptx"], args.arch),
                    "shared_bytes": compiled.metadata.shared,
                }
                rows.append(row)
                bm, bn, bk, w, s = tile
                print(
                    f"| {bm} x {bn} x {bk}, {w}, {s} | {row['epilogue']} | {row['store']} | "
                    f"{row['registers']} | {row['spill_store_bytes']} | {row['shared_bytes']} |",
                    flush=True,
                )
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
