"""Per-layer partial sums: the only currency between activation sources, the engine and reports.

Every field is declared once in :data:`FIELDS` with its merge rule, its identity element and what
a valid value looks like. Merging, empty partials, validation of arrays that come from outside
(an adapter's buffers, an ONNX session's float counts, a report file) and the torch adapter's
device buffers are all derived from that one declaration (the torchmetrics ``add_state`` idea).

A merge is an element-wise ``sum``, ``max`` or ``min``, so it is exact and associative for the
counts, the extrema and ``last_fired_step``; float sums are exact whenever the values are
representable (else within float64 rounding).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from numpy.typing import NDArray

from .errors import MergeError, ShapeError

__all__ = [
    "DEFAULT_HISTOGRAM_EDGES",
    "FIELDS",
    "FieldSpec",
    "Partials",
    "histogram_bins",
]

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


@dataclass(frozen=True)
class FieldSpec:
    """How one partials field is stored, merged and checked.

    - ``per``: one value per neuron, or one per histogram bin.
    - ``kind``: ``count`` fields are integral and lie in ``[0, rows]`` (per neuron) or add up to at
      most ``rows * neurons`` (histogram); ``sum`` and ``extremum`` fields are floats that must
      not be NaN; ``step`` fields are integral and ``>= -1``.
    - ``on_host``: filled by the engine when partials are merged in, not by the runtime that
      reduced the activations (``last_fired_step`` needs the engine's step).
    """

    merge: MergeRule
    dtype: type[np.generic]
    identity: float
    per: Literal["neuron", "bin"]
    kind: Literal["count", "sum", "extremum", "step"]
    doc: str
    on_host: bool = False


FIELDS: dict[str, FieldSpec] = {
    "fired": FieldSpec("sum", np.int64, 0, "neuron", "count", "finite values > fire_threshold"),
    "saturated": FieldSpec(
        "sum", np.int64, 0, "neuron", "count", "finite values in the family's flat region"
    ),
    "nonfinite": FieldSpec("sum", np.int64, 0, "neuron", "count", "NaN and +-Inf values"),
    "abs_sum": FieldSpec("sum", np.float64, 0.0, "neuron", "sum", "sum of |value| (finite)"),
    "sum": FieldSpec("sum", np.float64, 0.0, "neuron", "sum", "sum of values (finite)"),
    "sq_sum": FieldSpec(
        "sum", np.float64, 0.0, "neuron", "sum", "sum of squared values (finite): the spread"
    ),
    "max": FieldSpec("max", np.float64, -math.inf, "neuron", "extremum", "largest finite value"),
    "min": FieldSpec("min", np.float64, math.inf, "neuron", "extremum", "smallest finite value"),
    "histogram": FieldSpec("sum", np.int64, 0, "bin", "count", "finite values per fixed bin"),
    "last_fired_step": FieldSpec(
        "max",
        np.int64,
        -1,
        "neuron",
        "step",
        "engine step of the last flush in which the neuron fired (-1: never)",
        on_host=True,
    ),
}

# Fields an activation source reduces in its own runtime (everything but the host-side ones).
DEVICE_FIELDS: tuple[str, ...] = tuple(name for name, spec in FIELDS.items() if not spec.on_host)


def histogram_bins(edges: tuple[float, ...]) -> int:
    return len(edges) + 1


def _identity_array(name: str, size: int) -> NDArray[Any]:
    spec = FIELDS[name]
    return np.full(size, spec.identity, dtype=spec.dtype)


def _checked(name: str, value: Any, rows: int, size: int | None) -> NDArray[Any]:
    """``value`` as a 1-D array of the field's dtype, or a ShapeError saying what is wrong."""
    spec = FIELDS[name]
    array = np.asarray(value)
    if array.ndim != 1:
        raise ShapeError(f"partials field {name!r} must be 1-D, got shape {array.shape}")
    if size is not None and array.shape[0] != size:
        what = "histogram bins" if spec.per == "bin" else "neurons"
        raise ShapeError(f"partials field {name!r} has {array.shape[0]} {what}, expected {size}")
    if not (np.issubdtype(array.dtype, np.number) or array.dtype == np.bool_):
        raise ShapeError(f"partials field {name!r} must be numeric, got dtype {array.dtype}")
    as_float = array.astype(np.float64, copy=False)
    if np.isnan(as_float).any():
        raise ShapeError(f"partials field {name!r} contains NaN")
    if spec.kind in ("count", "step"):
        if not np.isfinite(as_float).all() or (as_float != np.round(as_float)).any():
            raise ShapeError(f"partials field {name!r} holds counts; got non-integral values")
        low = -1 if spec.kind == "step" else 0
        if (as_float < low).any():
            raise ShapeError(f"partials field {name!r} must be >= {low}, got {as_float.min()}")
        if spec.kind == "count" and spec.per == "neuron" and (as_float > rows).any():
            raise ShapeError(
                f"partials field {name!r} counts up to {int(as_float.max())} but only "
                f"{rows} rows were seen"
            )
    if name in ("abs_sum", "sq_sum") and (as_float < 0).any():
        raise ShapeError(f"partials field {name!r} is a sum of non-negative values, got < 0")
    return np.array(array, dtype=spec.dtype)


@dataclass(frozen=True, eq=False)
class Partials:
    """Accumulated statistics of one layer over some rows.

    ``rows`` counts every row seen; the per-neuron fields count only finite values (NaN and
    +-Inf are counted in ``nonfinite`` and excluded from everything else), so a neuron's
    usable rows are ``rows - nonfinite``. ``max``/``min`` are ``-inf``/``+inf`` until a finite
    value arrives. ``histogram`` covers the layer's values (all neurons) with fixed edges.
    See :data:`FIELDS` for every field.
    """

    rows: int
    fired: NDArray[np.int64]
    saturated: NDArray[np.int64]
    nonfinite: NDArray[np.int64]
    abs_sum: NDArray[np.float64]
    sum: NDArray[np.float64]
    sq_sum: NDArray[np.float64]
    max: NDArray[np.float64]
    min: NDArray[np.float64]
    histogram: NDArray[np.int64]
    last_fired_step: NDArray[np.int64]

    def __post_init__(self) -> None:
        neurons = self.fired.shape
        for name, spec in FIELDS.items():
            if spec.per == "neuron" and getattr(self, name).shape != neurons:
                raise ShapeError(
                    f"partials field {name!r} has shape {getattr(self, name).shape}, "
                    f"expected {neurons} like 'fired'"
                )
        if self.rows < 0:
            raise ShapeError(f"partials rows must be >= 0, got {self.rows}")

    @classmethod
    def _of(cls, rows: int, arrays: Mapping[str, NDArray[Any]]) -> Partials:
        # Trusted internal constructor: arrays already have the declared dtypes.
        return cls(rows=rows, **arrays)

    @property
    def neurons(self) -> int:
        return int(self.fired.shape[0])

    @property
    def bins(self) -> int:
        return int(self.histogram.shape[0])

    @classmethod
    def empty(cls, neurons: int, bins: int = histogram_bins(DEFAULT_HISTOGRAM_EDGES)) -> Partials:
        """Partials of no rows: every field at its identity element."""
        arrays = {
            name: _identity_array(name, bins if spec.per == "bin" else neurons)
            for name, spec in FIELDS.items()
        }
        return cls._of(0, arrays)

    @classmethod
    def from_arrays(
        cls, rows: int | float | np.number[Any], bins: int | None = None, **arrays: Any
    ) -> Partials:
        """Build checked partials from plain arrays (an adapter's host copy, a file).

        Counts may arrive as floats (ONNX Runtime sums them as floats) but must be integral,
        non-negative and at most ``rows``; ``bins``, when given, is the expected histogram
        length. Host-side fields (``last_fired_step``) may be left out: they start at their
        identity. Raises :class:`ShapeError` naming the field that is wrong.
        """
        unknown = set(arrays) - set(FIELDS)
        if unknown:
            raise ShapeError(f"partials have no field(s) {sorted(unknown)}; known: {list(FIELDS)}")
        missing = [n for n, spec in FIELDS.items() if n not in arrays and not spec.on_host]
        if missing:
            raise ShapeError(f"partials are missing field(s) {missing}")
        row_value = float(rows)
        if not math.isfinite(row_value) or row_value != round(row_value) or row_value < 0:
            raise ShapeError(f"partials rows must be a whole number >= 0, got {rows!r}")
        count = int(row_value)
        fired = _checked("fired", arrays["fired"], count, None)
        neurons = fired.shape[0]
        checked = {"fired": fired}
        for name, spec in FIELDS.items():
            if name == "fired":
                continue
            if name not in arrays:
                checked[name] = _identity_array(name, neurons)
                continue
            size = bins if spec.per == "bin" else neurons
            checked[name] = _checked(name, arrays[name], count, size)
        finite_rows = count - checked["nonfinite"]
        for name in ("fired", "saturated"):
            if (checked[name] > finite_rows).any():
                raise ShapeError(
                    f"partials field {name!r} counts more values than the {count} rows minus "
                    "the non-finite ones"
                )
        if int(checked["histogram"].sum()) > count * neurons:
            raise ShapeError(
                f"partials histogram holds {int(checked['histogram'].sum())} values but "
                f"{count} rows of {neurons} neurons hold at most {count * neurons}"
            )
        return cls._of(count, checked)

    def arrays(self) -> Iterator[tuple[str, NDArray[Any]]]:
        for name in FIELDS:
            yield name, getattr(self, name)

    def _check_compatible(self, other: Partials) -> None:
        if self.neurons != other.neurons or self.bins != other.bins:
            raise MergeError(
                f"cannot merge partials of {self.neurons} neurons/{self.bins} bins "
                f"with {other.neurons} neurons/{other.bins} bins"
            )

    def merged(self, other: Partials) -> Partials:
        """A new ``Partials`` holding both: every field merged by its declared rule."""
        self._check_compatible(other)
        merged = {
            name: _MERGE[FIELDS[name].merge](mine, getattr(other, name))
            for name, mine in self.arrays()
        }
        return Partials._of(self.rows + other.rows, merged)

    def replace(self, **arrays: NDArray[Any]) -> Partials:
        """A copy with some fields swapped (same shapes), e.g. a stamped ``last_fired_step``."""
        values = dict(self.arrays())
        for name, array in arrays.items():
            values[name] = np.asarray(array, dtype=FIELDS[name].dtype)
        return Partials._of(self.rows, values)

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
