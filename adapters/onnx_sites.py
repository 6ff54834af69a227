"""Activation sites of an ONNX graph: the tensors whose values are neurons.

A *site* is the output of one activation: a standard op (Relu ... Mish, Clip as ReLU6/Hardtanh),
a pattern older exporters write out of primitives (SiLU as ``x * Sigmoid(x)``, GELU through
``Erf`` or ``Tanh``, Mish as ``x * Tanh(Softplus(x))``), or a ``com.microsoft`` op an offline
optimiser fused (Gelu, FastGelu, BiasGelu, QuickGelu, FusedGemm/FusedConv with an activation).
Patterns are matched first, so the ``Sigmoid`` inside a SiLU is not a site of its own.

Activations inside control-flow subgraphs (If/Loop/Scan bodies) are found and reported by name
as not watched: their values never reach the main graph, where the reductions are appended.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import onnx

from .onnx_graph import GraphIndex, attribute, subgraphs

__all__ = ["ACTIVATION_OPS", "Site", "find_sites", "unwatched_in_subgraphs"]

MS = "com.microsoft"

# Standard (default domain) activation ops -> the torch class name thresholds are derived from.
ACTIVATION_OPS: dict[str, str] = {
    "Relu": "ReLU",
    "LeakyRelu": "LeakyReLU",
    "PRelu": "PReLU",
    "Elu": "ELU",
    "Selu": "SELU",
    "Celu": "CELU",
    "Gelu": "GELU",
    "Tanh": "Tanh",
    "Sigmoid": "Sigmoid",
    "HardSigmoid": "Hardsigmoid",
    "HardSwish": "Hardswish",
    "Softplus": "Softplus",
    "Mish": "Mish",
}

# com.microsoft ops written by ONNX Runtime's optimisers.
MICROSOFT_OPS: dict[str, str] = {
    "Gelu": "GELU",
    "FastGelu": "GELU",
    "BiasGelu": "GELU",
    "QuickGelu": "QuickGELUActivation",
}

# The ``activation`` attribute of FusedGemm / FusedConv (ORT's names) -> torch class name.
FUSED_ACTIVATIONS: dict[str, str] = {
    "Relu": "ReLU",
    "LeakyRelu": "LeakyReLU",
    "Tanh": "Tanh",
    "Sigmoid": "Sigmoid",
    "HardSigmoid": "Hardsigmoid",
    "Elu": "ELU",
    "Selu": "SELU",
    "Softplus": "Softplus",
    "Clip": "Hardtanh",
}
FUSED_OPS = frozenset({"FusedGemm", "FusedConv", "FusedMatMul"})

_SQRT2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


@dataclass(frozen=True)
class Site:
    """One activation whose output tensor holds neurons.

    - ``output``: the tensor the reductions read (the activation's output: fused kernels run).
    - ``input``: the pre-activation tensor (where wiring walks back to the producer), or
      ``None`` when the activation is fused into its producer (FusedGemm, FusedConv).
    - ``op``: what was matched (``Relu``, ``GELU(erf)``, ``com.microsoft.BiasGelu``, ...).
    - ``activation``/``params``: the torch class name and parameters thresholds come from.
    - ``nodes``: every node of the activation, in graph order; the last one names the site.
    """

    output: str
    input: str | None
    op: str
    activation: str
    params: tuple[tuple[str, float], ...]
    nodes: tuple[onnx.NodeProto, ...] = field(compare=False)

    @property
    def anchor(self) -> onnx.NodeProto:
        return self.nodes[-1]

    @property
    def producer_node(self) -> onnx.NodeProto | None:
        """The fused producer (FusedGemm/FusedConv/BiasGelu) when the site is one, else None."""
        node = self.nodes[-1]
        if node.domain == MS and (node.op_type in FUSED_OPS or node.op_type == "BiasGelu"):
            return node
        return None


def _single_reader(index: GraphIndex, tensor: str, op: str) -> onnx.NodeProto | None:
    readers = index.readers(tensor)
    if len(readers) != 1 or readers[0].op_type != op or index.is_graph_output(tensor):
        return None
    return readers[0]


def _close(value: float | None, target: float, tol: float = 1e-3) -> bool:
    return value is not None and abs(value - target) <= tol * max(1.0, abs(target))


def _times_half(index: GraphIndex, node: onnx.NodeProto, operand: str) -> bool:
    """Whether ``node`` multiplies ``operand`` by 0.5 (or divides it by 2)."""
    other = index.other_input(node, operand)
    if other is None:
        return False
    if node.op_type == "Mul":
        return _close(index.scalar(other), 0.5)
    return node.op_type == "Div" and node.input[0] == operand and _close(index.scalar(other), 2.0)


def _gelu_tail(index: GraphIndex, one_plus: onnx.NodeProto, x: str) -> list[onnx.NodeProto] | None:
    """The nodes forming ``0.5 * x * one_plus`` after ``one_plus`` (= 1 + erf/tanh(...)), in any
    of the association orders exporters write; ``None`` if the product is not that."""
    term = one_plus.output[0]
    first = next((n for n in index.readers(term) if n.op_type == "Mul"), None)
    if first is None or len(index.readers(term)) != 1:
        return None
    other = index.other_input(first, term)
    if other is None:
        return None
    if other == x:  # (x * (1+e)) * 0.5
        second = index.readers(first.output[0])
        if len(second) == 1 and _times_half(index, second[0], first.output[0]):
            return [first, second[0]]
        return None
    if _close(index.scalar(other), 0.5):  # ((1+e) * 0.5) * x
        second = index.readers(first.output[0])
        if (
            len(second) == 1
            and second[0].op_type == "Mul"
            and index.other_input(second[0], first.output[0]) == x
        ):
            return [first, second[0]]
        return None
    half = index.producer.get(other)  # (x * 0.5) * (1+e)
    if (
        half is not None
        and half.op_type in ("Mul", "Div")
        and x in half.input
        and _times_half(index, half, x)
    ):
        return [half, first]
    return None


def _is_one(index: GraphIndex, node: onnx.NodeProto, tensor: str) -> bool:
    other = index.other_input(node, tensor)
    return node.op_type == "Add" and other is not None and _close(index.scalar(other), 1.0)


def _match_erf_gelu(index: GraphIndex, erf: onnx.NodeProto) -> Site | None:
    scaled = index.producer.get(erf.input[0])
    if scaled is None or scaled.op_type not in ("Div", "Mul"):
        return None
    x = scaled.input[0]
    constant = index.scalar(scaled.input[1])
    if scaled.op_type == "Mul" and not _close(constant, 1.0 / _SQRT2):
        x, constant = scaled.input[1], index.scalar(scaled.input[0])
        if not _close(constant, 1.0 / _SQRT2):
            return None
    if scaled.op_type == "Div" and not _close(constant, _SQRT2):
        return None
    one_plus = _single_reader(index, erf.output[0], "Add")
    if one_plus is None or not _is_one(index, one_plus, erf.output[0]):
        return None
    tail = _gelu_tail(index, one_plus, x)
    if tail is None:
        return None
    nodes = (scaled, erf, one_plus, *tail)
    return Site(tail[-1].output[0], x, "GELU(erf)", "GELU", (), _ordered(index, nodes))


def _scaled_by(index: GraphIndex, tensor: str, factor: float) -> tuple[onnx.NodeProto, str] | None:
    """``(node, other)`` when ``tensor`` is ``Mul(factor, other)`` in either order."""
    node = index.producer.get(tensor)
    if node is None or node.op_type != "Mul" or len(node.input) != 2:
        return None
    for constant, other in (node.input, node.input[::-1]):
        if _close(index.scalar(constant), factor):
            return node, other
    return None


def _cube(index: GraphIndex, tensor: str) -> tuple[str, list[onnx.NodeProto]] | None:
    """``(x, nodes)`` when ``tensor`` is ``x**3``: ``Pow(x, 3)``, ``x * (x * x)`` or
    ``(x * x) * x``."""
    node = index.producer.get(tensor)
    if node is None or len(node.input) != 2:
        return None
    if node.op_type == "Pow" and _close(index.scalar(node.input[1]), 3.0):
        return node.input[0], [node]
    if node.op_type != "Mul":
        return None
    for x, other in (node.input, node.input[::-1]):
        square = index.producer.get(other)
        if square is not None and square.op_type == "Mul" and list(square.input) == [x, x]:
            return x, [square, node]
    return None


def _match_tanh_gelu(index: GraphIndex, tanh: onnx.NodeProto) -> Site | None:
    """``0.5 * x * (1 + tanh(sqrt(2/pi) * (x + 0.044715 * x**3)))``, every term rooted at the
    same ``x``: only the nodes of this one GELU are claimed, never a neighbour's."""
    one_plus = _single_reader(index, tanh.output[0], "Add")
    if one_plus is None or not _is_one(index, one_plus, tanh.output[0]):
        return None
    scaled = _scaled_by(index, tanh.input[0], _SQRT_2_OVER_PI)
    if scaled is None:
        return None
    scale, inner = scaled
    add = index.producer.get(inner)
    if add is None or add.op_type != "Add" or len(add.input) != 2:
        return None
    for x, term in (add.input, add.input[::-1]):
        cubic = _scaled_by(index, term, 0.044715)
        cube = _cube(index, cubic[1]) if cubic is not None else None
        if cubic is None or cube is None or cube[0] != x:
            continue
        tail = _gelu_tail(index, one_plus, x)
        if tail is not None:
            nodes = (*cube[1], cubic[0], add, scale, tanh, one_plus, *tail)
            return Site(tail[-1].output[0], x, "GELU(tanh)", "GELU", (), _ordered(index, nodes))
    return None


def _match_gated(index: GraphIndex, node: onnx.NodeProto) -> Site | None:
    """``x * Sigmoid(x)`` (SiLU), ``x * Sigmoid(1.702 x)`` (QuickGELU), ``x * HardSigmoid(x)``
    (Hardswish), ``x * Tanh(Softplus(x))`` (Mish)."""
    gate_out = node.output[0]
    mul = _single_reader(index, gate_out, "Mul")
    if mul is None:
        return None
    x = index.other_input(mul, gate_out)
    if x is None:
        return None
    nodes: list[onnx.NodeProto] = [node, mul]
    source = node.input[0]
    if node.op_type == "Sigmoid":
        activation, op = "SiLU", "SiLU(x*sigmoid(x))"
        if source != x:
            scaled = index.producer.get(source)
            if scaled is None or scaled.op_type != "Mul" or x not in scaled.input:
                return None
            if not _close(index.scalar(index.other_input(scaled, x) or ""), 1.702):
                return None
            activation, op = "QuickGELUActivation", "QuickGELU(x*sigmoid(1.702x))"
            nodes.insert(0, scaled)
    elif node.op_type == "HardSigmoid":
        if source != x:
            return None
        activation, op = "Hardswish", "Hardswish(x*hardsigmoid(x))"
    elif node.op_type == "Tanh":
        softplus = index.producer.get(source)
        if softplus is None or softplus.op_type != "Softplus" or softplus.input[0] != x:
            return None
        activation, op = "Mish", "Mish(x*tanh(softplus(x)))"
        nodes.insert(0, softplus)
    else:
        return None
    return Site(mul.output[0], x, op, activation, (), _ordered(index, nodes))


def _ordered(
    index: GraphIndex, nodes: tuple[onnx.NodeProto, ...] | list[onnx.NodeProto]
) -> tuple[onnx.NodeProto, ...]:
    return tuple(sorted(nodes, key=index.position))


def _clip_site(index: GraphIndex, node: onnx.NodeProto) -> Site | None:
    """Clip with constant bounds is ReLU6 (0, 6) or Hardtanh: both are torch activations."""
    if len(node.input) >= 3 and node.input[1] and node.input[2]:
        low, high = index.scalar(node.input[1]), index.scalar(node.input[2])
    else:  # opset < 11: bounds are attributes
        low, high = attribute(node, "min"), attribute(node, "max")
    if low is None or high is None:
        return None
    low, high = float(low), float(high)
    activation = "ReLU6" if (low, high) == (0.0, 6.0) else "Hardtanh"
    params = (("max_val", high), ("min_val", low))
    return Site(node.output[0], node.input[0], "Clip", activation, params, (node,))


def _standard_site(index: GraphIndex, node: onnx.NodeProto) -> Site | None:
    if node.domain in ("", "ai.onnx"):
        if node.op_type == "Clip":
            return _clip_site(index, node)
        activation = ACTIVATION_OPS.get(node.op_type)
        if activation is None:
            return None
        params: tuple[tuple[str, float], ...] = ()
        if node.op_type in ("Elu", "Celu"):
            params = (("alpha", float(attribute(node, "alpha", 1.0))),)
        return Site(node.output[0], node.input[0], node.op_type, activation, params, (node,))
    if node.domain != MS:
        return None
    if node.op_type in MICROSOFT_OPS:
        return Site(
            node.output[0],
            node.input[0],
            f"{MS}.{node.op_type}",
            MICROSOFT_OPS[node.op_type],
            (),
            (node,),
        )
    if node.op_type in FUSED_OPS:
        fused = attribute(node, "activation")
        activation = FUSED_ACTIVATIONS.get(str(fused)) if fused else None
        if activation is None:
            return None
        params = ()
        if fused == "Elu":
            alphas = attribute(node, "activation_params") or [1.0]
            params = (("alpha", float(alphas[0])),)
        if fused == "Clip":
            bounds = attribute(node, "activation_params") or []
            if len(bounds) == 2:
                params = (("max_val", float(bounds[1])), ("min_val", float(bounds[0])))
                if (bounds[0], bounds[1]) == (0.0, 6.0):
                    activation = "ReLU6"
        return Site(
            node.output[0], None, f"{MS}.{node.op_type}({fused})", activation, params, (node,)
        )
    return None


_PATTERNS: dict[str, Callable[[GraphIndex, onnx.NodeProto], Site | None]] = {
    "Erf": _match_erf_gelu,
    "Tanh": _match_tanh_gelu,
}


def find_sites(index: GraphIndex) -> list[Site]:
    """Every activation site of the main graph, in graph order (= torch's call order)."""
    claimed: set[int] = set()
    found: list[Site] = []
    for node in index.nodes():
        if node.domain not in ("", "ai.onnx"):
            continue
        matchers = []
        if node.op_type in _PATTERNS:
            matchers.append(_PATTERNS[node.op_type])
        if node.op_type in ("Sigmoid", "HardSigmoid", "Tanh"):
            matchers.append(_match_gated)
        for matcher in matchers:
            site = matcher(index, node)
            if site is not None and not any(id(n) in claimed for n in site.nodes):
                claimed.update(id(n) for n in site.nodes)
                found.append(site)
                break
    for node in index.nodes():
        if id(node) in claimed:
            continue
        site = _standard_site(index, node)
        if site is not None:
            claimed.add(id(node))
            found.append(site)
    return sorted(found, key=lambda s: index.position(s.anchor))


def unwatched_in_subgraphs(graph: onnx.GraphProto) -> list[str]:
    """Names of activations inside If/Loop/Scan bodies (not watched: their values stay in the
    subgraph), as ``<holder node>/<activation node>``."""
    names: list[str] = []
    for node in graph.node:
        for body in subgraphs(node):
            inner = GraphIndex.of(body)
            holder = node.name or node.op_type
            for site in find_sites(inner):
                names.append(f"{holder}/{site.anchor.name or site.output}")
            names.extend(f"{holder}/{name}" for name in unwatched_in_subgraphs(body))
    return names
