"""Word + position + token-type embeddings and their LayerNorm -> one kernel.

Looks for a fused LayerNorm whose input is a sum of ``embedding`` lookups indexed by
``input_ids``, ``token_type_ids`` and a slice of a constant that holds ``0, 1, 2, ...`` (the
position ids buffer of BERT-style models) or ``ops.padded_positions`` (RoBERTa-style positions,
see the positions pass).
"""

from __future__ import annotations

import torch

from .. import ops
from ..graph import Graph, is_op, replace

aten = torch.ops.aten


def _addends(node, out):
    if is_op(node, aten.add.Tensor) and len(node.users) == 1 and len(node.args) == 2:
        for a in node.args:
            _addends(a, out)
    else:
        out.append(node)
    return out


def _position_offset(g: Graph, index) -> int | None:
    """The offset if ``index`` is positions offset..offset+S-1 taken from a constant, else None."""
    if not is_op(index, aten.slice.Tensor):
        return None
    src, dim = index.args[0], index.args[1]
    start = index.args[2] if len(index.args) > 2 and index.args[2] is not None else 0
    table = g.constant(src)
    if table is None or dim != table.dim() - 1 or not isinstance(start, int):
        return None
    row = table.reshape(-1, table.shape[-1])[0]
    expected = torch.arange(row.numel(), device=row.device, dtype=row.dtype)
    if not torch.equal(row, expected):
        return None
    return start


def fuse_embeddings(g: Graph) -> Graph:
    ids, types = g.input_node("input_ids"), g.input_node("token_type_ids")
    for node in list(g.graph.nodes):
        if not is_op(node, ops.layer_norm):
            continue
        x, residual, weight, bias, eps = node.args
        terms = _addends(x, []) + (_addends(residual, []) if residual is not None else [])
        word = position = token_type = padding_idx = None
        offset = 0
        for t in terms:
            if not is_op(t, aten.embedding.default) or g.constant(t.args[0]) is None:
                break
            table, index = t.args[0], t.args[1]
            if index is ids and ids is not None and word is None:
                word = table
            elif index is types and types is not None and token_type is None:
                token_type = table
            elif position is None and (off := _position_offset(g, index)) is not None:
                position, offset = table, off
            elif position is None and is_op(index, ops.padded_positions) and index.args[0] is ids:
                position, padding_idx = table, index.args[1]
                offset = padding_idx + 1
            else:
                break
        else:
            if word is None or position is None:
                continue
            replace(
                g.graph,
                node,
                ops.embed_layernorm,
                (
                    ids,
                    types if token_type is not None else None,
                    word,
                    position,
                    token_type,
                    weight,
                    bias,
                    eps,
                    offset,
                    padding_idx,
                ),
            )
    return g.cleanup()
