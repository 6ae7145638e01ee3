"""``hidden[:, 0]`` (the first-token pooling of BERT-style poolers) -> ``ops.first_token``."""

from __future__ import annotations

import torch

from .. import ops
from ..graph import Graph, is_op, replace, tensor_shape

aten = torch.ops.aten


def fuse_first_token(g: Graph) -> Graph:
    for node in list(g.graph.nodes):
        if is_op(node, aten.select.int) and node.args[1] == 1 and node.args[2] == 0:
            shape = tensor_shape(node.args[0])
            if shape is not None and len(shape) == 3:
                replace(g.graph, node, ops.first_token, (node.args[0],))
    return g.cleanup()
