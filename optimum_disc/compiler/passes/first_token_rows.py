"""The last layer on the first token only, when the first token is all the model reads of it.

A head that pools the first token (BERT's pooler, RoBERTa's and ELECTRA's classification heads)
reads one row per sequence of the last layer's output. Attention is the only op of a layer that
mixes rows, and it needs every row as a key and a value, but only the first row as a query. So
everything from the last attention to the pooling can run on one row per sequence:

    attention(q, k, v)                 -> attention_first(q, k, v)       [B, H], first queries
    linear(x, ..., residual=h)         -> linear(x', ..., residual=h[:, 0])
    layer_norm(...), linear(...), ...  -> the same ops over [B, H]
    first_token(last)                  -> last'

The rows given up are exactly those no output reads, so the result is the same function. In
BERT-base this is most of a layer's work (the attention output projection, the feed-forward
network, two LayerNorms and the attention's queries): about a twelfth of a call at many tokens.

The rewritten region is the set of row-wise nodes (``linear``, ``layer_norm``) and attention
nodes, found walking up from the pooling, whose every user is in the region or the pooling
itself; row inputs from outside it (the residual stream) are gathered with ``first_token``. The
pass applies only when the region holds an attention node, where the work saved is most of a
layer; in the BERT family the one gather it adds (the residual into the attention output
projection) takes the place of the pooling's own.
"""

from __future__ import annotations

import torch.fx as fx

from .. import ops
from ..graph import Graph, is_op, tensor_shape

_ROW_OPS = (ops.linear, ops.layer_norm)
_ATTENTION = {ops.attention: ops.attention_first, ops.attention_packed: ops.attention_packed_first}


def _first_rows_val(node: fx.Node):
    """The value metadata of ``node[:, 0]``."""
    val = node.meta.get("val")
    return val.select(1, 0) if val is not None else None


def first_token_rows(g: Graph) -> Graph:
    pools = [n for n in g.graph.nodes if is_op(n, ops.first_token)]
    if len(pools) != 1:
        return g
    (pool,) = pools
    ids = g.input_node("input_ids")
    if ids is None:
        return g
    tokens = tensor_shape(ids)[:2]

    def is_tokens(node) -> bool:
        shape = tensor_shape(node)
        return shape is not None and len(shape) == 3 and shape[:2] == tokens

    region: set[fx.Node] = set()
    reached = {pool.args[0]}
    for node in reversed(list(g.graph.nodes)):
        if node not in reached or not is_tokens(node):
            continue
        if not (is_op(node, *_ROW_OPS) or is_op(node, *_ATTENTION)):
            continue
        if not all(u is pool or u in region for u in node.users):
            continue
        region.add(node)
        if is_op(node, *_ROW_OPS):
            # linear(x, w, b, act, residual) and layer_norm(x, residual, w, b, eps): the row
            # inputs are x and residual; the rest are weights and constants.
            rows = (node.args[0], node.args[4]) if node.target is ops.linear else node.args[:2]
            reached.update(a for a in rows if isinstance(a, fx.Node))
    if not any(is_op(n, *_ATTENTION) for n in region):
        return g

    new: dict[fx.Node, fx.Node] = {}
    gathered: dict[fx.Node, fx.Node] = {}

    def first_rows(a):
        if not isinstance(a, fx.Node):
            return a
        if a in new:
            return new[a]
        if not is_tokens(a):
            return a  # a weight or a constant
        if a not in gathered:
            node = g.graph.call_function(ops.first_token, (a,))
            node.meta["val"] = _first_rows_val(a)
            gathered[a] = node
        return gathered[a]

    with g.graph.inserting_before(pool):
        for node in [n for n in g.graph.nodes if n in region]:
            if node.target in _ATTENTION:
                args = node.args  # queries, keys and values stay [B, S, ...]
                target = _ATTENTION[node.target]
            else:
                rows = (0, 4) if node.target is ops.linear else (0, 1)
                args = tuple(first_rows(a) if i in rows else a for i, a in enumerate(node.args))
                target = node.target
            copy = g.graph.call_function(target, args, dict(node.kwargs))
            copy.meta["val"] = _first_rows_val(node)
            new[node] = copy
    pool.replace_all_uses_with(new[pool.args[0]])
    g.graph.erase_node(pool)
    return g.cleanup()
