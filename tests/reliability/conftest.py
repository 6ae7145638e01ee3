"""Models of the reliability tests, compiled once per session (compiling takes seconds on
Triton's CPU interpreter); tests that change a model or a folder work on their own copies.
Every model is drawn from a fresh seed, shown in its repr and so in failure messages."""

from __future__ import annotations

import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import transformers

from optimum_disc import DiscSettings, optimize
from optimum_disc.compiler import CompiledModel

from .helpers import DEVICE, TINY, tiny_tokenizer


@dataclass
class Compiled:
    eager: torch.nn.Module
    compiled: CompiledModel
    remove_padding: bool
    seed: int

    def __repr__(self) -> str:
        return f"Compiled(remove_padding={self.remove_padding}, seed={self.seed})"


@dataclass
class Classifier:
    """A checkpoint with a tokenizer, its eager model and its DiscModelForSequenceClassification."""

    path: Path
    eager: torch.nn.Module
    tokenizer: object
    disc: object
    seed: int

    def __repr__(self) -> str:
        return f"Classifier(seed={self.seed})"


def _seed() -> int:
    seed = random.SystemRandom().randrange(2**31)
    torch.manual_seed(seed)
    return seed


@pytest.fixture(scope="session")
def base_eager():
    seed = _seed()
    model = transformers.BertModel(transformers.BertConfig(**TINY)).eval().to(DEVICE)
    return model, seed


@pytest.fixture(scope="session")
def base(base_eager) -> Compiled:
    """BertModel compiled in fp32 with padding removed (the default)."""
    model, seed = base_eager
    return Compiled(model, optimize(model, DiscSettings(precision="fp32")), True, seed)


@pytest.fixture(scope="session")
def base_padded(base_eager) -> Compiled:
    """The same BertModel compiled with remove_padding=False: every position computed."""
    model, seed = base_eager
    settings = DiscSettings(precision="fp32", remove_padding=False)
    return Compiled(model, optimize(model, settings), False, seed)


@pytest.fixture(scope="session")
def classifier(tmp_path_factory) -> Classifier:
    from optimum_disc.modeling import DiscModelForSequenceClassification

    seed = _seed()
    labels = {0: "negative", 1: "neutral", 2: "positive"}
    config = transformers.BertConfig(
        **TINY, id2label=labels, label2id={v: k for k, v in labels.items()}
    )
    eager = transformers.BertForSequenceClassification(config).eval()
    path = tmp_path_factory.mktemp("checkpoint")
    eager.save_pretrained(str(path))
    tokenizer = tiny_tokenizer(path)
    disc = DiscModelForSequenceClassification.from_pretrained(path, export=True, device=DEVICE)
    return Classifier(path, eager.to(DEVICE), tokenizer, disc, seed)


@pytest.fixture(scope="session")
def saved(classifier, tmp_path_factory) -> Path:
    """The classifier's saved artifact (shared: copy it before changing it)."""
    path = tmp_path_factory.mktemp("artifact") / "model"
    classifier.disc.save_pretrained(path)
    return path


@pytest.fixture
def artifact_copy(saved, tmp_path) -> Path:
    """A private copy of the saved artifact."""
    target = tmp_path / "model"
    shutil.copytree(saved, target)
    return target
