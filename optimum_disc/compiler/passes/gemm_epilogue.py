"""Every ``linear`` -> the fused GEMM, with what follows it folded into its epilogue: an
activation (exact or tanh GELU, tanh, ReLU), then a residual add of a tensor of the same shape."""

from __future__ import annotations

import torch

from .. import ops
from ..graph import Graph, is_op, replace, single_user, tensor_shape

aten = torch.ops.aten

_ACTIVATIONS = {aten.tanh.default: "tanh", aten.relu.default: "relu"}


def _activation(node):
    if is_op(node, aten.gelu.default):
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu" if approx == "none" else "gelu_tanh"
    if is_op(node, *_ACTIVATIONS):
        return _ACTIVATIONS[node.target]
    return None


def fuse_gemm_epilogue(g: Graph) -> Graph:
    for node in list(g.graph.nodes):
        if not is_op(node, aten.linear.default):
            continue
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else None
        if g.constant(w) is None:
            continue
        end, activation, residual = node, None, None
        nxt = single_user(end)
        act = _activation(nxt) if nxt is not None else None
        if act is not None:
            end, activation = nxt, act
            nxt = single_user(end)
        if is_op(nxt, aten.add.Tensor) and len(nxt.args) == 2 and not nxt.kwargs:
            other = nxt.args[1] if nxt.args[0] is end else nxt.args[0]
            if (
                isinstance(other, type(node))
                and other is not end
                and tensor_shape(other) == tensor_shape(end)
            ):
                end, residual = nxt, other
        replace(g.graph, end, ops.linear, (x, w, b, activation, residual))
    return g.cleanup()
