"""The compiler: capture -> passes -> program -> runtime.

``optimize(model, settings)`` is the whole of it, the counterpart of BladeDISC's
``torch_blade.optimize``.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import torch

from optimum_disc.settings import DiscSettings

from . import ops, torch_ops
from .capture import capture
from .graph import Graph
from .lower import UnsupportedGraph, lower
from .passes.activations import recognise_gelu
from .passes.attention import fuse_attention
from .passes.cleanup import drop_noops
from .passes.columns import split_columns
from .passes.embeddings import fuse_embeddings
from .passes.first_token_rows import first_token_rows
from .passes.gemm_epilogue import fuse_gemm_epilogue
from .passes.key_padding_mask import key_padding_mask
from .passes.layer_norm import fuse_layer_norm
from .passes.merge_qkv import merge_qkv
from .passes.pointwise import fuse_pointwise
from .passes.pooler import fuse_first_token
from .passes.positions import padded_positions
from .passes.precision import apply_precision
from .program import Program
from .runtime import CompiledModel

__all__ = ["optimize", "CompiledModel", "Program", "UnsupportedGraph", "PASSES", "DiscSettings"]

logger = logging.getLogger(__name__)

# Order matters: attention is matched before its projections merge, the GEMM epilogue takes
# residual adds before LayerNorm fusion looks for them, column splits of a GEMM's output need the
# fused GEMM, and the last layer shrinks to the first token once every op of it is fused.
PASSES = (
    drop_noops,
    key_padding_mask,
    padded_positions,
    fuse_attention,
    merge_qkv,
    recognise_gelu,
    fuse_gemm_epilogue,
    split_columns,
    fuse_layer_norm,
    fuse_embeddings,
    fuse_first_token,
    fuse_pointwise,
    first_token_rows,
)


def run_passes(g: Graph, dump=None) -> Graph:
    for i, p in enumerate(PASSES, start=1):
        g = p(g)
        if dump:
            dump(f"{i:02d}_after_{p.__name__}.py", g.gm.code)
    return g


def coverage(
    program: Program, graph_before: Graph, graph_after: Graph | None = None, tokens: int = 128
) -> dict:
    """Which ops ran where, and the share of FLOPs in our kernels, for one sequence of
    ``tokens`` tokens (matrix products and attention; the rest is memory-bound). Matrix
    products left to ``torch`` calls count against the share."""
    flops: dict[str, float] = {}
    for call in program.calls:
        if call.kernel == "linear":
            n, k = program.weights[call.inputs["weight"][2:]].shape
            rows = tokens if program.buffers[call.output].layout == "tokens" else 1
            f = 2.0 * rows * n * k
        elif call.kernel == "attention":
            width = call.attrs["num_heads"] * call.attrs["head_dim"]
            queries = 1 if call.attrs.get("first_only") else tokens
            f = 4.0 * queries * tokens * width
        else:
            f = 0.0
        flops[call.kernel] = flops.get(call.kernel, 0.0) + f
    aten_ops: dict[str, int] = {}
    for n in graph_before.graph.nodes:
        if n.op == "call_function":
            name = getattr(n.target, "__name__", str(n.target))
            aten_ops[name] = aten_ops.get(name, 0) + 1
    kernels: dict[str, int] = {}
    for call in program.calls:
        kernels[call.kernel] = kernels.get(call.kernel, 0) + 1
    total = sum(v for k, v in flops.items() if k != "torch")
    fallback_flops = 0.0
    if graph_after is not None and "torch" in kernels:
        ids = graph_after.input_node("input_ids")
        b, s = (str(d) for d in ids.meta["val"].shape[:2])
        sizes = {"B": 1, "S": tokens, "names": {b: "B", s: "S"}}
        calls = {c.output for c in program.calls if c.kernel == "torch"}
        for n in graph_after.graph.nodes:
            if n.op == "call_function" and n.name in calls:
                fallback_flops += torch_ops.matmul_flops(n, sizes)
    flops.pop("torch", None)
    if fallback_flops:
        flops["torch"] = fallback_flops
    everything = total + fallback_flops
    return {
        "captured_ops": aten_ops,
        "kernel_calls": kernels,
        "fallback_ops": dict(program.meta.get("torch_ops", {})),
        "flops_per_kernel": flops,
        "flops_in_our_kernels": total,
        "flops_share_in_our_kernels": total / everything if everything else 0.0,
        "tokens_assumed": tokens,
    }


def optimize(
    model: torch.nn.Module,
    settings: DiscSettings | None = None,
    *,
    example_inputs: dict[str, torch.Tensor] | None = None,
    **overrides,
) -> CompiledModel:
    """Compile a transformers encoder into a program of fused Triton kernels.

    Args:
        model: a transformers model in eval mode (``BertModel``, ``BertForSequenceClassification``
            and the other BERT-style heads), on the device it will run on.
        settings: a ``DiscSettings``; keyword overrides (``precision="fp16"``...) apply on top.
        example_inputs: optional inputs to trace with; random ones are built from the config.

    Returns:
        A ``CompiledModel`` with the model's forward signature and output type, for every batch
        size and every sequence length up to ``max_position_embeddings``.

    Example:
        >>> import transformers
        >>> from optimum_disc import optimize
        >>> cfg = transformers.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=1,
        ...     num_attention_heads=2, intermediate_size=37, max_position_embeddings=64)
        >>> compiled = optimize(transformers.BertModel(cfg).eval(), precision="fp32")
        >>> print(compiled.code.splitlines()[0])
        def program(input_ids: i64[B, S], attention_mask: i64[B, S], token_type_ids: i64[B, S]):
    """
    settings = (
        (settings or DiscSettings()).replace(**overrides)
        if overrides
        else (settings or DiscSettings())
    )
    started = time.perf_counter()
    dump = _dumper(settings.debug_dir)
    captured = capture(model, example_inputs)
    if dump:
        dump("00_captured.py", captured.gm.code)
    before = captured.copy()
    g = run_passes(captured, dump)
    program = lower(g, allow_torch=settings.torch_fallback)
    program = apply_precision(program, settings.compute_dtype)
    program.meta["settings"] = settings.to_dict()
    report = coverage(program, before, g)
    device = next(model.parameters()).device
    compiled = CompiledModel(program, settings, device=device, coverage=report)
    if dump:
        dump("10_program.txt", program.code())
        dump("11_program.json", program.to_json())
        dump("12_coverage.json", json.dumps(report, indent=1))
        _dump_kernels(dump, program)
    logger.info(
        "compiled %s: %d kernel calls in %.1f s",
        type(model).__name__,
        len(program.calls),
        time.perf_counter() - started,
    )
    return compiled


def _dumper(directory: str | None):
    if not directory:
        return None
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)

    def dump(name: str, text: str) -> None:
        target = path / name
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, target)

    return dump


def _dump_kernels(dump, program: Program) -> None:
    """The Triton sources the program runs: the generated pointwise kernels and the fixed
    kernel families."""
    import inspect

    from optimum_disc.kernels import attention, embedding, layernorm, matmul, pointwise

    families = {
        "linear": matmul,
        "layer_norm": layernorm,
        "embed_layernorm": embedding,
        "attention": attention,
    }
    used = {c.kernel for c in program.calls}
    for name, module in families.items():
        if name in used:
            dump(f"kernels/{name}.py", inspect.getsource(module))
    for i, call in enumerate(c for c in program.calls if c.kernel == "pointwise"):
        dump(
            f"kernels/pointwise_{i}_{call.output}.py",
            pointwise.pointwise_source(call.attrs["expr"]),
        )
    dump("13_kernel_choices.json", json.dumps(program.tuning, indent=1, sort_keys=True))


_ = ops  # the fused ops are part of the compiler's surface for tests and passes
