"""A read-only index of one ONNX graph: who produces and who reads each tensor, constants, shapes.

Site finding, naming and wiring all walk the graph by tensor name; this module answers their
questions ("which node produces this tensor?", "is this input a constant, and what is it?",
"what rank does it have?") without loading any weight from external data.
"""

from __future__ import annotations

import ast
import heapq
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from numpy.typing import NDArray
from onnx import numpy_helper

__all__ = ["Dim", "GraphIndex", "attribute", "metadata", "topological"]

# A symbolic dimension: an int when known, a name for a named dynamic axis, None when unknown.
Dim = int | str | None

# Ops whose output holds exactly the neurons of their (first) input, value for value.
PASS_THROUGH_OPS = frozenset({"Identity", "Dropout", "Cast"})


def attribute(node: onnx.NodeProto, name: str, default: Any = None) -> Any:
    """The value of attribute ``name`` of ``node`` (decoded strings), or ``default``."""
    for attr in node.attribute:
        if attr.name == name:
            value = onnx.helper.get_attribute_value(attr)
            return value.decode() if isinstance(value, bytes) else value
    return default


def metadata(node: onnx.NodeProto) -> dict[str, str]:
    return {prop.key: prop.value for prop in node.metadata_props}


def metadata_list(node: onnx.NodeProto, key: str) -> list[str] | None:
    """A list-valued metadata entry written by torch's dynamo exporter (a Python literal)."""
    raw = metadata(node).get(key)
    if raw is None:
        return None
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return None
    return [str(v) for v in value] if isinstance(value, list) else None


@dataclass
class GraphIndex:
    """Producers, consumers, constants and value infos of one (main) graph."""

    graph: onnx.GraphProto
    producer: dict[str, onnx.NodeProto] = field(default_factory=dict)
    consumers: dict[str, list[onnx.NodeProto]] = field(default_factory=dict)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)
    constants: dict[str, onnx.TensorProto] = field(default_factory=dict)
    shapes: dict[str, tuple[Dim, ...] | None] = field(default_factory=dict)
    elem_types: dict[str, int] = field(default_factory=dict)
    order: dict[int, int] = field(default_factory=dict)

    @classmethod
    def of(cls, graph: onnx.GraphProto) -> GraphIndex:
        index = cls(graph)
        for position, node in enumerate(graph.node):
            index.order[id(node)] = position
            for name in node.output:
                if name:
                    index.producer[name] = node
            for name in node.input:
                if name:
                    index.consumers.setdefault(name, []).append(node)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                tensor = attribute(node, "value")
                if isinstance(tensor, onnx.TensorProto):
                    index.constants[node.output[0]] = tensor
        for tensor in graph.initializer:
            index.initializers[tensor.name] = tensor
        for info in (*graph.input, *graph.value_info, *graph.output):
            index._record(info)
        for tensor in graph.initializer:
            index.shapes.setdefault(tensor.name, tuple(int(d) for d in tensor.dims))
            index.elem_types.setdefault(tensor.name, tensor.data_type)
        return index

    def _record(self, info: onnx.ValueInfoProto) -> None:
        kind = info.type.WhichOneof("value")
        if kind != "tensor_type":
            return
        tensor_type = info.type.tensor_type
        if tensor_type.elem_type:
            self.elem_types[info.name] = tensor_type.elem_type
        if not tensor_type.HasField("shape"):
            self.shapes.setdefault(info.name, None)
            return
        dims: list[Dim] = []
        for dim in tensor_type.shape.dim:
            if dim.HasField("dim_value"):
                dims.append(int(dim.dim_value))
            elif (
                dim.HasField("dim_param")
                and dim.dim_param
                and not dim.dim_param.startswith("unk__")
            ):
                dims.append(dim.dim_param)
            else:  # unknown, or a name shape inference made up for an unknown dim
                dims.append(None)
        known = self.shapes.get(info.name)
        if known is None or _known_dims(dims) > _known_dims(known):
            self.shapes[info.name] = tuple(dims)

    # -- questions ------------------------------------------------------------------------------

    def nodes(self) -> Iterator[onnx.NodeProto]:
        return iter(self.graph.node)

    def position(self, node: onnx.NodeProto) -> int:
        return self.order[id(node)]

    def readers(self, tensor: str) -> list[onnx.NodeProto]:
        return self.consumers.get(tensor, [])

    def is_graph_output(self, tensor: str) -> bool:
        return any(output.name == tensor for output in self.graph.output)

    def is_initializer(self, tensor: str) -> bool:
        return tensor in self.initializers

    def resolve(self, tensor: str) -> str:
        """The initializer behind a chain of ``Identity`` nodes (the legacy exporter's way of
        sharing one initializer under several names), or ``tensor`` itself."""
        seen = 0
        while tensor not in self.initializers and seen < 16:
            node = self.producer.get(tensor)
            if node is None or node.op_type != "Identity":
                break
            tensor, seen = node.input[0], seen + 1
        return tensor

    def is_param(self, tensor: str) -> bool:
        """Whether ``tensor`` is an initializer, directly or through Identity nodes."""
        return self.resolve(tensor) in self.initializers

    def constant(self, tensor: str) -> NDArray[Any] | None:
        """The value of a small constant input (a Constant node or an initializer stored in
        the file), or ``None``; weights kept in external data are never read."""
        proto = self.constants.get(tensor)
        if proto is None:
            proto = self.initializers.get(tensor)
            if proto is None or proto.data_location == onnx.TensorProto.EXTERNAL:
                return None
            if int(np.prod(proto.dims, dtype=np.int64)) > 64:  # scalars and tiny vectors only
                return None
        return np.asarray(numpy_helper.to_array(proto))

    def scalar(self, tensor: str) -> float | None:
        value = self.constant(tensor)
        if value is None or value.size != 1:
            return None
        return float(value.reshape(-1)[0])

    def shape(self, tensor: str) -> tuple[Dim, ...] | None:
        return self.shapes.get(tensor)

    def rank(self, tensor: str) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def param_shape(self, tensor: str) -> tuple[int, ...] | None:
        """The shape of an initializer (from its dims: no data is read)."""
        proto = self.initializers.get(tensor)
        return None if proto is None else tuple(int(d) for d in proto.dims)

    def uses(self, tensor: str) -> int:
        """How many nodes read ``tensor``, counting readers through Identity aliases (an
        initializer read twice is shared)."""
        total = 0
        for reader in self.consumers.get(tensor, []):
            total += self.uses(reader.output[0]) if reader.op_type == "Identity" else 1
        return total

    def other_input(self, node: onnx.NodeProto, tensor: str) -> str | None:
        """The other input of a binary node, given one of them."""
        inputs = [name for name in node.input if name]
        if len(inputs) != 2 or tensor not in inputs:
            return None
        return str(inputs[1] if inputs[0] == tensor else inputs[0])


