"""``optimum-disc export`` and ``optimum-cli export disc``: compile a checkpoint into a folder.

Example:
    optimum-cli export disc --model google-bert/bert-base-uncased --precision fp16 bert_disc/

The folder holds the compiled artifact (see ``optimum_disc.artifact``); load it with
``DiscModelFor<Task>.from_pretrained(folder)``. transformers and the compiler are imported in
``run`` only, so that listing the commands stays fast.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

TASKS = (
    "text-classification",
    "feature-extraction",
    "token-classification",
    "question-answering",
    "fill-mask",
)
ALIASES = ("sentiment-analysis", "ner")
PRECISIONS = ("fp32", "fp16", "bf16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-m",
        "--model",
        required=True,
        help="a Hub model id (org/name) or the folder of a transformers checkpoint",
    )
    parser.add_argument("output", type=Path, help="the folder to write the compiled model to")
    parser.add_argument(
        "--task",
        default="auto",
        choices=("auto", *TASKS, *ALIASES),
        help="the model's task; 'auto' (default) reads it from the checkpoint's architectures",
    )
    parser.add_argument("--precision", default="fp32", choices=PRECISIONS)
    parser.add_argument(
        "--device", default=None, help="device to compile and tune on (default: cuda if present)"
    )
    parser.add_argument(
        "--keep-padding",
        action="store_true",
        help="compute padding positions too (default: real tokens only)",
    )
    parser.add_argument("--no-cuda-graphs", action="store_true", help="do not use CUDA graphs")
    parser.add_argument("--max-cuda-graphs", type=int, default=None, help="CUDA graphs to keep")
    parser.add_argument(
        "--no-autotune", action="store_true", help="use default GEMM block shapes, tune nothing"
    )
    parser.add_argument("--revision", default=None, help="branch, tag or commit of the checkpoint")
    parser.add_argument("--subfolder", default="", help="subfolder of the checkpoint")
    parser.add_argument("--cache-dir", default=None, help="Hugging Face cache folder")
    parser.add_argument("--token", default=None, help="Hugging Face token for private models")
    parser.add_argument("--local-files-only", action="store_true", help="do not download")
    parser.add_argument(
        "--trust-remote-code", action="store_true", help="allow the checkpoint's own code"
    )


def run(args: argparse.Namespace) -> int:
    from transformers import AutoConfig

    from optimum_disc.modeling import TASK_TO_CLASS, infer_task, normalize_task

    hub = {
        "revision": args.revision,
        "subfolder": args.subfolder,
        "cache_dir": args.cache_dir,
        "token": args.token,
        "local_files_only": args.local_files_only,
        "trust_remote_code": args.trust_remote_code,
    }
    settings = {"precision": args.precision}
    if args.keep_padding:
        settings["remove_padding"] = False
    if args.no_cuda_graphs:
        settings["cuda_graphs"] = False
    if args.max_cuda_graphs is not None:
        settings["max_cuda_graphs"] = args.max_cuda_graphs
    if args.no_autotune:
        settings["autotune"] = False
    try:
        if args.task == "auto":
            config = AutoConfig.from_pretrained(
                args.model, **{k: v for k, v in hub.items() if v not in (None, "")}
            )
            task = infer_task(config)
            print(f"task: {task} (from the checkpoint's architectures; --task to choose)")
        else:
            task = normalize_task(args.task)
        cls = TASK_TO_CLASS[task]
        model = cls.from_pretrained(args.model, export=True, device=args.device, **hub, **settings)
        model.save_pretrained(args.output)
    except (ValueError, OSError) as e:
        print(f"optimum-disc export: error: {e}", file=sys.stderr)
        return 1
    share = model.coverage.get("flops_share_in_our_kernels")
    coverage = f"; {share:.0%} of the FLOPs in optimum-disc kernels" if share is not None else ""
    print(f"saved {cls.__name__} ({args.precision}) to {args.output}{coverage}")
    return 0
