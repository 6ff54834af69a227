"""From an ONNX file to a watched graph: sites, layer names, wiring, taps, reductions.

:func:`plan` runs the steps in order and declares every layer (thresholds and wiring) on the
engine; the result holds the augmented model, what each extra output means, and what was
found along the way for the report's metadata.
"""

from __future__ import annotations

import fnmatch
import importlib
import logging
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx

from neuronwatch.audit_data import InputSpec
from neuronwatch.engine import Engine
from neuronwatch.errors import ConfigError

from .onnx_augment import Augmented, Tap, augment, mask_rule
from .onnx_graph import GraphIndex, topological
from .onnx_load import LoadedModel, load_model, lower_ir_version
from .onnx_names import Named, functional_sites, model_class, name_sites
from .onnx_sites import find_sites, unwatched_in_subgraphs
from .onnx_wiring import SiteWiring, channel_rank, feature_axis, wire_site

__all__ = ["InputSpec", "Plan", "plan"]

log = logging.getLogger(__name__)


@dataclass
class Plan:
    loaded: LoadedModel
    augmented: Augmented
    layers: list[Named]
    wiring: dict[str, SiteWiring]
    inputs: list[InputSpec]
    outputs: list[str]
    unwatched: list[str] = field(default_factory=list)
    where: str = "model"

    def meta(self) -> dict[str, Any]:
        """What the report records about the ONNX side (JSON-ready)."""
        renamed: dict[str, dict[str, Any]] = {}
        not_editable: dict[str, list[str]] = {}
        for layer, site_wiring in self.wiring.items():
            for link in site_wiring.links:
                if link.initializer != link.ref.name:
                    renamed[link.ref.name] = {
                        "initializer": link.initializer,
                        "transposed": link.transposed,
                    }
            if site_wiring.not_editable:
                not_editable[layer] = site_wiring.not_editable
        return {
            "model_file": None if self.loaded.path is None else str(self.loaded.path),
            "sites": {named.name: named.site.op for named in self.layers},
            "initializers": renamed,
            "not_editable": not_editable,
            "unwatched": list(self.unwatched),
        }


