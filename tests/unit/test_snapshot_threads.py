"""Snapshots are immutable and can be read from another thread while the engine is fed."""

from __future__ import annotations

import sys
import threading

import numpy as np
import pytest

from neuronwatch import Engine, Partials, Snapshot


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
    mine = Partials.from_arrays(rows=1, **dict(partials.arrays()))
    engine.update("a", mine)  # the first update of a window is stored, not merged
    mine.fired[:] = 1000  # the caller reuses its buffer: still its own, still writable
    engine.update("a", Partials.from_arrays(rows=1, **dict(partials.arrays())))
    mine.fired[:] = 2000
    assert engine.snapshot().layers("current")["a"].partials.fired.tolist() == [2, 2, 2]
    assert engine.snapshot().layers("lifetime")["a"].partials.fired.tolist() == [2, 2, 2]


WINDOW_STEPS = 100
ROWS = 16


def check_consistent(snap: Snapshot) -> bool:
    """What one atomic snapshot must satisfy; returns whether both layers were in it."""
    lifetime, current = snap.layers("lifetime"), snap.windows["current"]
    for name, stats in lifetime.items():
        # Fired counts never run ahead of (or behind) the rows they were counted on.
        assert int(stats.partials.fired.max()) == stats.rows, name
        assert stats.count("dead") in (0, 4), name
        # Every window is WINDOW_STEPS batches: lifetime = closed windows + the current one.
        filling = current[name].rows if name in current else 0
        assert stats.rows == snap.windows_completed * WINDOW_STEPS * ROWS + filling, name
        if snap.windows_completed:
            assert snap.windows["last"][name].rows == WINDOW_STEPS * ROWS, name
    if "a" in lifetime and "b" in lifetime:
        # b is fed right after a: a snapshot sees either both or only a's last batch.
        assert lifetime["b"].rows in (lifetime["a"].rows, lifetime["a"].rows - ROWS)
        return True
    return False


def test_snapshots_from_another_thread_are_consistent() -> None:
    engine = Engine("m", min_rows=10)
    engine.add_layer("a", "ReLU")
    engine.add_layer("b", "ReLU")
    batch = np.zeros((ROWS, 8))
    batch[:, ::2] = 1.0  # even neurons fire on every row, odd ones never
    windows = 6
    failures: list[BaseException] = []
    # Halfway, training waits until the reader has taken a snapshot: the two threads are then
    # guaranteed to overlap, whatever the scheduler does.
    halfway, snapshot_taken = threading.Event(), threading.Event()

    def train() -> None:  # the "training thread" feeds the engine
        try:
            for step in range(windows * WINDOW_STEPS):
                if step == windows * WINDOW_STEPS // 2:
                    halfway.set()
                    snapshot_taken.wait(timeout=30)
                engine.observe("a", batch)
                engine.observe("b", batch)
                if step % WINDOW_STEPS == WINDOW_STEPS - 1:
                    engine.rollover()
        except BaseException as exc:  # surfaced in the main thread below
            failures.append(exc)

    # Switch threads as often as the interpreter can, so that a snapshot taken without the
    # engine's lock would land inside an update or a rollover (the test fails then).
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        writer = threading.Thread(target=train)
        writer.start()
        snapshots = 0
        while writer.is_alive():
            during = halfway.is_set()
            snapshots += check_consistent(engine.snapshot())
            if during:
                snapshot_taken.set()
        writer.join()
    finally:
        sys.setswitchinterval(interval)
    assert not failures, failures
    assert snapshot_taken.is_set(), "no snapshot overlapped the training thread"
    assert snapshots > 100
    final = engine.snapshot()
    assert final.layers("lifetime")["a"].rows == windows * WINDOW_STEPS * ROWS
    assert final.windows_completed == windows
