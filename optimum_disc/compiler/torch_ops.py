"""``torch`` calls: the operations that no kernel or pass covers, run as PyTorch ops.

A program call with kernel ``"torch"`` names one ATen operator (``"aten.bmm.default"``) or one
of the fused operators of ``ops`` (``"disc.pointwise"``) and its arguments as JSON data:

* ``{"t": "t0"}``: a tensor, read from ``call.inputs["t0"]`` (a buffer, weight or prologue
  value); row buffers are seen in their padded ``[B, S, ...]`` / ``[B, ...]`` shapes;
* ``{"sym": "2*B"}``: a size computed from the bucket's batch ``B`` and sequence length ``S``;
* ``{"dtype": "float32"}``, ``{"device": null}`` (the model's device), ``{"layout": ...}``,
  ``{"memory_format": ...}``, ``{"literal": ...}`` (any other JSON value, such as the step list of
  a pointwise expression), and plain numbers, strings, booleans, ``None`` and lists of these.

Loading a program resolves operator names against ``torch.ops.aten`` and ``ops`` only, and sizes
are evaluated by a small arithmetic interpreter: nothing in a saved program can name other code.

These calls run over padded rows, so a program that passes token rows through them keeps the
padding of each bucket (``meta["keeps_padding"]``); the rest of its calls are still kernels.
"""

from __future__ import annotations

import ast
import math
import operator
import re

import torch
import torch.fx as fx

from . import ops

_OP_NAME = re.compile(r"^(aten\.[A-Za-z_][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]*|disc\.[a-z_]+)$")
_FUSED = {f.__name__: f for f in ops.FUSED_OPS}

# Operators whose tensor arguments must share one floating dtype: in a reduced-precision
# program they run in that precision (as autocast would), whatever dtype each input has.
_SAME_DTYPE = {
    "aten.mm.default",
    "aten.bmm.default",
    "aten.matmul.default",
    "aten.addmm.default",
    "aten.baddbmm.default",
    "aten.linear.default",
    "aten.einsum.default",
    "aten.scaled_dot_product_attention.default",
    "disc.linear",
    "disc.attention",
    "disc.attention_packed",
}
_FILLS = {
    "aten.masked_fill.Scalar",
    "aten.where.ScalarOther",
    "aten.where.ScalarSelf",
    "aten.fill.Scalar",
    "aten.full_like.default",
    "aten.new_full.default",
}
_RESHAPES = {
    "aten.view.default": torch.ops.aten.reshape.default,
    "aten._unsafe_view.default": torch.ops.aten.reshape.default,
}
_MATMULS = {"aten.mm.default", "aten.bmm.default", "aten.matmul.default", "aten.linear.default"}

# Operators whose result depends on data in its shape or that read values back to the host:
# a CUDA graph cannot hold them and export keeps no symbolic shape for them.
_REFUSED = {
    "nonzero",
    "masked_select",
    "unique",
    "_unique2",
    "item",
    "_local_scalar_dense",
    "repeat_interleave",
    "to_dense",
    "_assert_async",
}


class TorchOpError(ValueError):
    pass


def op_name(target) -> str | None:
    """The program's name of an FX call target, or None if it cannot be a ``torch`` call."""
    if isinstance(target, torch._ops.OpOverload):
        namespace = target.namespace
        if namespace != "aten":
            return None
        packet = target._overloadpacket.__name__.split(".")[-1]
        if packet in _REFUSED:
            return None
        return f"aten.{packet}.{target._overloadname}"
    if target in ops.FUSED_OPS:
        return f"disc.{target.__name__}"
    return None


def resolve(name: str):
    """The callable of an operator name; raises ``TorchOpError`` for anything else."""
    if not isinstance(name, str) or not _OP_NAME.match(name):
        raise TorchOpError(f"operator {name!r} is not an ATen or optimum-disc operator")
    if name.startswith("disc."):
        fn = _FUSED.get(name[5:])
        if fn is None:
            raise TorchOpError(f"operator {name!r} is not an optimum-disc operator")
        return fn
    _, packet, overload = name.split(".")
    if packet in _REFUSED:
        raise TorchOpError(f"operator {name!r} reads data back to the host")
    try:
        return getattr(getattr(torch.ops.aten, packet), overload)
    except (AttributeError, RuntimeError) as e:
        raise TorchOpError(f"operator {name!r} does not exist in torch {torch.__version__}") from e


