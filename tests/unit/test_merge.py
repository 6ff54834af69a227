"""Merging engines and reports is exact and associative (property test)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from neuronwatch import Engine, MergeError, Report

NEURONS = 5
# Dyadic values (k/8) and non-finite ones: float sums of these are exact in any order, so
# "exact" can be checked with ==, not a tolerance.
values = st.one_of(
    st.integers(-400, 400).map(lambda k: k / 8),
    st.sampled_from([np.nan, np.inf, -np.inf]),
)
batches = arrays(np.float64, st.tuples(st.integers(0, 40), st.just(NEURONS)), elements=values)


def engine_of(*parts: np.ndarray, roll_after: int | None = None) -> Engine:
    engine = Engine("m", min_rows=3)
    engine.add_layer("act", "Tanh")
    engine.add_layer("other", "GELU")
    for i, part in enumerate(parts):
        engine.observe("act", part)
        engine.observe("other", part[:, ::-1])
        if roll_after == i:
            engine.rollover()
    return engine


def same(a: Engine, b: Engine) -> bool:
    sa, sb = a.snapshot(), b.snapshot()
    return all(
        sa.windows[w].keys() == sb.windows[w].keys()
        and all(
            sa.windows[w][name].partials.equals(sb.windows[w][name].partials)
            for name in sa.windows[w]
        )
        for w in ("current", "last", "lifetime")
    )


@settings(max_examples=60, deadline=None)
@given(batches, batches, batches)
def test_engine_merge_is_exact_and_associative(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
    a, b, c = engine_of(x), engine_of(y), engine_of(z)
    left = a.merged(b).merged(c)
    right = a.merged(b.merged(c))
    assert same(left, right)
    assert same(a.merged(b), b.merged(a))
    # ... and equal to one engine that saw every row.
    assert same(left, engine_of(np.concatenate([x, y, z])))


@settings(max_examples=30, deadline=None)
@given(batches, batches)
def test_windows_merge_too(x: np.ndarray, y: np.ndarray) -> None:
    merged = engine_of(x, y, roll_after=0).merged(engine_of(y, x, roll_after=0))
    snap = merged.snapshot()
    rows = x.shape[0] + y.shape[0]
    # A saw x then y, B saw y then x: both closed windows merge, both current ones too.
    assert snap.layers("last")["act"].rows == rows
    assert snap.layers("current")["act"].rows == rows
    assert snap.layers("lifetime")["act"].rows == 2 * rows
    whole = engine_of(x, y).snapshot().layers("current")["act"].partials
    assert snap.layers("last")["act"].partials.equals(whole)


@settings(max_examples=30, deadline=None)
@given(batches, batches, batches)
def test_report_merge_is_exact_and_associative(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> None:
    ra, rb, rc = (Report.from_snapshot(engine_of(p).snapshot(), "lifetime") for p in (x, y, z))
    left, right = ra.merged(rb).merged(rc), ra.merged(rb.merged(rc))
    whole = Report.from_snapshot(engine_of(np.concatenate([x, y, z])).snapshot(), "lifetime")
    for name in whole.layers:
        assert left.layers[name].partials.equals(right.layers[name].partials)
        assert left.layers[name].partials.equals(whole.layers[name].partials)
        assert left.layers[name].dead.tolist() == whole.layers[name].dead.tolist()


def test_merge_refuses_different_settings() -> None:
    a = Engine("m", min_rows=3)
    a.observe("act", np.ones((4, 2)))
    b = Engine("m", min_rows=4)
    b.observe("act", np.ones((4, 2)))
    with pytest.raises(MergeError, match="'act'"):
        a.merged(b)
    with pytest.raises(MergeError, match="'m' and 'n'"):
        a.merged(Engine("n", min_rows=3))
