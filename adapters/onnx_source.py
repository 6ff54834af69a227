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
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from neuronwatch.partials import Partials

from .onnx_augment import FIELD_ORDER, TapOutputs

__all__ = ["OnnxSource"]

log = logging.getLogger(__name__)

# float32 sums of 0/1 values are exact while every partial sum stays below 2**24.
EXACT_FLOAT32_COUNT = 2**24
_MERGE = {"max": np.maximum, "min": np.minimum}


class _Layer:
    """Running sums of one tap between two drains."""

    def __init__(self, outputs: TapOutputs) -> None:
        self.outputs = outputs
        self.rows = 0
        self.arrays: dict[str, NDArray[np.float64]] | None = None
        self.histogram: NDArray[np.float64] | None = None

    def add(self, values: Mapping[str, NDArray[Any]], with_histogram: bool) -> None:
        rows = int(values["rows"])
        incoming = {name: np.asarray(values[name], dtype=np.float64) for name in FIELD_ORDER}
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

    def drain(self) -> Partials | None:
        if self.arrays is None:
            return None
        bins = self.outputs.edges + 1
        histogram = self.histogram if self.histogram is not None else np.zeros(bins)
        partials = Partials.from_arrays(
            rows=self.rows, bins=bins, histogram=histogram, **self.arrays
        )
        self.rows, self.arrays, self.histogram = 0, None, None
        return partials


class OnnxSource:
    """An activation source fed by the runs of one augmented ONNX Runtime session."""

    def __init__(self, taps: Sequence[TapOutputs]) -> None:
        self._layers = {tap.layer: _Layer(tap) for tap in taps}
        self._lock = threading.Lock()
        self._closed = False
        self._warned_counts = False

    @property
    def layers(self) -> tuple[str, ...]:
        return tuple(self._layers)

    def output_names(self) -> list[str]:
        """Every extra output of the session, in the order :meth:`record` expects them."""
        return [name for layer in self._layers.values() for name in layer.outputs.names.values()]

    def record(self, results: Sequence[NDArray[Any]], with_histogram: bool) -> None:
        """Add one run's extra outputs (in :meth:`output_names` order)."""
        position = 0
        with self._lock:
            for layer in self._layers.values():
                names = list(layer.outputs.names)
                values = dict(zip(names, results[position : position + len(names)], strict=True))
                position += len(names)
                if int(values["rows"]) >= EXACT_FLOAT32_COUNT and not self._warned_counts:
                    self._warned_counts = True
                    log.warning(
                        "layer %r: %d rows in one run; float32 counts are exact only below "
                        "2**24 rows per run: use smaller batches",
                        layer.outputs.layer,
                        int(values["rows"]),
                    )
                layer.add(values, with_histogram)

    def drain(self) -> Iterator[tuple[str, Partials]]:
        with self._lock:
            drained = [(name, layer.drain()) for name, layer in self._layers.items()]
        for name, partials in drained:
            if partials is not None:
                yield name, partials

    def close(self) -> None:
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed
