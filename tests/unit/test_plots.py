"""Plots and the HTML page of a report: what each view draws is read back from the figure."""

from __future__ import annotations

import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgba
from matplotlib.image import imread
from matplotlib.patches import FancyBboxPatch
from plots_planted import DEAD, NEURONS, UNKNOWN_LAYER, planted_report

import neuronwatch
from neuronwatch import Report, ReportError, State, plot_layer_map
from neuronwatch import plot_figures as figures
from neuronwatch.html_page import render_page
from neuronwatch.plot_figures import STATE_COLORS
from neuronwatch.plots import HTML_NAME, VIEWS, write_plots


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[dict[str, str | None]] = []
        self.title = ""
        self._in_title = False
        self.scripts = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "img":
            self.images.append(dict(attrs))
        self._in_title = tag == "title"
        self.scripts += tag == "script"

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data


def parse(path: Path) -> _Page:
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    return page


def test_write_plots_writes_every_view_and_a_page_that_shows_them(tmp_path: Path) -> None:
    written = write_plots(planted_report(), tmp_path / "out")

    assert [p.name for p in written] == [*(v.file for v in VIEWS), HTML_NAME]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in written)
    page = parse(tmp_path / "out" / HTML_NAME)
    assert [img["src"] for img in page.images] == [v.file for v in VIEWS]
    assert page.title.startswith("planted")
    assert page.scripts == 0
    for img in page.images:
        pixels = imread(tmp_path / "out" / str(img["src"]))
        # The page declares each image's real size, so the layout does not jump while loading.
        assert (int(str(img["width"])), int(str(img["height"]))) == (
            pixels.shape[1],
            pixels.shape[0],
        )
        assert pixels.shape[0] > 200
        assert pixels.shape[1] > 200
        assert np.ptp(pixels) > 0  # not a blank canvas


def test_heatmap_rows_pair_pre_with_post_and_sort_neurons_by_frequency() -> None:
    report = planted_report()
    figure = figures.firing_frequency(report)

    kinds, sites = figures.sites(report)
    assert kinds == ["pre", "post"]
    assert [{k: s.name for k, s in site.items()} for site in sites[:3]] == [
        {"pre": f"{layer}:pre", "post": layer} for layer in DEAD
    ]
    panes = [axes for axes in figure.axes if axes.images]
    assert len(panes) == 2 * len(DEAD) + 2  # pre and post per block; leaky and tanh post only
    for axes in panes:
        name = axes.get_title(loc="left").split(" [")[0]
        frequency = report.layers[name].frequency
        drawn = np.asarray(axes.images[0].get_array())
        assert drawn.shape == (1, frequency.size)
        np.testing.assert_array_equal(drawn[0], np.sort(frequency))
    # Planted dead neurons come first (never fired: frequency 0), and the title counts them.
    post = next(a for a in panes if a.get_title(loc="left").startswith("blocks.2.act [post]"))
    drawn = np.asarray(post.images[0].get_array())[0]
    assert (drawn[: len(DEAD["blocks.2.act"])] == 0).all()
    assert (drawn[len(DEAD["blocks.2.act"]) :] > 0).all()
    assert f"never fired {len(DEAD['blocks.2.act'])}" in post.get_title(loc="left")
    # Where a site has no pre layer, its pane says so instead of drawing somebody else's data.
    empty = [a for a in figure.axes if not a.images and a.texts]
    assert [a.texts[0].get_text() for a in empty] == ["pre: not watched"] * 2


def test_neurons_without_a_finite_row_are_masked_and_sorted_last() -> None:
    engine = neuronwatch.Engine("nan", min_rows=1)
    engine.observe("act", np.array([[1.0, np.nan, 0.0, np.nan]] * 5))
    figure = figures.firing_frequency(Report.from_snapshot(engine.snapshot()))

    image = figure.axes[0].images[0]
    np.testing.assert_allclose(image.cmap.get_bad(), to_rgba(STATE_COLORS[State.UNKNOWN]))
    drawn = image.get_array()
    assert isinstance(drawn, np.ma.MaskedArray)
    assert drawn.mask[0].tolist() == [False, False, True, True]
    assert drawn[0, :2].tolist() == [0.0, 1.0]


def test_histograms_draw_each_layers_own_fixed_edge_histogram() -> None:
    report = planted_report()
    figure = figures.histograms(report)

    panels = [axes for axes in figure.axes if axes.patches]
    assert [a.get_title(loc="left") for a in panels] == [
        f"{s.name} [{s.kind}]" for s in report.layers.values()
    ]
    for axes, stats in zip(panels, report.layers.values(), strict=True):
        counts = stats.partials.histogram
        heights = [bar.get_height() for bar in axes.patches]
        np.testing.assert_allclose(heights, counts / counts.sum())
        labels = [t.get_text() for t in axes.get_xticklabels()]
        assert labels == [f"{e:g}" for e in stats.config.histogram_edges]
    # A ReLU output puts its non-firing quarter of rows (and the dead columns) on 0 exactly:
    # the bin (-1e-3, 0] holds them.
    relu = panels[list(report.layers).index("blocks.2.act")]
    zero_bin = list(report.layers["blocks.2.act"].config.histogram_edges).index(0.0)
    dead = len(DEAD["blocks.2.act"])
    expected = (dead + (NEURONS - dead) / 4) / NEURONS
    assert relu.patches[zero_bin].get_height() == pytest.approx(expected)


