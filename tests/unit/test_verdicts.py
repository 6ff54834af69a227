"""Dead, asleep, active, dormant and saturated neurons planted with known indices are found
exactly through ``Engine.observe``; verdicts are made over windows, never from one batch."""

from __future__ import annotations

import numpy as np
import pytest

from neuronwatch import ConfigError, Engine, LayerStats, ParamRef, Report, ShapeError, Wiring
from neuronwatch.stats import JudgedLayers, summarize


def relu_layer(rng: np.random.Generator, rows: int, neurons: int, bias: np.ndarray) -> np.ndarray:
    """A real Linear+ReLU: ordinary weights, the given bias."""
    x = rng.normal(size=(rows, 32))
    w = rng.normal(scale=1 / np.sqrt(32), size=(32, neurons))
    return np.maximum(x @ w + bias, 0.0)


def test_planted_dead_and_rare_neurons() -> None:
    rng = np.random.default_rng(0)
    neurons, rows = 64, 20_000
    bias = np.zeros(neurons)
    dead = [3, 17, 40]
    bias[dead] = -50.0  # killed by a large negative bias with ordinary weights
    acts = relu_layer(rng, rows, neurons, bias)
    rare = [5, 60]
    acts[:, rare] = 0.0
    fires = rng.random((rows, len(rare))) < 0.005  # ~0.5 % of rows
    acts[:, rare] = np.where(fires, 1.0, 0.0)
    engine = Engine("mlp", min_rows=1000)
    engine.add_layer("fc1.act", "ReLU")
    for batch in np.array_split(acts, 40):
        engine.observe("fc1.act", batch)
    stats = engine.snapshot().layers("current")["fc1.act"]
    assert stats.dead_indices.tolist() == dead
    assert np.flatnonzero(stats.asleep).tolist() == rare
    assert 0.003 < stats.frequency[5] < 0.007
    assert stats.count("active") == neurons - len(dead) - len(rare)
    assert stats.count("dead") + stats.count("asleep") + stats.count("active") == neurons


def test_silent_first_batches_then_one_firing_is_not_dead() -> None:
    engine = Engine("m", min_rows=100)
    engine.add_layer("act", "ReLU")
    for batch in range(1, 11):
        acts = np.zeros((64, 4))
        acts[:, 0] = 1.0
        if batch == 7:
            acts[13, 2] = 0.5  # neuron 2 fires once, on batch 7
        engine.observe("act", acts)
        if batch == 1:
            # One batch is below min_rows: nothing may be called dead yet.
            first = engine.snapshot().layers("current")["act"]
            assert first.count("dead") == 0
            assert first.count("unknown") == 4
    stats = engine.snapshot().layers("current")["act"]
    assert stats.dead_indices.tolist() == [1, 3]
    assert stats.asleep[2]


def test_windows_current_last_lifetime() -> None:
    engine = Engine("m", min_rows=10)
    engine.add_layer("act", "ReLU")
    early = np.zeros((50, 3))
    early[:, 1] = 1.0  # neuron 1 only fires in the first window
    late = np.zeros((30, 3))
    late[:, 2] = 1.0
    engine.observe("act", early)
    engine.rollover()
    engine.observe("act", late)
    snap = engine.snapshot()
    assert snap.windows_completed == 1
    assert snap.layers("last")["act"].rows == 50
    assert snap.layers("last")["act"].dead_indices.tolist() == [0, 2]
    assert snap.layers("current")["act"].dead_indices.tolist() == [0, 1]
    assert snap.layers("lifetime")["act"].rows == 80
    assert snap.layers("lifetime")["act"].dead_indices.tolist() == [0]
    assert snap.resolve_window("auto") == "last"
    engine.rollover()
    assert engine.snapshot().layers("last")["act"].rows == 30
    # A window that saw no rows at all is fully unknown, not dead.
    engine.rollover()
    empty = engine.snapshot().layers("last")["act"]
    assert empty.rows == 0
    assert empty.count("dead") == 0
    assert empty.count("unknown") == 3


