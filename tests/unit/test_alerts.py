"""In-process alert rules on real engines and monitors: they fire exactly when their condition
starts to hold, log a warning, call callbacks, and never raise into the training loop."""

from __future__ import annotations

import logging
import threading

import numpy as np
import pytest

from neuronwatch import Engine, Monitor, Snapshot
from neuronwatch.alerts import (
    Alert,
    Alerts,
    AliveShareDrop,
    DeadRatioHigh,
    SilentNeurons,
    alive_share,
    default_rules,
)
from neuronwatch.errors import ConfigError

NEURONS = 10


def window(monitor: Monitor, dead: int, rows: int = 20) -> Snapshot:
    """One training step whose rows leave the first ``dead`` neurons at zero, then close the
    window."""
    acts = np.ones((rows, NEURONS))
    acts[:, :dead] = 0.0
    monitor.engine.observe("act", acts)
    monitor.step()
    return monitor.rollover()


@pytest.fixture
def monitor() -> Monitor:
    engine = Engine("mlp", min_rows=10)
    engine.add_layer("act", "ReLU")
    return Monitor(engine)


def fired(rule: object, snapshots: list[Snapshot]) -> list[int]:
    """Indices of the snapshots on which the rule fired."""
    assert hasattr(rule, "evaluate")
    return [i for i, s in enumerate(snapshots) if rule.evaluate(s)]


def test_dead_ratio_fires_on_the_third_window_in_a_row_and_rearms(monitor: Monitor) -> None:
    # Dead shares 0.4 0.4 0.4 0.4 0.1 0.4 0.4 0.4: above 0.3 three times in a row at 2 and 7.
    snapshots = [window(monitor, d) for d in (4, 4, 4, 4, 1, 4, 4, 4)]
    rule = DeadRatioHigh(above=0.3, windows=3)
    assert fired(rule, snapshots) == [2, 7]


def test_dead_ratio_counts_each_window_once(monitor: Monitor) -> None:
    rule = DeadRatioHigh(above=0.3, windows=2)
    snapshot = window(monitor, 4)
    assert rule.evaluate(snapshot) == []
    assert rule.evaluate(snapshot) == []  # same window again: not a second one
    assert rule.evaluate(monitor.flush()) == []  # a flush without a new window
    [alert] = rule.evaluate(window(monitor, 4))
    assert (alert.rule, alert.model, alert.layer, alert.value) == (
        "DeadRatioHigh",
        "mlp",
        "act",
        0.4,
    )
    assert "40% of layer 'act'" in alert.message


def test_alive_share_drop_compares_consecutive_windows(monitor: Monitor) -> None:
    snapshots = [window(monitor, d) for d in (0, 1, 4, 4, 7)]
    assert [alive_share(s.layers()["act"]) for s in snapshots] == [1.0, 0.9, 0.6, 0.6, 0.3]
    rule = AliveShareDrop(points=0.2)
    assert fired(rule, snapshots) == [2, 4]  # -0.3 twice; -0.1 and 0 are no drop
    [alert] = AliveShareDrop(points=0.2).evaluate(snapshots[0]) or [None]
    assert alert is None  # the first window has nothing to compare with


def test_alive_share_drop_of_exactly_points_fires_despite_rounding(monitor: Monitor) -> None:
    snapshots = [window(monitor, d) for d in (3, 5)]  # 0.7 - 0.5 == 0.19999999999999996
    assert fired(AliveShareDrop(points=0.2), snapshots) == [1]


def test_a_rerun_of_a_model_starts_its_rules_afresh() -> None:
    def run(dead: list[int]) -> list[Snapshot]:
        engine = Engine("mlp", min_rows=10)
        engine.add_layer("act", "ReLU")
        fresh = Monitor(engine)
        return [window(fresh, d) for d in dead]

    dead_rule, drop_rule = DeadRatioHigh(above=0.3, windows=2), AliveShareDrop(points=0.2)
    first, second = run([4, 4, 4, 0]), run([4, 4, 7])
    # The first run fires at its second window; the rerun of the same model name counts its
    # windows from one again (it is not skipped until it passes the old run's four) and its
    # first window is not compared with the old run's last.
    assert fired(dead_rule, first) == [1]
    assert fired(dead_rule, second) == [1]
    assert fired(drop_rule, first) == []  # shares 0.6 0.6 0.6 1.0: no drop
    assert fired(drop_rule, second) == [2]  # 0.6 0.6 0.3; the rerun's 0.6 after 1.0 is no drop


def test_alive_share_drop_skips_windows_still_unknown(monitor: Monitor) -> None:
    rule = AliveShareDrop(points=0.2)
    assert rule.evaluate(window(monitor, 0)) == []
    assert rule.evaluate(window(monitor, 0, rows=5)) == []  # below min_rows: all unknown
    assert rule.evaluate(window(monitor, 0)) == []


def test_silent_neurons_fire_once_while_it_holds() -> None:
    engine = Engine("mlp", min_rows=1)
    monitor = Monitor(engine, flush_every=1000)
    acts = np.ones((4, NEURONS))
    acts[:, :3] = 0.0  # three neurons never fire
    rule = SilentNeurons(more_than=2, steps=100)
    results = []
    for step in range(1, 121):
        engine.observe("act", acts)
        monitor.step()
        if step % 20 == 0:
            results.append((step, len(rule.evaluate(monitor.flush()))))
    # Silent for more than 100 steps from step 101 on; fired once, not at every flush after.
    assert results == [(20, 0), (40, 0), (60, 0), (80, 0), (100, 0), (120, 1)]
    assert SilentNeurons(more_than=3, steps=100).evaluate(monitor.flush()) == []


