"""Layer names for ONNX sites that agree with the torch adapter's wherever the exporter kept them.

torch's exporters record the module a node came from in two ways:

- the dynamo exporter writes ``pkg.torch.onnx.name_scopes`` (module paths, then the FX node)
  and ``pkg.torch.onnx.class_hierarchy`` (their classes) into each node's metadata: exact;
- the legacy (TorchScript) exporter names nodes ``/encoder/layer.0/intermediate/act/Gelu``: the
  module path, one attribute per level, then the op; a module called again in the same forward
  gets a ``_1`` suffix (``/relu_1/Relu``). Legacy files do not say which class a module had, so
  a second call cannot be told from a sibling literally named ``relu_1``: we take the former.

From that, as in :mod:`neuronwatch.adapters.torch`: an activation *module* is named by its
module path (``encoder.layer.0.intermediate.intermediate_act_fn``); the functional activation of
``nn.TransformerEncoderLayer`` is ``<block>.activation``; other functional activations are
``<module>.<function>``; a second call of the same site is ``name#2``. Files without scopes
(other exporters) name sites after their node, or their output tensor.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

import onnx

from neuronwatch.families import ACTIVATION_CLASSES

from .onnx_graph import GraphIndex, metadata_list
from .onnx_sites import Site

__all__ = ["Scope", "functional_sites", "module_of", "name_sites", "site_name"]

_TRANSFORMER_LAYERS = ("TransformerEncoderLayer", "TransformerDecoderLayer")
# Functional names of activations named by their torch class.
_FUNCTIONS = {
    "ReLU": "relu",
    "ReLU6": "relu6",
    "Hardtanh": "hardtanh",
    "LeakyReLU": "leaky_relu",
    "PReLU": "prelu",
    "ELU": "elu",
    "SELU": "selu",
    "CELU": "celu",
    "GELU": "gelu",
    "SiLU": "silu",
    "Mish": "mish",
    "Hardswish": "hardswish",
    "Softplus": "softplus",
    "Tanh": "tanh",
    "Sigmoid": "sigmoid",
    "Hardsigmoid": "hardsigmoid",
    "QuickGELUActivation": "quick_gelu",
}
_SUFFIX = re.compile(r"^(.*)_(\d+)$")


@dataclass(frozen=True)
class Scope:
    """Where a node came from: the innermost module path (``""`` for the model itself), that
    module's class name when the exporter said (dynamo), and whether scopes are known at all."""

    module: str | None
    cls: str | None = None
    legacy: bool = False


def site_name(base: str, index: int) -> str:
    """``act``, ``act#2``, ... with a ``:pre`` suffix kept last (as the torch adapter)."""
    if index == 0:
        return base
    stem, colon, suffix = base.partition(":")
    return f"{stem}#{index + 1}{colon}{suffix}"


def _short(qualified: str) -> str:
    return qualified.rsplit(".", 1)[-1]


def _legacy_path(name: str) -> list[str] | None:
    if not name.startswith("/") and " /" in name:  # ORT's fusions: "fused /fc1/Gemm"
        name = name[name.index(" /") + 1 :]
    if not name.startswith("/"):
        return None
    return name.split("/")[1:-1]


def module_of(node: onnx.NodeProto, output_first: bool = False, value_only: bool = False) -> Scope:
    """The scope of ``node`` from dynamo metadata, a legacy node name, or a legacy output name.

    ONNX Runtime's fusions keep the *output's* name but name the node after another part:
    FusedConv ``/conv1/Conv`` writes ``/relu/Relu_output_0``. ``output_first`` asks for the
    module of the value (the activation, for naming), else of the node (the producer, for
    wiring); ``value_only`` never falls back to the node's name (a fused node's name is its
    producer's: ``fused /head/Gemm`` is not where the fused Sigmoid came from).
    """
    scopes = metadata_list(node, "pkg.torch.onnx.name_scopes")
    if scopes is not None and len(scopes) >= 2:
        classes = metadata_list(node, "pkg.torch.onnx.class_hierarchy") or []
        cls = _short(classes[-2]) if len(classes) >= 2 else None
        return Scope(scopes[-2], cls)
    if value_only:
        names: tuple[str, ...] = tuple(node.output)
    else:
        names = (*node.output, node.name) if output_first else (node.name, *node.output)
    for name in names:
        path = _legacy_path(name)
        if path is not None:
            return Scope(".".join(path), None, legacy=True)
    return Scope(None)


def model_class(index: GraphIndex) -> str | None:
    """The exported model's class name, when the dynamo exporter recorded it."""
    for node in index.nodes():
        classes = metadata_list(node, "pkg.torch.onnx.class_hierarchy")
        if classes:
            return _short(classes[0])
    return None


