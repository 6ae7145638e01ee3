"""Recognise the attention mask of each attention as a key-padding mask.

transformers builds the ``[B, 1, S, S]`` mask that ``scaled_dot_product_attention`` receives from
``attention_mask`` through a chain of ops that changes between versions. Rather than matching
that chain, this pass evaluates it on random 0/1 masks and checks that it equals "key j of
sequence b is visible iff attention_mask[b, j] == 1" (as booleans, or as an additive mask of 0
and a large negative number). If so, the chain is replaced by ``ops.padding_mask(attention_mask)``,
which the attention pass reads through; if not (a sliding-window or relative mask), that
attention is left as it is, for lowering to run as a PyTorch op.

The masks are evaluated alone (the part of the graph that computes them), at short lengths and
at the longest one the model takes (at most 4096), so that a window wider than a short test
sequence still shows.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops
from ..graph import Graph, is_op
from ..lower import unsupported

aten = torch.ops.aten


def _mask_graph(g: Graph, wanted: list[fx.Node]) -> tuple[fx.GraphModule, list[fx.Node]]:
    """A graph that computes only the ``wanted`` nodes, and its placeholders in order."""
    keep, stack = set(), list(wanted)
    while stack:
        n = stack.pop()
        if n not in keep:
            keep.add(n)
            stack.extend(n.all_input_nodes)
    graph, env = fx.Graph(), {}
    for n in g.graph.nodes:
        if n in keep:
            env[n] = graph.node_copy(n, lambda x: env[x])
    graph.output(tuple(env[w] for w in wanted))
    placeholders = [n for n in g.graph.nodes if n in keep and n.op == "placeholder"]
    return fx.GraphModule(g.gm, graph), placeholders


def _random_inputs(g: Graph, batch: int, seq: int) -> dict[str, torch.Tensor]:
    device = next(iter(g.constants.values())).device
    inputs = {}
    for name in g.inputs:
        if name == "attention_mask":
            mask = (torch.rand(batch, seq, device=device) > 0.3).long()
            mask[:, 0] = 1
            inputs[name] = mask
        elif name == "token_type_ids":
            inputs[name] = torch.zeros(batch, seq, dtype=torch.long, device=device)
        else:
            inputs[name] = torch.randint(
                0, g.meta.get("vocab_size", 2), (batch, seq), device=device
            )
    return inputs


def _is_key_padding(value: torch.Tensor, mask: torch.Tensor) -> bool:
    b, s = mask.shape
    if value.dim() != 4 or value.shape[0] not in (1, b) or value.shape[-1] != s:
        return False
    visible = mask.bool()[:, None, None, :].expand(b, value.shape[1], value.shape[2], s)
    value = value.expand(b, *value.shape[1:])
    if value.dtype == torch.bool:
        return bool(torch.equal(value, visible))
    if not value.is_floating_point():
        return False
    hidden_ok = bool((value[~visible] < -1e4).all()) if (~visible).any() else True
    return hidden_ok and bool((value[visible] == 0).all())


def key_padding_mask(g: Graph) -> Graph:
    sdpa = [n for n in g.graph.nodes if is_op(n, aten.scaled_dot_product_attention.default)]
    masks = {n: (n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")) for n in sdpa}
    masks = {n: m for n, m in masks.items() if isinstance(m, fx.Node)}
    if not masks:
        return g
    mask_input = g.input_node("attention_mask")
    if mask_input is None:
        raise unsupported(
            g.meta, "the attention reads a mask that does not come from attention_mask"
        )
    wanted = list(dict.fromkeys(masks.values()))
    gm, placeholders = _mask_graph(g, wanted)
    longest = min(int(g.meta.get("max_position_embeddings") or 512), 4096)
    padding = set(wanted)
    for batch, seq in ((2, 5), (3, 9), (2, longest)):
        inputs = _random_inputs(g, batch, seq)
        args = [g.constants.get(n.name, inputs.get(n.name)) for n in placeholders]
        with torch.no_grad():
            values = gm(*args)
        for node, value in zip(wanted, values):
            if node in padding and not _is_key_padding(value, inputs["attention_mask"]):
                padding.discard(node)
    masks = {n: m for n, m in masks.items() if m in padding}
    if not masks:
        return g
    first = next(n for n in g.graph.nodes if n in masks)
    with g.graph.inserting_before(first):
        canonical = g.graph.call_function(ops.padding_mask, (mask_input,))
    if isinstance(mask_input.meta.get("val"), torch.Tensor):  # FakeTensor ops stay fake
        canonical.meta["val"] = ops.padding_mask(mask_input.meta["val"])
    for node in masks:
        if len(node.args) > 3:
            node.args = (*node.args[:3], canonical, *node.args[4:])
        else:
            node.kwargs = {**node.kwargs, "attn_mask": canonical}
    return g.cleanup()
