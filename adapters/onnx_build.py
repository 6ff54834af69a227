"""Building ONNX nodes for the reductions: unique names, shared constants, opset rules.

:class:`Builder` hands out fresh ``neuronwatch/...`` names that collide with nothing in the
model and registers constants once; :class:`Body` collects the nodes of the main graph or of an
``If`` branch and writes reductions the way the model's opset wants (``axes`` as an input from
opset 13 for ``ReduceSum``, 18 for the others; an attribute before).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["FLOAT_TYPES", "PREFIX", "Body", "Builder"]

PREFIX = "neuronwatch"
# Activation types reduced as they are; anything else is cast to float32 first.
FLOAT_TYPES: dict[int, type[np.floating[Any]]] = {
    int(onnx.TensorProto.FLOAT): np.float32,
    int(onnx.TensorProto.DOUBLE): np.float64,
}


@dataclass
class Body:
    """A list of nodes under construction (the main graph or an If branch)."""

    builder: Builder
    nodes: list[onnx.NodeProto] = field(default_factory=list)

    def op(self, op_type: str, *inputs: str, domain: str = "", **attrs: Any) -> str:
        name = self.builder.fresh(op_type)
        self.nodes.append(
            helper.make_node(op_type, list(inputs), [name], name=name, domain=domain, **attrs)
        )
        return name

    def reduce(self, op_type: str, x: str, axes: Sequence[int] | None, keepdims: int = 0) -> str:
        """A reduction with ``axes`` as an input or an attribute, as the opset wants."""
        as_input = self.builder.opset >= (13 if op_type == "ReduceSum" else 18)
        if axes is None:
            return self.op(op_type, x, keepdims=keepdims)
        if as_input:
            return self.op(
                op_type, x, self.builder.const(np.asarray(axes, np.int64)), keepdims=keepdims
            )
        return self.op(op_type, x, axes=list(axes), keepdims=keepdims)

    def graph(self, name: str, outputs: Sequence[tuple[str, int]]) -> onnx.GraphProto:
        """This body as an If branch returning ``outputs`` (tensor, elem type)."""
        results = []
        for tensor, elem in outputs:
            out = self.builder.fresh("out")
            self.nodes.append(helper.make_node("Identity", [tensor], [out], name=out))
            results.append(helper.make_tensor_value_info(out, elem, None))
        return helper.make_graph(self.nodes, name, [], results)


class Builder:
    def __init__(self, model: onnx.ModelProto) -> None:
        self.model = model
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
        self.taken = {
            n for node in model.graph.node for n in (*node.input, *node.output, node.name)
        }
        self.taken.update(t.name for t in model.graph.initializer)
        self.taken.update(t.name for t in (*model.graph.input, *model.graph.output))
        self.counter = 0
        self.values: dict[str, np.ndarray[Any, Any]] = {}
        self.initializers: list[onnx.TensorProto] = []
        self._consts: dict[tuple[str, bytes, tuple[int, ...]], str] = {}

    def fresh(self, hint: str) -> str:
        while True:
            self.counter += 1
            name = f"{PREFIX}/{hint}_{self.counter}"
            if name not in self.taken:
                self.taken.add(name)
                return name

    def const(self, value: Any) -> str:
        array = np.asarray(value)
        key = (array.dtype.str, array.tobytes(), array.shape)
        if key not in self._consts:
            name = self.fresh("const")
            self.initializers.append(numpy_helper.from_array(array, name))
            self._consts[key] = name
            self.values[name] = array
        return self._consts[key]

    def value(self, name: str) -> np.ndarray[Any, Any]:
        return self.values[name]
