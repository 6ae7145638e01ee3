"""Lowering: the fused FX graph -> a ``Program`` of kernel calls over row buffers.

Every value of the graph is either a ``[B, S, ...]`` tensor (one row per token: layout
``tokens``), a ``[B, ...]`` tensor (one row per sequence: layout ``batch``), a constant (a
weight) or a model input. Kernels see the first two as 2-D row buffers, so the same program runs
on all ``B * S`` positions or on the real tokens only.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from . import ops
from .graph import Graph, tensor_shape
from .program import Buffer, Call, Program


class UnsupportedGraph(ValueError):
    """The graph holds operations that optimum-disc has no kernel or rule for."""


def _describe(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    return (
        f"{node.name} = {target}{tuple(a.name if isinstance(a, fx.Node) else a for a in node.args)}"
    )


def lower(g: Graph) -> Program:
    ids = g.input_node("input_ids")
    if ids is None:
        raise UnsupportedGraph("the graph has no input_ids")
    batch_sym, seq_sym = tensor_shape(ids)[:2]

    def layout(node) -> tuple[str, list[int]]:
        shape = tensor_shape(node)
        if shape is None:
            raise UnsupportedGraph(f"no shape known for {node.name}")
        if len(shape) >= 2 and shape[:2] == [batch_sym, seq_sym]:
            return "tokens", [int(s) for s in shape[2:]]
        if len(shape) >= 1 and shape[0] == batch_sym:
            return "batch", [int(s) for s in shape[1:]]
        raise UnsupportedGraph(f"{node.name} has shape {shape}, neither [B, S, ...] nor [B, ...]")

    weights: dict[str, torch.Tensor] = {}
    refs: dict[fx.Node, str] = {}
    for node in g.placeholders():
        if node.name in g.constants:
            name = g.fqns.get(node.name, node.name)
            weights[name] = g.constants[node.name]
            refs[node] = f"w:{name}"
        else:
            refs[node] = f"p:{node.name}"

    def ref(a):
        if a is None:
            return None
        if a not in refs:
            raise UnsupportedGraph(f"{a.name} is read before any kernel computes it")
        return refs[a]

    calls: list[Call] = []
    buffers: dict[str, Buffer] = {}
    unsupported = []

    def emit(node, kernel, inputs, attrs):
        lay, shape = layout(node)
        dtype = str(node.meta["val"].dtype).removeprefix("torch.")
        buffers[node.name] = Buffer(node.name, lay, shape, dtype)
        calls.append(Call(kernel, node.name, inputs, attrs))
        refs[node] = node.name

    for node in g.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        t, a = node.target, node.args
        if t is ops.embed_layernorm:
            emit(
                node,
                "embed_layernorm",
                {
                    "input_ids": "p:input_ids",
                    "token_type_ids": "p:token_type_ids" if a[1] is not None else None,
                    "word": ref(a[2]),
                    "position": ref(a[3]),
                    "token_type": ref(a[4]),
                    "ln_weight": ref(a[5]),
                    "ln_bias": ref(a[6]),
                    "rows": "p:rows",
                },
                {"eps": float(a[7]), "position_offset": int(a[8])},
            )
        elif t is ops.linear:
            emit(
                node,
                "linear",
                {"x": ref(a[0]), "weight": ref(a[1]), "bias": ref(a[2]), "residual": ref(a[4])},
                {"activation": a[3]},
            )
        elif t is ops.layer_norm:
            emit(
                node,
                "layer_norm",
                {"x": ref(a[0]), "residual": ref(a[1]), "weight": ref(a[2]), "bias": ref(a[3])},
                {"eps": float(a[4])},
            )
        elif t in (ops.attention, ops.attention_packed):
            packed = t is ops.attention_packed
            qkv = [a[0]] * 3 if packed else list(a[:3])
            width = layout(node)[1][0]
            num_heads = int(a[-2])
            emit(
                node,
                "attention",
                {
                    "q": ref(qkv[0]),
                    "k": ref(qkv[1]),
                    "v": ref(qkv[2]),
                    "cu_seqlens": "p:cu_seqlens",
                    "key_valid": "p:key_valid",
                },
                {
                    "num_heads": num_heads,
                    "head_dim": width // num_heads,
                    "scale": float(a[-1]) if a[-1] is not None else (width // num_heads) ** -0.5,
                    "offsets": [0, width, 2 * width] if packed else [0, 0, 0],
                },
            )
        elif t is ops.first_token:
            emit(node, "first_token", {"x": ref(a[0]), "first_rows": "p:first_rows"}, {})
        elif t is ops.pointwise:
            emit(
                node,
                "pointwise",
                {f"in{i}": ref(x) for i, x in enumerate(a[1:])},
                {"expr": a[0]},
            )
        else:
            unsupported.append(_describe(node))
            refs[node] = node.name
    if unsupported:
        listed = "\n  ".join(unsupported[:20])
        raise UnsupportedGraph(
            f"{len(unsupported)} operation(s) of {g.meta.get('model_class', 'the model')} have no "
            f"optimum-disc kernel or rule:\n  {listed}\nPlease open an issue with this list."
        )

    out_node = next(n for n in g.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    outputs = {}
    for field, value in zip(g.output_fields, outs):
        if value not in refs or refs[value].startswith(("w:", "p:")):
            raise UnsupportedGraph(f"output {field} is not computed by a kernel")
        outputs[field] = refs[value]
    used = {r[2:] for c in calls for r in c.inputs.values() if r and r.startswith("w:")}
    program = Program(
        inputs=list(g.inputs),
        calls=calls,
        buffers=buffers,
        outputs=outputs,
        output_class=g.output_class,
        weights={k: v.contiguous() for k, v in weights.items() if k in used},
        meta=dict(g.meta),
    )
    program.check()
    return program
