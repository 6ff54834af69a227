"""``neuronwatch show``: a real engine fed planted dead neurons, saved, shown through click."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result

import neuronwatch
from neuronwatch import render
from neuronwatch.cli import main

ROWS = 2000
# layer -> (neurons, planted dead indices)
PLANTED: dict[str, tuple[int, list[int]]] = {
    "blocks.0.mlp.act": (32, [3, 17, 30]),
    "blocks.1.mlp.act": (48, [0, 47]),
    "head.act": (16, []),
}


def planted_engine(rows: int = ROWS, min_rows: int = 1000) -> neuronwatch.Engine:
    rng = np.random.default_rng(0)
    engine = neuronwatch.Engine("planted", min_rows=min_rows)
    for layer, (neurons, dead) in PLANTED.items():
        engine.add_layer(layer, "ReLU")
        # |normal| fires on every row; the planted columns never do.
        acts = np.abs(rng.normal(size=(rows, neurons))) + 0.01
        acts[:, dead] = 0.0
        engine.observe(layer, acts)
    return engine


def save(engine: neuronwatch.Engine, where: Path) -> Path:
    return neuronwatch.Report.from_snapshot(engine.snapshot(), meta={"run": "test"}).save(where)


def show(*args: str) -> Result:
    return CliRunner().invoke(main, ["show", *args])


def row_of(output: str, layer: str) -> list[str]:
    """The cells on the first line of ``layer``'s row (counts; shares are on line two), or of
    the header for ``layer="layer"``."""
    lines = [line.split() for line in output.splitlines() if line.split()[:1] == [layer]]
    assert len(lines) == 1, f"expected one row for {layer!r} in:\n{output}"
    return lines[0]


def test_show_lists_every_layer_with_its_dead_count(tmp_path: Path) -> None:
    result = show(str(save(planted_engine(), tmp_path / "report")))

    assert result.exit_code == 0, result.output
    for layer, (neurons, dead) in PLANTED.items():
        # layer, kind, activation, neurons, rows, dead, leaking, asleep, active, dormant,
        # saturated, bar
        cells = row_of(result.output, layer)
        assert cells[:7] == [layer, "post", "ReLU", str(neurons), str(ROWS), str(len(dead)), "0"]
        assert cells[8] == str(neurons - len(dead))  # active
    assert row_of(result.output, "total")[:3] == ["total", "96", "5"]
    assert "unknown" not in row_of(result.output, "layer")  # no unknown column when complete


def test_show_json_has_the_planted_dead_neurons(tmp_path: Path) -> None:
    result = show(str(save(planted_engine(), tmp_path / "report")), "--json")

    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["model"] == "planted"
    assert summary["totals"]["dead"] == 5
    layers = {entry["name"]: entry for entry in summary["layers"]}
    assert set(layers) == set(PLANTED)
    for layer, (_, dead) in PLANTED.items():
        assert layers[layer]["dead"] == len(dead)
        assert layers[layer]["dead_indices"] == dead


def test_show_of_a_missing_directory_names_it(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-report"
    result = show(str(missing))

    assert result.exit_code == 2
    assert str(missing) in result.output
    assert "does not exist" in result.output


def test_show_of_a_directory_without_a_report_says_what_is_missing(tmp_path: Path) -> None:
    result = show(str(tmp_path))

    assert result.exit_code == 1
    assert str(tmp_path / "report.json") in result.output
    assert "report.npz" in result.output  # the message says what a report directory holds


def test_show_says_unknown_instead_of_alive_below_min_rows(tmp_path: Path) -> None:
    report_dir = save(planted_engine(rows=50, min_rows=100), tmp_path / "report")
    result = show(str(report_dir))

    assert result.exit_code == 0, result.output
    assert row_of(result.output, "layer")[11] == "unknown"
    for layer, (neurons, _) in PLANTED.items():
        cells = row_of(result.output, layer)
        # dead, leaking, asleep, active, dormant, saturated are all 0; unknown holds them all
        assert cells[5:12] == ["0", "0", "0", "0", "0", "0", str(neurons)]
        assert cells[12] == "?" * render.BAR_WIDTH
        assert f"{neurons} of {neurons} neurons are unknown" in result.output
    assert "needs min_rows=100" in result.output
    summary = json.loads(show(str(report_dir), "--json").stdout)
    assert [entry["unknown"] for entry in summary["layers"]] == [n for n, _ in PLANTED.values()]
    assert summary["totals"]["dead"] == 0


def test_show_prints_the_active_parameter_ratio_when_wiring_exists(tmp_path: Path) -> None:
    engine = planted_engine()
    neurons, dead = PLANTED["blocks.0.mlp.act"]
    engine.set_wiring(
        "blocks.0.mlp.act",
        neuronwatch.Wiring(
            producer="blocks.0.mlp.fc",
            consumer="blocks.0.mlp.proj",
            produces=(
                neuronwatch.ParamRef("blocks.0.mlp.fc.weight", (neurons, 8), 0),
                neuronwatch.ParamRef("blocks.0.mlp.fc.bias", (neurons,), 0),
            ),
            consumes=(neuronwatch.ParamRef("blocks.0.mlp.proj.weight", (8, neurons), 1),),
        ),
    )
    result = show(str(save(engine, tmp_path / "report")))

    assert result.exit_code == 0, result.output
    # Every wired parameter is indexed by the layer's neurons once: the alive share of them.
    expected = (neurons - len(dead)) / neurons
    assert f"active-parameter ratio: {expected:.3f}" in result.output


def test_show_without_wiring_prints_no_active_parameter_ratio(tmp_path: Path) -> None:
    result = show(str(save(planted_engine(), tmp_path / "report")))

    assert result.exit_code == 0, result.output
    assert "active-parameter ratio" not in result.output


@pytest.mark.parametrize(
    ("dead", "asleep", "expected"),
    [
        ([], [], "█" * 12),
        (list(range(16)), [], "█" * 6 + "░" * 6),
        (list(range(8)), list(range(8, 16)), "█" * 6 + "▒" * 3 + "░" * 3),
    ],
)
def test_liveness_bar_is_proportional(dead: list[int], asleep: list[int], expected: str) -> None:
    engine = neuronwatch.Engine("bar", min_rows=100)
    acts = np.ones((1000, 32))
    acts[:, dead] = 0.0
    acts[10:, asleep] = 0.0  # fires on 10 of 1000 rows: asleep (< 5 %)
    engine.observe("act", acts)
    stats = engine.snapshot().layers("current")["act"]

    assert render.liveness_bar(stats, width=12).plain == expected


def test_version() -> None:
    result = CliRunner().invoke(main, ["--version"])

    assert result.exit_code == 0
    assert neuronwatch.__version__ in result.output
