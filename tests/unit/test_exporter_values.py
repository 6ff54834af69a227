"""What a snapshot exports: planted states found exactly, every figure of a layer from one window,
and the vectorised reading equal to a plain per-neuron reference."""

from __future__ import annotations

import numpy as np
import pytest
from exporter_fixtures import (
    FC1_ASLEEP,
    FC1_DEAD,
    FC2_LEAKING,
    OUT_SATURATED,
    ROWS,
    planted_engine,
    planted_monitor,
)

from neuronwatch import Engine, Monitor, Snapshot
from neuronwatch.metric_families import FAMILIES, SILENT_STEP_BUCKETS
from neuronwatch.metric_values import Histogram, Histograms, Reading, read
from neuronwatch.states import FIRING_STATES, STATES
from neuronwatch.stats import FREQUENCY_EDGES


def by_layer(reading: Reading, family: str) -> dict[str, object]:
    series = reading.series[family]
    return {labels[1]: value for labels, value in zip(series.labels, series.values, strict=True)}


def reference_histogram(values: np.ndarray, bounds: tuple[float, ...]) -> Histogram:
    """Cumulative ``le`` counts the slow way, neuron by neuron."""
    buckets = [float(sum(1 for v in values if v <= b)) for b in bounds] + [float(len(values))]
    return Histogram(tuple(buckets), float(len(values)), float(sum(values)))


@pytest.fixture
def snapshot() -> Snapshot:
    return planted_monitor(steps=3, windows=1).latest  # type: ignore[return-value]


def test_the_planted_states_are_counted_exactly(snapshot: Snapshot) -> None:
    reading = read(snapshot)
    assert reading.window == "last"
    # The tanh neuron stuck at -1 never fires and passes no gradient: dead and saturated.
    dead = by_layer(reading, "neuronwatch_dead_neurons")
    assert dead == {"fc1.act": len(FC1_DEAD), "fc2.act": 0.0, "out.act": len(OUT_SATURATED)}
    assert by_layer(reading, "neuronwatch_asleep_neurons")["fc1.act"] == len(FC1_ASLEEP)
    assert by_layer(reading, "neuronwatch_leaking_neurons") == {
        "fc1.act": 0.0,
        "fc2.act": len(FC2_LEAKING),
        "out.act": 0.0,
    }
    assert by_layer(reading, "neuronwatch_saturated_neurons")["out.act"] == len(OUT_SATURATED)
    assert by_layer(reading, "neuronwatch_dead_ratio")["fc1.act"] == len(FC1_DEAD) / 8
    # Three batches in the last window; four in all.
    assert set(by_layer(reading, "neuronwatch_window_rows").values()) == {3.0 * ROWS}
    assert set(by_layer(reading, "neuronwatch_rows_observed").values()) == {4.0 * ROWS}


def test_every_layer_figure_matches_the_snapshot_window(snapshot: Snapshot) -> None:
    for window in ("current", "last", "lifetime"):
        reading = read(snapshot, window)
        layers = snapshot.windows[window]
        for state in STATES:
            counts = by_layer(reading, f"neuronwatch_{state.value}_neurons")
            ratios = by_layer(reading, f"neuronwatch_{state.value}_ratio")
            for name, stats in layers.items():
                assert counts[name] == stats.count(state)
                assert ratios[name] == pytest.approx(stats.ratio(state))
        neurons = by_layer(reading, "neuronwatch_neurons")
        for name, stats in layers.items():
            firing = sum(
                by_layer(reading, f"neuronwatch_{s.value}_neurons")[name] for s in FIRING_STATES
            )
            assert firing == neurons[name] == stats.neurons
            assert by_layer(reading, "neuronwatch_window_rows")[name] == stats.rows


