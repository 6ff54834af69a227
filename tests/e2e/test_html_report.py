"""The HTML report in a real headless Chromium: the page loads and every image is decoded.

Chromium is Debian's (``tools/test-all.sh`` installs it); it is driven over the DevTools
protocol on a pipe by ``tools/html_report_chromium.py``, so nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from click.testing import CliRunner

import neuronwatch
from neuronwatch.cli.plot import plot
from neuronwatch.plots import HTML_NAME, VIEWS

ROOT = Path(__file__).resolve().parents[2]


def _load_tool() -> ModuleType:
    path = ROOT / "tools" / "html_report_chromium.py"
    spec = importlib.util.spec_from_file_location("html_report_chromium", path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being built
    spec.loader.exec_module(module)
    return module


chromium = _load_tool()
pytestmark = pytest.mark.skipif(
    chromium.chromium_binary() is None,
    reason="needs Debian's chromium: apt-get install -y --no-install-recommends chromium "
    "(tools/test-all.sh installs it)",
)


def planted_report_dir(where: Path) -> Path:
    """A training-style report: ReLU blocks with planted dead units, pre beside post, a tanh
    head with saturated units, and a layer short of min_rows (unknown)."""
    rng = np.random.default_rng(0)
    engine = neuronwatch.Engine("planted <mlp>", min_rows=500)
    for block, dead in enumerate(([], [2, 3], [0, 1, 4, 9])):
        layer = f"blocks.{block}.act"
        before = rng.normal(size=(1000, 16))
        before[:, dead] = -np.abs(before[:, dead]) - 0.1
        engine.add_layer(f"{layer}:pre", None, kind="pre")
        engine.add_layer(layer, "ReLU")
        engine.observe(f"{layer}:pre", before)
        engine.observe(layer, np.maximum(before, 0.0))
    engine.add_layer("head.tanh", "Tanh")
    values = np.tanh(rng.normal(size=(1000, 8)))
    values[:, 5] = -1.0
    engine.observe("head.tanh", values)
    engine.add_layer("late.gelu", "GELU")
    engine.observe("late.gelu", rng.normal(size=(10, 8)))
    report = neuronwatch.Report.from_snapshot(engine.snapshot(), meta={"run": "e2e"})
    return report.save(where)


@pytest.fixture(scope="module")
def page(tmp_path_factory: pytest.TempPathFactory) -> Path:
    report_dir = planted_report_dir(tmp_path_factory.mktemp("html") / "report")
    result = CliRunner().invoke(plot, [str(report_dir)])
    assert result.exit_code == 0, result.output
    return report_dir / HTML_NAME


def test_the_page_loads_and_every_image_shows(page: Path) -> None:
    state = chromium.load_page(page)

    assert state.title == "planted <mlp> · neuronwatch report"
    assert [image.src for image in state.images] == [view.file for view in VIEWS]
    for image in state.images:
        assert image.complete, image
        assert image.natural_width > 0, image
        assert image.natural_height > 0, image
    assert state.broken == []
    # The text a reader sees: totals, the warning about the unjudged layer, the table.
    assert "late.gelu: 8 of 8 neurons are unknown" in state.text
    assert "blocks.2.act:pre" in state.text


def test_a_missing_image_is_caught(page: Path, tmp_path: Path) -> None:
    """The control: the same page with one PNG gone shows a broken image, and the check sees
    it (so the test above can fail)."""
    copy = tmp_path / "site"
    copy.mkdir()
    for view in VIEWS[1:]:
        (copy / view.file).write_bytes((page.parent / view.file).read_bytes())
    (copy / HTML_NAME).write_bytes(page.read_bytes())

    state = chromium.load_page(copy / HTML_NAME)

    assert state.broken == [VIEWS[0].file]


def test_a_corrupt_image_is_caught(page: Path, tmp_path: Path) -> None:
    copy = tmp_path / "site"
    copy.mkdir()
    for view in VIEWS:
        (copy / view.file).write_bytes((page.parent / view.file).read_bytes())
    (copy / VIEWS[2].file).write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)  # header, no image
    (copy / HTML_NAME).write_bytes(page.read_bytes())

    assert chromium.load_page(copy / HTML_NAME).broken == [VIEWS[2].file]


def test_screenshot_of_the_whole_page(page: Path, tmp_path: Path) -> None:
    from matplotlib.image import imread

    png = chromium.screenshot(page, tmp_path / "docs" / "report.png", width=1000)

    pixels = imread(png)
    assert pixels.shape[1] == 1000
    # Full page, not the 900-pixel viewport: the four figures stack far below it.
    assert pixels.shape[0] > 2000
    assert np.ptp(pixels) > 0
    assert sorted(p.name for p in png.parent.iterdir()) == ["report.png"]
