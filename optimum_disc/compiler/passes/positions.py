"""Recognise RoBERTa-style position ids: counted over the tokens that are not padding.

RoBERTa, XLM-RoBERTa, CamemBERT (and MPNet) number positions with
``create_position_ids_from_input_ids``: ``padding_idx`` plus the number of non-padding tokens up
to and including each token, and ``padding_idx`` at padding tokens. transformers computes that
with a chain of ops (``ne``, casts, ``cumsum``, ``mul``, ``add``) that changes between versions,
so rather than matching the chain this pass takes each integer index of a position-embedding
lookup that is computed from ``input_ids`` alone, evaluates it on random ids with padding tokens
at the end, at the start and inside, and replaces it by ``ops.padded_positions(input_ids,
padding_idx)`` if it equals that for every draw. The embeddings pass then fuses the lookup.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops
from ..graph import Graph, is_op, replace

aten = torch.ops.aten


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [node]
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        stack.extend(n.all_input_nodes)
    return seen


def _function_of_ids(g: Graph, node: fx.Node, ids: fx.Node):
    """``node`` as a function of input_ids (a GraphModule), or None if it reads anything else
    than input_ids and constants."""
    nodes = _ancestors(node)
    if ids not in nodes:
        return None
    for n in nodes:
        if n.op == "placeholder" and n is not ids and n.name not in g.constants:
            return None
        if n.op not in ("placeholder", "call_function"):
            return None
    sub, env = fx.Graph(), {}
    placeholders = []
    for n in g.graph.nodes:
        if n in nodes:
            env[n] = sub.node_copy(n, env.__getitem__)
            if n.op == "placeholder":
                placeholders.append(n)
    sub.output(env[node])
    gm = fx.GraphModule(g.gm, sub)

    def run(input_ids):
        args = [input_ids if p is ids else g.constants[p.name] for p in placeholders]
        return gm(*args)

    return run


def _probes(vocab: int, pad: int, device) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    probes = []
    for batch, seq in ((4, 9), (3, 16), (1, 1), (2, 5)):
        ids = torch.randint(0, max(vocab, 2), (batch, seq), generator=gen)
        ids[ids == pad] = (pad + 1) % max(vocab, 2)
        if seq > 2:
            ids[0, seq - 2 :] = pad  # right padding
            ids[1, :2] = pad  # left padding
            ids[-1, seq // 2] = pad  # inside the sequence
        probes.append(ids.to(device))
    return probes


def _padding_idx(g: Graph, lookup: fx.Node) -> int | None:
    """The padding index the lookup declares (``embedding(table, index, padding_idx)``), else
    the model's pad_token_id."""
    if len(lookup.args) > 2 and isinstance(lookup.args[2], int) and lookup.args[2] >= 0:
        return lookup.args[2]
    pad = g.meta.get("pad_token_id")
    return pad if isinstance(pad, int) and pad >= 0 else None


def padded_positions(g: Graph) -> Graph:
    ids = g.input_node("input_ids")
    if ids is None:
        return g
    for node in list(g.graph.nodes):
        if not is_op(node, aten.embedding.default) or g.constant(node.args[0]) is None:
            continue
        index = node.args[1]
        if not isinstance(index, fx.Node) or index is ids or index.op != "call_function":
            continue
        pad = _padding_idx(g, node)
        fn = _function_of_ids(g, index, ids) if pad is not None else None
        if fn is None:
            continue
        device = next(iter(g.constants.values())).device
        try:
            with torch.no_grad():
                same = all(
                    torch.equal(fn(p).long(), ops.padded_positions(p, pad))
                    for p in _probes(g.meta.get("vocab_size", 2), pad, device)
                )
        except Exception:  # an index that this pass cannot evaluate is left alone
            same = False
        if same:
            replace(g.graph, index, ops.padded_positions, (ids, pad))
    return g.cleanup()