def _known_dims(dims: Sequence[Dim]) -> int:
    return sum(d is not None for d in dims)


def is_subgraph_holder(node: onnx.NodeProto) -> bool:
    return any(
        attr.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for attr in node.attribute
    )


def subgraphs(node: onnx.NodeProto) -> Sequence[onnx.GraphProto]:
    found: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            found.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            found.extend(attr.graphs)
    return found


def topological(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The graph's nodes in an order where every node follows its producers (Kahn, stable).

    ONNX requires it, but converters do not always keep it (an fp16 converter appends its input
    Casts last); ONNX Runtime sorts by itself, onnx's shape inference does not.
    """
    produced_by: dict[str, int] = {}
    for position, node in enumerate(graph.node):
        for name in node.output:
            produced_by[name] = position
    waiting = [0] * len(graph.node)
    followers: dict[int, list[int]] = {}
    for position, node in enumerate(graph.node):
        parents = {produced_by[name] for name in _outer_inputs(node) if name in produced_by}
        parents.discard(position)
        waiting[position] = len(parents)
        for parent in parents:
            followers.setdefault(parent, []).append(position)
    ready = [i for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order: list[int] = []
    while ready:
        position = heapq.heappop(ready)
        order.append(position)
        for follower in followers.get(position, []):
            waiting[follower] -= 1
            if waiting[follower] == 0:
                heapq.heappush(ready, follower)
    if len(order) != len(graph.node):  # a cycle: leave the file's order
        return list(graph.node)
    return [graph.node[i] for i in order]


def _outer_inputs(node: onnx.NodeProto) -> set[str]:
    """A node's inputs, and what its subgraphs read from the enclosing graph."""
    names = {name for name in node.input if name}
    for body in subgraphs(node):
        inner = {out for n in body.node for out in n.output}
        inner |= {i.name for i in body.input} | {t.name for t in body.initializer}
        for n in body.node:
            names |= _outer_inputs(n) - inner
    return names
