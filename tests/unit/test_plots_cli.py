"""``neuronwatch plot DIR``: plots and page beside a saved report, through click."""

from __future__ import annotations

from pathlib import Path

from click.testing import CliRunner
from plots_planted import planted_report

from neuronwatch.cli.plot import plot
from neuronwatch.plots import HTML_NAME, VIEWS


def test_plot_writes_beside_the_report_and_names_every_file(tmp_path: Path) -> None:
    report_dir = planted_report(pre=False).save(tmp_path / "report")

    result = CliRunner().invoke(plot, [str(report_dir)])

    assert result.exit_code == 0, result.output
    names = [*(v.file for v in VIEWS), HTML_NAME]
    assert sorted(p.name for p in report_dir.iterdir()) == sorted(
        ["report.json", "report.npz", *names]
    )
    for name in names:
        assert f"wrote {report_dir / name}" in result.output
    assert (report_dir / HTML_NAME).resolve().as_uri() in result.output


def test_plot_out_writes_elsewhere_and_leaves_the_report_alone(tmp_path: Path) -> None:
    report_dir = planted_report(pre=False).save(tmp_path / "report")
    before = {p.name: p.read_bytes() for p in report_dir.iterdir()}

    result = CliRunner().invoke(plot, [str(report_dir), "--out", str(tmp_path / "site")])

    assert result.exit_code == 0, result.output
    assert {p.name: p.read_bytes() for p in report_dir.iterdir()} == before
    assert (tmp_path / "site" / HTML_NAME).is_file()


def test_plot_of_a_broken_report_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    report_dir = planted_report(pre=False).save(tmp_path / "report")
    (report_dir / "report.npz").write_bytes(b"truncated")

    result = CliRunner().invoke(plot, [str(report_dir), "--out", str(tmp_path / "site")])

    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: {report_dir / 'report.npz'} does not belong to the report.json beside it (its "
        "checksum differs): the two files come from different saves; save the report again"
    ]
    assert not (tmp_path / "site").exists()


def test_an_unwritable_out_is_one_line_and_exit_2(tmp_path: Path) -> None:
    report_dir = planted_report(pre=False).save(tmp_path / "report")
    (tmp_path / "file").write_text("not a directory")

    result = CliRunner().invoke(plot, [str(report_dir), "--out", str(tmp_path / "file" / "sub")])

    assert result.exit_code == 2
    assert result.output.strip().splitlines() == [
        f"Error: cannot write the plots into {tmp_path / 'file' / 'sub'}: Not a directory; pass "
        "a directory that can be created and written"
    ]
