"""Lowering: the fused FX graph -> a ``Program`` of kernel calls over row buffers.

Every value of the graph is either a ``[B, S, ...]`` tensor (one row per token: layout
``tokens``), a ``[B, ...]`` tensor (one row per sequence: layout ``batch``), a constant (a
weight) or a model input. Kernels see the first two as 2-D row buffers, so the same program runs
on all ``B * S`` positions or on the real tokens only.
"""

from __future__ import annotations

import torch
import torch.fx as fx

from . import ops
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
}
"""transformers ``model_type`` -> name, of the architectures whose graphs compile."""

_ARCHITECTURE_NEEDS = {
    "roberta": {"padded_positions"},
    "xlm-roberta": {"padded_positions"},
    "camembert": {"padded_positions"},
}

NOT_SUPPORTED = {
    "mpnet": (
        "MPNet adds a relative position bias (one learned value per head and bucket of j - i) "
        "to the attention scores, and the attention kernel takes no bias."
    ),
    "deberta": (
        "DeBERTa's disentangled attention adds content-to-position and position-to-content "
        "scores gathered from relative position embeddings, which the attention kernel does not "
        "compute."
    ),
    "deberta-v2": (
        "DeBERTa-v2/v3's disentangled attention adds content-to-position and "
        "position-to-content scores gathered from relative position embeddings, which the "
        "attention kernel does not compute."
    ),
    "modernbert": (
        "ModernBERT rotates queries and keys by rotary position embeddings and uses "
        "sliding-window (local) attention in most layers; the kernels do neither."
    ),
}
"""Known architectures that do not compile, and the kernel features they would need."""

RUNTIME_FEATURES = {
    "scalar_rows": "outputs of one value per token or per sequence",
    "padded_positions": (
        "refusing inputs whose RoBERTa-style positions differ from s + padding_idx + 1 "
        "(left padding, padding tokens inside a sequence)"
    ),
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
    if kind in NOT_SUPPORTED:
        lines = [
            f"{model} (model_type {kind!r}) cannot be compiled: {NOT_SUPPORTED[kind]}",
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
    if kind not in NOT_SUPPORTED and kind not in ARCHITECTURES:
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


def lower(g: Graph) -> Program:
    ids = g.input_node("input_ids")
    if ids is None:
        raise unsupported(g.meta, "the graph has no input_ids")
    batch_sym, seq_sym = tensor_shape(ids)[:2]

    def layout(node) -> tuple[str, list[int]]:
        shape = tensor_shape(node)
        if shape is None:
            raise unsupported(g.meta, f"no shape known for {node.name}")
        if len(shape) >= 2 and shape[:2] == [batch_sym, seq_sym]:
            return "tokens", [int(s) for s in shape[2:]]
        if len(shape) >= 1 and shape[0] == batch_sym:
            return "batch", [int(s) for s in shape[1:]]
        raise unsupported(
            g.meta,
            f"{_describe(node)} has shape {shape}, neither [B, S, ...] nor [B, ...]: a value "
            "that no kernel computes (such as an attention bias over [S, S]).",
        )

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
        if buffers[src.name].shape != [1] or [d % len(shape) for d in dims] != [len(shape) - 1]:
            return None
        return src.name

    def emit(node, kernel, inputs, attrs):
        lay, shape = layout(node)
        dtype = str(node.meta["val"].dtype).removeprefix("torch.")
        buffers[node.name] = Buffer(node.name, lay, shape, dtype)
        calls.append(Call(kernel, node.name, inputs, attrs))
        refs[node] = node.name

    for node in g.graph.nodes:
        if node.op in ("placeholder", "output"):
            continue
        t, a = node.target, node.args
        if t is ops.embed_layernorm:
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
        elif t in (ops.attention, ops.attention_packed):
            packed = t is ops.attention_packed
            qkv = [a[0]] * 3 if packed else list(a[:3])
            width = layout(node)[1][0]
            num_heads = int(a[-2])
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
            unmatched.append(_describe(node))
            refs[node] = node.name
    if unmatched:
        listed = "\n  ".join(unmatched[:20])
        more = f"\n  ... and {len(unmatched) - 20} more" if len(unmatched) > 20 else ""
        raise unsupported(
            g.meta,
            f"{len(unmatched)} operation(s) have no optimum-disc kernel or rule:\n  {listed}{more}",
        )

    out_node = next(n for n in g.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    outputs = {}
    for field, value in zip(g.output_fields, outs):
        if value not in refs or refs[value].startswith(("w:", "p:")):
            raise unsupported(g.meta, f"output {field} is not computed by a kernel")
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
