"""The scripts in examples/ run as a user would run them, and say what they should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from neuronwatch import Report

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def run(script: str, cwd: Path) -> str:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_any_framework_finds_the_planted_neurons(tmp_path: Path) -> None:
    assert run("any_framework.py", tmp_path).strip() == "dead: [3, 11] asleep: 0"


def test_watch_training_writes_a_loadable_report(tmp_path: Path) -> None:
    out = run("watch_training.py", tmp_path)
    assert out.startswith("neuronwatch-example ")
    report = Report.load(tmp_path / "neuronwatch-example")
    assert report.model == "example-mlp"
    assert report.window == "last"
    assert report.layers["1"].rows == 50 * 32
    assert report.wiring["1"].producer == "0"
    assert report.wiring["1"].consumer == "2"
