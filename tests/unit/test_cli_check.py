"""``neuronwatch check``: exit codes, one line per offending layer, the JSON summary."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner, Result
from plots_planted import UNKNOWN_LAYER, planted_report

from neuronwatch.cli.check import (
    EXIT_BAD_INPUT,
    EXIT_OVER_BUDGET,
    EXIT_PASSED,
    budget_options,
    check,
    enforce_budget,
)


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return planted_report(unknown=False).save(tmp_path_factory.mktemp("planted") / "report")


@pytest.fixture(scope="module")
def unknown_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return planted_report(unknown=True).save(tmp_path_factory.mktemp("unknown") / "report")


def run(*args: str | Path) -> Result:
    return CliRunner().invoke(check, [str(a) for a in args])


def over_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("over budget:")]


def test_within_budget_exits_0(report_dir: Path) -> None:
    result = run(report_dir, "--max-dead-ratio", "0.5")
    assert result.exit_code == EXIT_PASSED, result.output
    assert over_lines(result.output) == []
    assert result.output.splitlines()[-1].startswith("passed: 5 layers within budget (dead <= 0.5")


def test_over_budget_exits_1_with_one_line_per_offending_layer(report_dir: Path) -> None:
    result = run(report_dir, "--max-dead-ratio", "0.05", "--max-saturated-ratio", "0.2")
    assert result.exit_code == EXIT_OVER_BUDGET, result.output
    assert over_lines(result.output) == [
        "over budget: blocks.1.act [post]: dead 0.0625 (2 of 32 neurons) > max 0.05",
        "over budget: blocks.2.act [post]: dead 0.3438 (11 of 32 neurons) > max 0.05",
        "over budget: head.tanh [post]: saturated 0.2500 (2 of 8 neurons) > max 0.2",
    ]
    assert result.output.splitlines()[-1].startswith("failed: 3 of 5 layers over budget")


def test_a_layer_over_two_budgets_is_still_one_line(report_dir: Path) -> None:
    result = run(report_dir, "--max-dead-ratio", "0.3", "--max-dormant-ratio", "0.3")
    assert result.exit_code == EXIT_OVER_BUDGET
    assert over_lines(result.output) == [
        "over budget: blocks.2.act [post]: dead 0.3438 (11 of 32 neurons) > max 0.3; "
        "dormant 0.3438 (11 of 32 neurons) > max 0.3"
    ]


def test_leaking_budget(report_dir: Path) -> None:
    result = run(report_dir, "--max-leaking-ratio", "0.1")
    assert result.exit_code == EXIT_OVER_BUDGET
    assert over_lines(result.output) == [
        "over budget: head.leaky [post]: leaking 0.1250 (2 of 16 neurons) > max 0.1"
    ]


def test_unknown_layers_fail_by_default_and_warn_with_allow_unknown(unknown_dir: Path) -> None:
    strict = run(unknown_dir, "--max-dead-ratio", "0.5")
    assert strict.exit_code == EXIT_OVER_BUDGET
    [line] = over_lines(strict.output)
    assert line.startswith(f"over budget: {UNKNOWN_LAYER} [post]: unknown 1.0000 (8 of 8")
    assert "100 rows < min_rows 1000" in line
    assert "--allow-unknown" in line

    lenient = run(unknown_dir, "--max-dead-ratio", "0.5", "--allow-unknown")
    assert lenient.exit_code == EXIT_PASSED, lenient.output
    assert over_lines(lenient.stdout) == []
    assert f"warning: {UNKNOWN_LAYER} [post]: unknown 1.0000" in lenient.stderr


def test_kind_pre_gates_the_pre_activation_layers(report_dir: Path) -> None:
    default = run(report_dir, "--max-dead-ratio", "0.3")
    assert [line.split()[2] for line in over_lines(default.output)] == ["blocks.2.act"]
    both = run(report_dir, "--max-dead-ratio", "0.3", "--kind", "pre", "--kind", "post")
    assert [line.split()[2] for line in over_lines(both.output)] == [
        "blocks.2.act:pre",
        "blocks.2.act",
    ]


def test_summary_json_is_written_whole_for_pass_and_fail(report_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "ci" / "gate.json"  # the folder is created
    failed = run(report_dir, "--max-dead-ratio", "0.3", "--summary-json", path)
    assert failed.exit_code == EXIT_OVER_BUDGET
    summary = json.loads(path.read_text())
    assert summary["passed"] is False
    assert summary["exit_code"] == EXIT_OVER_BUDGET
    assert summary["report"] == str(report_dir)
    assert [(o["layer"], o["state"]) for o in summary["offending"]] == [("blocks.2.act", "dead")]
    assert sorted(p.name for p in path.parent.iterdir()) == ["gate.json"]  # no temp files left

    passed = run(report_dir, "--max-dead-ratio", "0.5", "--summary-json", path)
    assert passed.exit_code == EXIT_PASSED
    assert json.loads(path.read_text())["passed"] is True


def test_no_budget_is_a_usage_error(report_dir: Path) -> None:
    result = run(report_dir)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "give at least one budget" in result.output


@pytest.mark.parametrize("value", ["1.5", "-0.1", "lots"])
def test_a_budget_outside_0_1_is_a_usage_error(report_dir: Path, value: str) -> None:
    result = run(report_dir, "--max-dead-ratio", value)
    assert result.exit_code == EXIT_BAD_INPUT
    assert "--max-dead-ratio" in result.output


def test_a_report_that_cannot_be_loaded_exits_2_in_one_line(
    report_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "report.json").write_text("{not json")
    (broken / "report.npz").write_bytes((report_dir / "report.npz").read_bytes())
    summary = tmp_path / "gate.json"

    result = run(broken, "--max-dead-ratio", "0.3", "--summary-json", summary)

    assert result.exit_code == EXIT_BAD_INPUT
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: ")
    assert "report.json is not valid JSON" in line
    assert not summary.exists()
    assert run(tmp_path / "missing", "--max-dead-ratio", "0.3").exit_code == EXIT_BAD_INPUT


def test_an_unwritable_summary_exits_2(report_dir: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = run(report_dir, "--max-dead-ratio", "0.3", "--summary-json", blocker / "gate.json")
    assert result.exit_code == EXIT_BAD_INPUT
    assert "cannot write --summary-json" in result.output


def test_budget_options_and_enforce_budget_compose_into_another_command(
    report_dir: Path, tmp_path: Path
) -> None:
    """What ``audit`` does: take the options, build a report, return enforce_budget's code."""
    from neuronwatch import Report

    @click.command()
    @click.argument("directory", type=click.Path(path_type=Path))
    @budget_options
    @click.pass_context
    def audit_like(ctx: click.Context, /, directory: Path, **budget: Any) -> None:
        ctx.exit(enforce_budget(Report.load(directory), **budget))

    runner = CliRunner()
    gated = runner.invoke(audit_like, [str(report_dir), "--max-dead-ratio", "0.3"])
    assert gated.exit_code == EXIT_OVER_BUDGET
    assert len(over_lines(gated.output)) == 1
    # Without a budget there is no gate: nothing printed, exit 0, a summary when asked.
    path = tmp_path / "s.json"
    ungated = runner.invoke(audit_like, [str(report_dir), "--summary-json", str(path)])
    assert ungated.exit_code == EXIT_PASSED
    assert ungated.output == ""
    assert json.loads(path.read_text())["budgets"] == {}


def test_summary_json_never_replaces_the_report_or_a_file_that_is_not_a_summary(
    report_dir: Path, tmp_path: Path
) -> None:
    before = {p.name: p.read_bytes() for p in report_dir.iterdir()}
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for target in (report_dir / "report.json", report_dir / "report.npz", notes, fifo):
        result = run(report_dir, "--max-dead-ratio", "0.5", "--summary-json", target)
        assert result.exit_code == EXIT_BAD_INPUT, (target, result.output)
        assert "--summary-json" in result.output
    assert {p.name: p.read_bytes() for p in report_dir.iterdir()} == before
    assert notes.read_text() == '{"mine": true}'
    assert fifo.exists()
    assert not fifo.is_file()
