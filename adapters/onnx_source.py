"""The ONNX Runtime activation source: host-side sums of the per-run partial vectors.

Each run of the augmented session returns, per tapped layer, the row count and ``O(neurons)``
vectors (float counts, sums, extrema, and the histogram's "above each edge" counts on sampled
runs). :class:`OnnxSource` adds them up per layer, in float64 (exact for counts up to 2**53),
and hands :class:`~neuronwatch.Partials` to the monitor when drained; ``Partials.from_arrays``
checks that counts are integral and within the rows.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from neuronwatch.errors import NeuronwatchError, ShapeError
from neuronwatch.partials import Partials

from .onnx_augment import COUNT_FIELDS, FIELD_ORDER, TapOutputs

__all__ = ["OnnxSource"]

log = logging.getLogger(__name__)

# The graph counts wide taps in int32 (MatMulInteger): exact while a run has fewer rows.
EXACT_COUNT_ROWS = 2**31
# Conv taps count and sum each row of their last axis in float32 first: exact below this length.
EXACT_ROW_LENGTH = 2**24
_MERGE = {"max": np.maximum, "min": np.minimum}


class _Layer:
    """Running sums of one tap between two drains."""

    def __init__(self, outputs: TapOutputs) -> None:
        self.outputs = outputs
        self.rows = 0
        self.arrays: dict[str, NDArray[np.float64]] | None = None
        self.histogram: NDArray[np.float64] | None = None

    def add(self, values: Mapping[str, NDArray[Any]], with_histogram: bool) -> None:
        """Add one run's values; a run whose values cannot be partial sums (NaN, negative
        counts) raises :class:`ShapeError` before anything is merged, so it is refused alone
        and the sums of the other runs stay valid."""
        rows = int(values["rows"])
        incoming = {name: np.asarray(values[name], dtype=np.float64) for name in FIELD_ORDER}
        self._check(rows, incoming)
        if self.arrays is None:
            self.arrays = {name: array.copy() for name, array in incoming.items()}
        else:
            for name, array in incoming.items():
                merge = _MERGE.get(name, np.add)
                merge(self.arrays[name], array, out=self.arrays[name])
        if with_histogram:
            neurons = incoming["fired"].shape[0]
            finite = rows * neurons - incoming["nonfinite"].sum()
            above = np.concatenate([[finite], np.asarray(values["above"], np.float64)])
            bins = above - np.append(above[1:], 0.0)
            self.histogram = bins if self.histogram is None else self.histogram + bins
        self.rows += rows

    def _check(self, rows: int, incoming: Mapping[str, NDArray[np.float64]]) -> None:
        where = f"layer {self.outputs.layer!r}"
        if rows < 0:
            raise ShapeError(f"{where}: a run reported {rows} rows")
        for name, array in incoming.items():
            if np.isnan(array).any():
                raise ShapeError(
                    f"{where}: a run's {name!r} holds NaN (a sum of finite values that "
                    "overflowed both ways?); the run is left out of the statistics"
                )
            if name in COUNT_FIELDS and (array < 0).any():
                raise ShapeError(f"{where}: a run's {name!r} count is negative")

    def drain(self) -> Partials | None:
        """The partials since the last drain; the sums are reset first, so partials that do
        not check out are lost alone and never block the following drains."""
        if self.arrays is None:
            return None
        rows, arrays, histogram = self.rows, self.arrays, self.histogram
        self.rows, self.arrays, self.histogram = 0, None, None
        bins = self.outputs.edges + 1
        return Partials.from_arrays(
            rows=rows,
            bins=bins,
            histogram=histogram if histogram is not None else np.zeros(bins),
            **arrays,
        )


class OnnxSource:
    """An activation source fed by the runs of one augmented ONNX Runtime session.

    ``on_error(layer)`` is told about every run or drain of a layer that was refused (the
    monitor's engine counts them as that layer's errors).
    """

    def __init__(
        self, taps: Sequence[TapOutputs], on_error: Callable[[str], None] | None = None
    ) -> None:
        self._layers = {tap.layer: _Layer(tap) for tap in taps}
        self._lock = threading.Lock()
        self._closed = False
        self._warned_counts = False
        self._warned_length = False
        self._on_error = on_error
        # The most rows one layer saw in the last run (pad positions left out): what a
        # progress bar reports as rows/s.
        self.last_rows = 0

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self._layers)

    def output_names(self) -> list[str]:
        """Every extra output of the session, in the order :meth:`record` expects them."""
        return [name for layer in self._layers.values() for name in layer.outputs.names.values()]

    def record(self, results: Sequence[NDArray[Any]], with_histogram: bool) -> dict[str, Exception]:
        """Add one run's extra outputs (in :meth:`output_names` order); returns the layers whose
        values were refused, with why (the caller counts them as errors; the others are added).
        """
        position = 0
        refused: dict[str, Exception] = {}
        most = 0
        with self._lock:
            for layer in self._layers.values():
                names = list(layer.outputs.names)
                values = dict(zip(names, results[position : position + len(names)], strict=True))
                position += len(names)
                most = max(most, int(values["rows"]))
                if int(values["rows"]) >= EXACT_COUNT_ROWS and not self._warned_counts:
                    self._warned_counts = True
                    log.warning(
                        "layer %r: %d rows in one run; counts are exact only below 2**31 rows "
                        "per run: use smaller batches",
                        layer.outputs.layer,
                        int(values["rows"]),
                    )
                length = int(np.max(values["row_length"])) if "row_length" in values else 0
                if length >= EXACT_ROW_LENGTH and not self._warned_length:
                    self._warned_length = True
                    log.warning(
                        "layer %r: %d values along the last axis of one map; the graph "
                        "counts and sums each such row in float32 first, which stops being "
                        "exact at 2**24 values: split such inputs",
                        layer.outputs.layer,
                        length,
                    )
                try:
                    layer.add(values, with_histogram)
                except ShapeError as exc:
                    refused[layer.outputs.layer] = exc
            self.last_rows = most
        return refused

    def drain(self) -> Iterator[tuple[str, Partials]]:
        drained: list[tuple[str, Partials]] = []
        with self._lock:
            for name, layer in self._layers.items():
                try:
                    partials = layer.drain()
                except (NeuronwatchError, ValueError) as exc:
                    # Counted and dropped: one bad window must not stop every later flush.
                    log.warning("layer %r: its partials were dropped: %s", name, exc)
                    if self._on_error is not None:
                        self._on_error(name)
                    continue
                if partials is not None:
                    drained.append((name, partials))
        yield from drained

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed
