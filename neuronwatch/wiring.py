"""Wiring: which parameters produce and consume each monitored layer's neurons.

Rescue edits checkpoints offline from this map alone, and the active-parameter ratio (Synaptic
Stripping §III-D) is computed from it: a parameter entry is inactive when any neuron it is
attached to is dead.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import ShapeError

__all__ = ["ParamRef", "Wiring", "active_parameter_counts"]


@dataclass(frozen=True)
class ParamRef:
    """One parameter tensor and the axis of it that is indexed by the layer's neurons.

    A ``torch.nn.Linear`` producing the neurons has ``weight`` axis 0 (rows) and ``bias`` axis 0;
    the Linear consuming them has ``weight`` axis 1. Hugging Face's GPT-2 ``Conv1D`` stores its
    weight transposed, so the axes swap.
    """

    name: str
    shape: tuple[int, ...]
    axis: int
    # False: editing it offline changes something else too (a tied or shared parameter, or one
    # read through a gate or a reshape): rescue leaves it alone and says so.
    editable: bool = True

    def __post_init__(self) -> None:
        if not 0 <= self.axis < len(self.shape):
            raise ShapeError(f"parameter {self.name!r}: axis {self.axis} not in shape {self.shape}")

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"name": self.name, "shape": list(self.shape), "axis": self.axis}
        if not self.editable:
            data["editable"] = False
        return data

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> ParamRef:
        editable = data.get("editable", True)
        if not isinstance(editable, bool):
            raise ShapeError(f"parameter {data.get('name')!r}: editable must be true or false")
        return cls(
            name=str(data["name"]),
            shape=tuple(int(n) for n in data["shape"]),
            axis=int(data["axis"]),
            editable=editable,
        )


@dataclass(frozen=True)
class Wiring:
    """How one monitored layer is connected: producing/consuming modules and their parameters.

    ``feature_axis`` is the axis of the activation tensor that holds the neurons (1 for conv
    feature maps, -1 for Linear outputs), as the adapter determined it.
    """

    feature_axis: int = -1
    producer: str | None = None
    consumer: str | None = None
    produces: tuple[ParamRef, ...] = field(default=())
    consumes: tuple[ParamRef, ...] = field(default=())

    def to_json(self) -> dict[str, Any]:
        return {
            "feature_axis": self.feature_axis,
            "producer": self.producer,
            "consumer": self.consumer,
            "produces": [p.to_json() for p in self.produces],
            "consumes": [p.to_json() for p in self.consumes],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Wiring:
        return cls(
            feature_axis=int(data.get("feature_axis", -1)),
            producer=data.get("producer"),
            consumer=data.get("consumer"),
            produces=tuple(ParamRef.from_json(p) for p in data.get("produces", ())),
            consumes=tuple(ParamRef.from_json(p) for p in data.get("consumes", ())),
        )


def active_parameter_counts(
    wiring: Mapping[str, Wiring], dead: Mapping[str, NDArray[np.bool_]]
) -> tuple[int, int]:
    """``(active, total)`` parameters over every parameter wired to a monitored layer.

    Each parameter is counted once even when it consumes one layer and produces the next; an
    entry is inactive when the neuron of *any* layer it is attached to is dead. Layers without a
    dead vector (not in ``dead``) count as fully alive.
    """
    shapes: dict[str, tuple[int, ...]] = {}
    dead_along: dict[str, dict[int, NDArray[np.bool_]]] = {}
    for layer, layer_wiring in wiring.items():
        layer_dead = dead.get(layer)
        for ref in (*layer_wiring.produces, *layer_wiring.consumes):
            known = shapes.setdefault(ref.name, ref.shape)
            if known != ref.shape:
                raise ShapeError(
                    f"parameter {ref.name!r} is wired with shape {known} and {ref.shape}"
                )
            if layer_dead is None:
                continue
            if layer_dead.shape != (ref.shape[ref.axis],):
                raise ShapeError(
                    f"layer {layer!r} has {layer_dead.size} neurons but parameter {ref.name!r} "
                    f"axis {ref.axis} has size {ref.shape[ref.axis]}; fix the wiring"
                )
            axes = dead_along.setdefault(ref.name, {})
            axes[ref.axis] = axes.get(ref.axis, np.zeros_like(layer_dead)) | layer_dead
    total = sum(math.prod(shape) for shape in shapes.values())
    inactive = 0
    for name, axes in dead_along.items():
        shape = shapes[name]
        # Entries with every attached index alive: product of alive counts on attached axes
        # times the full size of the other axes (inclusion-exclusion without building masks).
        alive = math.prod(
            int((~axes[a]).sum()) if a in axes else size for a, size in enumerate(shape)
        )
        inactive += math.prod(shape) - alive
    return total - inactive, total
