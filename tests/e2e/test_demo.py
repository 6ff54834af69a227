"""The dead-ReLU demo end to end: real digits, real training, real reports on disk."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import neuronwatch
from neuronwatch import demo
from neuronwatch.cli import main

LAYERS = [f"act{i}" for i in range(1, demo.HIDDEN_LAYERS + 1)]
COUNT_CELL = re.compile(r"\d+ \(\d+\.\d%\)")


@pytest.fixture(scope="module")
def data() -> demo.Digits:
    return demo.load_data()


def dead_ratio(report: neuronwatch.Report) -> float:
    return report.count("dead") / report.neurons


def cell(count: int, total: int) -> str:
    """A count cell as the comparison table prints it."""
    return f"{count} ({100 * count / total:.1f}%)"


def test_the_digits_are_split_and_standardised(data: demo.Digits) -> None:
    assert data.x_train.shape == (1437, 64)
    assert data.x_test.shape == (360, 64)
    assert sorted(data.y_test.unique().tolist()) == list(range(10))
    # Scaled with train statistics: zero mean, unit variance (constant pixels stay at 0).
    assert data.x_train.mean(0).abs().max() < 1e-5
    assert set(data.x_train.std(0, unbiased=False).round(decimals=4).tolist()) <= {0.0, 1.0}


def test_relu_and_leaky_relu_start_from_the_same_weights() -> None:
    torch.manual_seed(11)
    relu = demo.build_model("relu").state_dict()
    torch.manual_seed(11)
    leaky = demo.build_model("leaky_relu").state_dict()

    assert relu.keys() == leaky.keys()
    assert all(torch.equal(relu[key], leaky[key]) for key in relu)


def test_dead_means_never_fired_during_the_last_epoch(data: demo.Digits) -> None:
    # lr=0 keeps the initial weights, so the last epoch's activations can be recomputed here
    # batch by batch, exactly as the training loop fed them, and counted by hand.
    seed, epochs = 7, 2
    run = demo.train("relu", epochs=epochs, seed=seed, lr=0.0, data=data)

    torch.manual_seed(seed)
    model = demo.build_model("relu")
    shuffle = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        batches = demo.epoch_batches(len(data.x_train), shuffle)
    fired = {name: np.zeros(demo.WIDTH, dtype=np.int64) for name in LAYERS}
    with torch.no_grad():
        for index in batches:
            x = data.x_train[index]
            for name, module in model.named_children():
                x = module(x)
                if name in fired:
                    fired[name] += (x > 0).sum(0).numpy()

    report = run.report
    assert report.window == "last"
    assert list(report.layers) == LAYERS
    for name, stats in report.layers.items():
        assert stats.rows == len(data.x_train)  # one window is exactly one epoch
        assert stats.complete
        np.testing.assert_array_equal(stats.partials.fired, fired[name])
        np.testing.assert_array_equal(stats.dead_indices, np.flatnonzero(fired[name] == 0))


def test_a_short_run_reports_wiring_and_meta_and_round_trips(
    data: demo.Digits, tmp_path: Path
) -> None:
    run = demo.train("relu", epochs=3, seed=1, data=data)
    report = run.report

    assert report.model == "digits-mlp-relu"
    assert report.meta["epochs"] == 3
    assert report.meta["seed"] == 1
    assert report.meta["dataset"] == demo.DATASET
    assert report.meta["test_accuracy"] == run.test_accuracy
    assert 0.5 < run.test_accuracy <= 1.0  # it learned something
    # Wiring found by tensor identity: fcN produces actN, the next Linear consumes it.
    consumers = [f"fc{i}" for i in range(2, demo.HIDDEN_LAYERS + 1)] + ["out"]
    for i, (name, consumer) in enumerate(zip(LAYERS, consumers, strict=True), start=1):
        assert report.wiring[name].producer == f"fc{i}"
        assert report.wiring[name].consumer == consumer
    assert report.active_parameter_ratio() is not None

    loaded = neuronwatch.Report.load(report.save(tmp_path / "relu"))
    assert loaded.equals(report)
    assert dict(loaded.meta) == dict(report.meta)


@pytest.mark.parametrize("quiet", [False, True])
def test_demo_command_passes_its_options_through(tmp_path: Path, quiet: bool) -> None:
    out = tmp_path / "demo"
    args = ["demo", "--out", str(out), "--epochs", "2", "--seed", "5"]
    result = CliRunner().invoke(main, args + (["--quiet"] if quiet else []))

    assert result.exit_code == 0, result.output
    for activation in demo.ACTIVATIONS:
        report = neuronwatch.Report.load(out / activation)
        assert (report.meta["activation"], report.meta["epochs"], report.meta["seed"]) == (
            activation,
            2,
            5,
        )
        assert f"wrote {out / activation} " in result.output
    # The progress display shows each run's last epoch unless --quiet.
    assert ("digits-mlp-relu  epoch 2/2" in result.output) is not quiet
    assert "never fired in the last window" in result.output


def test_demo_without_scikit_learn_says_what_to_install(tmp_path: Path) -> None:
    # A None entry in sys.modules makes ``import sklearn`` fail just as if it were not installed.
    code = (
        "import sys\n"
        "sys.modules['sklearn'] = None\n"
        "from neuronwatch.cli import main\n"
        f"main(['demo', '--out', {str(tmp_path / 'demo')!r}])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)

    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [
        "Error: 'scikit-learn' is not installed; install it with: pip install 'neuronwatch[demo]'"
    ]
    assert not (tmp_path / "demo").exists()


def layer_share(report: neuronwatch.Report, layer: str, state: str) -> float:
    return report.layers[layer].ratio(state)


@pytest.mark.slow
def test_the_default_demo_kills_relus_and_spares_leaky_relus(tmp_path: Path) -> None:
    out = tmp_path / "demo"
    result = CliRunner().invoke(main, ["demo", "--out", str(out)])

    assert result.exit_code == 0, result.output
    relu = neuronwatch.Report.load(out / "relu")
    leaky = neuronwatch.Report.load(out / "leaky_relu")
    assert relu.meta["epochs"] == demo.DEFAULT_EPOCHS
    assert relu.meta["seed"] == leaky.meta["seed"] == demo.DEFAULT_SEED
    # The margins the seed sweep guarantees (see test_the_contrast_holds_for_seeds_0_to_9).
    assert dead_ratio(relu) > 1 / 3
    assert layer_share(relu, LAYERS[-1], "dead") > 0.5
    assert relu.count("leaking") == 0  # ReLU has no leaking state: never firing is fatal
    assert leaky.count("dead") == 0  # ... and LeakyReLU has no dead one
    assert leaky.count("leaking") > 0
    relu_active, leaky_active = relu.active_parameter_ratio(), leaky.active_parameter_ratio()
    assert relu_active is not None
    assert relu_active < 1.0
    assert leaky_active == 1.0  # nothing dead, so every parameter is active

    # The side-by-side table: dead and leaking per layer, totals, accuracy and parameter ratio.
    table = result.output[result.output.index("never fired in the last window") :]
    rows = {line.split()[0]: line for line in table.splitlines() if line.strip()}
    for name in LAYERS:
        assert COUNT_CELL.findall(rows[name]) == [
            cell(r.layers[name].count(state), r.layers[name].neurons)
            for r in (relu, leaky)
            for state in ("dead", "leaking")
        ]
    assert COUNT_CELL.findall(rows["total"]) == [
        cell(r.count(state), r.neurons) for r in (relu, leaky) for state in ("dead", "leaking")
    ]
    assert rows["test"].split()[2:] == [
        f"{100 * r.meta['test_accuracy']:.1f}%" for r in (relu, leaky)
    ]
    assert rows["active-parameter"].split()[2:] == [
        f"{r.active_parameter_ratio():.3f}" for r in (relu, leaky)
    ]


@pytest.mark.slow
def test_the_contrast_holds_for_seeds_0_to_9(data: demo.Digits) -> None:
    """Not one tuned seed: every seed kills a third of the ReLUs and over 40 % of the last
    hidden layer (the lesson's exercise), and no LeakyReLU dies."""
    for seed in range(10):
        relu = demo.train("relu", seed=seed, data=data).report
        leaky = demo.train("leaky_relu", seed=seed, data=data).report
        assert dead_ratio(relu) > 0.3, seed
        assert layer_share(relu, LAYERS[-1], "dead") > 0.4, seed
        assert leaky.count("dead") == 0, seed
