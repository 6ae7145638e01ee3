"""``layer_norm(a + b)`` -> one fused residual-add + LayerNorm; a lone ``layer_norm`` too."""

from __future__ import annotations

import torch

from .. import ops
from ..graph import Graph, is_op, replace, tensor_shape

aten = torch.ops.aten


def fuse_layer_norm(g: Graph) -> Graph:
    for node in list(g.graph.nodes):
        if not is_op(node, aten.layer_norm.default):
            continue
        x, shape = node.args[0], node.args[1]
        weight = node.args[2] if len(node.args) > 2 else None
        bias = node.args[3] if len(node.args) > 3 else None
        eps = node.args[4] if len(node.args) > 4 else 1e-5
        if len(shape) != 1:
            continue
        residual = None
        if (
            is_op(x, aten.add.Tensor)
            and len(x.users) == 1
            and len(x.args) == 2
            and not x.kwargs
            and all(tensor_shape(a) == tensor_shape(x) for a in x.args)
        ):
            x, residual = x.args
        replace(g.graph, node, ops.layer_norm, (x, residual, weight, bias, float(eps)))
    return g.cleanup()
