"""Helpers of the Hugging Face integration tests: tiny random BERT checkpoints (one per head),
their tokenizer, models compiled from them, and comparisons.

Compiling takes seconds on Triton's CPU interpreter, so each head is exported once per session
and shared; tests that change a model or its folder work on their own copies. Every checkpoint
is drawn from a fresh seed, recorded on it (``Checkpoint.seed``) and shown in failure messages.
"""

from __future__ import annotations

import contextlib
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import transformers

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

_WORDS = (
    "the a an good bad great terrible movie film story actor plot is was were very not "
    "i you it liked hated loved boring fun who what where paris london lives in city alice "
    "bob eats apples pears today yesterday and but of to"
)
WORDS = _WORDS.split()
VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
TAGS = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}

HEADS = {
    "text-classification": ("BertForSequenceClassification", "DiscModelForSequenceClassification"),
    "feature-extraction": ("BertModel", "DiscModel"),
    "token-classification": ("BertForTokenClassification", "DiscModelForTokenClassification"),
    "question-answering": ("BertForQuestionAnswering", "DiscModelForQuestionAnswering"),
    "fill-mask": ("BertForMaskedLM", "DiscModelForMaskedLM"),
}


def tiny_config(task: str) -> transformers.BertConfig:
    labels = TAGS if task == "token-classification" else LABELS
    if task == "question-answering":
        labels = {0: "start", 1: "end"}
    return transformers.BertConfig(
        vocab_size=99,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        # Larger than BERT's 0.02 so that random heads give well separated scores.
        initializer_range=0.2,
        id2label=dict(labels),
        label2id={v: k for k, v in labels.items()},
    )


def tiny_tokenizer(folder: Path):
    """A WordPiece tokenizer over VOCAB, written into ``folder`` and loaded from it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), model_max_length=64)
    tokenizer.save_pretrained(str(folder))
    return tokenizer


@dataclass
class Checkpoint:
    task: str
    path: Path
    eager: torch.nn.Module
    tokenizer: object
    seed: int

    def __repr__(self) -> str:
        return f"Checkpoint({self.task}, seed={self.seed})"


def disc_class(task: str):
    import optimum_disc.modeling as modeling

    return getattr(modeling, HEADS[task][1])


class ModelCache:
    def __init__(self, factory):
        self.factory = factory
        self.checkpoints: dict[str, Checkpoint] = {}
        self.models: dict[str, object] = {}
        self.saved: dict[str, Path] = {}

    def checkpoint(self, task: str) -> Checkpoint:
        if task not in self.checkpoints:
            seed = random.SystemRandom().randrange(2**31)
            torch.manual_seed(seed)
            cls = getattr(transformers, HEADS[task][0])
            eager = cls(tiny_config(task)).eval()
            path = self.factory.mktemp(f"checkpoint-{task}")
            eager.save_pretrained(str(path))
            tokenizer = tiny_tokenizer(path)
            self.checkpoints[task] = Checkpoint(task, path, eager, tokenizer, seed)
        return self.checkpoints[task]

    def model(self, task: str):
        if task not in self.models:
            ckpt = self.checkpoint(task)
            try:
                self.models[task] = disc_class(task).from_pretrained(
                    ckpt.path, export=True, device=DEVICE
                )
            except Exception as e:  # compile once: later tests see the same error
                self.models[task] = e
        if isinstance(self.models[task], Exception):
            raise self.models[task]
        return self.models[task]

    def saved_artifact(self, task: str) -> Path:
        """A folder with the saved artifact of ``task`` (shared: copy it before changing it)."""
        if task not in self.saved:
            path = self.factory.mktemp(f"artifact-{task}") / "model"
            self.model(task).save_pretrained(path)
            self.saved[task] = path
        return self.saved[task]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str, rel: float = 1e-4):
    """Every element within ``rel`` times the output's scale (at least 1)."""
    actual = actual.detach().float().cpu()
    expected = expected.detach().float().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    tol = rel * max(1.0, expected.abs().max().item())
    err = (actual - expected).abs().max().item()
    assert err <= tol, f"{what}: max abs error {err:.3g} > {tol:.3g}"


def padded_batch(tokenizer, texts, pairs=None):
    return tokenizer(texts, pairs, padding=True, return_tensors="pt")


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def no_warnings():
    """Fail if the ``transformers`` or ``optimum`` loggers record anything at WARNING or above,
    or if any Python warning is raised, inside the block."""
    handler = _Records()
    loggers = [logging.getLogger("transformers"), logging.getLogger("optimum")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.WARNING)
    # transformers' warning_once remembers what it said: forget, so nothing is hidden.
    with contextlib.suppress(AttributeError):
        logging.Logger.warning_once.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(handler)
            lg.setLevel(level)
    logged = [f"{r.name} {r.levelname}: {r.getMessage()}" for r in handler.records]
    assert not logged, f"logged: {logged}"
    raised = [f"{w.category.__name__}: {w.message} ({w.filename}:{w.lineno})" for w in caught]
    assert not raised, f"warnings: {raised}"
