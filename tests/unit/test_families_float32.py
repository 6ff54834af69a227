"""float32_below/above: exact bounds anywhere on the float64 line, with no numpy warning or
error (a threshold of 1e-50 or a histogram edge of 1e300 is legitimate)."""

from __future__ import annotations

import numpy as np
import pytest

from neuronwatch.families import float32_above, float32_below

TINY = float(np.finfo(np.float32).smallest_subnormal)
BIG = float(np.finfo(np.float32).max)


@pytest.mark.parametrize(
    ("value", "below", "above"),
    [
        (0.1, 0.09999999403953552, 0.10000000149011612),
        (1e-50, 0.0, TINY),
        (-1e-50, -TINY, -0.0),
        (5e-324, 0.0, TINY),
        (1e300, BIG, np.inf),
        (-1e300, -np.inf, -BIG),
        (np.inf, np.inf, np.inf),
    ],
)
def test_bounds_hold_without_warnings_under_raising_error_settings(
    value: float, below: float, above: float
) -> None:
    with np.errstate(all="raise"):
        assert float32_below(value) == below
        assert float32_above(value) == above
    assert float32_below(value) <= value <= float32_above(value)