class _LegacyScopes:
    """Which legacy scopes hold nothing but one activation (an activation *module*)."""

    def __init__(self, index: GraphIndex) -> None:
        self.nodes: dict[str, list[onnx.NodeProto]] = {}
        for node in index.nodes():
            scope = module_of(node, output_first=True)
            if scope.legacy and scope.module is not None:
                self.nodes.setdefault(scope.module, []).append(node)

    def only_activation(self, module: str, site: Site) -> bool:
        """Whether ``module`` is an activation module: a leaf scope holding nothing but this
        site. A scope with sub-modules (``b`` above ``b.fc``) calls a functional activation."""
        own = {id(n) for n in site.nodes}
        if any(other.startswith(f"{module}.") for other in self.nodes):
            return False
        return all(id(n) in own or n.op_type == "Constant" for n in self.nodes.get(module, []))

    def exists(self, module: str) -> bool:
        return module in self.nodes


def _first_call(module: str, scopes: _LegacyScopes, op: str) -> str:
    """``relu_1`` -> ``relu`` when ``relu`` is a sibling scope running the same op: the legacy
    exporter's name for the second call of one module."""
    parent, _, last = module.rpartition(".")
    match = _SUFFIX.match(last)
    if match is None:
        return module
    first = f"{parent}.{match.group(1)}" if parent else match.group(1)
    if scopes.exists(first) and any(n.op_type == op for n in scopes.nodes[first]):
        return first
    return module


def _functional_base(
    index: GraphIndex, site: Site, scope: Scope, producer: str | None, consumer: str | None
) -> str:
    module = scope.module or ""
    prefix = f"{module}." if module else ""
    transformer = scope.cls in _TRANSFORMER_LAYERS or (
        scope.cls is None and producer == f"{prefix}linear1" and consumer == f"{prefix}linear2"
    )
    if transformer:
        return f"{prefix}activation"
    return f"{prefix}{_FUNCTIONS.get(site.activation, site.activation.lower())}"


@dataclass(frozen=True)
class Named:
    """A site with its layer name and the activation class its thresholds come from."""

    site: Site
    name: str
    activation: str | None
    kind: str = "post"


def base_name(
    index: GraphIndex,
    site: Site,
    scopes: _LegacyScopes,
    producer: str | None,
    consumer: str | None,
) -> tuple[str, str]:
    """``(base layer name, activation class name)`` of one site."""
    anchor = site.anchor
    fused = site.producer_node is not None
    scope = module_of(anchor, output_first=True, value_only=fused)
    if scope.module is None:
        # A fused node is named after its producer (``fused node_linear``): the activation's
        # own output name is closer to what it was.
        return (site.output if fused else anchor.name or site.output), site.activation
    if scope.cls is not None:  # dynamo: classes are known
        if scope.cls in ACTIVATION_CLASSES and scope.module:
            return scope.module, scope.cls
        return _functional_base(index, site, scope, producer, consumer), site.activation
    module = scope.module
    if module and scopes.only_activation(module, site):
        return _first_call(module, scopes, anchor.op_type), site.activation
    return _functional_base(index, site, scope, producer, consumer), site.activation


def functional_sites(index: GraphIndex, sites: Sequence[Site]) -> dict[str, str]:
    """``{output: input}`` of the sites known to be functional activations (``F.relu`` in a
    block's forward), which the torch adapter's wiring walks through to the producer; sites
    without scopes, and activation modules, are left out."""
    scopes = _LegacyScopes(index)
    through: dict[str, str] = {}
    for site in sites:
        scope = module_of(site.anchor, output_first=True)
        if site.input is None or scope.module is None:
            continue
        if scope.cls is not None:
            module = scope.cls in ACTIVATION_CLASSES and bool(scope.module)
        else:
            module = bool(scope.module) and scopes.only_activation(scope.module, site)
        if not module:
            through[site.output] = site.input
    return through


def name_sites(
    index: GraphIndex,
    sites: Sequence[Site],
    neighbours: Sequence[tuple[str | None, str | None]],
    pre: bool = False,
) -> list[Named]:
    """Layer names for ``sites`` (graph order); ``neighbours`` holds each site's producing and
    consuming module (from the wiring), which identifies Transformer feed-forward activations in
    legacy files. ``pre=True`` adds a ``<name>:pre`` layer per site for its input."""
    scopes = _LegacyScopes(index)
    calls: dict[str, int] = {}
    named: list[Named] = []
    for site, (producer, consumer) in zip(sites, neighbours, strict=True):
        base, activation = base_name(index, site, scopes, producer, consumer)
        count = calls.get(base, 0)
        calls[base] = count + 1
        named.append(Named(site, site_name(base, count), activation))
        if pre and site.input is not None:
            named.append(Named(site, site_name(f"{base}:pre", count), None, kind="pre"))
    return named
