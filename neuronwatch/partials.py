"""Per-layer partial sums: the only currency between adapters, the engine and reports.

Every field is declared once with its merge rule, so ``merge``, ``reset`` and (later) DDP or
shard merges are written once, generically (the torchmetrics ``add_state`` idea). A merge is an
element-wise ``sum``, ``max`` or ``min`` and therefore exact and associative for the counts and
extrema; float sums are exact whenever the values are representable (else within float64
rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from .errors import MergeError, ShapeError

__all__ = ["DEFAULT_HISTOGRAM_EDGES", "FIELD_RULES", "Partials", "histogram_bins"]

MergeRule = Literal["sum", "max", "min"]

# The value histogram of a layer uses fixed edges so histograms of any two windows, ranks or runs
# add up. Bin j holds values in (edges[j-1], edges[j]]; the first and last bins are open.
# Exact zeros (ReLU's dead region) land in (-1e-3, 0].
DEFAULT_HISTOGRAM_EDGES: tuple[float, ...] = (
    -10.0, -3.0, -1.0, -0.3, -0.1, -0.01, -1e-3, 0.0, 1e-3, 0.01, 0.1, 0.3, 1.0, 3.0, 10.0,
)  # fmt: skip

_MERGE: dict[MergeRule, Callable[..., NDArray[np.generic]]] = {
    "sum": np.add,
    "max": np.maximum,
    "min": np.minimum,
}

# field name -> (merge rule, dtype, identity element)
FIELD_RULES: dict[str, tuple[MergeRule, type[np.generic], float]] = {
    "fired": ("sum", np.int64, 0),
    "saturated": ("sum", np.int64, 0),
    "nonfinite": ("sum", np.int64, 0),
    "abs_sum": ("sum", np.float64, 0.0),
    "sum": ("sum", np.float64, 0.0),
    "max": ("max", np.float64, -math.inf),
    "min": ("min", np.float64, math.inf),
    "histogram": ("sum", np.int64, 0),
}


def histogram_bins(edges: tuple[float, ...]) -> int:
    return len(edges) + 1


@dataclass(frozen=True, eq=False)
class Partials:
    """Accumulated statistics of one layer over some rows.

    ``rows`` counts every row seen; the per-neuron fields count only finite values (NaN and
    +-Inf are counted in ``nonfinite`` and excluded from everything else), so a neuron's
    usable rows are ``rows - nonfinite``. ``max``/``min`` are ``-inf``/``+inf`` until a finite
    value arrives. ``histogram`` covers the layer's values (all neurons) with fixed edges.
    """

    rows: int
    fired: NDArray[np.int64]
    saturated: NDArray[np.int64]
    nonfinite: NDArray[np.int64]
    abs_sum: NDArray[np.float64]
    sum: NDArray[np.float64]
    max: NDArray[np.float64]
    min: NDArray[np.float64]
    histogram: NDArray[np.int64]

    def __post_init__(self) -> None:
        neurons = self.fired.shape
        for name in ("saturated", "nonfinite", "abs_sum", "sum", "max", "min"):
            if getattr(self, name).shape != neurons:
                raise ShapeError(
                    f"partials field {name!r} has shape {getattr(self, name).shape}, "
                    f"expected {neurons} like 'fired'"
                )
        if self.rows < 0:
            raise ShapeError(f"partials rows must be >= 0, got {self.rows}")

    @classmethod
    def _of(cls, rows: int, arrays: Mapping[str, NDArray[Any]]) -> Partials:
        # Names and shapes are checked in __post_init__; callers cast dtypes per FIELD_RULES.
        return cls(rows=rows, **arrays)

    @property
    def neurons(self) -> int:
        return int(self.fired.shape[0])

    @classmethod
    def empty(cls, neurons: int, bins: int = histogram_bins(DEFAULT_HISTOGRAM_EDGES)) -> Partials:
        arrays = {
            name: np.full(bins if name == "histogram" else neurons, identity, dtype=dtype)
            for name, (_, dtype, identity) in FIELD_RULES.items()
        }
        return cls._of(0, arrays)

    @classmethod
    def from_arrays(cls, rows: int, **arrays: NDArray[np.generic]) -> Partials:
        """Build partials from plain arrays (an adapter's host copy), casting to the declared
        dtypes."""
        missing = set(FIELD_RULES) - set(arrays)
        if missing:
            raise ShapeError(f"partials are missing fields {sorted(missing)}")
        cast = {
            name: np.asarray(arrays[name], dtype=FIELD_RULES[name][1]).reshape(-1)
            for name in FIELD_RULES
        }
        return cls._of(int(rows), cast)

    def arrays(self) -> Iterator[tuple[str, NDArray[np.generic]]]:
        for f in fields(self):
            if f.name != "rows":
                yield f.name, getattr(self, f.name)

    def _check_compatible(self, other: Partials) -> None:
        if self.neurons != other.neurons or self.histogram.shape != other.histogram.shape:
            raise MergeError(
                f"cannot merge partials of {self.neurons} neurons/{self.histogram.size} bins "
                f"with {other.neurons} neurons/{other.histogram.size} bins"
            )

    def merged(self, other: Partials) -> Partials:
        """A new ``Partials`` holding both: every field merged by its declared rule."""
        self._check_compatible(other)
        merged = {
            name: _MERGE[FIELD_RULES[name][0]](mine, getattr(other, name))
            for name, mine in self.arrays()
        }
        return Partials._of(self.rows + other.rows, merged)

    def copy(self, readonly: bool = False) -> Partials:
        copied = Partials._of(self.rows, {name: array.copy() for name, array in self.arrays()})
        return copied.frozen() if readonly else copied

    def frozen(self) -> Partials:
        """Mark this object's own arrays read-only and return it (no copy). Only for partials
        nobody else holds, such as the result of :meth:`merged` or :meth:`copy`."""
        for _, array in self.arrays():
            array.flags.writeable = False
        return self

    def equals(self, other: Partials) -> bool:
        """Exact equality of every field (NaN never occurs: non-finite values are excluded)."""
        return self.rows == other.rows and all(
            np.array_equal(mine, getattr(other, name)) for name, mine in self.arrays()
        )
