"""Reusable buffers for the large temporary arrays of judging and exporting many layers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
from numpy.typing import NDArray

__all__ = ["SCRATCH", "Scratch"]


class Scratch:
    """Buffers for per-neuron arrays a read needs only while it runs, kept for the next read.

    A fresh 2 MB array (256,000 neurons) is fresh pages: page faults cost more than the work
    on them (~2.5 ms to join one lifetime field of 1,000 layers, ~0.4 ms into a warm buffer).
    A few buffers per dtype and size; a read that finds none free makes its own.
    """

    PER_SIZE = 3
    SIZES = 8

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._free: dict[tuple[str, int], list[NDArray[Any]]] = {}

    @contextmanager
    def joined(self, arrays: list[NDArray[Any]], dtype: type[np.generic]) -> Iterator[NDArray[Any]]:
        """``arrays`` concatenated into a buffer that is valid inside the ``with`` only."""
        key = (np.dtype(dtype).str, sum(map(len, arrays)))
        with self._lock:
            kept = self._free.get(key)
            buffer = kept.pop() if kept else None
        if buffer is None:
            buffer = np.empty(key[1], dtype=dtype)
        if arrays:
            np.concatenate(arrays, out=buffer)
        try:
            yield buffer
        finally:
            with self._lock:
                kept = self._free.pop(key, [])  # re-inserted: the newest key goes last
                self._free[key] = [*kept, buffer][-self.PER_SIZE :]
                while len(self._free) > self.SIZES:  # models come and go: keep a few sizes
                    del self._free[next(iter(self._free))]


SCRATCH = Scratch()
