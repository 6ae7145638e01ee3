"""Lowering: the fused FX graph -> a ``Program`` of kernel calls over row buffers.

Every value of the graph is either a ``[B, S, ...]`` tensor (one row per token: layout
``tokens``), a ``[B, ...]`` tensor (one row per sequence: layout ``batch``), a constant (a
weight) or a model input. Kernels see the first two as 2-D row buffers, so the same program runs
on all ``B * S`` positions or on the real tokens only.
"""

from __future__ import annotations

import operator
import re

import torch
import torch.fx as fx

from . import ops, torch_ops
from .graph import Graph, tensor_shape
from .program import Buffer, Call, Program


class UnsupportedGraph(ValueError):
    """The graph holds operations that optimum-disc has no kernel or rule for."""


# The graph decides what compiles: a model of another type compiles if its graph matches the
# passes, and one of a listed type with an unusual configuration may not. These tables only
# name architectures in messages (docs/models.md has the heads and precisions of each).
ARCHITECTURES = {
    "bert": "BERT",
    "distilbert": "DistilBERT",
    "electra": "ELECTRA",
    "albert": "ALBERT",
    "roberta": "RoBERTa",
    "xlm-roberta": "XLM-RoBERTa",
    "camembert": "CamemBERT",
    "mpnet": "MPNet",
    "deberta-v2": "DeBERTa-v2/v3",
    "modernbert": "ModernBERT",
}
"""transformers ``model_type`` -> name, of the architectures whose graphs compile."""

_ARCHITECTURE_NEEDS = {
    "roberta": {"padded_positions"},
    "xlm-roberta": {"padded_positions"},
    "camembert": {"padded_positions"},
    "mpnet": {"padded_positions", "torch_ops"},
    "deberta-v2": {"torch_ops"},
    "modernbert": {"torch_ops"},
}

NEEDS_TORCH_OPS = {
    "mpnet": (
        "MPNet adds a relative position bias (one learned value per head and bucket of j - i) "
        "to the attention scores, and the attention kernel takes no bias"
    ),
    "deberta": (
        "DeBERTa's disentangled attention adds content-to-position and position-to-content "
        "scores gathered from relative position embeddings, which the attention kernel does not "
        "compute"
    ),
    "deberta-v2": (
        "DeBERTa-v2/v3's disentangled attention adds content-to-position and "
        "position-to-content scores gathered from relative position embeddings, which the "
        "attention kernel does not compute"
    ),
    "modernbert": (
        "ModernBERT rotates queries and keys by rotary position embeddings and uses "
        "sliding-window (local) attention in most layers; the kernels do neither"
    ),
}
"""Architectures whose attention runs as PyTorch ops (``torch`` calls), and why."""

RUNTIME_FEATURES = {
    "scalar_rows": "outputs of one value per token or per sequence",
    "padded_positions": (
        "refusing inputs whose RoBERTa-style positions differ from s + padding_idx + 1 "
        "(left padding, padding tokens inside a sequence)"
    ),
    "torch_ops": "operations without a kernel run as PyTorch ops over padded rows",
    "first_query_attention": "attention of the first query of each sequence only",
}
"""Features some programs need from the runtime, which lists those it has in ``FEATURES``."""


def runtime_features() -> frozenset[str]:
    """The features of ``RUNTIME_FEATURES`` that this runtime declares (``runtime.FEATURES``)."""
    from . import runtime

    return frozenset(getattr(runtime, "FEATURES", ()))


def supported_architectures(features: frozenset[str] | None = None) -> list[str]:
    """Names of the architectures that compile with this runtime."""
    features = runtime_features() if features is None else features
    return [
        name
        for kind, name in ARCHITECTURES.items()
        if _ARCHITECTURE_NEEDS.get(kind, set()) <= features
    ]


def unsupported(meta: dict, problem: str) -> UnsupportedGraph:
    """The error for a model that does not compile: what, why, and what does compile."""
    model, kind = meta.get("model_class", "the model"), meta.get("model_type") or "?"
    if kind in NEEDS_TORCH_OPS and "torch.export" not in problem:
        lines = [
            f"{model} (model_type {kind!r}) cannot be compiled with torch_fallback=False: "
            f"{NEEDS_TORCH_OPS[kind]}; those operations run as PyTorch ops with "
            "torch_fallback=True (the default).",
            f"The compiler stopped at: {problem}",
        ]
    else:
        lines = [f"{model} (model_type {kind!r}) cannot be compiled: {problem}"]
    features = runtime_features()
    pending = [
        f"{name} (runtime feature {', '.join(sorted(_ARCHITECTURE_NEEDS[k] - features))})"
        for k, name in ARCHITECTURES.items()
        if _ARCHITECTURE_NEEDS.get(k, set()) - features
    ]
    lines.append(
        f"optimum-disc compiles {', '.join(supported_architectures(features))} encoders"
        + (f"; these need a runtime feature first: {', '.join(pending)}" if pending else "")
        + " (docs/models.md lists heads and precisions, and what is not supported and why)."
    )
    if kind not in NEEDS_TORCH_OPS and kind not in ARCHITECTURES:
        lines.append("Please open an issue with this message.")
    return UnsupportedGraph("\n".join(lines))


def _describe(node: fx.Node) -> str:
    target = getattr(node.target, "__name__", str(node.target))
    args = node.args
    if node.target is ops.pointwise:  # the steps' names, not the whole expression
        target = f"pointwise[{', '.join(step[0] for step in args[0]['steps'])}]"
        args = args[1:]
    return f"{node.name} = {target}{tuple(a.name if isinstance(a, fx.Node) else a for a in args)}"


_SQUEEZES = (torch.ops.aten.squeeze.dim, torch.ops.aten.squeeze.dims)
# The fused ops that lower to kernels when they compute rows from rows.
_KERNEL_OPS = (
    ops.embed_layernorm,
    ops.linear,
    ops.layer_norm,
    ops.attention,
    ops.attention_packed,
    ops.attention_first,
    ops.attention_packed_first,
    ops.first_token,
    ops.pointwise,
)
_ATTENTION_OPS = {
    # op -> (q, k and v in one packed tensor, the first query of each sequence only)
    ops.attention: (False, False),
    ops.attention_packed: (True, False),
    ops.attention_first: (False, True),
    ops.attention_packed_first: (True, True),
}


