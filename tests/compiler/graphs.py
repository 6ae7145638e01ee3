"""Small graphs for pass tests: a module exported the way ``capture`` exports a model."""

from __future__ import annotations

import torch

from optimum_disc.compiler.graph import Graph


def export_graph(module: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Graph:
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("seq", min=1, max=64)
    dynamic = {n: {0: batch, 1: seq} for n in inputs}
    ep = torch.export.export(module.eval(), (), inputs, dynamic_shapes=dynamic, strict=False)
    ep = ep.run_decompositions({})
    constants, fqns, names = {}, {}, []
    state = {**ep.state_dict, **ep.constants}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
            names.append(spec.arg.name)
        else:
            constants[spec.arg.name] = state[spec.target].detach()
            fqns[spec.arg.name] = spec.target
    return Graph(ep.graph_module, constants, names, fqns, meta={"vocab_size": 50})


def targets(g: Graph) -> list:
    return [n.target for n in g.graph.nodes if n.op == "call_function"]


def assert_same_function(before: Graph, after: Graph, inputs: dict, atol=1e-5, rtol=1e-5):
    with torch.no_grad():
        for x, y in zip(before.run(**inputs), after.run(**inputs), strict=True):
            torch.testing.assert_close(y, x, atol=atol, rtol=rtol)
