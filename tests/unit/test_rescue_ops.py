"""The arithmetic of the rescue ops, against plain reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from neuronwatch.rescue import ops
from neuronwatch.rescue.jsonout import plain
from neuronwatch.rescue.steps import Add, Delete, Fill, Redraw, Strip, apply_steps


def test_strip_zeroes_the_most_negative_tenth_of_the_remaining_weights() -> None:
    w = np.array([[-5.0, 3.0, -1.0, 0.0, -2.0, 4.0, -0.5, 1.0, -3.0, 2.0, 0.1]])
    zeroed = ops.strip(w, 0, np.array([0]), 0.1)
    # 10 non-zero weights -> ceil(1.0) = 1: the most negative one.
    assert zeroed[0].tolist() == [0]
    assert w[0, 0] == 0.0
    zeroed = ops.strip(w, 0, np.array([0]), 0.25)
    # 9 non-zero left -> ceil(2.25) = 3: -3, -2, -1 in that order of value.
    assert zeroed[0].tolist() == [2, 4, 8]
    assert (w[0, [2, 4, 8]] == 0).all()
    assert w[0, 1] == 3.0
    assert w[0, 6] == -0.5


def test_strip_never_zeroes_positive_weights() -> None:
    w = np.array([[1.0, 2.0, -1.0, 3.0]])
    zeroed = ops.strip(w, 0, np.array([0]), 1.0)
    assert zeroed[0].tolist() == [2]
    assert w.tolist() == [[1.0, 2.0, 0.0, 3.0]]


def test_strip_acts_on_the_neuron_axis_only() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(4, 6, 3, 3))  # conv weight, neurons = input channels (axis 1)
    before = w.copy()
    zeroed = ops.strip(w, 1, np.array([2, 5]), 0.1)
    assert set(zeroed) == {2, 5}
    untouched = [c for c in range(6) if c not in (2, 5)]
    np.testing.assert_array_equal(w[:, untouched], before[:, untouched])
    for channel, positions in zeroed.items():
        flat = before[:, channel].reshape(-1)
        assert len(positions) == math.ceil(0.1 * flat.size)
        assert flat[positions].max() <= np.sort(flat)[len(positions) - 1]
        assert (w[:, channel].reshape(-1)[positions] == 0).all()


def test_init_bounds_follow_fan_in() -> None:
    assert ops.init_bound((64, 100), 0, "torch") == pytest.approx(1 / math.sqrt(100))
    assert ops.init_bound((64, 100), 0, "kaiming") == pytest.approx(math.sqrt(6 / 100))
    assert ops.init_bound((8, 3, 3, 3), 0, "torch") == pytest.approx(1 / math.sqrt(27))


def test_redraw_stays_in_bounds_and_can_match_the_live_norm() -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(10, 50)) * 3.0
    before = w.copy()
    ops.redraw(w, 0, np.array([1, 7]), 0.1, np.random.default_rng(1))
    assert np.abs(w[[1, 7]]).max() <= 0.1
    assert not np.array_equal(w[1], before[1])
    np.testing.assert_array_equal(np.delete(w, [1, 7], 0), np.delete(before, [1, 7], 0))
    norm = ops.redraw(w, 0, np.array([1, 7]), 0.1, np.random.default_rng(1), match_norm=True)
    live = np.linalg.norm(np.delete(before, [1, 7], 0), axis=1).mean()
    assert norm == pytest.approx(live)
    assert np.linalg.norm(w[[1, 7]], axis=1) == pytest.approx([live, live])


@pytest.mark.parametrize("axis", [0, 1])
def test_fold_delta_is_what_the_removed_inputs_contributed(axis: int) -> None:
    rng = np.random.default_rng(0)
    w = rng.normal(size=(5, 7)) if axis == 1 else rng.normal(size=(7, 5))
    x = rng.normal(size=7)
    index = np.array([1, 4])
    x[index] = [0.75, -2.0]  # constant neurons
    full = (w @ x) if axis == 1 else (x @ w)
    delta = ops.fold_delta(w, axis, index, x[index])
    kept = np.delete(w, index, axis=axis)
    rest = np.delete(x, index)
    pruned = (kept @ rest) if axis == 1 else (rest @ kept)
    np.testing.assert_allclose(pruned + delta, full, rtol=1e-12)


def test_normal_quantile() -> None:
    assert ops.normal_quantile(0.5) == pytest.approx(0.0)
    assert ops.normal_quantile(0.9) == pytest.approx(1.2815515655446004)
    with pytest.raises(ValueError, match="p must be in"):
        ops.normal_quantile(1.0)


def test_lift_makes_a_gaussian_neuron_fire_on_about_the_top_share() -> None:
    rng = np.random.default_rng(0)
    z = rng.normal(-30.0, 2.0, size=(200_000, 3)) * np.array([1.0, 0.5, 3.0])
    shift = ops.lift_shifts(np.full(3, z.shape[0]), z.sum(0), (z**2).sum(0), z.max(0), 0.0, 0.1)
    fired = ((z + shift) > 0).mean(axis=0)
    np.testing.assert_allclose(fired, 0.1, atol=0.005)


def test_lift_is_capped_by_the_maximum_so_a_skewed_neuron_still_fires() -> None:
    # Mostly -1 with a few rows far below: the normal estimate of the 99 % quantile lies far
    # above the largest value ever seen, so the cap decides and the best rows fire.
    z = np.full(1000, -1.0)
    z[:3] = -100.0
    shift = ops.lift_shifts(
        np.array([z.size]),
        np.array([z.sum()]),
        np.array([(z**2).sum()]),
        np.array([z.max()]),
        0.0,
        0.01,
    )
    assert (z + shift[0] > 0).sum() == 997


def test_steps_run_value_changes_then_zeroing_then_deletions() -> None:
    w = np.arange(12, dtype=np.float64).reshape(3, 4)
    steps = [
        Delete("a", 1, np.array([0])),
        Fill("a", 1, np.array([2]), 0.0),
        Redraw("b", 0, np.array([1]), init="torch", seed=3),
        Add("b", 0, np.array([0]), np.array([100.0])),
    ]
    edited, applied = apply_steps(w, "F64", steps, "fc.weight")
    assert edited.shape == (3, 3)
    assert (edited[:, 1] == 0).all()  # column 2 zeroed after the redraw of row 1
    assert edited[0, 0] == 101.0  # row 0 + 100, column 0 deleted
    assert [a.record["action"] for a in applied] == ["redraw", "add", "fill", "delete"]
    moment = np.ones((3, 4))
    for a in applied:
        moment = a.moment(moment)
    # rows 0 (add) and 1 (redraw) and column 2 (fill) reset; column 0 gone.
    assert moment.tolist() == [[0.0, 0.0, 0.0], [0.0, 0.0, 0.0], [1.0, 0.0, 1.0]]


def test_strip_moments_reset_only_the_zeroed_entries() -> None:
    w = np.array([[-3.0, 1.0, -1.0, 2.0], [1.0, 1.0, 1.0, 1.0]])
    _, applied = apply_steps(w, "F64", [Strip("a", 0, np.array([0]), fraction=0.5)], "fc.weight")
    moment = applied[0].moment(np.ones((2, 4)))
    assert moment.tolist() == [[0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 1.0, 1.0]]
    assert plain(applied[0].record["zeroed"]) == [[0, [0, 2]]]
