"""A process that only serves (no ``step()``) still publishes ``latest``, from the thread that
ran the forward, at most once per ``flush_interval``; readers of ``latest`` never flush."""

from __future__ import annotations

import time
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import neuronwatch  # noqa: E402


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(OrderedDict(fc=nn.Linear(4, 6), act=nn.ReLU(), out=nn.Linear(6, 1))).eval()


def test_a_serving_loop_publishes_latest_within_flush_interval() -> None:
    served = model()
    interval = 0.2
    with neuronwatch.watch(served, compile=False, flush_interval=interval) as monitor:
        assert monitor.latest is None
        with torch.inference_mode():
            served(torch.randn(1, 4))
        first = monitor.latest  # the first finished forward publishes at once
        assert first is not None
        assert first.layers("lifetime")["act"].rows == 1
        published = {id(first)}
        started = time.monotonic()
        while time.monotonic() - started < 3 * interval:
            with torch.inference_mode():
                served(torch.randn(1, 4))
            published.add(id(monitor.latest))
            time.sleep(0.005)
        elapsed = time.monotonic() - started
        latest = monitor.latest
        assert latest is not None
        assert latest.layers("lifetime")["act"].rows > 1
        # Published again within the interval, and at most once per interval.
        assert 2 <= len(published) <= elapsed / interval + 2
        assert time.time() - latest.taken_at < interval + 0.1


def test_without_flush_interval_nothing_is_published_until_a_step() -> None:
    served = model()
    with neuronwatch.watch(served, compile=False) as monitor:
        with torch.inference_mode():
            for _ in range(3):
                served(torch.randn(1, 4))
        assert monitor.latest is None  # reading latest never flushes
        monitor.step()
        assert monitor.latest is None  # flush_every=10 steps
        assert monitor.snapshot().layers("lifetime")["act"].rows == 3


def test_flush_interval_must_be_positive() -> None:
    for bad in (0, -1.0, float("nan"), "1"):
        with pytest.raises(neuronwatch.ConfigError, match="flush_interval"):
            neuronwatch.watch(model(), flush_interval=bad)


def test_the_last_requests_before_traffic_stops_are_published() -> None:
    served = model()
    interval = 0.2
    with neuronwatch.watch(served, compile=False, flush_interval=interval) as monitor:
        with torch.inference_mode():
            for _ in range(20):
                served(torch.randn(1, 4))  # a burst: only its first forward publishes at once
        first = monitor.latest
        assert first is not None
        deadline = time.monotonic() + 10 * interval
        while time.monotonic() < deadline:
            latest = monitor.latest
            if latest is not None and latest.layers("lifetime")["act"].rows == 20:
                break
            time.sleep(interval / 4)
        assert monitor.latest.layers("lifetime")["act"].rows == 20  # type: ignore[union-attr]


def test_closing_publishes_what_the_last_forwards_recorded() -> None:
    served = model()
    monitor = neuronwatch.watch(served, compile=False, flush_interval=60.0)
    with torch.inference_mode():
        for _ in range(5):
            served(torch.randn(1, 4))
    monitor.close()
    assert monitor.latest is not None
    assert monitor.latest.layers("lifetime")["act"].rows == 5
