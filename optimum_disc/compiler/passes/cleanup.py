"""Drop what does nothing at inference: clones, dropout, aliases, whole-tensor slices, no-op
casts and asserts."""

from __future__ import annotations

import torch

from ..graph import Graph, is_op

aten = torch.ops.aten

_IDENTITY = (
    aten.clone.default,
    aten.alias.default,
    aten.detach.default,
    aten.lift_fresh_copy.default,
)
_ASSERTS = (
    aten._assert_tensor_metadata.default,
    aten._assert_scalar.default,
    aten.sym_constrain_range_for_size.default,
)


def _is_noop_cast(node) -> bool:
    if not is_op(node, aten._to_copy.default):
        return False
    src, dst = node.args[0].meta.get("val"), node.meta.get("val")
    return (
        isinstance(src, torch.Tensor)
        and isinstance(dst, torch.Tensor)
        and src.dtype == dst.dtype
        and src.device == dst.device
    )


def _is_full_slice(node) -> bool:
    if not is_op(node, aten.slice.Tensor):
        return False
    args = list(node.args) + [None] * (5 - len(node.args))
    start, end, step = args[2], args[3], args[4]
    return start in (None, 0) and end in (None, 2**63 - 1) and step in (None, 1)


def _is_inference_dropout(node) -> bool:
    return is_op(node, aten.dropout.default) and (node.args[2] is False or node.args[1] == 0.0)


def drop_noops(g: Graph) -> Graph:
    for node in list(g.graph.nodes):
        if is_op(node, *_ASSERTS):
            g.graph.erase_node(node)
        elif (
            is_op(node, *_IDENTITY)
            or _is_noop_cast(node)
            or _is_inference_dropout(node)
            or _is_full_slice(node)
        ):
            node.replace_all_uses_with(node.args[0])
            g.graph.erase_node(node)
    return g.cleanup()
