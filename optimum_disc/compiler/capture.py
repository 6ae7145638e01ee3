"""Capture: ``torch.export`` of a transformers encoder with symbolic batch and sequence sizes.

On transformers 5 the graph of a BERT-family encoder is plain ATen (``linear``,
``scaled_dot_product_attention``, ``layer_norm``, ``gelu``, ``embedding`` and pointwise ops), so
the passes match at that level and need no per-model code.
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import operator
import warnings
from unittest import mock

import torch

from .graph import Graph
from .lower import NEEDS_TORCH_OPS, unsupported

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _meta(model: torch.nn.Module) -> dict:
    return {
        "model_class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", ""),
    }


def _is_constraint_violation(error: Exception) -> bool:
    from torch._dynamo.exc import UserError, UserErrorType
    from torch.fx.experimental.symbolic_shapes import ConstraintViolationError

    if isinstance(error, UserError):
        return error.error_type == UserErrorType.CONSTRAINT_VIOLATION
    return isinstance(error, ConstraintViolationError)


def _refused_by_export(model: torch.nn.Module, error: Exception) -> bool:
    """Whether ``error`` from ``torch.export`` says that the model's code cannot be traced with
    symbolic sizes (rather than a bug): the sizes' constraints are violated or a guard depends on
    data, or any error for an architecture known not to compile. (``_export`` already retried
    the one spurious constraint violation that torch 2.11 reports, for DeBERTa-v2.)
    """
    from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

    if _is_constraint_violation(error) or isinstance(error, GuardOnDataDependentSymNode):
        return True
    return getattr(model.config, "model_type", "") in NEEDS_TORCH_OPS


@contextlib.contextmanager
def _ordered_sym_min_max():
    """``torch.sym_min``/``sym_max`` that return the smaller/larger size itself when the shape
    environment can order the two, as torch 2.13 already does by simplifying ``Min``/``Max``.

    Non-strict export replaces the builtin ``min``/``max`` with ``torch.sym_min``/``sym_max``, and
    the meta of ``view`` that merges dimensions takes ``min`` of their strides. DeBERTa-v2's
    ``transpose_for_scores`` (``x.permute(0, 2, 1, 3).contiguous().view(-1, x.size(1),
    x.size(-1))``) and its ``attention_probs.view(-1, S, S)`` merge batch and heads, so on torch
    2.11 the strides become ``Min(16*S, 32*S)`` and ``Min(S**2, 2*S**2)``; the fake tensor's
    contiguity check then guards ``Eq(Min(16*S, 32*S), 16*S)``, which 2.11's solver cannot prove
    for the ``seq`` range and reports as "Constraints violated (seq)!". Returning the operand
    that is provably the minimum is the same value, so the traced program is unchanged; only
    the spurious guard goes. Sizes that cannot be ordered keep the symbolic ``Min``/``Max``.
    """
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    sym_min, sym_max = torch.sym_min, torch.sym_max

    def ordered(fallback, pick_first):
        def fn(a, b):
            if isinstance(a, torch.SymInt | int) and isinstance(b, torch.SymInt | int):
                if statically_known_true(a <= b):
                    return a if pick_first else b
                if statically_known_true(b <= a):
                    return b if pick_first else a
            return fallback(a, b)

        return fn

    with (
        mock.patch.object(torch, "sym_min", ordered(sym_min, True)),
        mock.patch.object(torch, "sym_max", ordered(sym_max, False)),
    ):
        yield


def _export(model: torch.nn.Module, inputs: dict, dynamic: dict):
    """``torch.export`` with the dynamic shapes as given. A constraint violation is tried once
    more with ``_ordered_sym_min_max``, which removes the one spurious violation torch 2.11
    reports (DeBERTa-v2); the ``Dim`` ranges still hold, so a guard that really specializes a
    size fails the second time too."""
    try:
        return torch.export.export(model, (), inputs, dynamic_shapes=dynamic, strict=False)
    except Exception as e:
        if not _is_constraint_violation(e):
            raise
    with _ordered_sym_min_max():
        return torch.export.export(model, (), inputs, dynamic_shapes=dynamic, strict=False)


def model_inputs(model: torch.nn.Module) -> list[str]:
    """The inputs the compiled program takes, in the order of the model's forward."""
    if type(model).__name__.endswith("ForMultipleChoice"):
        raise unsupported(
            _meta(model),
            "multiple-choice heads take [batch, choices, seq] inputs and the compiled program "
            "takes [batch, seq]; compile the base model and score the choices from its outputs.",
        )
    params = inspect.signature(model.forward).parameters
    names = [n for n in INPUT_NAMES if n in params]
    if "input_ids" not in names:
        raise ValueError(
            f"{type(model).__name__}.forward takes no input_ids; optimum-disc compiles encoders "
            "that take token ids (BERT and its family)."
        )
    if "token_type_ids" in names and not getattr(model.config, "type_vocab_size", 0):
        names.remove("token_type_ids")
    return names


