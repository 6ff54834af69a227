"""Reduce an activation array to :class:`Partials` with numpy (the framework-free path).

This is what ``Engine.observe`` runs for JAX, numpy or anything that can hand over an array; the
torch and ONNX adapters compute the same quantities in their own runtime.
"""

from __future__ import annotations

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .config import LayerConfig
from .errors import ShapeError
from .partials import Partials

__all__ = ["as_rows", "reduce_rows"]


def as_rows(array: ArrayLike, feature_axis: int, layer: str) -> NDArray[np.floating]:
    """View ``array`` as ``[rows, neurons]``: the feature axis last, every other axis a row."""
    values = np.asarray(array)
    if values.ndim == 0:
        raise ShapeError(f"layer {layer!r}: got a scalar; pass an array with a feature axis")
    if not -values.ndim <= feature_axis < values.ndim:
        raise ShapeError(
            f"layer {layer!r}: feature_axis={feature_axis} is out of range for an array of "
            f"shape {values.shape}; pass the axis that holds the neurons (channels for conv maps)"
        )
    if values.shape[feature_axis] == 0:
        raise ShapeError(
            f"layer {layer!r}: the array of shape {values.shape} has no neurons on "
            f"feature_axis={feature_axis}"
        )
    if not np.issubdtype(values.dtype, np.number) or np.issubdtype(
        values.dtype, np.complexfloating
    ):
        raise ShapeError(
            f"layer {layer!r}: expected a real numeric array, got dtype {values.dtype}"
        )
    values = np.moveaxis(values, feature_axis, -1)
    return values.reshape(-1, values.shape[-1]).astype(np.float64, copy=False)


def reduce_rows(rows: NDArray[np.floating], config: LayerConfig) -> Partials:
    """Partials of a ``[rows, neurons]`` array under ``config``'s thresholds."""
    finite = np.isfinite(rows)
    zeroed = np.where(finite, rows, 0.0)
    fired = (zeroed > config.fire_threshold) & finite
    if config.saturates:
        flat = (zeroed < config.saturation_low) | (zeroed > config.saturation_high)
        saturated = (flat & finite).sum(axis=0)
    else:
        saturated = np.zeros(rows.shape[1], dtype=np.int64)
    edges = np.asarray(config.histogram_edges, dtype=np.float64)
    # side="left": bin j holds (edges[j-1], edges[j]] -- the same convention as torch.bucketize.
    bins = np.searchsorted(edges, rows[finite], side="left")
    return Partials.from_arrays(
        rows=rows.shape[0],
        fired=fired.sum(axis=0),
        saturated=saturated,
        nonfinite=(~finite).sum(axis=0),
        abs_sum=np.abs(zeroed).sum(axis=0),
        sum=zeroed.sum(axis=0),
        sq_sum=np.square(zeroed).sum(axis=0),
        max=np.where(finite, rows, -np.inf).max(axis=0, initial=-np.inf),
        min=np.where(finite, rows, np.inf).min(axis=0, initial=np.inf),
        histogram=np.bincount(bins, minlength=edges.size + 1),
    )
