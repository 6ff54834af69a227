"""A scrape of a new snapshot reuses what did not change (the window's verdicts, its families'
text and their compressed segments): every such shortcut must give exactly what a fresh
exporter gives for the same snapshot."""

from __future__ import annotations

import gzip
import zlib

import numpy as np
import pytest
from exporter_fixtures import feed, planted_engine
from neuronwatch.exporters.prometheus import PrometheusExporter
from neuronwatch.exporters.prometheus_text import Renderer, deflate_segment, gzip_member

from neuronwatch import Monitor
from neuronwatch.metric_values import WINDOW_FAMILIES, read
from neuronwatch.scratch import Scratch
from neuronwatch.stats import VerdictCache, judge_joined


def monitor_with_a_closed_window() -> tuple[Monitor, np.random.Generator]:
    engine = planted_engine()
    monitor = Monitor(engine, flush_every=1)
    rng = np.random.default_rng(1)
    feed(engine, rng)
    monitor.rollover()
    feed(engine, rng)
    monitor.flush()
    return monitor, rng


def fresh_exposition(monitor: Monitor, openmetrics: bool) -> bytes:
    return PrometheusExporter(monitor, labels={"run": "r1"}).render(openmetrics)


@pytest.mark.parametrize("openmetrics", [False, True], ids=["text", "openmetrics"])
def test_scrapes_of_new_snapshots_equal_a_fresh_exporters(openmetrics: bool) -> None:
    monitor, rng = monitor_with_a_closed_window()
    engine = monitor.engine
    exporter = PrometheusExporter(monitor, labels={"run": "r1"})
    for step in range(6):
        # Same window twice (only lifetime figures move), then a new window, and so on.
        feed(engine, rng)
        engine.advance(1)
        if step % 3 == 2:
            monitor.rollover()
        monitor.flush()
        want = fresh_exposition(monitor, openmetrics)
        assert exporter.render(openmetrics) == want
        assert gzip.decompress(exporter.render(openmetrics, compress=True)) == want


def test_a_new_snapshot_of_the_same_window_reuses_its_verdicts_and_families() -> None:
    monitor, rng = monitor_with_a_closed_window()
    cache = VerdictCache()
    first = read(monitor.latest, "auto", None, cache)
    feed(monitor.engine, rng)  # lifetime moves, the last complete window does not
    monitor.flush()
    second = read(monitor.latest, "auto", None, cache, first)
    assert second.verdicts is first.verdicts
    for name in WINDOW_FAMILIES:
        assert second.series[name] is first.series[name], name
    assert second.series["neuronwatch_rows_observed"].values != (
        first.series["neuronwatch_rows_observed"].values
    )
    fresh = read(monitor.latest)
    for name, series in fresh.series.items():
        assert list(series.labels) == list(second.series[name].labels), name
        assert list(series.values) == list(second.series[name].values), name
    monitor.rollover()  # a new window: judged again
    monitor.flush()
    third = read(monitor.latest, "auto", None, cache, second)
    assert third.verdicts is not second.verdicts
    assert third.series["neuronwatch_dead_neurons"] is not second.series["neuronwatch_dead_neurons"]


def test_the_verdict_cache_compares_objects_not_values() -> None:
    engine = planted_engine()
    feed(engine, np.random.default_rng(2))
    window = engine.snapshot().windows["current"]
    configs = [engine.config(name) for name in window]
    partials = [window.partials(name) for name in window]
    cache = VerdictCache()
    first = cache.judge(configs, partials)
    assert cache.judge(configs, list(partials)) is first
    copied = [p.copy(readonly=True) for p in partials]  # equal values, other objects
    again = cache.judge(configs, copied)
    assert again is not first
    for name, array in first.arrays.items():
        np.testing.assert_array_equal(again[name], array, err_msg=name)


def test_verdicts_never_share_the_scratch_buffers_of_a_later_judgement() -> None:
    engine = planted_engine()
    rng = np.random.default_rng(3)
    feed(engine, rng)
    window = engine.snapshot().windows["current"]
    names = list(window)
    configs = [engine.config(name) for name in names]
    first = judge_joined(configs, [window.partials(n) for n in names])
    kept = {name: array.copy() for name, array in first.arrays.items()}
    for _ in range(3):  # later judgements of other partials reuse the buffers
        feed(engine, rng)
        later = engine.snapshot().windows["current"]
        judge_joined(configs, [later.partials(n) for n in names])
    for name, array in first.arrays.items():
        np.testing.assert_array_equal(array, kept[name], err_msg=name)
        assert not array.flags.writeable


def test_a_scratch_buffer_is_handed_to_one_user_at_a_time() -> None:
    scratch = Scratch()
    parts = [np.arange(3), np.arange(2)]
    with scratch.joined(parts, np.int64) as a, scratch.joined(parts, np.int64) as b:
        assert a is not b
        a[:] = 7
        assert b.tolist() == [0, 1, 2, 0, 1]
    with scratch.joined([np.ones(5, np.int64)], np.int64) as c:
        assert c.tolist() == [1] * 5
        assert c is a or c is b


def test_gzip_of_separately_compressed_segments_is_one_valid_member() -> None:
    parts = [b"# HELP a x\n", b"a 1.0\n" * 5000, b"", "é\n".encode(), b"# EOF\n"]
    whole = b"".join(parts)
    crc = 0
    for part in parts:
        crc = zlib.crc32(part, crc)
    body = gzip_member([deflate_segment(p) for p in parts], crc, len(whole))
    assert gzip.decompress(body) == whole
    # One member, not several: a strict single-member reader stops at its end with nothing left.
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert reader.decompress(body) == whole
    assert reader.eof
    assert reader.unused_data == b""


def test_a_renamed_layer_set_is_rendered_again() -> None:
    monitor, _ = monitor_with_a_closed_window()
    renderer = Renderer({"run": "r1"})
    before = renderer.render([read(monitor.latest)], True)
    other = Monitor(planted_engine(model="other"), flush_every=1)
    feed(other.engine, np.random.default_rng(1))
    other.flush()
    after = renderer.render([read(other.latest)], True)
    assert b'model="other"' in after
    assert b'model="mlp"' not in after
    assert renderer.render([read(monitor.latest)], True) == before