def example_inputs(model: torch.nn.Module, names: list[str], batch: int = 3, seq: int = 11):
    """Random inputs to trace with. Sizes other than 0 and 1 keep the dimensions symbolic."""
    config = model.config
    device = next(model.parameters()).device
    seq = min(seq, config.max_position_embeddings)
    inputs = {"input_ids": torch.randint(0, config.vocab_size, (batch, seq), device=device)}
    if "attention_mask" in names:
        mask = torch.ones(batch, seq, dtype=torch.long, device=device)
        mask[0, seq // 2 :] = 0
        inputs["attention_mask"] = mask
    if "token_type_ids" in names:
        inputs["token_type_ids"] = torch.randint(
            0, config.type_vocab_size, (batch, seq), device=device
        )
    return inputs


# Ops of an exported encoder that ``run_decompositions({})`` keeps as they are. A graph of these
# and of the ops of `_REWRITES` is taken to the ATen inference graph by `_to_inference_ir`.
_KEPT = frozenset(
    f"aten.{name}"
    for name in (
        "__and__.Tensor",
        "_assert_tensor_metadata.default",
        "add.Tensor",
        "arange.default",
        "arange.start",
        "cumsum.default",
        "div.Tensor",
        "embedding.default",
        "expand.default",
        "ge.Scalar",
        "gelu.default",
        "index.Tensor",
        "layer_norm.default",
        "linear.default",
        "masked_fill.Scalar",
        "mul.Tensor",
        "ne.Scalar",
        "new_ones.default",
        "pow.Tensor_Scalar",
        "relu.default",
        "scaled_dot_product_attention.default",
        "select.int",
        "slice.Tensor",
        "sub.Tensor",
        "sym_size.int",
        "tanh.default",
        "transpose.int",
        "unsqueeze.default",
        "view.default",
    )
)


def _to_inference_ir(exported) -> bool:
    """Turn the exported graph (``torch.export``'s training IR) into the ATen inference graph
    that ``exported.run_decompositions({})`` gives, in place, where it holds only ops of `_KEPT`
    and of `_REWRITES`: for an eval-mode encoder the decompositions then only turn
    ``dropout`` into ``clone``, ``reshape`` of a contiguous tensor into ``view``, ``to`` into
    ``_to_copy`` (or nothing, where it changes nothing) and drop dead nodes, and re-tracing the
    whole graph for that took half of `optimize` (BERT-base: 3.7 of 6.8 s on a CPU). Returns
    False, having changed nothing, for any other graph (in-place ops, other composite ops), which
    the caller decomposes as before."""
    graph = exported.graph_module.graph
    nodes = [n for n in graph.nodes if n.op == "call_function"]
    for node in nodes:
        name = str(node.target)
        if name in _KEPT or node.target in (operator.getitem, operator.mul):
            continue
        rewrite = _REWRITES.get(name)
        if rewrite is None or rewrite(node, check=True) is False:
            return False
    for node in nodes:
        rewrite = _REWRITES.get(str(node.target))
        if rewrite is not None:
            rewrite(node, check=False)
    graph.eliminate_dead_code()
    exported.graph_module.recompile()
    return True


def _val(node):
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def _replace(node, target, args, kwargs=None) -> None:
    with node.graph.inserting_before(node):
        new = node.graph.call_function(target, tuple(args), kwargs or {})
    new.meta = dict(node.meta)
    node.replace_all_uses_with(new)
    node.graph.erase_node(node)


def _dropout(node, check: bool):
    """``dropout(x, p, train=False)`` -> ``clone(x)``."""
    train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
    if check:
        return train is False
    _replace(node, torch.ops.aten.clone.default, node.args[:1])


def _reshape(node, check: bool):
    """``reshape`` -> ``view`` where no copy is needed: of a contiguous tensor (the same sizes),
    or to the tensor's own shape (the sizes as inferred, as the decomposition writes them)."""
    x, out = _val(node.args[0]), node.meta.get("val")
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)):
        return False if check else None
    sizes = list(node.args[1])
    if not x.is_contiguous():
        if tuple(out.shape) != tuple(x.shape):
            return False if check else None
        inferred = [i for i, size in enumerate(sizes) if size == -1]
        if any(not isinstance(out.shape[i], int) for i in inferred):
            return False if check else None
        for i in inferred:
            sizes[i] = out.shape[i]
    if check:
        return True
    _replace(node, torch.ops.aten.view.default, [node.args[0], sizes])
    return None


