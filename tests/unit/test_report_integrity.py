"""Reports never lie: a failed save keeps the previous report, every malformed file gives a
ReportError naming the file (one line from the CLI, no traceback), and meta round-trips."""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from neuronwatch import Engine, Report, ReportError
from neuronwatch.cli import main


def make_report(meta: dict[str, Any] | None = None, seed: int = 7) -> Report:
    rng = np.random.default_rng(seed)
    engine = Engine("mlp", min_rows=20)
    engine.add_layer("act", "ReLU")
    acts = np.maximum(rng.normal(size=(40, 5)), 0)
    acts[:, 2] = 0.0
    engine.observe("act", acts)
    return Report.from_snapshot(engine.snapshot(), meta=meta or {"run": seed})


@pytest.fixture
def saved(tmp_path: Path) -> Path:
    make_report().save(tmp_path)
    return tmp_path


def rewrite_npz(directory: Path, change: Callable[[dict[str, np.ndarray]], None]) -> None:
    """Edit the arrays and re-sign the JSON, so only the edit itself can be caught."""
    with np.load(directory / "report.npz") as npz:
        arrays = {key: npz[key] for key in npz.files}
    change(arrays)
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    (directory / "report.npz").write_bytes(buffer.getvalue())
    data = json.loads((directory / "report.json").read_text())
    data["npz_sha256"] = hashlib.sha256(buffer.getvalue()).hexdigest()
    (directory / "report.json").write_text(json.dumps(data))


def rewrite_json(directory: Path, change: Callable[[dict[str, Any]], Any]) -> None:
    data = json.loads((directory / "report.json").read_text())
    change(data)
    (directory / "report.json").write_text(json.dumps(data))


def expect_report_error(directory: Path, match: str) -> None:
    with pytest.raises(ReportError, match=match) as caught:
        Report.load(directory)
    assert str(directory) in str(caught.value)  # names the file
    result = CliRunner().invoke(main, ["show", str(directory)])
    assert result.exit_code != 0
    assert result.exception is None or isinstance(result.exception, SystemExit)
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: ")
    assert "Traceback" not in result.output


# -- corrupt npz --------------------------------------------------------------------------------


