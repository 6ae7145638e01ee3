"""The graph that the passes rewrite: an FX graph whose placeholders are the model's inputs and
its constants (parameters and buffers), with the constants' values kept beside it.

A pass is a function ``Graph -> Graph``; it may rewrite ``gm`` in place and add constants, and
holds no state of its own. ``Graph.run`` executes the graph with PyTorch, which is how each pass
is checked: the graph computes the same function before and after it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx


@dataclass
class Graph:
    gm: fx.GraphModule
    constants: dict[str, torch.Tensor]
    """Placeholder name -> value, for every placeholder that is not a model input."""
    inputs: list[str]
    """Placeholder names of the model inputs (``input_ids``, ``attention_mask``...)."""
    fqns: dict[str, str] = field(default_factory=dict)
    """Placeholder name -> the parameter or buffer name in the original model."""
    output_fields: list[str] = field(default_factory=list)
    output_class: str = ""
    meta: dict = field(default_factory=dict)

    def copy(self) -> Graph:
        gm = fx.GraphModule(self.gm, copy.deepcopy(self.gm.graph))
        return Graph(
            gm,
            dict(self.constants),
            list(self.inputs),
            dict(self.fqns),
            list(self.output_fields),
            self.output_class,
            dict(self.meta),
        )

    @property
    def graph(self) -> fx.Graph:
        return self.gm.graph

    def placeholders(self) -> list[fx.Node]:
        return [n for n in self.graph.nodes if n.op == "placeholder"]

    def input_node(self, name: str) -> fx.Node | None:
        for n in self.placeholders():
            if n.name == name and name in self.inputs:
                return n
        return None

    def constant(self, node) -> torch.Tensor | None:
        """The value of ``node`` if it is a constant placeholder, else None."""
        if isinstance(node, fx.Node) and node.op == "placeholder":
            return self.constants.get(node.name)
        return None

    def add_constant(self, name: str, value: torch.Tensor, fqn: str) -> fx.Node:
        """A new constant placeholder, placed after the last existing placeholder."""
        base, i = name, 0
        existing = {n.name for n in self.placeholders()}
        while name in existing:
            i += 1
            name = f"{base}_{i}"
        last = self.placeholders()[-1]
        with self.graph.inserting_after(last):
            node = self.graph.placeholder(name)
        node.meta["val"] = value
        self.constants[node.name] = value
        self.fqns[node.name] = fqn
        return node

    def cleanup(self) -> Graph:
        """Drop dead nodes and constants nothing reads any more; recompile."""
        # Every op of an inference graph is pure; FX's own dead-code elimination keeps ops it
        # considers random (attention, dropout) even when nothing reads them.
        for node in reversed(list(self.graph.nodes)):
            if node.op == "call_function" and not node.users:
                self.graph.erase_node(node)
        for n in list(self.placeholders()):
            if n.name in self.constants and not n.users:
                self.graph.erase_node(n)
                del self.constants[n.name]
                self.fqns.pop(n.name, None)
        self.graph.lint()
        self.gm.recompile()
        return self

    def run(self, **inputs: torch.Tensor):
        """Execute the graph with PyTorch; returns the flat tuple of outputs."""
        args = []
        for n in self.placeholders():
            if n.name in self.constants:
                args.append(self.constants[n.name])
            else:
                args.append(inputs[n.name])
        return self.gm(*args)


def tensor_shape(node) -> list[str] | None:
    """The (possibly symbolic) shape of a node's value as strings, or None if unknown."""
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return [str(s) for s in val.shape]
    return None


def replace(graph: fx.Graph, old: fx.Node, target, args: tuple, kwargs: dict | None = None):
    """Insert ``target(*args, **kwargs)`` before ``old``, give it old's value metadata, and make
    every user of ``old`` read it instead."""
    with graph.inserting_before(old):
        new = graph.call_function(target, args, kwargs or {})
    new.meta.update({k: v for k, v in old.meta.items() if k in ("val", "tensor_meta")})
    old.replace_all_uses_with(new)
    return new


def is_op(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def single_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None