def test_histograms_equal_a_per_neuron_reference(snapshot: Snapshot) -> None:
    reading = read(snapshot)
    frequency = by_layer(reading, "neuronwatch_firing_frequency_ratio")
    silence = by_layer(reading, "neuronwatch_steps_since_last_fired")
    for name, stats in snapshot.layers().items():
        expected = reference_histogram(stats.frequency[stats.known], FREQUENCY_EDGES)
        assert frequency[name] == expected
        # The core's own distribution, accumulated: bucket le="0.0" holds the never-fired.
        assert frequency[name].buckets[:-1] == tuple(np.cumsum(stats.frequency_distribution()))
        assert silence[name] == reference_histogram(
            snapshot.steps_silent(name), SILENT_STEP_BUCKETS
        )


def test_silence_uses_le_semantics_at_the_bucket_bounds() -> None:
    engine = Engine("m", min_rows=1)
    engine.add_layer("act", "ReLU")
    # Neuron i fires only at step fired[i]; the snapshot is taken at step 10_010.
    fired = [10_000, 10, 9, 0]
    for step in sorted(set(fired)):
        engine.advance(step - engine.snapshot().step)
        engine.observe("act", np.array([[1.0 if f == step else 0.0 for f in fired]]))
    engine.advance(10_010 - engine.snapshot().step)
    histogram = by_layer(read(engine.snapshot()), "neuronwatch_steps_since_last_fired")["act"]
    assert isinstance(histogram, Histogram)
    # Silent for 10, 10_000, 10_001, 10_010 steps.
    assert histogram.buckets == (1.0, 1.0, 1.0, 2.0, 4.0, 4.0)
    assert histogram.gsum == 10 + 10_000 + 10_001 + 10_010


def test_before_the_first_window_the_figures_are_lifetime() -> None:
    monitor = planted_monitor(steps=2, windows=0)
    reading = read(monitor.latest)  # type: ignore[arg-type]
    assert reading.window == "lifetime"
    assert set(by_layer(reading, "neuronwatch_window_rows").values()) == {1.0 * ROWS}
    assert by_layer(reading, "neuronwatch_dead_neurons")["fc1.act"] == len(FC1_DEAD)


def test_model_families(snapshot: Snapshot) -> None:
    reading = read(snapshot)
    single = {
        name: reading.series[name].values
        for name in (
            "neuronwatch_steps",
            "neuronwatch_windows_completed",
            "neuronwatch_last_update_timestamp_seconds",
        )
    }
    assert single["neuronwatch_steps"] == [4.0]
    assert single["neuronwatch_windows_completed"] == [1.0]
    assert single["neuronwatch_last_update_timestamp_seconds"] == [snapshot.taken_at]
    ratio = reading.series["neuronwatch_active_parameter_ratio"]
    assert ratio.labels == [("mlp",)]
    assert ratio.values == [pytest.approx(snapshot.active_parameter_ratio())]
    assert ratio.values[0] < 1.0  # three dead neurons of fc1 cost parameters


def test_no_wiring_exports_no_active_parameter_ratio() -> None:
    engine = planted_engine(wired=False)
    engine.observe("fc1.act", np.zeros((4, 8)))
    assert len(read(engine.snapshot()).series["neuronwatch_active_parameter_ratio"]) == 0


def test_layer_patterns_and_failed_layers() -> None:
    engine = planted_engine()
    engine.observe("fc1.act", np.ones((60, 8)))
    engine.observe("out.act", np.zeros((60, 4)))
    engine.add_layer("fc9.act", "ReLU")  # declared, but every update failed
    for _ in range(3):
        engine.count_error("fc9.act")
    engine.count_error("fc1.act")
    reading = read(engine.snapshot(), layers=["fc*"])
    assert reading.layers == ("fc1.act",)
    errors = reading.series["neuronwatch_hook_errors"]
    assert list(zip(errors.labels, errors.values, strict=True)) == [
        (("mlp", "fc1.act", "post"), 1.0),
        (("mlp", "fc9.act", ""), 3.0),
    ]
    assert by_layer(reading, "neuronwatch_neurons") == {"fc1.act": 8.0}


