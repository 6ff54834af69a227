"""examples/rescue_strategies.py runs as a user runs it and says what it should."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("matplotlib")

SCRIPT = Path(__file__).resolve().parents[2] / "examples" / "rescue_strategies.py"
STRATEGIES = ["none", "lower LR", "LeakyReLU", "GELU", "reinit", "strip", "lift"]


@pytest.mark.slow
def test_every_rescue_runs_from_the_same_broken_network(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--epochs", "1", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("data: ")
    broken = re.search(r"(\d+)% of act5 dead", lines[1])
    assert broken is not None
    assert int(broken.group(1)) > 40
    rows = [line for line in lines if line.startswith("| ") and not line.startswith("| strategy")]
    assert [row.split(" | ")[0].removeprefix("| ") for row in rows] == STRATEGIES
    for row in rows:
        cells = row.strip("| ").split(" | ")
        # Audited before their first rescue: the same broken network (a swap changes what
        # every later layer sees at once).
        if cells[0] not in ("LeakyReLU", "GELU"):
            assert cells[1] == f"{broken.group(1)}%"
    touched = {row.split(" | ")[0][2:]: int(row.split(" | ")[-1].strip(" |")) for row in rows}
    assert touched["reinit"] > 0
    assert touched["strip"] > 0
    assert touched["lift"] > 0
    assert (tmp_path / "rescue_strategies.png").stat().st_size > 10_000