def test_gelu_dormant_neurons() -> None:
    rng = np.random.default_rng(1)
    pre = rng.normal(size=(5000, 16))
    pre[:, [2, 9]] -= 6.0  # GELU(x - 6) is tiny but almost never exactly zero
    gelu = 0.5 * pre * (1 + np.tanh(np.sqrt(2 / np.pi) * (pre + 0.044715 * pre**3)))
    engine = Engine("m", min_rows=1000)
    engine.add_layer("mlp.act", "GELU")
    engine.observe("mlp.act", gelu)
    stats = engine.snapshot().layers("current")["mlp.act"]
    assert np.flatnonzero(stats.dormant).tolist() == [2, 9]
    assert stats.dormancy[2] < 0.1 < stats.dormancy[0]
    # tau=0 means "exactly zero": GELU outputs are never exactly zero here.
    strict = Engine("m", min_rows=1000, tau=0.0)
    strict.add_layer("mlp.act", "GELU")
    strict.observe("mlp.act", gelu)
    assert strict.snapshot().layers("current")["mlp.act"].count("dormant") == 0


def test_tanh_saturated_neurons() -> None:
    # The |h| > 0.99 picture of seed 002: unscaled weights push some tanh units to +-1.
    rng = np.random.default_rng(2)
    pre = rng.normal(size=(4000, 10))
    pre[:, 4] = 8.0 + rng.random(4000)  # always > atanh(0.99) ~ 2.65
    pre[:, 7] = -8.0 * rng.random(4000) - 5.0  # sigmoid < 0.01 needs < -4.6
    pre[:, 8] = 3.0
    pre[::2, 8] = 0.0  # flat half the time only: not saturated
    engine = Engine("m", min_rows=1000)
    engine.add_layer("h", "Tanh")
    engine.observe("h", np.tanh(pre))
    stats = engine.snapshot().layers("current")["h"]
    assert np.flatnonzero(stats.saturated).tolist() == [4, 7]
    sig = Engine("m", min_rows=1000)
    sig.add_layer("s", "Sigmoid")
    sig.observe("s", 1 / (1 + np.exp(-pre)))
    assert np.flatnonzero(sig.snapshot().layers("current")["s"].saturated).tolist() == [4, 7]
    relu = Engine("m", min_rows=1000)
    relu.add_layer("r", "ReLU")
    relu.observe("r", np.maximum(pre, 0))
    assert relu.snapshot().layers("current")["r"].count("saturated") == 0


def test_active_parameter_ratio_from_wiring() -> None:
    engine = Engine("mlp", min_rows=10)
    engine.add_layer("a1", "ReLU")
    engine.add_layer("a2", "ReLU")
    acts1 = np.ones((20, 4))
    acts1[:, [1, 3]] = 0.0  # 2 of 4 dead
    acts2 = np.ones((20, 3))
    acts2[:, 0] = 0.0  # 1 of 3 dead
    engine.observe("a1", acts1)
    engine.observe("a2", acts2)
    # fc1: [4, 5] + bias[4] produces a1; fc2: [3, 4] + bias[3] consumes a1, produces a2;
    # fc3: [2, 3] consumes a2. fc2.weight is counted once.
    engine.set_wiring(
        "a1",
        Wiring(
            -1,
            "fc1",
            "fc2",
            (ParamRef("fc1.weight", (4, 5), 0), ParamRef("fc1.bias", (4,), 0)),
            (ParamRef("fc2.weight", (3, 4), 1),),
        ),
    )
    engine.set_wiring(
        "a2",
        Wiring(
            -1,
            "fc2",
            "fc3",
            (ParamRef("fc2.weight", (3, 4), 0), ParamRef("fc2.bias", (3,), 0)),
            (ParamRef("fc3.weight", (2, 3), 1),),
        ),
    )
    total = 20 + 4 + 12 + 3 + 6
    # inactive: fc1 rows 1,3 (10) + bias (2); fc2 entries in dead col {1,3} or dead row {0}:
    # 12 - alive(2 rows * 2 cols = 4) = 8; fc2.bias[0] (1); fc3 column 0 (2).
    inactive = 10 + 2 + 8 + 1 + 2
    ratio = engine.snapshot().active_parameter_ratio("current")
    assert ratio == pytest.approx((total - inactive) / total)