def lower(g: Graph, allow_torch: bool = True) -> Program:
    """The program of a fused graph. Operations that no kernel covers become ``torch`` calls
    (see ``torch_ops``) when ``allow_torch``; otherwise they make the model unsupported."""
    ids = g.input_node("input_ids")
    if ids is None:
        raise unsupported(g.meta, "the graph has no input_ids")
    batch_sym, seq_sym = tensor_shape(ids)[:2]
    sym_names = {batch_sym: "B", seq_sym: "S"}

    def size_text(size) -> str:
        text = str(size)
        for sym, letter in sym_names.items():
            text = re.sub(rf"\b{re.escape(sym)}\b", letter, text)
        if re.search(r"\b[a-z]+\d+\b", text):  # a size that is neither batch nor sequence
            raise unsupported(
                g.meta, f"a size {size} depends on the data, not on the batch and sequence"
            )
        return text

    def layout(node) -> tuple[str, list]:
        shape = tensor_shape(node)
        if shape is None:
            raise unsupported(g.meta, f"no shape known for {node.name}")
        concrete = lambda dims: all(d.isdigit() for d in dims)  # noqa: E731
        if len(shape) >= 2 and shape[:2] == [batch_sym, seq_sym] and concrete(shape[2:]):
            return "tokens", [int(s) for s in shape[2:]]
        if len(shape) >= 1 and shape[0] == batch_sym and concrete(shape[1:]):
            return "batch", [int(s) for s in shape[1:]]
        return "free", [int(s) if s.isdigit() else size_text(s) for s in shape]

    weights: dict[str, torch.Tensor] = {}
    refs: dict[fx.Node, str] = {}
    for node in g.placeholders():
        if node.name in g.constants:
            name = g.fqns.get(node.name, node.name)
            weights[name] = g.constants[node.name]
            refs[node] = f"w:{name}"
        else:
            refs[node] = f"p:{node.name}"

    def ref(a):
        if a is None:
            return None
        if a not in refs:
            raise unsupported(g.meta, f"{a.name} is read before any kernel computes it")
        return refs[a]

    calls: list[Call] = []
    buffers: dict[str, Buffer] = {}
    unmatched = []
    torch_calls: dict[str, int] = {}
    keeps_padding: list[str] = []
    requires: dict[str, str] = {}  # runtime feature -> what needs it
    meta = dict(g.meta)

    def squeezed(node) -> str | None:
        """The buffer that ``squeeze(buffer, -1)`` can become, if its last dimension is 1."""
        src, dims = node.args[0], node.args[1]
        dims = [dims] if isinstance(dims, int) else list(dims)
        shape = tensor_shape(src)
        computed = src in refs and refs[src] == src.name and src.name in buffers
        if not computed or shape is None or len(src.users) != 1:
            return None
        if buffers[src.name].layout == "free":
            return None
        if buffers[src.name].shape != [1] or [d % len(shape) for d in dims] != [len(shape) - 1]:
            return None
        return src.name

    def emit(node, kernel, inputs, attrs):
        lay, shape = layout(node)
        dtype = str(node.meta["val"].dtype).removeprefix("torch.")
        buffers[node.name] = Buffer(node.name, lay, shape, dtype)
        calls.append(Call(kernel, node.name, inputs, attrs))
        refs[node] = node.name

    def tensor_args(node):
        found = []

        def walk(v):
            if isinstance(v, fx.Node):
                if isinstance(v.meta.get("val"), torch.Tensor) and v not in found:
                    found.append(v)
            elif isinstance(v, (list, tuple)):
                for x in v:
                    walk(x)
            elif isinstance(v, dict):
                for x in v.values():
                    walk(x)

        walk(node.args)
        walk(node.kwargs)
        return found

    def on_rows(node) -> bool:
        """Whether a kernel can compute ``node``: its value and every tensor it reads are rows
        (or weights and inputs)."""
        if layout(node)[0] == "free":
            return False
        for a in tensor_args(node):
            r = refs.get(a)
            if r is None or (":" not in r and (r not in buffers or buffers[r].layout == "free")):
                return False
        return True

    def emit_torch(node, source=None, index=None):
        source = source or node
        name = torch_ops.op_name(source.target)
        if name is None or not allow_torch:
            unmatched.append(_describe(node))
            refs[node] = node.name
            return
        inputs: dict[str, str | None] = {}

        def tensor_ref(a):
            r = ref(a)
            key = next((k for k, v in inputs.items() if v == r), None)
            if key is None:
                key = f"t{len(inputs)}"
                inputs[key] = r
            if ":" not in r and r in buffers and buffers[r].layout == "tokens":
                keeps_padding.append(node.name)
            return key

        def size_expr(a):
            return size_text(a.meta.get("val"))

        try:
            args = torch_ops.encode(list(source.args), tensor_ref, size_expr)
            kwargs = {
                k: torch_ops.encode(v, tensor_ref, size_expr) for k, v in source.kwargs.items()
            }
        except torch_ops.TorchOpError as e:
            raise unsupported(g.meta, f"{_describe(node)}: {e}") from None
        attrs = {"op": name, "args": args, "kwargs": kwargs}
        if index is not None:
            attrs["index"] = index
        lay, shape = layout(node)
        if lay == "tokens":
            keeps_padding.append(node.name)
        emit(node, "torch", inputs, attrs)
        torch_calls[name] = torch_calls.get(name, 0) + 1

    for node in g.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        t, a = node.target, node.args
        val = node.meta.get("val")
        if t is operator.getitem and isinstance(a[0], fx.Node):
            if isinstance(val, torch.Tensor):
                emit_torch(node, source=a[0], index=a[1])
            continue
        if not isinstance(val, torch.Tensor):
            # Sizes (read where they are used, as expressions of B and S) and tuples (read
            # through their getitem users).
            continue
        if t in _KERNEL_OPS and not on_rows(node):
            emit_torch(node)
        elif t is ops.embed_layernorm:
            table, offset = g.constant(a[3]), int(a[8])
            if table is not None:
                limit = meta.get("max_position_embeddings", table.shape[0])
                meta["max_position_embeddings"] = min(limit, table.shape[0] - offset)
            if len(a) > 9 and a[9] is not None:
                meta["positions"] = {"pad_token_id": int(a[9]), "offset": offset}
                requires["padded_positions"] = (
                    f"its position ids count the tokens that are not padding (id {a[9]}), so "
                    f"they are s + {offset} only where no padding comes before a token; the "
                    "program must refuse inputs with left padding or padding inside a sequence"
                )
            emit(
                node,
                "embed_layernorm",
                {
                    "input_ids": "p:input_ids",
                    "token_type_ids": "p:token_type_ids" if a[1] is not None else None,
                    "word": ref(a[2]),
                    "position": ref(a[3]),
                    "token_type": ref(a[4]),
                    "ln_weight": ref(a[5]),
                    "ln_bias": ref(a[6]),
                    "rows": "p:rows",
                },
                {"eps": float(a[7]), "position_offset": int(a[8])},
            )
        elif t is ops.linear:
            emit(
                node,
                "linear",
                {"x": ref(a[0]), "weight": ref(a[1]), "bias": ref(a[2]), "residual": ref(a[4])},
                {"activation": a[3]},
            )
        elif t is ops.layer_norm:
            emit(
                node,
                "layer_norm",
                {"x": ref(a[0]), "residual": ref(a[1]), "weight": ref(a[2]), "bias": ref(a[3])},
                {"eps": float(a[4])},
            )
        elif t in _ATTENTION_OPS:
            packed, first = _ATTENTION_OPS[t]
            qkv = [a[0]] * 3 if packed else list(a[:3])
            width = layout(node)[1][0]
            num_heads = int(a[-2])
            attrs = {"first_only": True} if first else {}
            if first:
                requires["first_query_attention"] = (
                    "its last attention computes the first query of each sequence only (the "
                    "one row its pooling reads)"
                )
            emit(
                node,
                "attention",
                {
                    "q": ref(qkv[0]),
                    "k": ref(qkv[1]),
                    "v": ref(qkv[2]),
                    "cu_seqlens": "p:cu_seqlens",
                    "key_valid": "p:key_valid",
                },
                {
                    "num_heads": num_heads,
                    "head_dim": width // num_heads,
                    "scale": float(a[-1]) if a[-1] is not None else (width // num_heads) ** -0.5,
                    "offsets": [0, width, 2 * width] if packed else [0, 0, 0],
                    **attrs,
                },
            )
        elif t is ops.first_token:
            emit(node, "first_token", {"x": ref(a[0]), "first_rows": "p:first_rows"}, {})
        elif t is ops.pointwise:
            emit(
                node,
                "pointwise",
                {f"in{i}": ref(x) for i, x in enumerate(a[1:])},
                {"expr": a[0]},
            )
        elif t in _SQUEEZES and (src := squeezed(node)) is not None:
            # One value per row: the kernel writes one column, read back as [R] or [B].
            buffers[src].shape = []
            refs[node] = src
            requires.setdefault("scalar_rows", "")
        else:
            emit_torch(node)
    if unmatched:
        listed = "\n  ".join(unmatched[:20])
        more = f"\n  ... and {len(unmatched) - 20} more" if len(unmatched) > 20 else ""
        raise unsupported(
            g.meta,
            f"{len(unmatched)} operation(s) have no optimum-disc kernel or rule:\n  {listed}{more}",
        )
    if torch_calls:
        names = ", ".join(sorted(torch_calls))
        requires["torch_ops"] = (
            f"{sum(torch_calls.values())} operations run as PyTorch ops ({names})"
        )
        meta["torch_ops"] = dict(sorted(torch_calls.items()))
    if keeps_padding:
        meta["keeps_padding"] = True

    out_node = next(n for n in g.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    outputs = {}
    for field, value in zip(g.output_fields, outs):
        if value not in refs or refs[value].startswith(("w:", "p:")):
            raise unsupported(g.meta, f"output {field} is not computed by a kernel")
        if buffers[refs[value]].layout == "free":
            raise unsupported(
                g.meta,
                f"output {field} has shape {tensor_shape(value)}, neither [batch, seq, ...] nor "
                "[batch, ...]",
            )
        outputs[field] = refs[value]
    if "scalar_rows" in requires:
        fields = [f for f, b in outputs.items() if b in buffers and buffers[b].shape == []]
        requires["scalar_rows"] = (
            f"{' and '.join(fields)} hold one value per token or per sequence (no hidden "
            "dimension), an output that the runtime must return from a one-column buffer"
        )
    missing = sorted(set(requires) - runtime_features())
    if missing:
        raise unsupported(
            g.meta,
            "; ".join(f"{requires[f]} (runtime feature {f!r})" for f in missing)
            + ". This runtime lacks that feature.",
        )
    if requires:
        meta["requires"] = sorted(requires)
    used = {r[2:] for c in calls for r in c.inputs.values() if r and r.startswith("w:")}
    program = Program(
        inputs=list(g.inputs),
        calls=calls,
        buffers=buffers,
        outputs=outputs,
        output_class=g.output_class,
        weights={k: v.contiguous() for k, v in weights.items() if k in used},
        meta=meta,
    )
    program.check()
    return program
