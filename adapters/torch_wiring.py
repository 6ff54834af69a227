"""Discover wiring by tensor identity in one traced forward pass (never from module names).

During the traced pass every leaf module records which tensor objects it read and which it
returned. The module that produced an activation's input is the last one that returned that very
tensor; its consumers are the modules that later read the activation's output. Dropout, Identity
and per-channel affine layers (BatchNorm, LayerNorm) are walked through.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from neuronwatch.wiring import ParamRef, Wiring

__all__ = ["WiringTracer", "consumer_params", "feature_axis_of", "producer_params"]

_PASS_THROUGH = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity)
_PER_CHANNEL = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_T = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)


def _is_hf_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D: a Linear with a transposed [in, out] weight.
    return type(module).__name__ == "Conv1D" and not isinstance(module, nn.Conv1d)


def feature_axis_of(module: nn.Module) -> int | None:
    """Axis of the module's output that indexes neurons, or ``None`` if unknown."""
    if isinstance(module, nn.Linear | nn.Embedding | nn.LayerNorm) or _is_hf_conv1d(module):
        return -1
    if isinstance(module, _CONV + _CONV_T + (nn.modules.batchnorm._BatchNorm, nn.GroupNorm)):
        return 1
    return None


def _params(prefix: str, module: nn.Module, axes: dict[str, int]) -> list[ParamRef]:
    refs = []
    for pname, param in module.named_parameters(recurse=False):
        if pname in axes and param is not None:
            full = f"{prefix}.{pname}" if prefix else pname
            refs.append(ParamRef(full, tuple(param.shape), axes[pname]))
    return refs


def producer_params(name: str, module: nn.Module) -> list[ParamRef] | None:
    """Parameters of ``module`` indexed by the neurons it outputs; ``None`` if it is not a
    neuron-producing layer."""
    if isinstance(module, (nn.Linear, *_CONV)):
        return _params(name, module, {"weight": 0, "bias": 0})
    if isinstance(module, _CONV_T):
        return _params(name, module, {"weight": 1, "bias": 0}) if module.groups == 1 else []
    if _is_hf_conv1d(module):
        return _params(name, module, {"weight": 1, "bias": 0})
    if isinstance(module, nn.Embedding):
        return _params(name, module, {"weight": 1})
    return None


def consumer_params(name: str, module: nn.Module) -> list[ParamRef] | None:
    """Parameters of ``module`` indexed by the neurons it reads; ``None`` if it is not a
    neuron-consuming layer."""
    if isinstance(module, nn.Linear):
        return _params(name, module, {"weight": 1})
    if isinstance(module, _CONV):
        return _params(name, module, {"weight": 1}) if module.groups == 1 else []
    if isinstance(module, _CONV_T):
        return _params(name, module, {"weight": 0}) if module.groups == 1 else []
    if _is_hf_conv1d(module):
        return _params(name, module, {"weight": 0})
    return None


def _tensors(values: Iterable[Any]) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif isinstance(value, list | tuple):
            found.extend(_tensors(value))
    return found


@dataclass
class _Call:
    order: int
    name: str
    module: nn.Module
    inputs: list[int]
    outputs: list[int]


@dataclass
class WiringTracer:
    """Records leaf-module calls of one forward pass; hooks live only while tracing."""

    model: nn.Module
    calls: list[_Call] = field(default_factory=list)
    _handles: list[Any] = field(default_factory=list)
    _keep: list[torch.Tensor] = field(default_factory=list)  # ids stay unique while traced

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def hooks(self) -> int:
        return len(self._handles)

    def start(self) -> None:
        self.stop()
        try:
            for name, module in self.model.named_modules():
                if next(module.children(), None) is None:
                    self._handles.append(module.register_forward_hook(self._recorder(name)))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def clear(self) -> None:
        self.stop()
        self.calls.clear()
        self._keep.clear()

    def _recorder(self, name: str) -> Any:
        def record(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
            inputs = _tensors(args)
            outputs = _tensors([output])
            self._keep.extend(inputs + outputs)
            self.calls.append(
                _Call(
                    len(self.calls), name, module, [id(t) for t in inputs], [id(t) for t in outputs]
                )
            )

        return record

    def producer_of(self, tensor: torch.Tensor, exclude: str) -> tuple[str, nn.Module] | None:
        """The latest module (other than ``exclude``) that returned this very tensor."""
        for call in reversed(self.calls):
            if call.name != exclude and id(tensor) in call.outputs:
                return call.name, call.module
        return None

    def wiring_for(self, activation: str, act_input: torch.Tensor, feature_axis: int) -> Wiring:
        """Walk back from the activation's input and forward from its output."""
        produces: list[ParamRef] = []
        producer: str | None = None
        current: int | None = id(act_input)
        exclude = activation
        while current is not None:
            found = next(
                (c for c in reversed(self.calls) if c.name != exclude and current in c.outputs),
                None,
            )
            if found is None:
                break
            producer = found.name
            refs = producer_params(found.name, found.module)
            if refs is not None:
                produces.extend(refs)
                break
            if isinstance(found.module, _PER_CHANNEL):
                produces.extend(_params(found.name, found.module, {"weight": 0, "bias": 0}))
            elif not isinstance(found.module, _PASS_THROUGH):
                break
            exclude, current = found.name, (found.inputs[0] if found.inputs else None)
        consumer, consumes = self._consumers(activation)
        return Wiring(
            feature_axis=feature_axis,
            producer=producer,
            consumer=consumer,
            produces=tuple(produces),
            consumes=tuple(consumes),
        )

    def _consumers(self, activation: str) -> tuple[str | None, list[ParamRef]]:
        own = [c for c in self.calls if c.name == activation]
        if not own or not own[0].outputs:
            return None, []
        frontier, start = {own[0].outputs[0]}, own[0].order
        consumer: str | None = None
        refs: list[ParamRef] = []
        for call in self.calls[start + 1 :]:
            if not frontier.intersection(call.inputs):
                continue
            found = consumer_params(call.name, call.module)
            if found is not None:
                consumer = consumer or call.name
                refs.extend(found)
            elif isinstance(call.module, _PASS_THROUGH + _PER_CHANNEL):
                if isinstance(call.module, _PER_CHANNEL):
                    refs.extend(_params(call.name, call.module, {"weight": 0, "bias": 0}))
                frontier.update(call.outputs)
        return consumer, refs