def test_bad_input_errors_name_the_layer() -> None:
    engine = Engine("m")
    engine.observe("l", np.zeros((4, 3)))
    with pytest.raises(ShapeError, match=r"'l'.*3 neurons.*got 5"):
        engine.observe("l", np.zeros((4, 5)))
    with pytest.raises(ShapeError, match="feature_axis=3"):
        engine.observe("k", np.zeros((4, 5)), feature_axis=3)
    with pytest.raises(ConfigError, match="tau"):
        Engine("m", tau=1.5)
    with pytest.raises(ConfigError, match="unknown setting"):
        Engine("m", min_row=3)
    with pytest.raises(ConfigError, match="unknown layer 'nope'"):
        engine.config("nope")


def test_overrides_by_glob() -> None:
    engine = Engine("m", min_rows=5, overrides={"enc.*": {"fire_threshold": 0.5}})
    assert engine.add_layer("enc.0.act", "ReLU").fire_threshold == 0.5
    assert engine.add_layer("dec.0.act", "ReLU").fire_threshold == 0.0
    assert engine.add_layer("dec.1.act", "GELU").fire_threshold == 1e-3
    assert engine.config("dec.1.act").min_rows == 5


# -- honest verdicts: dead means no gradient on any row --------------------------------------------


def judge(activation: str, values: np.ndarray, **params: float) -> LayerStats:
    engine = Engine("m", min_rows=10)
    engine.add_layer("act", activation, params=params or None)
    engine.observe("act", values)
    return engine.snapshot().layers("current")["act"]


def never_positive(values: np.ndarray) -> list[int]:
    """The plain reference: neurons with no value above zero."""
    return np.flatnonzero((values > 0).sum(axis=0) == 0).tolist()


@pytest.mark.parametrize("activation", ["LeakyReLU", "PReLU", "RReLU"])
def test_leaky_neurons_that_never_fire_are_leaking_not_dead(activation: str) -> None:
    rng = np.random.default_rng(3)
    pre = rng.normal(size=(200, 8))
    pre[:, [1, 6]] -= 20.0  # never positive
    values = np.where(pre > 0, pre, 0.01 * pre)
    stats = judge(activation, values)
    assert stats.config.family == "leaky"
    assert stats.count("dead") == 0
    assert stats.indices("leaking").tolist() == never_positive(values) == [1, 6]
    same_with_relu = judge("ReLU", np.maximum(pre, 0))
    assert same_with_relu.dead_indices.tolist() == [1, 6]
    assert same_with_relu.count("leaking") == 0


def test_relu6_and_hardtanh_plateaus() -> None:
    rng = np.random.default_rng(4)
    pre = rng.normal(size=(300, 6)) * 2
    pre[:, 2] += 20.0  # always on the upper plateau
    pre[:, 4] -= 20.0  # always on the lower plateau: no gradient
    relu6 = np.clip(pre, 0.0, 6.0)
    stats = judge("ReLU6", relu6)
    assert np.flatnonzero(stats.saturated).tolist() == [2]
    assert stats.dead_indices.tolist() == [4]
    hardtanh = np.clip(pre, -2.0, 2.0)
    stats = judge("Hardtanh", hardtanh, min_val=-2.0, max_val=2.0)
    assert stats.config.fire_threshold == -2.0
    assert np.flatnonzero(stats.saturated).tolist() == [2]
    # Stuck at the lower bound: passes no gradient, so dead, although its value is -2, not 0.
    assert stats.dead_indices.tolist() == [4]
    assert stats.active[0]  # values in (-2, 0] are the linear region: not dead