def _to(node, check: bool):
    """``to(x, ...)`` and ``type_as(x, other)`` -> ``x`` where they change nothing, else
    ``_to_copy(x, dtype=, device=)``: only dtype and device, without ``copy`` or a memory
    format."""
    x, out = _val(node.args[0]), node.meta.get("val")
    if not (isinstance(x, torch.Tensor) and isinstance(out, torch.Tensor)):
        return False if check else None
    flags = {**dict(zip(_TO_FLAGS[str(node.target)], node.args[1:])), **node.kwargs}
    plain = not flags.get("copy") and flags.get("memory_format") is None
    plain = plain and flags.get("layout") in (None, torch.strided)
    if check:
        return plain and flags.get("pin_memory") in (None, False)
    if out.dtype == x.dtype and out.device == x.device:
        node.replace_all_uses_with(node.args[0])
        node.graph.erase_node(node)
        return None
    kwargs = {"dtype": out.dtype} if out.dtype != x.dtype else {}
    if out.device != x.device:
        kwargs["device"] = out.device
    _replace(node, torch.ops.aten._to_copy.default, node.args[:1], kwargs)
    return None


# Positional arguments after ``self`` of each ``to`` overload.
_TO_FLAGS = {
    "aten.to.dtype": ("dtype", "non_blocking", "copy", "memory_format"),
    "aten.to.device": ("device", "dtype", "non_blocking", "copy", "memory_format"),
    "aten.to.dtype_layout": (),  # keyword-only
    "aten.type_as.default": (),  # to(other's dtype and device)
}
_REWRITES = {
    "aten.dropout.default": _dropout,
    "aten.reshape.default": _reshape,
    "aten.to.dtype": _to,
    "aten.to.device": _to,
    "aten.to.dtype_layout": _to,
    "aten.type_as.default": _to,
}


def capture(model: torch.nn.Module, inputs: dict[str, torch.Tensor] | None = None) -> Graph:
    """Export ``model`` (in eval mode) with dynamic ``batch`` and ``seq`` dimensions."""
    if model.training:
        raise ValueError(
            f"{type(model).__name__} is in training mode; call model.eval() before compiling "
            "(dropout would otherwise be part of the function)."
        )
    names = model_inputs(model)
    # Traced on the CPU: the graph is the same, and on CUDA transformers adds alignment guards
    # on the sequence length (multiples of 8) that a symbolic length cannot satisfy. The program
    # takes its weights to the model's device afterwards.
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    cpu = torch.device("cpu")
    inputs = {k: v.to(cpu) for k, v in inputs.items()} if inputs else None
    inputs = inputs or example_inputs(model, names)
    max_seq = model.config.max_position_embeddings
    batch = torch.export.Dim("batch", min=1, max=1 << 20)
    seq = torch.export.Dim("seq", min=1, max=max_seq)
    dynamic = {n: {0: batch, 1: seq} for n in names}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reference = model(**inputs, return_dict=True)
        try:
            exported = _export(model, inputs, dynamic)
        except Exception as e:
            if not _refused_by_export(model, e):
                raise
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise unsupported(
                _meta(model),
                f"torch.export (torch {torch.__version__}) could not trace it with symbolic "
                f"batch and sequence sizes: {type(e).__name__}: {' '.join(lines[:3])}",
            ) from e
        if not _to_inference_ir(exported):
            exported = exported.run_decompositions({})

    gm = exported.graph_module
    sig = exported.graph_signature
    state = {**exported.state_dict, **exported.constants}
    constants, fqns, user_inputs = {}, {}, []
    for spec in sig.input_specs:
        name = spec.arg.name
        if spec.kind == torch.export.graph_signature.InputKind.USER_INPUT:
            user_inputs.append(name)
        else:
            constants[name] = state[spec.target].detach()
            fqns[name] = spec.target
    fields = [k for k, v in reference.items() if v is not None]
    outputs = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    if len(outputs) != len(fields):
        raise unsupported(
            _meta(model),
            f"the exported graph returns {len(outputs)} values but the model's output has fields "
            f"{fields}.",
        )
    cls = type(reference)
    return Graph(
        gm=gm,
        constants=constants,
        inputs=user_inputs,
        fqns=fqns,
        output_fields=fields,
        output_class=f"{cls.__module__}.{cls.__qualname__}",
        meta={
            **_meta(model),
            "vocab_size": model.config.vocab_size,
            "pad_token_id": getattr(model.config, "pad_token_id", None),
            "max_position_embeddings": max_seq,
            "type_vocab_size": getattr(model.config, "type_vocab_size", 0),
        },
    )