def _skeleton(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model's structure for shape inference, in topological order, without the shapes
    the file states and without the data of its large initializers (dims and types stay):
    inference never copies the weights."""
    skeleton = onnx.ModelProto()
    for field_name in ("ir_version", "producer_name", "domain", "model_version"):
        setattr(skeleton, field_name, getattr(proto, field_name))
    skeleton.opset_import.extend(proto.opset_import)
    graph, source = skeleton.graph, proto.graph
    graph.name = source.name
    graph.node.extend(topological(source))
    graph.input.extend(source.input)
    graph.output.extend(source.output)
    for tensor in source.initializer:
        if int(np.prod(tensor.dims, dtype=np.int64)) <= 64:  # constants patterns may read
            graph.initializer.append(tensor)
        else:
            graph.initializer.add(name=tensor.name, dims=tensor.dims, data_type=tensor.data_type)
    return skeleton


def _inferred(proto: onnx.ModelProto, where: str) -> onnx.ModelProto:
    """The model with inferred shapes: ONNX Runtime's symbolic inference when ORT's own
    (com.microsoft) ops are in the graph, which onnx's inference does not know; else onnx's.
    Shapes already in the file are dropped first: converters leave stale ones (unknown dims
    where inference knows better)."""
    stated = list(proto.graph.value_info)
    inferred = _infer(_skeleton(proto), where)
    # Keep what the file states too: an exporter's symbolic dims (dynamo's s0, s1) can say
    # more than inference recovers; GraphIndex keeps the more informative of the two.
    inferred.graph.value_info.extend(stated)
    return inferred


def _infer(proto: onnx.ModelProto, where: str) -> onnx.ModelProto:
    if any(node.domain == "com.microsoft" for node in proto.graph.node):
        try:
            symbolic: Any = importlib.import_module("onnxruntime.tools.symbolic_shape_infer")
            inferred: onnx.ModelProto = symbolic.SymbolicShapeInference.infer_shapes(
                proto, auto_merge=True, guess_output_rank=True
            )
            return inferred
        except Exception as exc:
            log.debug("%s: symbolic shape inference failed (%r)", where, exc)
    try:
        return onnx.shape_inference.infer_shapes(proto, data_prop=True)
    except Exception as exc:  # custom domains, odd models: shapes stay as exported
        log.debug("%s: shape inference failed (%r); using the shapes in the file", where, exc)
        return proto


def _inlined(proto: onnx.ModelProto, where: str) -> tuple[onnx.ModelProto, list[str]]:
    """The model with its model-local functions inlined (torch's
    ``export_modules_as_functions`` puts whole blocks in them), so their activations are in
    the main graph and watched; if inlining fails, those activations are listed as unwatched.
    """
    if not proto.functions:
        return proto, []
    try:
        import onnx.inliner

        return onnx.inliner.inline_local_functions(proto), []
    except Exception as exc:
        log.debug("%s: inlining local functions failed (%r)", where, exc)
    hidden = []
    for function in proto.functions:
        body = onnx.helper.make_graph(list(function.node), function.name, [], [])
        hidden += [
            f"{function.name}/{s.anchor.name or s.output}" for s in find_sites(GraphIndex.of(body))
        ]
    return proto, hidden


def _input_specs(index: GraphIndex) -> list[InputSpec]:
    specs = []
    for value in index.graph.input:
        if index.is_initializer(value.name):
            continue
        elem = index.elem_types.get(value.name, onnx.TensorProto.FLOAT)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(elem).name
        limit = None
        for reader in index.readers(value.name):
            if reader.op_type == "Gather" and reader.input[1:2] == [value.name]:
                table = index.param_shape(reader.input[0])
                if table:
                    limit = table[0]
        specs.append(InputSpec(value.name, dtype, index.shape(value.name), limit))
    return specs


def _select(named: list[Named], patterns: Iterable[str] | None) -> list[Named]:
    if patterns is None:
        return named
    chosen: list[Named] = []
    for pattern in patterns:
        matches = [n for n in named if fnmatch.fnmatchcase(n.name, pattern)]
        if not matches:
            known = ", ".join(n.name for n in named)
            raise ConfigError(f"layers: {pattern!r} matches no layer of the model; layers: {known}")
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def plan(
    source: str | os.PathLike[str] | onnx.ModelProto,
    engine: Engine | None = None,
    *,
    name: str | None = None,
    mask: str | None = "attention_mask",
    pre: bool = False,
    layers: Sequence[str] | None = None,
    defaults: dict[str, Any] | None = None,
    overrides: dict[str, dict[str, Any]] | None = None,
) -> tuple[Plan, Engine]:
    """Find, name and wire every activation of ``source`` and build its augmented graph.

    Declares each layer on ``engine`` (a new one named after the model when None). Raises
    :class:`ConfigError` for unreadable models and for models with no activation.
    """
    loaded = load_model(source)
    where = str(loaded.path) if loaded.path is not None else "model"
    proto = loaded.proto
    lower_ir_version(proto, where)
    proto, in_functions = _inlined(proto, where)
    index = GraphIndex.of(_inferred(proto, where).graph)
    sites = find_sites(index)
    unwatched = unwatched_in_subgraphs(proto.graph)
    for hidden in unwatched:
        log.warning(
            "%s: activation %s is inside a control-flow subgraph and not watched", where, hidden
        )
    for hidden in in_functions:
        log.warning(
            "%s: activation %s is inside a model-local function that could not be inlined, "
            "and is not watched",
            where,
            hidden,
        )
    unwatched += in_functions
    if not sites:
        raise ConfigError(
            f"{where}: the model has no activation to watch (no Relu, Gelu, Sigmoid, ... in its "
            "main graph); neuronwatch audits layers that end in an activation"
        )
    axes = [feature_axis(index, site) for site in sites]
    shapes = [index.shape(site.output) for site in sites]
    neurons: list[int | None] = [
        int(dim) if shape and isinstance(dim := shape[axis], int) else None
        for shape, axis in zip(shapes, axes, strict=True)
    ]
    through = functional_sites(index, sites)
    wirings = [
        wire_site(index, s, a, n, through) for s, a, n in zip(sites, axes, neurons, strict=True)
    ]
    # Shapes lost (fused ops): wire_site took the count from the producer's parameter.
    neurons = [w.neurons for w in wirings]
    named = _select(
        name_sites(index, sites, [(w.wiring.producer, w.wiring.consumer) for w in wirings], pre),
        layers,
    )
    if engine is None:
        model_name = (
            name or model_class(index) or (loaded.path.stem if loaded.path is not None else "model")
        )
        engine = Engine(model_name, overrides=overrides, **(defaults or {}))
    mask_input = mask if mask and any(i.name == mask for i in index.graph.input) else None
    mask_shape = index.shape(mask_input) if mask_input else None
    by_site = {id(s): i for i, s in enumerate(sites)}
    taps: list[Tap] = []
    wiring: dict[str, SiteWiring] = {}
    for layer in named:
        i = by_site[id(layer.site)]
        tensor = layer.site.output if layer.kind == "post" else layer.site.input
        assert tensor is not None
        config = engine.add_layer(layer.name, layer.activation, layer.kind, dict(layer.site.params))
        engine.set_wiring(layer.name, wirings[i].wiring)
        wiring[layer.name] = wirings[i]
        shape = index.shape(tensor)
        rank = len(shape) if shape is not None else channel_rank(index, layer.site)
        taps.append(
            Tap(
                layer=layer.name,
                tensor=tensor,
                axis=axes[i],
                rank=rank,
                neurons=neurons[i],
                config=config,
                elem_type=index.elem_types.get(tensor, onnx.TensorProto.UNDEFINED),
                masked="no" if mask_input is None else mask_rule(shape, axes[i], mask_shape),
            )
        )
        if mask_input is not None and taps[-1].masked == "no":
            log.info(
                "layer %r: its rows %s are not the %r positions %s, so all its rows count",
                layer.name,
                shape,
                mask_input,
                mask_shape,
            )
    own_outputs = [o.name for o in proto.graph.output]
    augmented = augment(proto, taps, mask_input, copy=False)
    return (
        Plan(
            loaded=loaded,
            augmented=augmented,
            layers=named,
            wiring=wiring,
            inputs=_input_specs(index),
            outputs=own_outputs,
            unwatched=unwatched,
            where=where,
        ),
        engine,
    )
