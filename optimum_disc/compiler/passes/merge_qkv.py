"""Q, K and V projections of one input -> one GEMM with the three weights side by side."""

from __future__ import annotations

import torch

from .. import ops
from ..graph import Graph, is_op, replace

aten = torch.ops.aten


def _plain_linear(g: Graph, node):
    """(input, weight, bias) of an un-fused linear over constants, else None."""
    if is_op(node, aten.linear.default) and len(node.users) == 1:
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        if g.constant(w) is not None and (b is None or g.constant(b) is not None):
            return x, w, b
    return None


def _common_prefix(names: list[str]) -> str:
    parts = [n.split(".") for n in names]
    prefix = []
    for segs in zip(*parts):
        if len(set(segs)) != 1:
            break
        prefix.append(segs[0])
    return ".".join(prefix)


def _packed_weights(g: Graph, lins):
    """New constants holding the q, k and v weights (and biases) side by side."""
    weight = torch.cat([g.constant(lin[1]) for lin in lins])
    biases = [g.constant(lin[2]) if lin[2] is not None else None for lin in lins]
    if any(b is None for b in biases) and not all(b is None for b in biases):
        biases = [
            b if b is not None else torch.zeros(w.shape[0], dtype=weight.dtype)
            for b, w in zip(biases, (g.constant(lin[1]) for lin in lins))
        ]
    bias = None if all(b is None for b in biases) else torch.cat(biases)
    prefix = _common_prefix([g.fqns[lin[1].name] for lin in lins])
    w_node = g.add_constant("qkv_weight", weight, f"{prefix}.qkv.weight")
    b_node = g.add_constant("qkv_bias", bias, f"{prefix}.qkv.bias") if bias is not None else None
    return w_node, b_node


def merge_qkv(g: Graph) -> Graph:
    # Layers that share their weights (ALBERT) share one packed weight too.
    packed_weights: dict[tuple, tuple] = {}
    for node in list(g.graph.nodes):
        if not is_op(node, ops.attention):
            continue
        q, k, v, mask, num_heads, scale = node.args
        lins = [_plain_linear(g, t) for t in (q, k, v)]
        if None in lins or len({lin[0] for lin in lins}) != 1:
            continue
        x = lins[0][0]
        key = tuple(lin[i] for lin in lins for i in (1, 2))
        if key not in packed_weights:
            packed_weights[key] = _packed_weights(g, lins)
        w_node, b_node = packed_weights[key]
        with g.graph.inserting_before(node):
            packed = g.graph.call_function(aten.linear.default, (x, w_node, b_node))
        val = q.meta.get("val")
        if isinstance(val, torch.Tensor):
            packed.meta["val"] = torch.cat([val, val, val], dim=-1)
        replace(g.graph, node, ops.attention_packed, (packed, mask, num_heads, scale))
        g.graph.erase_node(node)
    return g.cleanup()
