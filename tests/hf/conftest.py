"""Fixtures of the Hugging Face integration tests (helpers live in hf_helpers.py)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from .hf_helpers import ModelCache


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> ModelCache:
    """``tiny.checkpoint(task)``, ``tiny.model(task)`` (compiled), ``tiny.saved_artifact(task)``."""
    return ModelCache(tmp_path_factory)


@pytest.fixture
def artifact_copy(tiny, tmp_path):
    """A private copy of a saved artifact folder: ``artifact_copy(task) -> Path``."""

    def make(task: str) -> Path:
        target = tmp_path / f"copy-{task}"
        shutil.copytree(tiny.saved_artifact(task), target)
        return target

    return make
