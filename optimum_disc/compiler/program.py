"""The compiled program: a flat list of kernel calls over named buffers, plus its weights.

A program is plain data. It prints as readable code (``Program.code()``), serialises to JSON
(``to_dict`` / ``from_dict``) with its weights kept apart (a ``{name: tensor}`` dict that the
artifact stores as safetensors), and is what the runtime executes.

Buffers live in one of three layouts, named by their leading dimension:

* ``tokens``: one row per token that the program computes, ``R`` rows. With padding removed,
  ``R`` is the number of real tokens in the batch; with padding kept, ``R = batch * seq``.
* ``batch``: one row per sequence, ``B`` rows (the pooler and the sequence-classification head).
* ``free``: any other shape (``[B, heads, S, S]`` scores, a table computed from the weights),
  computed and read only by ``torch`` calls: the ATen ops that no kernel or pass covers, run as
  PyTorch ops over the padded ``[B, S, ...]`` view of the row buffers (see ``torch_ops``).

The runtime derives the row bookkeeping from ``attention_mask`` once per call (the prologue) and
turns ``tokens`` outputs back into ``[batch, seq, ...]`` tensors at the end (the epilogue).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

FORMAT_VERSION = 1

# Values of the prologue that kernel calls may read besides the buffers and the weights.
PROLOGUE_VALUES = {
    "input_ids": "the caller's token ids, [B, S]",
    "token_type_ids": "the caller's segment ids, [B, S]",
    "rows": "flat index (b * S + s) of each computed token row, [R]",
    "cu_seqlens": "first row of each sequence and the total, [B + 1] int32",
    "key_valid": "whether each row may be attended to (None when padding is removed), [R]",
    "first_rows": "row of position 0 of each sequence, [B]",
    "attention_mask": "the caller's mask padded into the bucket (0 past each sequence), [B, S]",
}

LAYOUTS = ("tokens", "batch", "free")
DTYPES = ("float32", "float16", "bfloat16", "int64", "int32", "bool", "int8", "uint8")


@dataclass
class Buffer:
    """An activation: ``[R or B, *shape]`` of ``dtype`` (a torch dtype name such as 'float16')."""

    name: str
    layout: str
    shape: list  # ints; a ``free`` buffer's dimensions may be symbolic ("B", "S", "2*B")
    dtype: str

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(f"buffer {self.name!r}: layout {self.layout!r} not in {LAYOUTS}")
        if self.dtype not in DTYPES:
            raise ValueError(
                f"buffer {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}; the program "
                "is corrupt: export the model again."
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    def type_str(self) -> str:
        short = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}.get(self.dtype, self.dtype)
        if self.layout == "free":
            return f"{short}[{', '.join(map(str, self.shape))}]"
        lead = "R" if self.layout == "tokens" else "B"
        return f"{short}[{', '.join([lead, *map(str, self.shape)])}]"


@dataclass
class Call:
    """One kernel call: ``output = kernel(**inputs, **attrs)``.

    ``inputs`` maps each argument name to a buffer, a weight (``"w:" + name``), a prologue value
    (``"p:" + name``) or ``None``; ``attrs`` holds plain JSON values (sizes, epsilons, configs).
    """

    kernel: str
    output: str
    inputs: dict[str, str | None]
    attrs: dict = field(default_factory=dict)


@dataclass
class Program:
    """What the compiler produces and the artifact stores."""

    inputs: list[str]
    calls: list[Call]
    buffers: dict[str, Buffer]
    outputs: dict[str, str]
    output_class: str
    weights: dict[str, torch.Tensor]
    meta: dict = field(default_factory=dict)
    tuning: dict = field(default_factory=dict)

    # -- printing ---------------------------------------------------------------------------

    def code(self) -> str:
        """The program as readable Python-like text, one line per kernel call."""
        args = ", ".join(f"{name}: i64[B, S]" for name in self.inputs)
        lines = [f"def program({args}):"]
        lines.append(
            "    # prologue: rows, cu_seqlens, key_valid, first_rows <- attention_mask"
            if "attention_mask" in self.inputs
            else "    # prologue: every position is a real token"
        )
        for call in self.calls:
            out = self.buffers[call.output]
            if call.kernel == "torch":
                from .torch_ops import describe

                lines.append(f"    {out.name}: {out.type_str()} = {describe(call)}")
                continue
            parts = [f"{k}={_ref(v)}" for k, v in call.inputs.items() if v is not None] + [
                f"{k}={_attr(v)}" for k, v in call.attrs.items() if k != "config"
            ]
            lines.append(f"    {out.name}: {out.type_str()} = {call.kernel}({', '.join(parts)})")
        fields = ", ".join(f"{k}={v}" for k, v in self.outputs.items())
        lines.append(f"    return {self.output_class.rsplit('.', 1)[-1]}({fields})")
        return "\n".join(lines)

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.weights.values())

    # -- serialisation ----------------------------------------------------------------------

    def to_dict(self) -> dict:
        """Everything but the weights, as JSON-able data."""
        return {
            "format_version": FORMAT_VERSION,
            "inputs": list(self.inputs),
            "calls": [
                {"kernel": c.kernel, "output": c.output, "inputs": c.inputs, "attrs": c.attrs}
                for c in self.calls
            ],
            "buffers": {
                b.name: {"layout": b.layout, "shape": b.shape, "dtype": b.dtype}
                for b in self.buffers.values()
            },
            "outputs": dict(self.outputs),
            "output_class": self.output_class,
            "weights": {
                name: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
                for name, t in self.weights.items()
            },
            "meta": self.meta,
            "tuning": self.tuning,
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_dict(cls, d: dict, weights: dict[str, torch.Tensor]) -> Program:
        """Rebuild a program; refuses a document or weights that do not match each other."""
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise ValueError(
                f"program format_version={version!r} is not the supported {FORMAT_VERSION}; "
                "export the model again with this version of optimum-disc."
            )
        declared = d["weights"]
        if set(declared) != set(weights):
            missing = sorted(set(declared) - set(weights))
            extra = sorted(set(weights) - set(declared))
            raise ValueError(
                f"the weights do not match the program: missing {missing[:5]}, "
                f"unexpected {extra[:5]}; export the model again."
            )
        for name, spec in declared.items():
            t = weights[name]
            dtype = str(t.dtype).removeprefix("torch.")
            if list(t.shape) != spec["shape"] or dtype != spec["dtype"]:
                raise ValueError(
                    f"weight {name!r} is {dtype}{list(t.shape)} but the program expects "
                    f"{spec['dtype']}{spec['shape']}; export the model again."
                )
        program = cls(
            inputs=list(d["inputs"]),
            calls=[Call(**c) for c in d["calls"]],
            buffers={n: Buffer(name=n, **b) for n, b in d["buffers"].items()},
            outputs=dict(d["outputs"]),
            output_class=d["output_class"],
            weights=dict(weights),
            meta=dict(d.get("meta", {})),
            tuning=dict(d.get("tuning", {})),
        )
        program.check()
        return program

    @classmethod
    def from_json(cls, text: str, weights: dict[str, torch.Tensor]) -> Program:
        return cls.from_dict(json.loads(text), weights)

    def check(self) -> None:
        """Every reference resolves to something defined before it."""
        defined = set()
        for i, call in enumerate(self.calls):
            for arg, ref in call.inputs.items():
                if ref is None:
                    continue
                kind, _, name = ref.partition(":") if ":" in ref else ("b", "", ref)
                ok = (
                    (kind == "w" and name in self.weights)
                    or (kind == "p" and name in PROLOGUE_VALUES)
                    or (kind == "b" and name in defined)
                )
                if not ok:
                    raise ValueError(
                        f"call {i} ({call.kernel}) argument {arg}={ref!r} refers to nothing "
                        "defined before it; the program is corrupt: export the model again."
                    )
            if call.output not in self.buffers:
                raise ValueError(f"call {i} ({call.kernel}) writes undeclared {call.output!r}")
            if call.kernel == "torch":
                from .torch_ops import check_call

                check_call(i, call)
            defined.add(call.output)
        for field_name, buf in self.outputs.items():
            if buf not in defined:
                raise ValueError(f"output {field_name}={buf!r} is never computed")


def _ref(ref: str) -> str:
    if ref.startswith("w:"):
        return f"w[{ref[2:]!r}]"
    if ref.startswith("p:"):
        return ref[2:]
    return ref


def _attr(v) -> str:
    return repr(v) if not isinstance(v, float) else f"{v:g}"