def test_state_ratios_are_lines_across_depth_per_kind() -> None:
    report = planted_report(unknown=True)
    figure = figures.state_ratios(report)

    by_kind = {a.get_title(loc="left").split()[1].rstrip(":"): a for a in figure.axes}
    assert sorted(by_kind) == ["post", "pre"]
    post = by_kind["post"]
    lines = {line.get_label(): line for line in post.get_lines()}
    assert set(lines) == {"dead", "leaking", "dormant", "saturated", "unknown"}
    names = [s.name for s in report.layers.values() if s.kind == "post"]
    assert [t.get_text() for t in post.get_xticklabels()] == names
    for state in ("dead", "leaking", "dormant", "saturated", "unknown"):
        expected = [report.layers[name].ratio(state) for name in names]
        np.testing.assert_array_equal(lines[state].get_ydata(), expected)
    np.testing.assert_array_equal(
        lines["dead"].get_ydata()[:3], [len(d) / NEURONS for d in DEAD.values()]
    )


def test_unknown_line_only_when_a_layer_is_not_judged() -> None:
    figure = figures.state_ratios(planted_report(unknown=False))
    labels = {line.get_label() for axes in figure.axes for line in axes.get_lines()}
    assert labels == {"dead", "leaking", "dormant", "saturated"}


def test_layer_map_boxes_follow_graph_order_and_dead_share() -> None:
    report = planted_report(unknown=True)
    figure = plot_layer_map.layer_map(report)

    axes = figure.axes[0]
    boxes = [p for p in axes.patches if isinstance(p, FancyBboxPatch)]
    assert len(boxes) == len(report.layers)
    firsts = [t.get_text().splitlines()[0] for t in axes.texts]
    by_name = {line.split(" [")[0]: box for line, box in zip(firsts, boxes, strict=True)}
    assert list(by_name) == list(report.layers)  # graph order, pre before post per site
    reds = colormaps["Reds"]
    for name, box in by_name.items():
        expected = reds(report.layers[name].ratio(State.DEAD))
        np.testing.assert_allclose(box.get_facecolor(), expected)
    # Layers not judged yet get a dashed outline; the others a solid one.
    dashed = [name for name, box in by_name.items() if box.get_linestyle() == "--"]
    assert dashed == [UNKNOWN_LAYER]


def test_labels_with_markup_are_escaped_in_page_and_figures(tmp_path: Path) -> None:
    engine = neuronwatch.Engine("<b>m</b>", min_rows=1)
    # "$\frac$" is invalid mathtext: drawn unescaped, matplotlib raises while saving.
    name = r"odd<script>alert(1)</script>$\frac$"
    engine.add_layer(name, "ReLU")
    engine.observe(name, np.abs(np.random.default_rng(0).normal(size=(50, 4))))
    report = Report.from_snapshot(engine.snapshot())

    write_plots(report, tmp_path)

    html = (tmp_path / HTML_NAME).read_text(encoding="utf-8")
    assert "<script>" not in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html
    assert "&lt;b&gt;m&lt;/b&gt;" in html


