"""Columns taken out of a GEMM's output -> one GEMM per part, over rows of the weight.

A question-answering head computes ``[B, S, 2]`` logits with one GEMM and splits them into
start and end logits (``split(1, dim=-1)`` then ``squeeze(-1)``). Kernels write whole row
buffers, so each part becomes its own ``ops.linear`` over the weight rows (and bias entries) it
reads, sliced once at compile time. A part that drops the last dimension (``squeeze``,
``select``, ``unbind``) keeps a ``squeeze`` of the ``[..., 1]`` GEMM, which lowering turns into a
buffer of one value per row.

Matched on the last dimension of an ``ops.linear`` without a residual: ``getitem`` of
``split`` / ``split_with_sizes`` / ``unbind``, ``slice`` with step 1, and ``select``.
"""

from __future__ import annotations

import operator

import torch
import torch.fx as fx

from .. import ops
from ..graph import Graph, is_op, tensor_shape

aten = torch.ops.aten

_SPLITS = (aten.split.Tensor, aten.split_with_sizes.default, aten.unbind.int)


def _last_dim(node: fx.Node, dim) -> bool:
    shape = tensor_shape(node)
    return isinstance(dim, int) and shape is not None and dim in (-1, len(shape) - 1)


def _parts(node: fx.Node, width: int) -> list[tuple[fx.Node, int, int, bool]]:
    """(user, start, end, squeezed) for each column selection that reads ``node``."""
    found = []
    for user in list(node.users):
        args = list(user.args) + [None] * 5
        if is_op(user, *_SPLITS) and _last_dim(node, user.kwargs.get("dim", args[2])):
            if user.target is aten.unbind.int:
                bounds = [(i, i + 1) for i in range(width)]
            elif user.target is aten.split.Tensor:
                size = args[1]
                bounds = [(s, min(s + size, width)) for s in range(0, width, size)]
            else:
                edges = [0, *torch.tensor(args[1]).cumsum(0).tolist()]
                bounds = list(zip(edges[:-1], edges[1:]))
            for item in user.users:
                if item.op == "call_function" and item.target is operator.getitem:
                    a, b = bounds[item.args[1]]
                    found.append((item, a, b, user.target is aten.unbind.int))
        elif is_op(user, aten.slice.Tensor) and _last_dim(node, args[1]) and args[4] in (None, 1):
            a = 0 if args[2] is None else args[2]
            b = width if args[3] is None else args[3]
            a, b = (v + width if v < 0 else v for v in (a, b))
            a, b = max(0, min(a, width)), max(0, min(b, width))
            if a < b:
                found.append((user, a, b, False))
        elif is_op(user, aten.select.int) and _last_dim(node, args[1]):
            i = args[2] + width if args[2] < 0 else args[2]
            found.append((user, i, i + 1, True))
    return found


def _rows(g: Graph, node: fx.Node, start: int, end: int) -> fx.Node:
    """A new constant: rows start..end-1 of the constant ``node``."""
    fqn = g.fqns.get(node.name, node.name)
    value = g.constant(node)[start:end].clone()
    return g.add_constant(f"{node.name}_{start}_{end}", value, f"{fqn}[{start}:{end}]")


def split_columns(g: Graph) -> Graph:
    # A part may be taken apart again (a slice, then a split): new GEMMs join the work list.
    work = [n for n in g.graph.nodes if is_op(n, ops.linear)]
    while work:
        node = work.pop(0)
        x, w, b, activation, residual = node.args
        weight, bias = g.constant(w), g.constant(b) if b is not None else None
        if residual is not None or weight is None or (b is not None and bias is None):
            continue
        cache: dict[tuple[int, int], fx.Node] = {}
        anchor = node  # the parts follow the GEMM, in order
        for part, start, end, squeezed in _parts(node, weight.shape[0]):
            if (start, end) not in cache:
                w_part = _rows(g, w, start, end)
                b_part = _rows(g, b, start, end) if b is not None else None
                with g.graph.inserting_after(anchor):
                    new = g.graph.call_function(ops.linear, (x, w_part, b_part, activation, None))
                anchor = new
                work.append(new)
                val = node.meta.get("val")
                if isinstance(val, torch.Tensor):
                    new.meta["val"] = val[..., start:end]
                cache[(start, end)] = new
            new = cache[(start, end)]
            if squeezed:
                with g.graph.inserting_before(part):
                    out = g.graph.call_function(aten.squeeze.dim, (new, -1))
                out.meta.update({k: v for k, v in part.meta.items() if k in ("val", "tensor_meta")})
            else:
                out = new
            part.replace_all_uses_with(out)
    return g.cleanup()
