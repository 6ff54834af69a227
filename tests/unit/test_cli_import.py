"""The CLI loads no framework: ``neuronwatch show`` must work where torch is not installed."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

import neuronwatch

FRAMEWORKS = ("torch", "sklearn", "onnxruntime", "prometheus_client", "opentelemetry")


def loaded_after(code: str) -> list[str]:
    """Run ``code`` in a fresh interpreter; the frameworks it left in ``sys.modules``."""
    probe = (
        f"{code}\nimport json, sys\n"
        f"print(json.dumps(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules)))\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    result: list[str] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def test_importing_the_cli_loads_no_framework() -> None:
    assert loaded_after("import neuronwatch.cli, neuronwatch.render") == []


def test_running_show_loads_no_framework(tmp_path: Path) -> None:
    engine = neuronwatch.Engine("m", min_rows=1)
    engine.observe("act", np.eye(4))
    report_dir = neuronwatch.Report.from_snapshot(engine.snapshot()).save(tmp_path / "r")
    code = (
        "from neuronwatch.cli import main\n"
        f"main(['show', {str(report_dir)!r}], standalone_mode=False)\n"
        f"main(['show', {str(report_dir)!r}, '--json'], standalone_mode=False)"
    )
    assert loaded_after(code) == []


def test_the_probe_sees_a_framework_that_is_imported() -> None:
    # The control for the tests above: the demo needs torch and scikit-learn, and loads them.
    assert loaded_after("import neuronwatch.demo") == ["sklearn", "torch"]


def test_listing_every_command_loads_no_framework() -> None:
    # --help imports every command's module (for its one-line help): none may load a framework.
    code = (
        "from neuronwatch.cli import main\ntry:\n    main(['--help'])\nexcept SystemExit:\n    pass"
    )
    assert loaded_after(code) == []


def test_a_command_imports_only_its_own_module() -> None:
    # neuronwatch rescue starts in ~0.13 s instead of ~0.2 s: the other commands stay unloaded.
    probe = (
        "from neuronwatch.cli import main\n"
        "try:\n    main(['rescue', '--help'])\nexcept SystemExit:\n    pass\n"
        "import sys\n"
        "print(sorted(m for m in sys.modules if m.startswith('neuronwatch.cli.')))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    loaded = done.stdout.strip().splitlines()[-1]
    assert "neuronwatch.cli.rescue" in loaded
    for other in ("audit", "demo", "grafana", "plot"):
        assert f"neuronwatch.cli.{other}'" not in loaded, loaded