@pytest.mark.parametrize(
    ("activation", "scale", "alpha"),
    [("ELU", 1.0, 1.0), ("CELU", 1.0, 1.0), ("SELU", 1.0507009873554805, 1.6732632423543772)],
)
def test_elu_family_negative_plateau_is_saturated(
    activation: str, scale: float, alpha: float
) -> None:
    rng = np.random.default_rng(5)
    pre = rng.normal(size=(300, 5))
    pre[:, 1] -= 30.0  # deep on the negative plateau on every row
    pre[:, 3] = -rng.random(300)  # negative, but on the curved part: gradient flows
    values = scale * np.where(pre > 0, pre, alpha * (np.exp(pre) - 1))
    stats = judge(activation, values)
    assert stats.config.family == "elu"
    assert never_positive(values) == [1, 3]
    assert np.flatnonzero(stats.saturated).tolist() == [1]
    # On the plateau on every row: no gradient, dead. On the curved part: leaking.
    assert stats.dead_indices.tolist() == [1]
    assert stats.indices("leaking").tolist() == [3]


def test_hardswish_floor_is_dead_and_its_negative_lobe_leaks() -> None:
    rng = np.random.default_rng(8)
    pre = rng.normal(size=(300, 4))
    pre[:, 0] -= 10.0  # below -3 on every row: exactly 0, no gradient
    pre[:, 2] = -1.0 - rng.random(300)  # in (-3, 0): negative values, gradient flows
    values = pre * np.clip(pre + 3, 0, 6) / 6
    stats = judge("Hardswish", values)
    assert stats.config.family == "hard"
    assert stats.dead_indices.tolist() == [0]
    assert stats.indices("leaking").tolist() == [2]


def test_a_sigmoid_stuck_at_zero_is_dead_and_saturated() -> None:
    rng = np.random.default_rng(9)
    pre = rng.normal(size=(300, 3))
    pre[:, 1] -= 30.0
    stats = judge("Sigmoid", 1 / (1 + np.exp(-pre)))
    assert stats.dead_indices.tolist() == [1]
    assert np.flatnonzero(stats.saturated).tolist() == [1]


def test_states_partition_every_neuron_and_unknown_names_are_listed() -> None:
    rng = np.random.default_rng(6)
    values = np.maximum(rng.normal(size=(50, 12)) - rng.random(12) * 3, 0)
    for activation in ("ReLU", "LeakyReLU", "GELU", "Tanh"):
        stats = judge(activation, values)
        firing = [stats.mask(s) for s in ("dead", "leaking", "asleep", "active", "unknown")]
        assert (np.sum(firing, axis=0) == 1).all(), activation
    with pytest.raises(ConfigError, match=r"'deed'.*dead, leaking, asleep, active, unknown"):
        stats.count("deed")


def test_last_fired_step_is_the_step_of_the_last_update_that_fired() -> None:
    engine = Engine("m", min_rows=1)
    engine.add_layer("act", "ReLU")
    for step in range(1, 7):
        engine.advance()
        values = np.zeros((4, 3))
        values[:, 0] = 1.0  # fires on every step
        if step == 2:
            values[0, 1] = 1.0  # fires once, at step 2
        engine.observe("act", values)
        if step == 3:
            engine.rollover()
    snap = engine.snapshot()
    assert snap.step == 6
    assert snap.layers("lifetime")["act"].partials.last_fired_step.tolist() == [6, 2, -1]
    assert snap.layers("last")["act"].partials.last_fired_step.tolist() == [3, 2, -1]
    assert snap.layers("current")["act"].partials.last_fired_step.tolist() == [6, -1, -1]
    assert snap.steps_silent("act").tolist() == [0, 4, 6]
    assert {k: v.tolist() for k, v in snap.silent(4).items()} == {"act": [1, 2]}
    # Merged by max: the later of two runs wins.
    other = Engine("m", min_rows=1)
    other.add_layer("act", "ReLU")
    other.advance(9)
    other.observe("act", np.eye(3)[[2]])
    merged = engine.merged(other).snapshot().layers("lifetime")["act"]
    assert merged.partials.last_fired_step.tolist() == [6, 2, 9]


def test_a_report_of_the_last_window_keeps_the_run_long_silence() -> None:
    engine = Engine("m", min_rows=1)
    engine.add_layer("act", "ReLU")
    engine.observe("act", np.array([[1.0, 1.0]]))
    engine.advance(5)
    engine.rollover()
    engine.observe("act", np.array([[1.0, 0.0]]))
    engine.rollover()
    report = Report.from_snapshot(engine.snapshot(), "last")
    assert report.layers["act"].partials.last_fired_step.tolist() == [5, 0]
    assert report.steps_silent("act").tolist() == [0, 5]


