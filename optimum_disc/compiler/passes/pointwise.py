"""Leftover chains of elementwise ops -> one generated Triton kernel per chain.

A chain grows backwards from its last op through producers that are elementwise and read by
nothing outside the chain. Its operands must be tensors of the output's shape ("full"), vectors
of its last dimension ("col", e.g. a bias) or Python numbers; anything else ends the chain.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from .. import ops
from ..graph import Graph, replace, tensor_shape

aten = torch.ops.aten

_BINARY = {
    aten.add.Tensor: "add",
    aten.add.Scalar: "add",
    aten.sub.Tensor: "sub",
    aten.sub.Scalar: "sub",
    aten.mul.Tensor: "mul",
    aten.mul.Scalar: "mul",
    aten.div.Tensor: "div",
    aten.div.Scalar: "div",
    aten.pow.Tensor_Scalar: "pow",
    aten.pow.Tensor_Tensor: "pow",
    aten.maximum.default: "maximum",
    aten.minimum.default: "minimum",
}
_UNARY = {
    aten.neg.default: "neg",
    aten.exp.default: "exp",
    aten.log.default: "log",
    aten.sqrt.default: "sqrt",
    aten.rsqrt.default: "rsqrt",
    aten.tanh.default: "tanh",
    aten.erf.default: "erf",
    aten.sigmoid.default: "sigmoid",
    aten.relu.default: "relu",
    aten.abs.default: "abs",
}


def _op_name(node) -> str | None:
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return None
    if node.target in _BINARY:
        if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("rounding_mode"):
            return None
        return _BINARY[node.target]
    if node.target in _UNARY:
        return _UNARY[node.target]
    if node.target is aten.gelu.default:
        approx = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return "gelu" if approx == "none" else "gelu_tanh"
    return None


def _float_tensor(node) -> bool:
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return isinstance(val, torch.Tensor) and val.is_floating_point()


def _operand_kind(node, out_shape) -> str | None:
    if isinstance(node, (int, float)) and not isinstance(node, bool):
        return "const"
    shape = tensor_shape(node)
    if shape is None or not _float_tensor(node):
        return None
    if shape == out_shape:
        return "full"
    if len(shape) == 1 and shape[0] == out_shape[-1]:
        return "col"
    return None


def _chain(root: fx.Node) -> list[fx.Node] | None:
    """The nodes of the chain ending at ``root``, in graph order, or None."""
    out_shape = tensor_shape(root)
    if _op_name(root) is None or out_shape is None or not _float_tensor(root):
        return None
    members, stack = {root}, [root]
    while stack:
        node = stack.pop()
        for a in node.args:
            if (
                isinstance(a, fx.Node)
                and a not in members
                and _op_name(a) is not None
                and tensor_shape(a) == out_shape
                and all(u in members for u in a.users)
            ):
                members.add(a)
                stack.append(a)
    for m in members:
        if any(
            _operand_kind(a, out_shape) is None
            for a in m.args
            if a not in members and not isinstance(a, str)
        ):
            return None
    order = {n: i for i, n in enumerate(root.graph.nodes)}
    return sorted(members, key=order.__getitem__)


def _expression(chain: list[fx.Node]):
    out_shape = tensor_shape(chain[-1])
    inputs, kinds, slots = [], [], {}

    def operand(a):
        if isinstance(a, (int, float)):
            return {"const": float(a)}
        if a not in slots:
            slots[a] = len(inputs)
            inputs.append(a)
            kinds.append(_operand_kind(a, out_shape))
        return slots[a]

    raw = []
    for node in chain:
        args = node.args[:2] if _op_name(node) in _BINARY.values() else node.args[:1]
        raw.append((node, _op_name(node), [a if a in chain else ("in", a) for a in args]))
    for _, _, args in raw:
        for a in args:
            if isinstance(a, tuple):
                operand(a[1])
    steps, index = [], {}
    for node, name, args in raw:
        refs = [index[a] if isinstance(a, fx.Node) else operand(a[1]) for a in args]
        index[node] = len(inputs) + len(steps)
        steps.append([name, *refs])
    return {"inputs": kinds, "steps": steps}, inputs


def fuse_pointwise(g: Graph) -> Graph:
    done: set[fx.Node] = set()
    for node in reversed(list(g.graph.nodes)):
        if node in done or node.graph is not g.graph:
            continue
        chain = _chain(node)
        if not chain:
            continue
        expr, inputs = _expression(chain)
        if "full" not in expr["inputs"]:
            continue
        done.update(chain)
        replace(g.graph, node, ops.pointwise, (expr, *inputs))
    return g.cleanup()
