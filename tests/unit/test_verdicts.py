"""Dead, asleep, active, dormant and saturated neurons planted with known indices are found
exactly through ``Engine.observe``; verdicts are made over windows, never from one batch."""

from __future__ import annotations

import numpy as np
import pytest

from neuronwatch import ConfigError, Engine, ParamRef, ShapeError, Wiring


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
            assert first.count("known") == 0
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
    assert empty.count("known") == 0


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
