"""Wiring from the ONNX graph, in the schema of the torch adapter (:mod:`neuronwatch.wiring`).

Producers are found by walking back from an activation's input (through Identity/Dropout/Cast,
per-channel norms and the bias ``Add``) to a MatMul ``[in, out]``, a Gemm (``transB``), a MatMul
reading a ``Transpose`` of an initializer, a Conv or an embedding ``Gather``; consumers by walking
forward from its output the same way. Each parameter is recorded with the axis its neurons index.

Names: torch's exporters keep most initializers under their ``state_dict`` names, but fold a
Linear's transposed weight into an anonymous initializer (``onnx::MatMul_18``, ``val_0``). When
the node's module is known (:mod:`.onnx_names`), such a parameter is reported under its torch
name and orientation (``fc1.weight``, ``[out, in]``, axis 0), so torch and ONNX reports of one
model carry equal wiring and merge; :attr:`ParamLink.initializer` keeps the file's own name.

Not editable (changing it offline would change something else too): an initializer read by more
than one node (tied or deduplicated weights), and parameters reached through a non-linear
consumer (a gate ``Mul``, a ``Reshape`` into heads). ``Wiring`` has no field for that yet, so
they are left out of the wiring and listed by :func:`not_editable` instead.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import onnx

from neuronwatch.wiring import ParamRef, Wiring

from .onnx_graph import PASS_THROUGH_OPS, GraphIndex, attribute
from .onnx_names import module_of
from .onnx_sites import Site

__all__ = ["ParamLink", "SiteWiring", "channel_rank", "feature_axis", "wire_site"]

_PER_CHANNEL = frozenset({"BatchNormalization", "LayerNormalization", "InstanceNormalization"})
_CHANNEL_FIRST = frozenset({"Conv", "ConvTranspose", "FusedConv", "BatchNormalization",
                            "InstanceNormalization", "MaxPool", "AveragePool"})  # fmt: skip
_LAST_AXIS = frozenset({"MatMul", "Gemm", "FusedGemm", "FusedMatMul", "LayerNormalization",
                        "Gather", "Add", "BiasGelu", "SkipLayerNormalization"})  # fmt: skip
# Consumers that reshape or gate the neurons: what they feed is not a plain linear read.
_NON_LINEAR = frozenset({"Mul", "Div", "Reshape", "Transpose", "Split", "Slice", "Flatten"})
_MAX_STEPS = 32


@dataclass(frozen=True)
class ParamLink:
    """One parameter attached to a layer's neurons.

    ``ref`` is what the wiring records (torch's name and orientation where the exporter dropped
    them); ``initializer`` is the tensor's name in the ONNX file and ``transposed`` says the file
    stores it transposed relative to ``ref``. ``editable`` is False for shared initializers and
    parameters behind a non-linear consumer.
    """

    ref: ParamRef
    initializer: str
    transposed: bool = False
    editable: bool = True


@dataclass(frozen=True)
class SiteWiring:
    """A site's wiring, the file's side of each parameter, and its neuron count (from the
    shapes, else from the producer's parameter; None when neither tells)."""

    wiring: Wiring
    links: tuple[ParamLink, ...]
    neurons: int | None = None

    @property
    def not_editable(self) -> list[str]:
        return [link.ref.name for link in self.links if not link.editable]


def _anonymous(name: str) -> bool:
    """Whether an initializer name is one an exporter made up (``onnx::MatMul_18``,
    ``val_0``) rather than a ``state_dict`` name, which always has a dot (``fc1.weight``)."""
    return name.startswith("onnx::") or "." not in name


def _link(
    index: GraphIndex,
    tensor: str,
    module: str | None,
    role: str,
    axis: int,
    transposed: bool = False,
    editable: bool = True,
) -> ParamLink | None:
    """A link to initializer ``tensor`` whose ``axis`` (in the file's layout) holds the neurons;
    renamed to ``<module>.<role>`` (and transposed back) when the file's name is anonymous."""
    tensor = index.resolve(tensor)
    shape = index.param_shape(tensor)
    if shape is None or not 0 <= axis < len(shape):
        return None
    shared = index.uses(tensor) > 1
    name, flip = tensor, False
    # A shared initializer is one tensor whatever module reads it: it keeps the file's name.
    if module and _anonymous(tensor) and not shared:
        name = f"{module}.{role}"
        flip = transposed and len(shape) == 2
    ref_shape, ref_axis = (shape[::-1], len(shape) - 1 - axis) if flip else (shape, axis)
    return ParamLink(
        ParamRef(name, tuple(ref_shape), ref_axis), tensor, flip, editable and not shared
    )


def _weight_of_matmul(
    index: GraphIndex,
    node: onnx.NodeProto,
    module: str | None,
    reads_neurons: bool,
    editable: bool = True,
) -> ParamLink | None:
    """The weight of ``x @ W``: an initializer ``[in, out]`` or ``Transpose`` of one."""
    weight = node.input[1]
    axis = 0 if reads_neurons else 1
    if index.is_param(weight) and index.rank(index.resolve(weight)) == 2:
        return _link(index, weight, module, "weight", axis, transposed=True, editable=editable)
    transpose = index.producer.get(weight)
    if transpose is not None and transpose.op_type == "Transpose":
        source = transpose.input[0]
        perm = attribute(transpose, "perm")
        if (
            index.is_param(source)
            and index.rank(index.resolve(source)) == 2
            and perm in (None, [1, 0])
        ):
            # A Transpose of an initializer: the initializer is torch's [out, in] weight.
            return _link(index, source, module, "weight", 1 - axis, editable=editable)
    return None


def _gemm_links(
    index: GraphIndex,
    node: onnx.NodeProto,
    module: str | None,
    reads_neurons: bool,
    editable: bool = True,
) -> list[ParamLink]:
    links: list[ParamLink] = []
    weight = node.input[1]
    trans_b = int(attribute(node, "transB", 0))
    if index.is_param(weight):
        # B is [in, out] (transB=0) or [out, in] (transB=1); neurons produced index "out".
        axis = (0 if trans_b else 1) if not reads_neurons else (1 if trans_b else 0)
        link = _link(
            index, weight, module, "weight", axis, transposed=not trans_b, editable=editable
        )
        if link is not None:
            links.append(link)
    if not reads_neurons and len(node.input) > 2 and index.rank(index.resolve(node.input[2])) == 1:
        link = _link(index, node.input[2], module, "bias", 0, editable=editable)
        if link is not None:
            links.append(link)
    return links


def _conv_links(
    index: GraphIndex,
    node: onnx.NodeProto,
    module: str | None,
    reads_neurons: bool,
    editable: bool = True,
) -> list[ParamLink]:
    links: list[ParamLink] = []
    transposed = node.op_type == "ConvTranspose"
    grouped = int(attribute(node, "group", 1)) != 1
    if reads_neurons:
        if not grouped and index.is_param(node.input[1]):
            axis = 0 if transposed else 1
            link = _link(index, node.input[1], module, "weight", axis, editable=editable)
            links += [link] if link is not None else []
        return links
    if index.is_param(node.input[1]) and not (transposed and grouped):
        link = _link(index, node.input[1], module, "weight", 1 if transposed else 0)
        links += [link] if link is not None else []
    if len(node.input) > 2 and node.input[2] and index.is_param(node.input[2]):
        link = _link(index, node.input[2], module, "bias", 0)
        links += [link] if link is not None else []
    return links


def _per_channel_links(
    index: GraphIndex, node: onnx.NodeProto, module: str | None, editable: bool = True
) -> list[ParamLink]:
    links = []
    for position, role in ((1, "weight"), (2, "bias")):
        tensor = node.input[position] if len(node.input) > position else ""
        if tensor and index.is_param(tensor) and index.rank(index.resolve(tensor)) == 1:
            link = _link(index, tensor, module, role, 0, editable=editable)
            links += [link] if link is not None else []
    return links


def _bias_of_add(index: GraphIndex, node: onnx.NodeProto) -> tuple[str, str] | None:
    """``(bias initializer, other input)`` of a bias ``Add``, else None."""
    inputs = [name for name in node.input if name]
    if len(inputs) != 2:
        return None
    for bias, other in (inputs, inputs[::-1]):
        if index.is_param(bias) and index.rank(index.resolve(bias)) == 1:
            return bias, other
    return None


def _producer_links(
    index: GraphIndex, node: onnx.NodeProto, module: str | None
) -> list[ParamLink] | None:
    """Parameters a producing node indexes by its output neurons; None if it is no producer."""
    op = node.op_type
    if op == "MatMul" or (op == "FusedMatMul" and not attribute(node, "transB", 0)):
        link = _weight_of_matmul(index, node, module, reads_neurons=False)
        return [link] if link is not None else None
    if op in ("Gemm", "FusedGemm"):
        return _gemm_links(index, node, module, reads_neurons=False) or None
    if op in ("Conv", "ConvTranspose", "FusedConv"):
        return _conv_links(index, node, module, reads_neurons=False) or None
    if (
        op == "Gather"
        and index.is_param(node.input[0])
        and index.rank(index.resolve(node.input[0])) == 2
    ):
        link = _link(index, node.input[0], module, "weight", 1)
        return [link] if link is not None else None
    return None


def _module_of_params(links: Sequence[ParamLink]) -> str | None:
    """``fc`` from a producer's ``fc.weight``: the module when the node's own scope is lost
    (ONNX Runtime's optimiser drops the dynamo exporter's metadata from fused nodes) but the
    file kept the ``state_dict`` name."""
    for link in links:
        if link.ref.name == link.initializer and link.ref.name.endswith(".weight"):
            return link.ref.name[: -len(".weight")]
    return None


def _walk_back(
    index: GraphIndex,
    tensor: str | None,
    fused: onnx.NodeProto | None,
    through: Mapping[str, str] | None = None,
) -> tuple[str | None, list[ParamLink]]:
    """Producer module and its parameters (per-channel ones first, then weight and bias, the
    torch adapter's order). ``through`` maps the output of a functional activation to its
    input: the walk goes on through it, as the torch adapter's wiring does."""
    per_channel: list[ParamLink] = []
    bias: str | None = None
    producer: str | None = None
    current = tensor
    if fused is not None:
        if fused.op_type == "BiasGelu":
            bias = fused.input[1]
        else:
            module = module_of(fused).module
            links = _producer_links(index, fused, module) or []
            return module or _module_of_params(links) or fused.name, links
    for _ in range(_MAX_STEPS):
        if through and current is not None and current in through:
            current = through[current]
            continue
        node = index.producer.get(current) if current is not None else None
        if node is None:
            break
        module = module_of(node).module
        if node.op_type in PASS_THROUGH_OPS:
            current = node.input[0]
            continue
        if node.op_type in _PER_CHANNEL:
            per_channel.extend(_per_channel_links(index, node, module))
            producer = module or node.name
            current = node.input[0]
            continue
        if node.op_type == "Add" and bias is None:
            found = _bias_of_add(index, node)
            if found is None:
                break
            bias, current = found
            continue
        found_links = _producer_links(index, node, module)
        if found_links is None:
            break
        links = found_links
        # The bias belongs to the producer (a Linear's bias): named after its module.
        bias_link = _link(index, bias, module, "bias", 0) if bias is not None else None
        if bias_link is not None and bias_link.ref.name not in {x.ref.name for x in links}:
            links.append(bias_link)
        return module or _module_of_params(links) or node.name, per_channel + links
    return producer, per_channel


def _consumer_links(
    index: GraphIndex, node: onnx.NodeProto, tensor: str, editable: bool
) -> list[ParamLink] | None:
    """Parameters ``node`` indexes by the neurons it reads from ``tensor``; None if it is no
    consumer."""
    op = node.op_type
    module = module_of(node).module
    if op in ("MatMul", "FusedMatMul") and node.input[0] == tensor:
        if op == "FusedMatMul" and (attribute(node, "transA", 0) or attribute(node, "transB", 0)):
            return None
        link = _weight_of_matmul(index, node, module, reads_neurons=True, editable=editable)
        return [link] if link is not None else None
    if op in ("Gemm", "FusedGemm") and node.input[0] == tensor and not attribute(node, "transA", 0):
        return _gemm_links(index, node, module, reads_neurons=True, editable=editable)
    if op in ("Conv", "ConvTranspose", "FusedConv") and node.input[0] == tensor:
        return _conv_links(index, node, module, reads_neurons=True, editable=editable)
    return None


def _walk_forward(
    index: GraphIndex, tensor: str, neurons: int | None
) -> tuple[str | None, list[ParamLink]]:
    consumer: str | None = None
    links: list[ParamLink] = []
    frontier: list[tuple[str, bool]] = [(tensor, True)]
    seen: set[int] = set()
    steps = 0
    while frontier and steps < _MAX_STEPS:
        steps += 1
        current, editable = frontier.pop(0)
        for node in sorted(index.readers(current), key=index.position):
            if id(node) in seen:
                continue
            seen.add(id(node))
            found = _consumer_links(index, node, current, editable)
            if found is not None:
                if editable or consumer is None:
                    consumer = consumer or (
                        module_of(node).module or _module_of_params(found) or node.name
                    )
                # Behind a reshape the parameter's axis may no longer be the neurons' one.
                links.extend(
                    link
                    for link in found
                    if neurons is None or link.ref.shape[link.ref.axis] == neurons
                )
            elif node.op_type in PASS_THROUGH_OPS:
                frontier.append((node.output[0], editable))
            elif node.op_type in _PER_CHANNEL and node.input[0] == current:
                links.extend(_per_channel_links(index, node, module_of(node).module, editable))
                frontier.append((node.output[0], editable))
            elif (node.op_type in _NON_LINEAR and node.input[0] == current) or (
                node.op_type == "Mul" and current in node.input
            ):
                frontier.append((node.output[0], False))
    return consumer, links


def feature_axis(index: GraphIndex, site: Site) -> int:
    """The axis of ``site.output`` that holds the neurons, as reports state it: ``-1`` for the
    last axis (Linear/MatMul outputs of any rank), ``1`` for channel-first maps (Conv)."""
    fused = site.producer_node
    if fused is not None:
        return 1 if fused.op_type == "FusedConv" else -1
    current = site.input
    for _ in range(_MAX_STEPS):
        node = index.producer.get(current) if current is not None else None
        if node is None:
            return -1
        if node.op_type in _CHANNEL_FIRST:
            rank = index.rank(site.output)
            return -1 if rank is not None and rank <= 2 else 1
        if node.op_type in _LAST_AXIS:
            return -1
        current = node.input[0] if node.input else None
    return -1


def channel_rank(index: GraphIndex, site: Site) -> int | None:
    """The rank of a conv site's output when shape inference lost it: that of the producing
    convolution's weight (``[out, in, *kernel]`` for an output ``[batch, out, *spatial]``)."""
    node = site.producer_node
    current = site.input
    for _ in range(_MAX_STEPS):
        if node is not None and node.op_type in ("Conv", "FusedConv", "ConvTranspose"):
            weight = index.param_shape(index.resolve(node.input[1]))
            return None if weight is None else len(weight)
        node = index.producer.get(current) if current is not None else None
        if node is None or not node.input:
            return None
        current = node.input[0]
    return None


def wire_site(
    index: GraphIndex,
    site: Site,
    axis: int,
    neurons: int | None,
    through: Mapping[str, str] | None = None,
) -> SiteWiring:
    """Producer and consumer parameters of one site; ``through`` as for :func:`_walk_back`.

    When shapes were lost (fused ops), the producer's parameter says how many neurons there
    are, before the consumers are filtered by that count (a ``Flatten`` into a Linear reads
    ``channels * positions`` features, not the neurons)."""
    producer, produced = _walk_back(index, site.input, site.producer_node, through)
    if neurons is None and produced:
        last = produced[-1].ref
        neurons = last.shape[last.axis]
    consumer, consumed = _walk_forward(index, site.output, neurons)
    if neurons is not None:
        produced = [link for link in produced if link.ref.shape[link.ref.axis] == neurons]
    links = _dedup(produced) + _dedup(consumed)
    wiring = Wiring(
        feature_axis=axis,
        producer=producer,
        consumer=consumer,
        produces=tuple(_refs(_dedup(produced))),
        consumes=tuple(_refs(_dedup(consumed))),
    )
    return SiteWiring(wiring, tuple(links), neurons)


def _dedup(links: Iterable[ParamLink]) -> list[ParamLink]:
    seen: set[tuple[str, int]] = set()
    unique = []
    for link in links:
        key = (link.ref.name, link.ref.axis)
        if key not in seen:
            seen.add(key)
            unique.append(link)
    return unique


def _refs(links: Iterable[ParamLink]) -> list[ParamRef]:
    """What the wiring records: every parameter, those rescue must leave alone marked
    ``editable=False`` (they are also listed by ``SiteWiring.not_editable``)."""
    return [
        link.ref if link.editable else dataclasses.replace(link.ref, editable=False)
        for link in links
    ]
