"""Window semantics through the torch adapter: verdicts over windows, never one batch;
``rollover()`` and ``window=`` steps; ``min_rows``; ``flush_every``; ``every=k``."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn

import neuronwatch

ROWS = 100


def identity_relu() -> nn.Sequential:
    """Linear with identity weights and zero bias, then ReLU: the input decides who fires."""
    fc = nn.Linear(4, 4)
    with torch.no_grad():
        fc.weight.copy_(torch.eye(4))
        fc.bias.zero_()
    return nn.Sequential(OrderedDict(fc=fc, act=nn.ReLU()))


def batch(rows: int = ROWS, fire_rows: tuple[int, ...] = ()) -> torch.Tensor:
    """Neurons 0..2 fire on every row; neuron 3 only on ``fire_rows``."""
    x = torch.ones(rows, 4)
    x[:, 3] = -1.0
    x[list(fire_rows), 3] = 1.0
    return x


def test_one_firing_row_in_batch_seven_means_not_dead() -> None:
    model = identity_relu()
    with neuronwatch.watch(model, compile=False, min_rows=500) as monitor:
        for _ in range(6):
            model(batch())
        act = monitor.snapshot().layers("lifetime")["act"]
        assert act.rows == 600
        assert act.dead_indices.tolist() == [3]  # silent so far
        model(batch(fire_rows=(42,)))  # batch 7: neuron 3 fires once
        act = monitor.snapshot().layers("lifetime")["act"]
    assert act.rows == 700
    assert act.dead_indices.tolist() == []
    assert act.partials.fired.tolist() == [700, 700, 700, 1]
    assert np.flatnonzero(act.asleep).tolist() == [3]
    assert act.frequency[3] == pytest.approx(1 / 700)


def test_rollover_last_window_covers_only_its_own_rows() -> None:
    model = identity_relu()
    with neuronwatch.watch(model, compile=False, min_rows=500) as monitor:
        for _ in range(6):
            model(batch())
        monitor.rollover()
        first = monitor.report()
        assert first.window == "last"
        assert first.layers["act"].rows == 600
        assert first.layers["act"].dead_indices.tolist() == [3]

        model(batch(fire_rows=(0,)))
        for _ in range(5):
            model(batch())
        monitor.rollover()
        second = monitor.report().layers["act"]
        assert second.rows == 600
        assert second.partials.fired[3] == 1
        assert second.dead_indices.tolist() == []

        for _ in range(6):
            model(batch())
        monitor.rollover()
        snapshot = monitor.snapshot()
    third = snapshot.layers("last")["act"]
    assert third.rows == 600
    assert third.dead_indices.tolist() == [3]  # the firing row belongs to the previous window
    assert snapshot.windows_completed == 3
    assert "act" not in snapshot.windows["current"]
    lifetime = snapshot.layers("lifetime")["act"]
    assert lifetime.rows == 1800
    assert lifetime.partials.fired[3] == 1


def test_window_steps_roll_over_automatically() -> None:
    model = identity_relu()
    with neuronwatch.watch(model, compile=False, window=3, min_rows=10) as monitor:
        for step in range(1, 10):
            model(batch(rows=10, fire_rows=(0,) if step == 5 else ()))
            monitor.step()
            latest = monitor.latest
            if step < 3:
                assert latest is None  # no flush yet (flush_every defaults to 10)
            if step == 3:
                assert latest is not None
                assert latest.windows_completed == 1
                assert latest.step == 3
                assert latest.windows["last"]["act"].rows == 30
                assert latest.windows["last"]["act"].dead_indices.tolist() == [3]
            if step == 4:
                # Not flushed: the published snapshot still shows the first window only.
                assert latest is not None
                assert latest.windows_completed == 1
                assert "act" not in latest.windows["current"]
                current = monitor.snapshot().layers("current")["act"]
                assert current.rows == 10
            if step == 6:
                assert latest is not None
                last = latest.windows["last"]["act"]
                assert latest.windows_completed == 2
                assert last.rows == 30  # steps 4..6 only
                assert last.partials.fired[3] == 1
                assert last.dead_indices.tolist() == []
        report = monitor.report()
    assert report.window == "last"
    assert report.step == 9
    assert report.layers["act"].rows == 30  # steps 7..9
    assert report.layers["act"].dead_indices.tolist() == [3]


def test_below_min_rows_nothing_is_dead() -> None:
    model = identity_relu()
    with neuronwatch.watch(model, compile=False, min_rows=1000) as monitor:
        for _ in range(6):
            model(batch())
        report = monitor.report()
        act = report.layers["act"]
        assert act.rows == 600
        assert act.partials.fired[3] == 0
        assert act.count("dead") == 0
        assert act.count("unknown") == act.neurons
        assert not act.complete
        assert report.count("dead") == 0
        assert report.summary()["layers"][0]["unknown"] == 4
        for _ in range(4):
            model(batch())
        act = monitor.report().layers["act"]
    assert act.rows == 1000
    assert act.complete
    assert act.dead_indices.tolist() == [3]


def test_flush_every_publishes_latest_without_touching_buffers_in_between() -> None:
    model = identity_relu()
    with neuronwatch.watch(model, compile=False, flush_every=3, min_rows=1) as monitor:
        for step in range(1, 5):
            model(batch(rows=10))
            monitor.step()
            if step < 3:
                assert monitor.latest is None
        latest = monitor.latest
        assert latest is not None
        assert latest.layers("lifetime")["act"].rows == 30  # flushed at step 3, not 4
        assert monitor.snapshot().layers("lifetime")["act"].rows == 40


@pytest.mark.parametrize(
    ("every", "rows"),
    [(1, 55), (2, 1 + 3 + 5 + 7 + 9), (3, 1 + 4 + 7 + 10), (4, 1 + 5 + 9)],
)
def test_every_k_watches_exactly_one_forward_in_k(every: int, rows: int) -> None:
    model = identity_relu()
    with neuronwatch.watch(model, compile=False, every=every, min_rows=1) as monitor:
        for size in range(1, 11):  # forward n has n rows, so rows tell which were watched
            model(batch(rows=size))
        act = monitor.snapshot().layers("lifetime")["act"]
    assert act.rows == rows
    assert act.partials.fired[0] == rows


def test_every_k_still_finds_wiring_and_dead_neurons() -> None:
    model = identity_relu()
    with neuronwatch.watch(model, compile=False, every=3, min_rows=100) as monitor:
        for _ in range(9):
            model(batch())
        snapshot = monitor.snapshot()
    assert snapshot.layers("lifetime")["act"].rows == 300
    assert snapshot.layers("lifetime")["act"].dead_indices.tolist() == [3]
    assert snapshot.wiring["act"].producer == "fc"


def test_paused_block_adds_no_rows_and_does_not_count_for_every() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.ReLU())
    with neuronwatch.watch(model, every=2, compile=False, min_rows=1) as monitor:
        model(torch.randn(3, 4))  # forward 1: watched
        with monitor.paused():
            model(torch.randn(50, 4))
            model(torch.randn(50, 4))
        model(torch.randn(5, 4))  # forward 2: skipped by every=2
        model(torch.randn(7, 4))  # forward 3: watched
        assert monitor.snapshot().layers("current")["1"].rows == 3 + 7
