"""What the torch adapter watches: activation modules, call sites, inputs, Transformer layers.

A *probe* is one hooked module and which of its tensors holds the neurons; a *site* is one call
of a probed module in a forward, i.e. one layer (``relu``, ``relu#2``, ...).
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from torch import nn

from neuronwatch.config import LayerConfig
from neuronwatch.errors import ConfigError
from neuronwatch.families import ACTIVATION_CLASSES
from neuronwatch.wiring import ParamRef, Wiring

from .torch_reduce import LayerAccumulator
from .torch_wiring import ACTIVATION_FUNCTIONS

__all__ = ["Probe", "Site", "find_activations", "probes_for", "site_name"]

_TRANSFORMER_LAYERS = (nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def find_activations(model: nn.Module) -> list[str]:
    """Names of the activation modules of ``model`` (torch.nn and Hugging Face classes)."""
    return [
        name
        for name, module in model.named_modules()
        if name and type(module).__name__ in ACTIVATION_CLASSES
    ]


def site_name(base: str, index: int) -> str:
    """Layer name of the ``index``-th call (0-based) of the layer ``base`` in one forward:
    ``act``, ``act#2``, ``act#3``...; a ``:pre``/``:input`` suffix stays last (``act#2:pre``)."""
    if index == 0:
        return base
    stem, colon, suffix = base.partition(":")
    return f"{stem}#{index + 1}{colon}{suffix}"


def _activation_params(module: nn.Module) -> dict[str, Any]:
    """What an activation's thresholds depend on (see ``activation_settings``)."""
    params: dict[str, Any] = {}
    for attribute in ("min_val", "max_val", "alpha"):
        value = getattr(module, attribute, None)
        if isinstance(value, int | float):
            params[attribute] = float(value)
    return params


@dataclass
class Site:
    """One layer: one call site of a probed module."""

    layer: str
    config: LayerConfig
    accumulator: LayerAccumulator | None = None
    failed_once: bool = False
    unmasked_logged: bool = False


@dataclass
class Probe:
    """One hooked module and which of its tensors holds the neurons.

    ``watch="output"``: an activation module's output (kind ``post``); ``"input"``: a module's
    input, for ``pre=True`` layers (an activation's input), ``inputs=`` layers and functional
    activations of Transformer layers.
    """

    base: str
    module_name: str
    module: nn.Module
    watch: Literal["output", "input"]
    kind: str
    activation: str | None
    params: dict[str, Any]
    axis_override: int | None
    consumes_itself: bool = False
    infer_activation: bool = False
    fixed_wiring: Wiring | None = None
    sites: list[Site] = field(default_factory=list)
    over_cap_logged: bool = False


def _match(names: list[str], patterns: Iterable[str], what: str) -> list[str]:
    selected: list[str] = []
    for pattern in patterns:
        matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            close = difflib.get_close_matches(pattern, names, n=3)
            hint = f"; did you mean {close}?" if close else ""
            raise ConfigError(f"{what}: {pattern!r} matches no module of the model{hint}")
        selected.extend(m for m in matches if m not in selected)
    return selected


def _transformer_activation(name: str, layer: nn.Module) -> Probe | None:
    """The feed-forward activation of ``nn.TransformerEncoderLayer``/``DecoderLayer`` when it is
    applied as a function: its neurons are the input of ``dropout`` (the feed-forward dropout,
    which reads exactly ``activation(linear1(x))``) and feed ``linear2``."""
    function = getattr(layer, "activation", None)
    if isinstance(function, nn.Module) or function is None:
        return None  # a module activation is found like any other
    activation = ACTIVATION_FUNCTIONS.get(function)
    prefix = f"{name}." if name else ""
    linear1, linear2, dropout = layer.linear1, layer.linear2, layer.dropout
    if not (
        isinstance(linear1, nn.Linear)
        and isinstance(linear2, nn.Linear)
        and isinstance(dropout, nn.Module)
    ):
        return None
    wiring = Wiring(
        feature_axis=-1,
        producer=f"{prefix}linear1",
        consumer=f"{prefix}linear2",
        produces=tuple(
            ParamRef(f"{prefix}linear1.{p}", tuple(getattr(linear1, p).shape), 0)
            for p in ("weight", "bias")
            if getattr(linear1, p, None) is not None
        ),
        consumes=(ParamRef(f"{prefix}linear2.weight", tuple(linear2.weight.shape), 1),),
    )
    return Probe(
        base=f"{prefix}activation",
        module_name=f"{prefix}dropout",
        module=dropout,
        watch="input",
        kind="post",
        activation=activation,
        params={},
        axis_override=-1,
        fixed_wiring=wiring,
    )


def probes_for(
    model: nn.Module,
    layers: Iterable[str] | None,
    inputs: Iterable[str] | Mapping[str, str | None] | None,
    pre: bool,
    axes: Mapping[str, int],
) -> list[Probe]:
    modules = dict(model.named_modules())
    names = [n for n in modules if n]
    functional = {
        p.base: p
        for name, module in modules.items()
        if isinstance(module, _TRANSFORMER_LAYERS)
        for p in [_transformer_activation(name, module)]
        if p is not None
    }
    if layers is None:
        chosen = find_activations(model) + list(functional)
        if not chosen and not inputs:
            raise ConfigError(
                f"{type(model).__name__} has no activation modules (nn.ReLU, nn.GELU, ...); "
                "name the modules to watch with layers=[...] (globs allowed), or the modules "
                "whose input features are neurons with inputs=[...]"
            )
    else:
        chosen = _match(names + list(functional), list(layers), "layers")
    probes: list[Probe] = []
    for name in chosen:
        if name in functional:
            probe = functional[name]
            probes.append(probe)
            if pre:  # the functional activation's input: linear1's output
                linear1 = modules[probe.module_name.removesuffix("dropout") + "linear1"]
                probes.append(
                    replace(
                        probe,
                        base=f"{name}:pre",
                        module_name=probe.module_name.removesuffix("dropout") + "linear1",
                        module=linear1,
                        watch="output",
                        kind="pre",
                        activation=None,
                        sites=[],
                    )
                )
            continue
        module = modules[name]
        activation = type(module).__name__
        params = _activation_params(module)
        axis = axes.get(name)
        probes.append(Probe(name, name, module, "output", "post", activation, params, axis))
        if pre:
            pre_axis = axes.get(f"{name}:pre", axis)
            probes.append(Probe(f"{name}:pre", name, module, "input", "pre", None, {}, pre_axis))
    given: dict[str, str | None] = (
        dict(inputs) if isinstance(inputs, Mapping) else dict.fromkeys(inputs or (), None)
    )
    for pattern, named in given.items():
        for name in _match(names, [pattern], "inputs"):
            base = f"{name}:input"
            if any(p.base == base for p in probes):
                continue
            probes.append(
                Probe(
                    base,
                    name,
                    modules[name],
                    "input",
                    "post",
                    named,
                    {},
                    axes.get(base, axes.get(name)),
                    consumes_itself=True,
                    infer_activation=named is None,
                )
            )
    known = {p.base for p in probes} | {p.module_name for p in probes}
    unknown_axes = set(axes) - known
    if unknown_axes:
        raise ConfigError(f"feature_axis names layers that are not watched: {sorted(unknown_axes)}")
    return probes
