"""Plots of a report from the torch adapter: a real model with pre-activations watched."""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import neuronwatch  # noqa: E402
from neuronwatch import Report, State  # noqa: E402
from neuronwatch import plot_figures as figures  # noqa: E402
from neuronwatch.plots import HTML_NAME, VIEWS, write_plots  # noqa: E402

DEAD = [1, 5, 9]


def watched_report() -> Report:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(8, 32),
            act1=nn.ReLU(),
            fc2=nn.Linear(32, 16),
            act2=nn.GELU(),
            out=nn.Linear(16, 4),
        )
    )
    with torch.no_grad():
        model.fc1.bias[DEAD] = -100.0  # never above 0: dead after the ReLU
    gen = torch.Generator().manual_seed(0)
    with (
        neuronwatch.watch(
            model, name="mlp", pre=True, compile=False, min_rows=64, histogram_every=1
        ) as monitor,
        torch.no_grad(),
    ):
        for _ in range(4):
            model(torch.randn(32, 8, generator=gen))
        return monitor.report()


def test_plots_of_a_watched_torch_model(tmp_path: Path) -> None:
    report = watched_report()
    assert list(report.layers) == ["act1", "act1:pre", "act2", "act2:pre"]
    assert report.layers["act1"].dead_indices.tolist() == DEAD

    kinds, sites = figures.sites(report)
    assert kinds == ["pre", "post"]
    assert [{k: s.name for k, s in site.items()} for site in sites] == [
        {"post": "act1", "pre": "act1:pre"},
        {"post": "act2", "pre": "act2:pre"},
    ]
    heatmap = figures.firing_frequency(report)
    pane = next(a for a in heatmap.axes if a.get_title(loc="left").startswith("act1 [post]"))
    drawn = np.asarray(pane.images[0].get_array())[0]
    assert (drawn[: len(DEAD)] == 0).all()
    assert (drawn[len(DEAD) :] > 0).all()
    # The histogram counted every watched forward: 4 batches of 32 rows of 32 neurons.
    assert int(report.layers["act1"].partials.histogram.sum()) == 4 * 32 * 32

    written = write_plots(report, tmp_path)
    assert [p.name for p in written] == [*(v.file for v in VIEWS), HTML_NAME]
    html = (tmp_path / HTML_NAME).read_text(encoding="utf-8")
    assert "<tr><td>act1</td>" in html
    assert f"dead {report.count(State.DEAD)} (" in html
