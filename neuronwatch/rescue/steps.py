"""Edits of one tensor, as data: what to do along which axis to which neurons.

A plan is a list of steps per tensor. Applying a step to the tensor's values gives the new
values and an :class:`Applied` record: what exactly changed (the manifest's entry) and how to
carry the change over to the tensor's optimizer moments (zero wherever values changed, delete
wherever entries were deleted). Steps run in a fixed order per tensor: value changes first,
then zeroing (so a zeroed outgoing weight stays zero even if another layer redrew its row),
then deletions, each on the original coordinates of its own axis.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from . import ops
from .checkpoint import CheckpointError
from .dtypes import decode, encode
from .ops import Floats

__all__ = ["Add", "Applied", "Delete", "Fill", "Redraw", "Step", "Strip", "apply_steps"]

Init = Literal["torch", "kaiming"]


@dataclass(frozen=True)
class Applied:
    """One step as it was applied: the manifest entry and the moment rule."""

    record: dict[str, Any]
    axis: int
    index: NDArray[np.intp]
    delete: bool = False
    # Strip zeroes single entries: per neuron, flat positions inside its slice.
    positions: dict[int, NDArray[np.intp]] | None = None

    def moment(self, values: NDArray[Any]) -> NDArray[Any]:
        """The same change on an optimizer moment (stored values; 0 is all-zero bits in every
        float type, so no conversion is needed)."""
        if self.delete:
            return delete(values, self.axis, self.index)
        if self.positions is None:
            return ops.fill(values, self.axis, self.index, 0.0)
        return ops.zero_positions(values, self.axis, self.positions)


@dataclass(frozen=True)
class _Base:
    layer: str
    axis: int
    index: NDArray[np.intp]

    def _record(self, action: str, **extra: Any) -> dict[str, Any]:
        return {
            "action": action,
            "layer": self.layer,
            "axis": self.axis,
            "index": self.index,
            **extra,
        }


@dataclass(frozen=True)
class Strip(_Base):
    """Synaptic Stripping: zero the ``fraction`` most negative non-zero incoming weights."""

    fraction: float = 0.1
    order = 0

    def apply(self, values: Floats, name: str) -> Applied:
        positions = ops.strip(values, self.axis, self.index, self.fraction)
        zeroed = [[n, p] for n, p in positions.items()]
        record = self._record("strip", fraction=self.fraction, zeroed=zeroed)
        return Applied(record, self.axis, self.index, positions=positions)


@dataclass(frozen=True)
class Redraw(_Base):
    """ReDo: new incoming weights from the layer's init distribution (uniform by fan-in)."""

    init: Init = "torch"
    match_norm: bool = False
    seed: int = 0
    order = 0

    def apply(self, values: Floats, name: str) -> Applied:
        # One generator per (seed, tensor): results do not depend on the order tensors are
        # written in, so a sharded checkpoint gets the same draws as a single file.
        rng = np.random.default_rng([self.seed, zlib.crc32(name.encode("utf-8"))])
        bound = ops.init_bound(values.shape, self.axis, self.init)
        try:
            norm = ops.redraw(values, self.axis, self.index, bound, rng, self.match_norm)
        except ValueError as exc:
            raise CheckpointError(
                f"tensor {name!r} (layer {self.layer!r}): {exc}, so --match-norm has no norm to "
                "match; fix those weights or drop --match-norm"
            ) from None
        record = self._record(
            "redraw", init=self.init, bound=bound, seed=self.seed, matched_norm=norm
        )
        return Applied(record, self.axis, self.index)


@dataclass(frozen=True)
class Add(_Base):
    """Add one value per index (lift's bias shift, prune's folded constants)."""

    values: NDArray[np.float64] = field(default_factory=lambda: np.zeros(0))
    why: str = ""
    order = 0

    def apply(self, values: Floats, name: str) -> Applied:
        ops.add(values, self.axis, self.index, self.values)
        changed = self.index[self.values != 0]
        record = self._record("add", values=self.values, why=self.why)
        return Applied(record, self.axis, changed)


@dataclass(frozen=True)
class Fill(_Base):
    """Set whole slices to one value (reinit: outgoing weights and biases to 0)."""

    value: float = 0.0
    order = 1

    def apply(self, values: Floats, name: str) -> Applied:
        ops.fill(values, self.axis, self.index, self.value)
        return Applied(self._record("fill", value=self.value), self.axis, self.index)


@dataclass(frozen=True)
class Delete(_Base):
    """Remove slices (prune)."""

    order = 2

    def apply(self, values: Floats, name: str) -> Applied:
        raise AssertionError("deletions are applied by apply_steps")

    def new_size(self, size: int) -> int:
        return size - int(self.index.size)


Step = Strip | Redraw | Add | Fill | Delete


def delete(values: NDArray[Any], axis: int, index: NDArray[np.intp]) -> NDArray[Any]:
    """``values`` without the slices ``index`` along ``axis`` (``np.take`` of the kept ones is
    an order of magnitude faster than ``np.delete`` across the last axis)."""
    keep = np.ones(values.shape[axis], dtype=bool)
    keep[index] = False
    return np.take(values, np.flatnonzero(keep), axis=axis)


def apply_steps(
    raw: NDArray[Any], dtype: str, steps: list[Step], name: str
) -> tuple[NDArray[Any], list[Applied]]:
    """The stored values ``raw`` (of element type ``dtype``) edited by ``steps`` in the fixed
    order. Value changes are computed in float64 and rounded once; deletions alone never
    convert (they work on any element type)."""
    applied: list[Applied] = []
    ordered = sorted(steps, key=lambda s: s.order)
    changes = [s for s in ordered if not isinstance(s, Delete)]
    if changes:
        values = decode(raw, dtype, name)
        for step in changes:
            applied.append(step.apply(values, name))
        raw = encode(values, dtype, name)
    for removal in ordered:
        if isinstance(removal, Delete):
            raw = delete(raw, removal.axis, removal.index)
            record = removal._record("delete")
            applied.append(Applied(record, removal.axis, removal.index, delete=True))
    return raw, applied


def new_shape(shape: tuple[int, ...], steps: list[Step]) -> tuple[int, ...]:
    result = list(shape)
    for step in steps:
        if isinstance(step, Delete):
            result[step.axis] = step.new_size(result[step.axis])
    return tuple(result)
