"""GELU written out as elementwise ops -> ``aten.gelu``, so that the GEMM epilogue takes it.

ALBERT's ``gelu_new`` (and BERT-family models configured with it) computes
``0.5 * x * (1 + tanh(sqrt(2 / pi) * (x + 0.044715 * x^3)))`` op by op. Rather than match that
chain's exact form, this pass takes each chain of elementwise ops over one tensor (as the
pointwise pass delimits them), evaluates it on a range of values and, if it is GELU (tanh or erf
form) there, replaces it by ``aten.gelu`` with the matching ``approximate``.
"""

from __future__ import annotations

import torch
import torch.fx as fx
import torch.nn.functional as F

from ..graph import Graph, replace
from .pointwise import _chain, _expression

aten = torch.ops.aten

_GELUS = {
    "tanh": lambda t: F.gelu(t, approximate="tanh"),
    "none": F.gelu,
}


def _evaluate(expr: dict, x: torch.Tensor) -> torch.Tensor:
    from optimum_disc.kernels.pointwise import pointwise_reference

    return pointwise_reference(expr, [x])


def recognise_gelu(g: Graph) -> Graph:
    x = torch.linspace(-10.0, 10.0, 4001, dtype=torch.float32)[None]
    done: set[fx.Node] = set()
    for node in reversed(list(g.graph.nodes)):
        if node in done:
            continue
        chain = _chain(node)
        if not chain or len(chain) < 4:
            continue
        expr, inputs = _expression(chain)
        if expr["inputs"] != ["full"]:
            continue
        got = _evaluate(expr, x)
        for approximate, gelu in _GELUS.items():
            if torch.allclose(got, gelu(x), rtol=1e-5, atol=1e-6):
                done.update(chain)
                replace(
                    g.graph, node, aten.gelu.default, (inputs[0],), {"approximate": approximate}
                )
                break
    return g.cleanup()
