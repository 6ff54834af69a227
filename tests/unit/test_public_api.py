"""The public surface is under test: every exported name imports, and the core stays
framework-free (rule 1 of docs/architecture.md)."""

from __future__ import annotations

import importlib
import inspect
import subprocess
import sys
from pathlib import Path

import neuronwatch

FRAMEWORKS = ("torch", "onnx", "onnxruntime", "prometheus_client", "opentelemetry", "sklearn")


# Every public name and where it is defined: the face must hand out these very objects.
PUBLIC = {
    "STATES": "neuronwatch.states",
    "ActivationSource": "neuronwatch.monitor",
    "CheckpointError": "neuronwatch.errors",
    "ConfigError": "neuronwatch.errors",
    "Engine": "neuronwatch.engine",
    "Family": "neuronwatch.families",
    "LayerConfig": "neuronwatch.config",
    "LayerStats": "neuronwatch.stats",
    "MergeError": "neuronwatch.errors",
    "MissingExtraError": "neuronwatch.errors",
    "Monitor": "neuronwatch.monitor",
    "NeuronwatchError": "neuronwatch.errors",
    "ParamRef": "neuronwatch.wiring",
    "Partials": "neuronwatch.partials",
    "Report": "neuronwatch.report",
    "ReportError": "neuronwatch.errors",
    "ShapeError": "neuronwatch.errors",
    "Snapshot": "neuronwatch.snapshot",
    "SnapshotSource": "neuronwatch.monitor",
    "State": "neuronwatch.states",
    "Wiring": "neuronwatch.wiring",
    "__version__": "neuronwatch._version",
    "family_of": "neuronwatch.families",
}


def test_every_public_name_is_the_object_of_its_module() -> None:
    assert set(neuronwatch.__all__) == set(PUBLIC) | {"watch"}
    for name, module in PUBLIC.items():
        assert getattr(neuronwatch, name) is getattr(importlib.import_module(module), name), name
    errors = [getattr(neuronwatch, n) for n in PUBLIC if n.endswith("Error")]
    assert all(issubclass(e, neuronwatch.NeuronwatchError) for e in errors)
    assert inspect.signature(neuronwatch.watch).parameters.keys() == {"model", "options"}


def test_importing_the_core_loads_no_framework() -> None:
    code = (
        "import sys, neuronwatch, neuronwatch.cli, neuronwatch.report, neuronwatch.engine\n"
        "e = neuronwatch.Engine('m', min_rows=1); e.observe('a', [[1.0, 0.0]]); e.snapshot()\n"
        f"print(' '.join(m for m in {FRAMEWORKS!r} if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"the core imported: {out.stdout.strip()}"


def test_watch_loads_torch_lazily() -> None:
    code = (
        "import sys, neuronwatch\n"
        "assert 'torch' not in sys.modules\n"
        "import torch\n"
        "model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.ReLU())\n"
        "m = neuronwatch.watch(model, compile=False)\n"
        "print(type(m).__name__)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "Monitor"


def test_a_source_checkout_provides_the_adapters() -> None:
    # Python started in the repository root imports neuronwatch/ from the checkout, ahead of
    # any installed copy; drop the editable-install finder to see what a plain install sees.
    root = Path(__file__).resolve().parents[2]
    code = (
        "import sys\n"
        "sys.meta_path[:] = [\n"
        "    f for f in sys.meta_path if 'Editable' not in getattr(f, '__name__', '')\n"
        "]\n"
        "import neuronwatch.adapters, neuronwatch.exporters\n"
        "print(neuronwatch.adapters.__file__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True
    )
    assert Path(out.stdout.strip()) == root / "adapters" / "__init__.py"