# -- sizes ---------------------------------------------------------------------------------------

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Div: operator.truediv,
    ast.Pow: operator.pow,
}
_FUNCS = {
    "FloorDiv": operator.floordiv,
    "CleanDiv": operator.floordiv,
    "Mod": operator.mod,
    "PythonMod": operator.mod,
    "Max": max,
    "Min": min,
    "floor": math.floor,
    "ceiling": math.ceil,
    "FloorToInt": math.floor,
    "CeilToInt": math.ceil,
    "TruncToInt": math.trunc,
    "ToFloat": float,
    "IntTrueDiv": operator.truediv,
    "FloatTrueDiv": operator.truediv,
    "sqrt": math.sqrt,
    "OpaqueUnaryFn_sqrt": math.sqrt,
}


def evaluate_size(expr: str, batch: int, seq: int):
    """The value of a size expression over ``B`` and ``S``.

    >>> evaluate_size("2*B + FloorDiv(S, 4)", 3, 10)
    8
    """
    try:
        tree = ast.parse(expr, mode="eval")
    except SyntaxError as e:
        raise TorchOpError(f"size {expr!r} is not an expression") from e
    names = {"B": batch, "S": seq}

    def ev(n):
        if isinstance(n, ast.Expression):
            return ev(n.body)
        if isinstance(n, ast.Constant) and type(n.value) in (int, float, bool):
            return n.value
        if isinstance(n, ast.Name) and n.id in names:
            return names[n.id]
        if isinstance(n, ast.BinOp) and type(n.op) in _BINOPS:
            return _BINOPS[type(n.op)](ev(n.left), ev(n.right))
        if isinstance(n, ast.UnaryOp) and isinstance(n.op, ast.USub):
            return -ev(n.operand)
        if (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Name)
            and n.func.id in _FUNCS
            and not n.keywords
        ):
            return _FUNCS[n.func.id](*[ev(a) for a in n.args])
        raise TorchOpError(f"size {expr!r} holds {ast.dump(n)[:60]}, which is not allowed")

    return ev(tree)


# -- encoding (compile time) ---------------------------------------------------------------------


def encode(value, tensor_ref, size_expr):
    """JSON data for an FX argument; ``tensor_ref(node)`` names a tensor input and
    ``size_expr(node)`` renders a symbolic size."""
    if isinstance(value, fx.Node):
        val = value.meta.get("val")
        if isinstance(val, torch.Tensor):
            return {"t": tensor_ref(value)}
        return {"sym": size_expr(value)}
    if isinstance(value, (list, tuple)):
        return [encode(v, tensor_ref, size_expr) for v in value]
    if isinstance(value, torch.dtype):
        return {"dtype": str(value).removeprefix("torch.")}
    if isinstance(value, torch.device):
        return {"device": None}
    if isinstance(value, torch.layout):
        return {"layout": str(value).removeprefix("torch.")}
    if isinstance(value, torch.memory_format):
        return {"memory_format": str(value).removeprefix("torch.")}
    if isinstance(value, dict):
        return {"literal": value}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TorchOpError(f"argument {value!r} of type {type(value).__name__} cannot be saved")


def decode(data, tensors: dict, batch: int, seq: int, device):
    if isinstance(data, list):
        return [decode(v, tensors, batch, seq, device) for v in data]
    if isinstance(data, dict):
        if len(data) != 1:
            raise TorchOpError(f"argument {data!r} is not an encoded value")
        ((kind, v),) = data.items()
        if kind == "t":
            return tensors[v]
        if kind == "sym":
            return evaluate_size(v, batch, seq)
        if kind == "dtype":
            return _attr(torch, v, torch.dtype)
        if kind == "device":
            return device
        if kind == "layout":
            return _attr(torch, v, torch.layout)
        if kind == "memory_format":
            return _attr(torch, v, torch.memory_format)
        if kind == "literal":
            return v
        raise TorchOpError(f"argument kind {kind!r} is unknown")
    return data


def _attr(module, name, kind):
    value = getattr(module, name, None) if isinstance(name, str) else None
    if not isinstance(value, kind):
        raise TorchOpError(f"{name!r} is not a torch {kind.__name__}")
    return value


def _walk(data):
    if isinstance(data, list):
        for v in data:
            yield from _walk(v)
    elif isinstance(data, dict):
        if len(data) != 1:
            raise TorchOpError(f"argument {data!r} is not an encoded value")
        ((kind, v),) = data.items()
        if kind not in ("t", "sym", "dtype", "device", "layout", "memory_format", "literal"):
            raise TorchOpError(f"argument kind {kind!r} is unknown")
        yield kind, v