def test_every_family_has_a_series_and_layer_families_share_their_labels(
    snapshot: Snapshot,
) -> None:
    reading = read(snapshot)
    assert set(reading.series) == {f.name for f in FAMILIES}
    layer_labels = reading.series["neuronwatch_neurons"].labels
    for fam in FAMILIES:
        series = reading.series[fam.name]
        assert all(len(labels) == len(fam.labels) for labels in series.labels)
        if fam.scope == "layer" and not fam.info_labels:
            assert series.labels is layer_labels  # labelled once per scrape, not per family
        values = [v for h in series.values for v in (h if isinstance(h, tuple) else [h])]
        assert all(np.isfinite(np.asarray(v, dtype=float)).all() for v in values)


def test_an_empty_engine_exports_model_families_only() -> None:
    reading = read(Engine("empty").snapshot())
    assert reading.layers == ()
    assert len(reading.series["neuronwatch_neurons"]) == 0
    assert reading.series["neuronwatch_steps"].values == [0.0]


def test_histograms_are_a_table_that_indexes_as_points() -> None:
    points = [Histogram((1.0, 3.0, 4.0), 4.0, 2.5), Histogram((0.0, 2.0, 2.0), 2.0, 7.0)]
    table = Histograms.of(points)
    assert list(table) == points
    assert len(table) == 2
    assert table[-1] == points[1]
    assert list(table[1:]) == points[1:]
    assert table.flat() == [1.0, 3.0, 4.0, 4.0, 2.5, 0.0, 2.0, 2.0, 2.0, 7.0]
    assert table.flat(summaries=False) == [1.0, 3.0, 4.0, 0.0, 2.0, 2.0]
    assert table.column("gcount") == [4.0, 2.0]
    assert table.column("gsum") == [2.5, 7.0]
    with pytest.raises(IndexError):
        table[2]


def _layers_engine(count: int) -> tuple[Engine, Monitor]:
    engine = Engine("m", min_rows=1)
    batch = np.random.default_rng(0).normal(size=(4, 16))
    for i in range(count):
        engine.add_layer(f"l{i}", "GELU")
        engine.observe(f"l{i}", batch)
    monitor = Monitor(engine)
    monitor.rollover()
    return engine, monitor


def _new_window(engine: Engine, monitor: Monitor) -> None:
    batch = np.random.default_rng(1).normal(size=(4, 16))
    for name in engine.layers:
        engine.observe(name, batch)
    monitor.rollover()
    monitor.flush()


def test_a_new_window_keeps_the_labels_and_leaves_few_objects_behind() -> None:
    """Every object a reading keeps must be collected by the garbage collector one day: per
    layer objects (a point per histogram, label tuples) made its full collections land in
    scrapes of large models."""
    import gc

    engine, monitor = _layers_engine(300)
    first = read(monitor.latest)  # type: ignore[arg-type]
    _new_window(engine, monitor)
    gc.collect()
    before = {id(o) for o in gc.get_objects()}
    second = read(monitor.latest, previous=first)  # type: ignore[arg-type]
    kept = [o for o in gc.get_objects() if id(o) not in before]
    assert second.verdicts is not first.verdicts  # a new window was judged
    assert second.series["neuronwatch_neurons"].labels is first.series["neuronwatch_neurons"].labels
    assert second.series["neuronwatch_layer"].labels is first.series["neuronwatch_layer"].labels
    assert len(kept) < 150, sorted({type(o).__name__ for o in kept})
    assert by_layer(second, "neuronwatch_window_rows")["l7"] == 4.0


def test_a_layer_added_between_windows_gets_labels() -> None:
    engine, monitor = _layers_engine(3)
    first = read(monitor.latest)  # type: ignore[arg-type]
    engine.add_layer("late", "Tanh")
    _new_window(engine, monitor)
    second = read(monitor.latest, previous=first)  # type: ignore[arg-type]
    labels = second.series["neuronwatch_neurons"].labels
    assert [label[1] for label in labels] == ["l0", "l1", "l2", "late"]
    assert len(second.series["neuronwatch_layer"].labels) == 4
