"""The compiler's settings: one dataclass, saved with every compiled artifact."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

PRECISIONS = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class DiscSettings:
    """How a model is compiled and run.

    Example:
        >>> from optimum_disc import DiscSettings
        >>> DiscSettings(precision="fp16").compute_dtype
        torch.float16

    Attributes:
        precision: ``"fp32"`` (true fp32 arithmetic, no TF32), ``"fp16"`` or ``"bf16"`` (weights and
            activations in half precision; matrix products accumulate in fp32, LayerNorm and softmax
            statistics are fp32, and logits come back in fp32).
        remove_padding: run token-wise work on the real tokens only. Outputs at padding positions
            (where ``attention_mask`` is 0) are then zeros instead of the values the original model
            computes there, which no head reads; with ``False`` every position matches the original.
        cuda_graphs: replay launch-bound calls through CUDA graphs captured per shape bucket.
        max_cuda_graphs: how many captured graphs are kept; the least recently used is evicted.
        autotune: time GEMM block shapes (and cuBLAS) on the GPU for each shape bucket, at the
            first call that meets the bucket; the choices are saved with the artifact (per GPU
            model) so a reload on the same GPU does not tune again.
        torch_fallback: operations that no kernel covers (MPNet's relative position bias,
            DeBERTa's disentangled attention, ModernBERT's rotary embeddings...) run as PyTorch ops
            inside the program, and ``compiled.coverage`` says what share of the work our kernels
            do. Such programs keep the padding of each batch. With ``False`` those models are
            refused with a message naming what is missing.
        debug_dir: when set, every stage of the compilation is written there, one file per stage.
            Defaults to the ``OPTIMUM_DISC_DEBUG_DIR`` environment variable.
    """

    precision: str = "fp32"
    remove_padding: bool = True
    cuda_graphs: bool = True
    max_cuda_graphs: int = 32
    autotune: bool = True
    torch_fallback: bool = True
    debug_dir: str | None = None

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"precision={self.precision!r} is not supported; use one of {sorted(PRECISIONS)}."
            )
        if self.max_cuda_graphs < 1:
            raise ValueError(
                f"max_cuda_graphs={self.max_cuda_graphs} must be at least 1; "
                "set cuda_graphs=False to capture none."
            )
        if self.debug_dir is None and os.environ.get("OPTIMUM_DISC_DEBUG_DIR"):
            object.__setattr__(self, "debug_dir", os.environ["OPTIMUM_DISC_DEBUG_DIR"])

    @property
    def compute_dtype(self) -> torch.dtype:
        return PRECISIONS[self.precision]

    def to_dict(self) -> dict:
        """The settings that shape the compiled program (``debug_dir`` is a local choice)."""
        d = dataclasses.asdict(self)
        d.pop("debug_dir")
        return d

    @classmethod
    def from_dict(cls, d: dict) -> DiscSettings:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(
                f"unknown compiler settings {unknown}; known settings are {sorted(known)}. "
                "The artifact may come from a newer optimum-disc: upgrade, or export again."
            )
        return cls(**d)

    def replace(self, **changes) -> DiscSettings:
        return dataclasses.replace(self, **changes)