def check_call(i: int, call) -> None:
    """Refuse a ``torch`` call that names an unknown operator or malformed arguments."""
    try:
        resolve(call.attrs.get("op"))
        for kind, v in _walk(
            [call.attrs.get("args", []), list(call.attrs.get("kwargs", {}).values())]
        ):
            if kind == "t" and v not in call.inputs:
                raise TorchOpError(f"tensor argument {v!r} is not among the call's inputs")
            if kind == "sym":
                evaluate_size(v, 2, 3)
            if kind in ("dtype", "layout", "memory_format"):
                decode({kind: v}, {}, 1, 1, None)
    except TorchOpError as e:
        raise ValueError(
            f"call {i} (torch {call.attrs.get('op')!r}): {e}; the program is corrupt: export the "
            "model again."
        ) from None


def describe(call) -> str:
    """One line of ``Program.code()``."""

    def show(d):
        if isinstance(d, list):
            return "[" + ", ".join(show(v) for v in d) + "]"
        if isinstance(d, dict):
            ((kind, v),) = d.items()
            if kind == "t":
                ref = call.inputs[v]
                return (
                    ref[2:]
                    if ref.startswith("p:")
                    else (f"w[{ref[2:]!r}]" if ref.startswith("w:") else ref)
                )
            if kind == "sym":
                return v
            if kind == "device":
                return "device"
            if kind == "literal":
                return "{...}"
            return f"{kind}.{v}" if kind != "dtype" else v
        return repr(d)

    parts = [show(a) for a in call.attrs.get("args", [])]
    parts += [f"{k}={show(v)}" for k, v in call.attrs.get("kwargs", {}).items()]
    index = f"[{call.attrs['index']}]" if "index" in call.attrs else ""
    return f"torch.{call.attrs['op']}({', '.join(parts)}){index}"


# -- execution -----------------------------------------------------------------------------------


def run(call, tensors: dict, batch: int, seq: int, device, compute_dtype: torch.dtype):
    """Execute one ``torch`` call over already-shaped tensor inputs."""
    name = call.attrs["op"]
    # The graph is functional, so a view may copy: clones that made its input contiguous are
    # dropped from the graph, as they cost nothing to the kernels.
    fn = _RESHAPES.get(name) or resolve(name)
    if name in _SAME_DTYPE:
        tensors = {
            k: t.to(compute_dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for k, t in tensors.items()
        }
    args = decode(call.attrs.get("args", []), tensors, batch, seq, device)
    if name in _FILLS:
        # Masks filled with fp32's lowest value (as traced) take the lowest value of the
        # tensor's own dtype in a reduced-precision program, as transformers does.
        target = next(
            (a for a in args if isinstance(a, torch.Tensor) and a.is_floating_point()), None
        )
        if target is not None and target.dtype != torch.float32:
            info = torch.finfo(target.dtype)
            args = [
                max(min(a, info.max), info.min) if type(a) is float and math.isfinite(a) else a
                for a in args
            ]
    kwargs = {
        k: decode(v, tensors, batch, seq, device) for k, v in call.attrs.get("kwargs", {}).items()
    }
    result = fn(*args, **kwargs)
    if "index" in call.attrs:
        result = result[call.attrs["index"]]
    return result


def matmul_flops(node: fx.Node, sizes: dict) -> float:
    """FLOPs of a matrix-product node with its symbolic sizes replaced by ``sizes``."""
    name = op_name(node.target)
    if name == "aten.scaled_dot_product_attention.default":
        q, k = (a.meta.get("val") for a in node.args[:2])
        try:
            *lead, s, d = (_concrete(x, sizes) for x in q.shape)
            return 4.0 * math.prod(lead) * s * _concrete(k.shape[-2], sizes) * d
        except (TorchOpError, AttributeError):
            return 0.0
    if name not in _MATMULS:
        return 0.0
    val = node.meta.get("val")
    first = node.args[0].meta.get("val") if isinstance(node.args[0], fx.Node) else None
    if not isinstance(val, torch.Tensor) or not isinstance(first, torch.Tensor):
        return 0.0
    try:
        out = math.prod(_concrete(s, sizes) for s in val.shape)
        k = _concrete(first.shape[-1], sizes)
    except TorchOpError:
        return 0.0
    return 2.0 * out * k


def _concrete(size, sizes: dict) -> int:
    if isinstance(size, int):
        return size
    expr = str(size)
    for sym, letter in sizes.get("names", {}).items():
        expr = re.sub(rf"\b{re.escape(sym)}\b", letter, expr)
    return int(evaluate_size(expr, sizes["B"], sizes["S"]))