def test_a_failed_render_leaves_no_directory_and_keeps_an_old_page(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    report = planted_report(pre=False)

    def broken(report: Report) -> object:
        raise RuntimeError("drawing failed")

    # The last view fails: three images were drawn already, and none may land on disk.
    monkeypatch.setattr(plot_layer_map, "layer_map", broken)
    with pytest.raises(RuntimeError, match="drawing failed"):
        write_plots(report, tmp_path / "new")
    assert not (tmp_path / "new").exists()

    monkeypatch.undo()
    old = write_plots(report, tmp_path / "old")
    before = {p: p.read_bytes() for p in old}
    monkeypatch.setattr(figures, "firing_frequency", broken)
    with pytest.raises(RuntimeError):
        write_plots(planted_report(pre=False, unknown=True), tmp_path / "old")
    assert {p: p.read_bytes() for p in old} == before
    assert sorted(p.name for p in (tmp_path / "old").iterdir()) == sorted(p.name for p in old)


def test_equal_reports_give_equal_files(tmp_path: Path) -> None:
    report = planted_report(pre=False)
    first = [p.read_bytes() for p in write_plots(report, tmp_path / "a")]
    second = [p.read_bytes() for p in write_plots(report, tmp_path / "b")]
    assert first == second


def test_a_report_without_layers_is_refused(tmp_path: Path) -> None:
    empty = Report(model="m", window="lifetime", step=0, layers=MappingProxyType({}))
    with pytest.raises(ReportError, match="no layers"):
        write_plots(empty, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_file_in_place_of_the_directory_is_refused(tmp_path: Path) -> None:
    target = tmp_path / "file"
    target.write_text("keep me")
    with pytest.raises(neuronwatch.ConfigError, match="not a directory"):
        write_plots(planted_report(), target)
    assert target.read_text() == "keep me"


def test_the_page_warns_about_layers_not_judged_yet() -> None:
    html = render_page(planted_report(unknown=True), [])
    assert f"{UNKNOWN_LAYER}: 8 of 8 neurons are unknown" in html
    assert "needs min_rows=1000" in html
    assert "are unknown" not in render_page(planted_report(unknown=False), [])


def test_the_page_tables_every_layer_with_its_counts() -> None:
    report = planted_report()
    html = render_page(report, [])
    for stats in report.layers.values():
        assert f'<tr><td>{stats.name}</td><td class="text">{stats.kind}</td>' in html
    # blocks.2.act has 11 of 32 neurons dead, flagged in red.
    row = html.split("<tr><td>blocks.2.act</td>")[1].split("</tr>")[0]
    assert "<td class=over>11 (34.4%)</td>" in row


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)


def test_without_matplotlib_a_missing_extra_error_names_the_extra(tmp_path: Path) -> None:
    report_dir = planted_report().save(tmp_path / "r")
    code = (
        "import sys\n"
        "sys.modules['matplotlib'] = None  # as if it were not installed\n"
        "from pathlib import Path\n"
        "from neuronwatch import Report, MissingExtraError\n"
        "from neuronwatch.plots import write_plots\n"
        "try:\n"
        f"    write_plots(Report.load({str(report_dir)!r}), Path({str(tmp_path / 'p')!r}))\n"
        "except MissingExtraError as exc:\n"
        "    print('missing:', exc.module, exc.extra)\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "missing: matplotlib plots"
    assert not (tmp_path / "p").exists()


def test_importing_plots_gate_and_their_commands_loads_no_matplotlib() -> None:
    code = (
        "import sys\n"
        "import neuronwatch, neuronwatch.plots, neuronwatch.html_page, neuronwatch.gate\n"
        "import neuronwatch.cli.plot, neuronwatch.cli.check\n"
        "print(sorted(m for m in ('matplotlib', 'torch') if m in sys.modules))\n"
    )
    done = _run(code)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
    # The control: writing plots does load it.
    done = _run("import sys, neuronwatch.plot_figures\nprint('matplotlib' in sys.modules)")
    assert done.stdout.strip() == "True"


def _deep_report(layers: int) -> Report:
    """``layers`` ReLU layers of 50 neurons; layer i has i % 50 neurons that never fire."""
    engine = neuronwatch.Engine("deep", min_rows=10)
    rng = np.random.default_rng(0)
    for i in range(layers):
        name = f"blocks.{i}.act"
        values = np.abs(rng.standard_normal((20, 50))) + 0.1
        values[:, : i % 50] = 0.0
        engine.add_layer(name, "ReLU")
        engine.observe(name, values)
    return Report.from_snapshot(engine.snapshot())


def test_many_layers_give_bounded_readable_figures(tmp_path: Path) -> None:
    # A 120-layer model: one matrix per view, a row per layer, within 30 x 30 inches.
    report = _deep_report(120)
    for path in write_plots(report, tmp_path)[:-1]:
        height, width = imread(path).shape[:2]
        assert max(height, width) <= 3000, (path.name, width, height)
    frequency = figures.firing_frequency(report).axes[0].images[0].get_array()
    assert frequency.shape == (120, 128)
    # Layer 7: 7 of 50 neurons never fire, sorted first: the row starts with zeros.
    row = np.asarray(frequency[7])
    assert (row[: int(128 * 7 / 50)] == 0).all()
    assert (row[int(128 * 8 / 50) :] > 0).all()
    strips = plot_layer_map.layer_map(report).axes[0].images[0].get_array()
    # Index 0 is dead, drawn first: 0, 10 and 49 of 50 neurons -> 0, 20 and 98 of 100 columns.
    assert [int((np.asarray(strips[i]) == 0).sum()) for i in (0, 10, 49)] == [0, 20, 98]
    histogram = figures.histograms(report).axes[0].images[0].get_array()
    assert histogram.shape[0] == 120
    np.testing.assert_allclose(np.nansum(histogram, axis=1), 1.0)


def test_the_page_header_flattens_meta_instead_of_printing_a_dict() -> None:
    import dataclasses

    meta = {
        "run": "audit",
        "onnx": {"provider": "CPUExecutionProvider", "sites": ["a", "b", "c"], "none": {}},
        "empty": [],
        "skipped": None,
    }
    html = render_page(dataclasses.replace(planted_report(), meta=meta), [])
    header = html.split('<p class="meta">')[2].split("</p>")[0]
    assert header == "run=audit · onnx.provider=CPUExecutionProvider · onnx.sites=3 entries"
