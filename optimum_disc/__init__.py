"""optimum-disc: Hugging Face encoders compiled to fused Triton GPU kernels.

Example:
    >>> from optimum_disc import DiscModelForSequenceClassification  # doctest: +SKIP
    >>> model = DiscModelForSequenceClassification.from_pretrained(  # doctest: +SKIP
    ...     "nlptown/bert-base-multilingual-uncased-sentiment", export=True, precision="fp16")
"""

from __future__ import annotations

import importlib
import os
import sys

import torch


def _use_triton_interpreter_without_cuda() -> None:
    """With no CUDA device, run every kernel on Triton's CPU interpreter.

    Triton decides between compiling and interpreting when each function is decorated, its own
    library (``tl.sum``...) included. PyTorch's import machinery often loads Triton before this
    package, so Triton's Python modules are dropped from ``sys.modules`` (not its compiled
    extension) and load again, interpreted, the next time they are imported.
    """
    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        return
    os.environ["TRITON_INTERPRET"] = "1"
    for name in [m for m in sys.modules if m == "triton" or m.startswith("triton.")]:
        if not name.startswith("triton._C"):
            del sys.modules[name]


_use_triton_interpreter_without_cuda()

__version__ = "0.1.0"

# Imported on first use, so that `import optimum_disc` stays light (no transformers, no Triton).
_LAZY = {
    "DiscSettings": "optimum_disc.settings",
    "optimize": "optimum_disc.compiler",
    "CompiledModel": "optimum_disc.compiler",
    "DiscModel": "optimum_disc.modeling",
    "DiscModelForSequenceClassification": "optimum_disc.modeling",
    "DiscModelForTokenClassification": "optimum_disc.modeling",
    "DiscModelForQuestionAnswering": "optimum_disc.modeling",
    "DiscModelForMaskedLM": "optimum_disc.modeling",
    "evaluate_model": "optimum_disc.evaluation",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'optimum_disc' has no attribute {name!r}")
