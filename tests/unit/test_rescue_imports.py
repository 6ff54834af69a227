"""Rescue is core: importing it (and its command) loads no framework (DESIGN rule 1)."""

from __future__ import annotations

import subprocess
import sys


def test_rescue_and_its_command_load_no_framework() -> None:
    code = (
        "import sys, neuronwatch.rescue, neuronwatch.cli.rescue\n"
        "from neuronwatch.rescue.formats import safetensors, sharded\n"
        "print(' '.join(m for m in ('torch', 'onnx', 'onnxruntime', 'safetensors') "
        "if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""
