"""Engine statistics equal a plain, loop-based numpy reference (including NaN/Inf rows)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuronwatch import Engine
from neuronwatch.config import LayerConfig


def reference(rows: np.ndarray, config: LayerConfig) -> dict[str, np.ndarray]:
    """Neuron by neuron, value by value: the definitions of docs/vocabulary.md written out."""
    neurons = rows.shape[1]
    keys = ("fired", "saturated", "nonfinite", "abs_sum", "sum", "sq_sum", "max", "min")
    out: dict[str, list[float]] = {k: [] for k in keys}
    histogram = np.zeros(len(config.histogram_edges) + 1, dtype=np.int64)
    for i in range(neurons):
        fired = saturated = nonfinite = 0
        abs_sum = total = squares = 0.0
        high, low = -math.inf, math.inf
        for value in rows[:, i]:
            if not math.isfinite(value):
                nonfinite += 1
                continue
            fired += value > config.fire_threshold
            saturated += value < config.saturation_low or value > config.saturation_high
            abs_sum += abs(value)
            total += value
            squares += value * value
            high, low = max(high, value), min(low, value)
            # bin j holds (edges[j-1], edges[j]]
            histogram[sum(value > e for e in config.histogram_edges)] += 1
        for key, val in zip(
            out, (fired, saturated, nonfinite, abs_sum, total, squares, high, low), strict=True
        ):
            out[key].append(val)
    result = {k: np.asarray(v) for k, v in out.items()}
    result["histogram"] = histogram
    return result


def noisy_rows(seed: int, n: int = 300, f: int = 12) -> np.ndarray:
    rng = np.random.default_rng(seed)
    rows = rng.normal(scale=3.0, size=(n, f))
    rows[rng.random((n, f)) < 0.05] = np.nan
    rows[rng.random((n, f)) < 0.02] = np.inf
    rows[rng.random((n, f)) < 0.02] = -np.inf
    rows[:, 0] = np.tanh(rows[:, 0])  # values right at histogram edges are exercised below
    rows[:7, 1] = [-10.0, -1.0, 0.0, 1e-3, 0.3, 10.0, 3.0]
    return rows


@pytest.mark.parametrize("activation", ["relu", "gelu", "tanh", "sigmoid", None])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partials_equal_reference(activation: str | None, seed: int) -> None:
    rows = noisy_rows(seed)
    engine = Engine("ref", min_rows=10)
    config = engine.add_layer("layer", activation)
    # Feed it in uneven batches: accumulation across batches must not change anything.
    for chunk in np.array_split(rows, [1, 50, 51, 200]):
        engine.observe("layer", chunk)
    partials = engine.snapshot().layers("current")["layer"].partials
    expected = reference(rows, config)
    assert partials.rows == rows.shape[0]
    for key in ("fired", "saturated", "nonfinite", "histogram"):
        np.testing.assert_array_equal(getattr(partials, key), expected[key], err_msg=key)
    for key in ("max", "min"):
        np.testing.assert_array_equal(getattr(partials, key), expected[key], err_msg=key)
    for key in ("abs_sum", "sum", "sq_sum"):
        np.testing.assert_allclose(getattr(partials, key), expected[key], rtol=1e-12, err_msg=key)


def test_feature_axis_moves_neurons_last() -> None:
    rng = np.random.default_rng(3)
    conv = rng.normal(size=(4, 6, 5, 5))  # [B, C, H, W]: 100 rows of 6 channels
    engine = Engine("conv", min_rows=1)
    engine.observe("conv", conv, feature_axis=1)
    partials = engine.snapshot().layers("current")["conv"].partials
    rows = np.moveaxis(conv, 1, -1).reshape(-1, 6)
    assert partials.rows == 100
    np.testing.assert_array_equal(partials.fired, (rows > 0).sum(0))
    np.testing.assert_array_equal(partials.max, rows.max(0))


def test_all_nonfinite_neuron_is_unknown_not_dead() -> None:
    rows = np.ones((50, 3))
    rows[:, 1] = np.nan
    rows[:, 2] = 0.0
    engine = Engine("m", min_rows=20)
    engine.observe("l", rows)
    stats = engine.snapshot().layers("current")["l"]
    assert stats.finite_rows.tolist() == [50, 0, 50]
    assert stats.known.tolist() == [True, False, True]
    assert stats.dead_indices.tolist() == [2]
    assert not stats.complete
    assert np.isnan(stats.frequency[1])
