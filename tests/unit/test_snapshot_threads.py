"""Snapshots are immutable and can be read from another thread while the engine is fed."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from neuronwatch import Engine, Partials


def test_snapshot_arrays_are_read_only() -> None:
    engine = Engine("m", min_rows=1)
    engine.observe("a", np.ones((4, 3)))
    stats = engine.snapshot().layers("current")["a"]
    with pytest.raises(ValueError, match="read-only"):
        stats.dead[0] = True
    with pytest.raises(ValueError, match="read-only"):
        stats.partials.fired[0] = 99
    with pytest.raises(AttributeError):
        stats.partials.rows = 5  # type: ignore[misc]


def test_engine_keeps_its_own_copy_of_updates() -> None:
    engine = Engine("m", min_rows=1)
    engine.add_layer("a")
    partials = Partials.empty(3)
    partials.fired[:] = 1
    engine.update("a", Partials.from_arrays(rows=1, **dict(partials.arrays())))
    reused = Partials.from_arrays(rows=1, **dict(partials.arrays()))
    engine.update("a", reused)
    reused.fired[:] = 1000  # the caller reuses its buffer
    assert engine.snapshot().layers("current")["a"].partials.fired.tolist() == [2, 2, 2]


def test_snapshots_from_another_thread_are_consistent() -> None:
    engine = Engine("m", min_rows=10)
    engine.add_layer("a", "ReLU")
    engine.add_layer("b", "ReLU")
    batch = np.zeros((16, 8))
    batch[:, ::2] = 1.0  # even neurons fire on every row, odd ones never
    steps = 2000
    failures: list[BaseException] = []
    # Halfway, training waits until the reader has taken a snapshot: the two threads are then
    # guaranteed to overlap, whatever the scheduler does.
    halfway, snapshot_taken = threading.Event(), threading.Event()

    def train() -> None:  # the "training thread" feeds the engine
        try:
            for step in range(steps):
                if step == steps // 2:
                    halfway.set()
                    snapshot_taken.wait(timeout=30)
                engine.observe("a", batch)
                engine.observe("b", batch)
                if step % 500 == 499:
                    engine.rollover()
        except BaseException as exc:  # surfaced in the main thread below
            failures.append(exc)

    writer = threading.Thread(target=train)
    writer.start()
    snapshots = 0
    while writer.is_alive():
        during = halfway.is_set()
        snap = engine.snapshot()
        layers = snap.layers("lifetime")
        for name, stats in layers.items():
            # Fired counts never run ahead of (or behind) the rows they were counted on.
            assert int(stats.partials.fired.max()) == stats.rows, name
            assert stats.count("dead") in (0, 4), name
        if "a" in layers and "b" in layers:
            # b is fed right after a: a snapshot sees either both or only a's last batch.
            assert layers["b"].rows in (layers["a"].rows, layers["a"].rows - 16)
            snapshots += 1
        if during:
            snapshot_taken.set()
    writer.join()
    assert not failures, failures
    assert snapshot_taken.is_set(), "no snapshot overlapped the training thread"
    assert snapshots > 0
    final = engine.snapshot()
    assert final.layers("lifetime")["a"].rows == steps * 16
    assert final.windows_completed == 4
