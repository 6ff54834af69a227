"""Reports with planted states at known indices, shared by the plots and gate tests.

A real :class:`neuronwatch.Engine` is fed activations built so that each state sits exactly
on the planted neurons: dead ReLU units, leaking LeakyReLU units, saturated tanh units, and a
layer with fewer rows than ``min_rows`` (unknown).
"""

from __future__ import annotations

import numpy as np

import neuronwatch
from neuronwatch import Report

ROWS = 2000
MIN_ROWS = 1000
NEURONS = 32
# ReLU block -> planted dead indices (the same units never exceed 0 before the ReLU either).
DEAD: dict[str, list[int]] = {
    "blocks.0.act": [],
    "blocks.1.act": [3, 9],
    "blocks.2.act": [0, 5, 6, 31, 12, 13, 14, 15, 16, 17, 18],
}
LEAKING = {"head.leaky": [2, 7]}  # LeakyReLU, 16 neurons: never positive
SATURATED = {"head.tanh": [1, 4]}  # Tanh, 8 neurons: pinned at +-1
UNKNOWN_LAYER = "late.gelu"  # GELU, 8 neurons, UNKNOWN_ROWS rows < MIN_ROWS
UNKNOWN_ROWS = 100


def planted_engine(*, pre: bool = True, unknown: bool = False) -> neuronwatch.Engine:
    rng = np.random.default_rng(0)
    engine = neuronwatch.Engine("planted", min_rows=MIN_ROWS)
    for layer, dead in DEAD.items():
        # Positive on most rows, so a unit is dead only where it is planted.
        before = np.abs(rng.normal(size=(ROWS, NEURONS))) + 0.05
        before[: ROWS // 4] *= -1.0  # a quarter of the rows do not fire: frequency 0.75
        before[:, dead] = -np.abs(before[:, dead]) - 0.01
        if pre:
            engine.add_layer(f"{layer}:pre", None, kind="pre")
        engine.add_layer(layer, "ReLU")
        if pre:
            engine.observe(f"{layer}:pre", before)
        engine.observe(layer, np.maximum(before, 0.0))
    for layer, never in LEAKING.items():
        values = np.abs(rng.normal(size=(ROWS, 16))) + 0.05
        values[:, never] = -0.01 * np.abs(values[:, never])
        engine.add_layer(layer, "LeakyReLU")
        engine.observe(layer, values)
    for layer, pinned in SATURATED.items():
        values = np.tanh(rng.normal(size=(ROWS, 8)) * 0.5)
        values[:, pinned] = 1.0
        engine.add_layer(layer, "Tanh")
        engine.observe(layer, values)
    if unknown:
        engine.add_layer(UNKNOWN_LAYER, "GELU")
        engine.observe(UNKNOWN_LAYER, np.abs(rng.normal(size=(UNKNOWN_ROWS, 8))))
    return engine


def planted_report(*, pre: bool = True, unknown: bool = False) -> Report:
    engine = planted_engine(pre=pre, unknown=unknown)
    return Report.from_snapshot(engine.snapshot(), meta={"run": "planted"})