def test_truncated_npz(saved: Path) -> None:
    raw = (saved / "report.npz").read_bytes()
    (saved / "report.npz").write_bytes(raw[: len(raw) // 2])
    expect_report_error(saved, "report.npz does not belong")


def test_truncated_npz_with_its_checksum(saved: Path) -> None:
    raw = (saved / "report.npz").read_bytes()[:200]
    (saved / "report.npz").write_bytes(raw)
    rewrite_json(saved, lambda d: d.update(npz_sha256=hashlib.sha256(raw).hexdigest()))
    expect_report_error(saved, "not a readable npz archive")


@pytest.mark.parametrize("content", [b"", b"garbage, not a zip file" * 10])
def test_empty_or_garbage_npz(saved: Path, content: bytes) -> None:
    (saved / "report.npz").write_bytes(content)
    rewrite_json(saved, lambda d: d.update(npz_sha256=hashlib.sha256(content).hexdigest()))
    expect_report_error(saved, "not a readable npz archive")


def test_npz_of_another_report(saved: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    other = tmp_path_factory.mktemp("other")
    make_report(seed=8).save(other)
    (saved / "report.npz").write_bytes((other / "report.npz").read_bytes())
    expect_report_error(saved, "does not belong to the report.json beside it")


def test_two_dimensional_fired(saved: Path) -> None:
    rewrite_npz(saved, lambda a: a.update({"act/fired": a["act/fired"].reshape(1, -1)}))
    expect_report_error(saved, "'fired' must be 1-D")


def test_missing_array(saved: Path) -> None:
    rewrite_npz(saved, lambda a: a.pop("act/max"))
    expect_report_error(saved, r"lacks the arrays \['max'\]")


@pytest.mark.parametrize(
    ("field", "value", "match"),
    [
        ("fired", [1.5, 0, 0, 0, 0], "non-integral"),
        ("fired", [-1, 0, 0, 0, 0], ">= 0"),
        ("fired", [41, 0, 0, 0, 0], "only 40 rows"),
        ("histogram", [1, 2, 3], "3 histogram bins, expected 16"),
        ("sum", [np.nan, 0, 0, 0, 0], "NaN"),
    ],
)
def test_impossible_arrays(saved: Path, field: str, value: list[float], match: str) -> None:
    rewrite_npz(saved, lambda a: a.update({f"act/{field}": np.asarray(value)}))
    expect_report_error(saved, match)


# -- malformed JSON -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda d: d.update(layers="act"), "'layers' must be a list"),
        (lambda d: d.update(step="ten"), "'step' must be an integer"),
        (lambda d: d.pop("model"), "has no 'model'"),
        (lambda d: d["layers"].append(5), r"layers\[1\] must be an object"),
        (lambda d: d["layers"][0].update(name=3), "'name' must be a string"),
        (lambda d: d["layers"][0].pop("thresholds"), "has no 'thresholds'"),
        (lambda d: d["layers"][0]["thresholds"].update(min_rows="x"), "thresholds is malformed"),
        (lambda d: d["layers"][0]["thresholds"].update(family="sparkly"), "unknown activation"),
        (lambda d: d["layers"][0].update(wiring={"produces": [{"name": 1}]}), "wiring"),
        (lambda d: d["layers"][0].update(dead="2"), "'dead' must be an integer"),
        (lambda d: d["layers"].append(d["layers"][0]), "appears twice"),
    ],
)
def test_structurally_wrong_json(saved: Path, change: Callable[[Any], Any], match: str) -> None:
    rewrite_json(saved, change)
    expect_report_error(saved, match)


@pytest.mark.parametrize("text", ["", "[1, 2]", "{", "\x00\xff"])
def test_json_that_is_not_a_report(saved: Path, text: str) -> None:
    (saved / "report.json").write_text(text, encoding="latin-1")
    expect_report_error(saved, "report.json")


# -- saving ---------------------------------------------------------------------------------------


def test_failed_save_leaves_the_previous_report_loadable_and_unchanged(
    saved: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    first = Report.load(saved)
    real_replace = os.replace

    def fail_on_the_json(src: Any, dst: Any) -> None:
        if str(dst).endswith("report.json"):
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", fail_on_the_json)
    with pytest.raises(OSError, match="disk gone"):
        make_report(seed=9).save(saved)  # the npz was already renamed when the JSON failed
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before
    assert Report.load(saved) == first


def test_meta_that_cannot_be_stored_is_refused_before_anything_is_written(saved: Path) -> None:
    before = {p.name: p.read_bytes() for p in saved.iterdir()}
    with pytest.raises(ReportError, match=r"meta\['opt'\]\['fn'\] is a builtin_function_or_method"):
        make_report(meta={"opt": {"fn": print}})
    assert {p.name: p.read_bytes() for p in saved.iterdir()} == before


def test_meta_takes_numpy_scalars_paths_and_non_finite_numbers(tmp_path: Path) -> None:
    meta = {
        "seed": np.int64(3),
        "lr": np.float32(0.5),
        "data": Path("/data/train"),
        "loss": math.nan,
        "best": -math.inf,
        "shape": (2, 3),
        "nested": {"values": np.arange(3), "flag": np.bool_(True)},
    }
    report = make_report(meta=meta)
    report.save(tmp_path)
    text = (tmp_path / "report.json").read_text()
    json.loads(text, parse_constant=lambda token: pytest.fail(f"invalid JSON token {token}"))
    loaded = Report.load(tmp_path)
    assert loaded == report
    assert loaded.meta["seed"] == 3
    assert loaded.meta["data"] == "/data/train"
    assert math.isnan(loaded.meta["loss"])
    assert loaded.meta["best"] == -math.inf
    assert loaded.meta["nested"]["values"] == [0, 1, 2]


def test_round_trip_equality_is_exact(tmp_path: Path) -> None:
    report = make_report()
    report.save(tmp_path)
    assert Report.load(tmp_path) == report
    assert Report.load(tmp_path) != make_report(seed=8)
    assert Report.load(tmp_path) != make_report(meta={"run": 8})


def test_a_folder_without_locks_still_saves_and_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Some NFS mounts refuse flock (ENOLCK): the report is still written and read; its
    checksum still pairs the two files."""
    import errno
    import fcntl

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_locks)
    report = make_report()
    report.save(tmp_path / "r")
    loaded = Report.load(tmp_path / "r")
    assert loaded.layers.keys() == report.layers.keys()
