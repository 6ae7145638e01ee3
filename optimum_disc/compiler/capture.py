"""Capture: ``torch.export`` of a transformers encoder with symbolic batch and sequence sizes.

On transformers 5 the graph of a BERT-family encoder is plain ATen (``linear``,
``scaled_dot_product_attention``, ``layer_norm``, ``gelu``, ``embedding`` and pointwise ops), so
the passes match at that level and need no per-model code.
"""

from __future__ import annotations

import copy
import inspect
import warnings

import torch

from .graph import Graph
from .lower import NEEDS_TORCH_OPS, unsupported

INPUT_NAMES = ("input_ids", "attention_mask", "token_type_ids")


def _meta(model: torch.nn.Module) -> dict:
    return {
        "model_class": type(model).__name__,
        "model_type": getattr(model.config, "model_type", ""),
    }


def _refused_by_export(model: torch.nn.Module, error: Exception) -> bool:
    """Whether ``error`` from ``torch.export`` says that the model's code cannot be traced with
    symbolic sizes (rather than a bug): the sizes' constraints are violated or a guard depends on
    data, or any error for an architecture known not to compile. On torch 2.11 DeBERTa-v2's
    ``permute(...).contiguous()`` adds a guard that export's constraint solver cannot prove for
    every sequence length ("Constraints violated (seq)!"), before the compiler sees its graph.
    """
    from torch._dynamo.exc import UserError, UserErrorType
    from torch.fx.experimental import symbolic_shapes

    if isinstance(error, UserError) and error.error_type == UserErrorType.CONSTRAINT_VIOLATION:
        return True
    refusals = (
        symbolic_shapes.ConstraintViolationError,
        symbolic_shapes.GuardOnDataDependentSymNode,
    )
    if isinstance(error, refusals):
        return True
    return getattr(model.config, "model_type", "") in NEEDS_TORCH_OPS


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
            exported = torch.export.export(model, (), inputs, dynamic_shapes=dynamic, strict=False)
        except Exception as e:
            if not _refused_by_export(model, e):
                raise
            lines = [line.strip() for line in str(e).splitlines() if line.strip()]
            raise unsupported(
                _meta(model),
                f"torch.export (torch {torch.__version__}) could not trace it with symbolic "
                f"batch and sequence sizes: {type(e).__name__}: {' '.join(lines[:3])}",
            ) from e
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