def test_an_array_without_neurons_is_refused_by_name() -> None:
    with pytest.raises(ShapeError, match=r"'empty'.* no neurons"):
        Engine("m").observe("empty", np.zeros((4, 0)))


def reference_verdicts(stats: LayerStats) -> dict[str, np.ndarray]:
    """The verdicts of one layer written out plainly, one layer at a time."""
    config, p = stats.config, stats.partials
    finite = p.rows - p.nonfinite
    has = finite > 0
    mean_abs = np.where(has, p.abs_sum / np.maximum(finite, 1), 0.0)
    known = finite >= config.min_rows
    layer_mean = mean_abs[has].mean() if has.any() else 0.0
    dormancy = mean_abs / layer_mean if layer_mean > 0 else np.zeros_like(mean_abs)
    never = known & (p.fired == 0)
    saturated = known & (p.saturated == finite) if config.saturates else np.zeros_like(known)
    no_gradient = np.ones_like(never) if config.can_die else saturated.copy()
    if config.family == "hard":  # Hardswish's exact-zero floor
        no_gradient |= (p.max == 0.0) & (p.min == 0.0)
    frequency = np.where(has, p.fired / np.maximum(finite, 1), np.nan)
    asleep = known & ~never & (frequency < config.asleep_below)
    return {
        "dead": never & no_gradient,
        "leaking": never & ~no_gradient,
        "asleep": asleep,
        "active": known & ~never & ~asleep,
        "dormant": known & (dormancy <= config.tau),
        "saturated": saturated,
        "dormancy": dormancy,
        "frequency": frequency,
    }


def test_judging_many_layers_at_once_equals_judging_each_alone() -> None:
    # Exporters judge every layer of a snapshot in one numpy pass; the verdicts and scores must
    # be those of each layer judged alone, bit for bit, whatever mix of families and settings.
    rng = np.random.default_rng(7)
    engine = Engine("mixed", min_rows=30)
    kinds = ["ReLU", "LeakyReLU", "GELU", "Tanh", "Sigmoid", "ReLU6", "ELU", "Hardswish"]
    for i, kind in enumerate(kinds * 3):
        name = f"l{i}"
        engine.add_layer(name, kind, min_rows=20 + 7 * (i % 4), tau=0.05 * (i % 3))
        neurons = 1 + (i * 5) % 17
        acts = rng.normal(scale=3, size=(60 if i % 5 else 10, neurons))
        acts[:, 0] = 0.0 if i % 2 else -9.0  # silent or flat neurons in every layer
        if i % 6 == 0:
            acts[3, -1] = np.nan
        engine.observe(name, acts)
    window = engine.snapshot().layers("current")
    together = dict(window.items())  # one pass over all layers
    for name, stats in together.items():
        alone = summarize(stats.config, stats.partials)
        expected = reference_verdicts(stats)
        for field, value in expected.items():
            np.testing.assert_array_equal(getattr(stats, field), value, err_msg=f"{name} {field}")
            np.testing.assert_array_equal(getattr(alone, field), value, err_msg=f"{name} {field}")
    assert sum(s.count("dead") for s in together.values()) > 0
    assert sum(s.count("leaking") for s in together.values()) > 0
    assert sum(s.count("unknown") for s in together.values()) > 0


def test_the_active_parameter_ratio_judges_only_wired_layers() -> None:
    # A scrape that exports a few layers of a large model must not judge all of them just to
    # find there is no wiring (or only a little).
    engine = Engine("m", min_rows=1)
    for name in ("a", "b"):
        engine.add_layer(name, "ReLU")
        engine.observe(name, np.eye(3))
    engine.set_wiring("a", Wiring(produces=(ParamRef("fc.weight", (3, 4), 0),)))
    snapshot = engine.snapshot()
    window = snapshot.layers("current")
    assert snapshot.active_parameter_ratio("current") == 1.0
    assert isinstance(window, JudgedLayers)
    assert set(window._judged) == {"a"}