def test_alerts_log_call_back_and_check_each_snapshot_once(
    monitor: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    received: list[Alert] = []
    alerts = Alerts([DeadRatioHigh(windows=1)], callbacks=[received.append])
    with caplog.at_level(logging.WARNING, logger="neuronwatch.alerts"):
        window(monitor, 5)
        assert len(alerts.check(monitor)) == 1
        assert alerts.check(monitor) == []  # the same snapshot: no work at all
    assert [a.rule for a in received] == ["DeadRatioHigh"]
    assert "DeadRatioHigh: 50% of layer 'act'" in caplog.text


def test_failing_rules_and_callbacks_are_logged_not_raised(
    monitor: Monitor, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        name = "Broken"

        def evaluate(self, snapshot: Snapshot) -> list[Alert]:
            raise RuntimeError("rule bug")

    def bad_callback(alert: Alert) -> None:
        raise ValueError("callback bug")

    received: list[Alert] = []
    alerts = Alerts([Broken(), DeadRatioHigh(windows=1)], callbacks=[bad_callback, received.append])
    window(monitor, 5)
    assert len(alerts.check(monitor)) == 1
    assert len(received) == 1  # the callback after the failing one still runs
    assert "rule bug" in caplog.text
    assert "callback bug" in caplog.text


def test_watch_checks_from_a_thread(monitor: Monitor) -> None:
    seen = threading.Event()
    alerts = Alerts([DeadRatioHigh(windows=1)], callbacks=[lambda alert: seen.set()])
    watcher = alerts.watch(monitor, interval=0.01)
    try:
        window(monitor, 5)
        assert seen.wait(5.0)
    finally:
        watcher.stop()


def test_defaults_and_bad_arguments() -> None:
    assert [r.name for r in default_rules()] == ["DeadRatioHigh", "AliveShareDrop", "SilentNeurons"]
    assert Alerts().rules[0].name == "DeadRatioHigh"
    with pytest.raises(ConfigError, match="above must be a number in"):
        DeadRatioHigh(above=30)
    with pytest.raises(ConfigError, match="windows must be an integer >= 1"):
        DeadRatioHigh(windows=0)
    with pytest.raises(ConfigError, match="steps must be an integer"):
        SilentNeurons(steps=1.5)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="not an alert rule"):
        Alerts([object()])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match=r"DeadRatioHigh is a rule class; pass an instance"):
        Alerts([DeadRatioHigh])  # type: ignore[list-item]
    with pytest.raises(ConfigError, match="interval"):
        Alerts().watch(Monitor(Engine()), interval=0)
    with pytest.raises(ConfigError, match="layers must be a list"):
        DeadRatioHigh(layers="fc*")  # type: ignore[arg-type]


def test_rules_keep_to_their_layers(monitor: Monitor) -> None:
    monitor.engine.add_layer("other", "ReLU")
    monitor.engine.observe("other", np.zeros((20, 4)))
    snapshot = window(monitor, 0)
    assert [a.layer for a in DeadRatioHigh(windows=1).evaluate(snapshot)] == ["other"]
    assert DeadRatioHigh(windows=1, layers=["act"]).evaluate(snapshot) == []


def test_a_snapshot_already_checked_costs_no_rule_evaluation(monitor: Monitor) -> None:
    class Counting:
        name = "Counting"
        calls = 0

        def evaluate(self, snapshot: Snapshot) -> list[Alert]:
            self.calls += 1
            return []

    rule = Counting()
    alerts = Alerts([rule])
    window(monitor, 0)
    for _ in range(3):
        alerts.check(monitor)
    assert rule.calls == 1
    monitor.flush()
    alerts.check(monitor)
    assert rule.calls == 2


def test_subscribed_alerts_see_every_window_even_between_polls() -> None:
    engine = Engine("mlp", min_rows=10)
    engine.add_layer("act", "ReLU")
    monitor = Monitor(engine, window=1)
    received: list[Alert] = []
    subscribed = Alerts(rules=[DeadRatioHigh(above=0.3, windows=3)], callbacks=[received.append])
    polled = Alerts(rules=[DeadRatioHigh(above=0.3, windows=3)])
    unsubscribe = monitor.subscribe(subscribed.check)
    acts = np.ones((20, NEURONS))
    acts[:, :4] = 0.0
    for _ in range(3):  # three windows close before anyone polls
        engine.observe("act", acts)
        monitor.step()
    assert polled.check(monitor) == []  # polling saw one window: the rule needs three
    assert [a.rule for a in received] == ["DeadRatioHigh"]  # the subscriber saw all three
    unsubscribe()
    for _ in range(3):
        engine.observe("act", acts)
        monitor.step()
    assert len(received) == 1


def test_a_failing_subscriber_never_breaks_training(caplog: pytest.LogCaptureFixture) -> None:
    engine = Engine("mlp", min_rows=1)
    monitor = Monitor(engine, window=1)

    def boom(snapshot: Snapshot) -> None:
        raise RuntimeError("subscriber bug")

    monitor.subscribe(boom)
    engine.observe("act", np.ones((2, 3)))
    monitor.step()  # publishes; the error is logged
    assert "subscriber" in caplog.text
    with pytest.raises(ConfigError, match="callable"):
        monitor.subscribe(3)  # type: ignore[arg-type]
