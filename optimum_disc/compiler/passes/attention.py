"""Attention: split heads, ``scaled_dot_product_attention``, merge heads -> one fused op.

Matches ``transpose(view(x, [B, S, heads, d]), 1, 2)`` for each of q, k and v and the inverse
chain after the attention, and replaces the whole by ``ops.attention(q, k, v, mask, heads,
scale)`` over ``[B, S, H]`` tensors, which the attention kernel reads in place.
"""

from __future__ import annotations

import torch

from .. import ops
from ..graph import Graph, is_op, replace, single_user, tensor_shape

aten = torch.ops.aten
_VIEWS = (aten.view.default, aten.reshape.default, aten._unsafe_view.default)


def _is_swap_12(node) -> bool:
    if is_op(node, aten.transpose.int):
        return sorted(d % 4 for d in node.args[1:3]) == [1, 2]
    if is_op(node, aten.permute.default):
        return list(node.args[1]) == [0, 2, 1, 3]
    return False


def _split_heads(node):
    """``x`` if node is x viewed as [B, S, heads, d] with heads and seq swapped, else None."""
    if not _is_swap_12(node):
        return None
    view = node.args[0]
    if not is_op(view, *_VIEWS):
        return None
    src = view.args[0]
    shape = tensor_shape(src)
    if shape is None or len(shape) != 3:
        return None
    return src


def _merge_heads(node):
    """The node that holds the attention output as [B, S, H], following views and the swap."""
    cur = node
    while True:
        nxt = single_user(cur)
        if nxt is None:
            return None
        if is_op(nxt, *_VIEWS) and len(tensor_shape(nxt) or []) == 4:
            cur = nxt
            continue
        if _is_swap_12(nxt):
            out = single_user(nxt)
            if is_op(out, *_VIEWS) and len(tensor_shape(out) or []) == 3:
                return out
        return None


def fuse_attention(g: Graph) -> Graph:
    for node in list(g.graph.nodes):
        if not is_op(node, aten.scaled_dot_product_attention.default):
            continue
        args = list(node.args) + [None] * (8 - len(node.args))
        kw = node.kwargs
        mask = args[3] if args[3] is not None else kw.get("attn_mask")
        if mask is not None and not is_op(mask, ops.padding_mask):
            continue  # not a mask the key-padding pass recognised
        mask = mask.args[0] if mask is not None else None
        dropout = args[4] if args[4] is not None else kw.get("dropout_p", 0.0)
        causal = args[5] if args[5] is not None else kw.get("is_causal", False)
        scale = kw.get("scale", args[6])
        if dropout or causal or kw.get("enable_gqa"):
            continue
        q, k, v = (_split_heads(a) for a in args[:3])
        end = _merge_heads(node)
        if q is None or k is None or v is None or end is None:
            continue
        heads_shape = tensor_shape(node)  # [B, heads, S, d]
        num_heads = int(heads_shape[1])
        replace(g.graph, end, ops.attention, (q, k, v, mask, num_heads, scale))
    return g.cleanup()
