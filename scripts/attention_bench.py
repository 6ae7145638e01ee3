"""The attention kernel alone, launch configurations side by side, at BERT-base's shapes.

    python scripts/attention_bench.py --dtype float32 --shapes 2x16,1x128,8x128,8x512

For each dtype and batch x sequence shape, the packed QKV buffer of BERT-base (12 heads of 64
channels, every sequence full length, as the model passes it once padding is removed) is
attended with every (BLOCK_M, BLOCK_N, num_warps, num_stages) of the grid, and the shipped
choice (`attention._launch_config`) is marked. A shape ``BxSrA`` (e.g. ``64x80r27``, a batch of
the movie-review pass) has sequences of different lengths: one of S tokens, the others drawn at
random (fixed seed) between 4 and S around a mean of A, packed as the model packs them. Each
configuration is captured in a CUDA graph of back-to-back launches whose replays are timed, so
the figure is per launch without the host, as inside the model's graph. Configurations that do
not compile are reported as such."""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import sys

import torch

HIDDEN, HEADS = 768, 12
LAUNCHES = 20


def _grid(dtype: torch.dtype) -> list[tuple[int, int, int, int]]:
    if dtype == torch.float32:
        blocks = [(16, 16), (16, 32), (32, 16), (32, 32), (64, 32), (64, 64)]
        warps, stages = (2, 4, 8), (1, 2)
    else:
        blocks = [(16, 16), (16, 64), (32, 32), (32, 64), (64, 32), (64, 64), (128, 64)]
        warps, stages = (4, 8), (2, 3)
    return [(bm, bn, w, s) for (bm, bn), w, s in itertools.product(blocks, warps, stages)]


def _lengths(shape: str) -> tuple[int, int, list[int]]:
    """``"8x128"`` -> (8, 128, [128] * 8); ``"64x80r27"`` -> 64 lengths, the first 80, the others
    drawn between 4 and 80 around a mean of 27 (seed 0)."""
    batch, rest = shape.split("x")
    batch = int(batch)
    if "r" not in rest:
        return batch, int(rest), [int(rest)] * batch
    seq, mean = (int(v) for v in rest.split("r"))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        drawn = torch.distributions.Exponential(1.0 / max(mean - 4, 1)).sample((batch - 1,))
    others = [min(seq, 4 + int(d)) for d in drawn.tolist()]
    return batch, seq, [seq, *others]


def _time(fn, device) -> float:
    """Milliseconds per launch: a CUDA graph of LAUNCHES launches, median of 10 replays."""
    from optimum_disc.kernels.matmul import _time_in_graph

    def launches():
        for _ in range(LAUNCHES):
            fn()

    return _time_in_graph(launches, device, replays=10) / LAUNCHES


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", default="float32,float16")
    parser.add_argument("--shapes", default="2x16,1x128,8x128,32x128,8x512")
    parser.add_argument("--output", default=None, help="JSON file for every timing")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_bench.py times CUDA kernels; no CUDA device here.", file=sys.stderr)
        return 2
    from triton.compiler.errors import CompilationError
    from triton.runtime.errors import OutOfResources

    from optimum_disc.kernels import attention as attn

    device = torch.device("cuda")
    shipped_config = attn._launch_config
    results = []
    for name in args.dtype.split(","):
        dtype = getattr(torch, name)
        for shape in args.shapes.split(","):
            batch, seq, lengths = _lengths(shape)
            rows = sum(lengths)
            qkv = torch.randn(rows, 3 * HIDDEN, device=device).to(dtype)
            q, k, v = qkv[:, :HIDDEN], qkv[:, HIDDEN : 2 * HIDDEN], qkv[:, 2 * HIDDEN :]
            cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device=device)
            out = torch.empty(rows, HIDDEN, dtype=dtype, device=device)
            shipped = shipped_config(64, dtype, seq, batch * HEADS)
            args_ = (q, k, v, cu, seq, HEADS, 64, 0.125)
            timed = []
            for cfg in _grid(dtype) + ([shipped] if shipped not in _grid(dtype) else []):
                attn._launch_config = lambda *a, cfg=cfg: cfg
                try:
                    ms = _time(
                        functools.partial(attn.attention, *args_, out=out),
                        device,
                    )
                except (CompilationError, OutOfResources, RuntimeError) as exc:
                    timed.append({"config": cfg, "ms": None, "error": type(exc).__name__})
                    continue
                finally:
                    attn._launch_config = shipped_config
                timed.append({"config": cfg, "ms": ms})
            ok = sorted((t for t in timed if t["ms"] is not None), key=lambda t: t["ms"])
            ship = next(t for t in timed if t["config"] == shipped)
            print(f"{name} {shape}: shipped {shipped} {ship['ms'] * 1e3:.1f} us; best:")
            for t in ok[:5]:
                print(f"   {t['config']} {t['ms'] * 1e3:.1f} us")
            results.append({"dtype": name, "shape": shape, "shipped": shipped, "timed": timed})
    if args.output:
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
        with open(args.output, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
