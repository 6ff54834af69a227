"""``neuronwatch rescue``: the command a user runs, its output, its errors."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from neuronwatch import Engine, Report

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from rescue_helpers import CLI_SIZES, invoke_rescue, linear_wiring, mlp_report, write_cli_files

SIZES = CLI_SIZES


@pytest.fixture
def files(tmp_path: Path) -> Path:
    return write_cli_files(tmp_path)


invoke = invoke_rescue


def test_dry_run_prints_the_plan_and_writes_nothing(files: Path) -> None:
    code, out = invoke("prune", files / "m.safetensors", "--report", files / "report", "--dry-run")
    assert code == 0, out
    assert out.splitlines()[:3] == [
        "prune: would change 3 neurons in 2 layers",
        "  act1: 2 dead, width 16 -> 14",
        "  act2: 1 dead, width 12 -> 11",
    ]
    assert "tensor fc2.weight [12, 16] -> [11, 14]: delete axis 1 x2, delete axis 0 x1" in out
    assert sorted(p.name for p in files.iterdir()) == ["m.safetensors", "report"]


def test_a_run_writes_the_checkpoint_and_its_manifest(files: Path) -> None:
    code, out = invoke(
        "strip",
        files / "m.safetensors",
        "--report",
        files / "report",
        "--out",
        files / "s.safetensors",
        "--fraction",
        "0.5",
        "--layers",
        "act2",
    )
    assert code == 0, out
    assert out.splitlines()[0] == "strip: changed 1 neurons in 1 layers"
    assert out.splitlines()[-1] == f"manifest: {files / 's.safetensors.manifest.json'}"
    manifest = json.loads((files / "s.safetensors.manifest.json").read_text())
    assert manifest["parameters"] == {"state": "dead", "fraction": 0.5}
    zeroed = manifest["tensors"][0]["actions"][0]["zeroed"]
    new = load_file(str(files / "s.safetensors"))
    assert (new["fc2.weight"][7, zeroed[0][1]] == 0).all()


def test_json_output_is_the_manifest(files: Path) -> None:
    code, out = invoke(
        "lift", files / "m.safetensors", "--report", files / "report", "--dry-run", "--json"
    )
    assert code == 1
    assert "take the report with neuronwatch.watch(model, pre=True)" in out
    mlp_report(SIZES, {1: [1]}, pre=True).save(files / "pre")
    code, out = invoke(
        "lift",
        files / "m.safetensors",
        "--report",
        files / "pre",
        "--dry-run",
        "--json",
        "--top",
        "5",
    )
    assert code == 0, out
    data = json.loads(out)
    assert data["parameters"] == {"state": "dead", "top": 0.05}
    assert data["layers"][0]["neurons"] == [1]


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["prune", "{m}"], 1, "Error: prune needs --report DIR"),
        (["prune", "{m}", "--report", "{r}"], 1, "Error: --out is required unless --dry-run"),
        (
            ["prune", "{m}", "--report", "{r}", "--fraction", "0.3"],
            2,
            "--fraction applies to strip",
        ),
        (["swap", "{m}", "--out", "{o}"], 1, "swap edits ONNX graphs"),
        (["strip", "{m}", "--report", "{r}", "--out", "{m}"], 1, "would overwrite the input"),
        (
            ["reinit", "{m}", "--report", "{r}", "--out", "{o}", "--layers", "fc*"],
            1,
            "matches no layer",
        ),
    ],
)
def test_errors_are_one_line_and_write_nothing(
    files: Path, args: list[str], code: int, message: str
) -> None:
    paths = {"m": files / "m.safetensors", "r": files / "report", "o": files / "o.safetensors"}
    result_code, out = invoke(*[a.format(**paths) for a in args])
    assert result_code == code
    assert message in out
    assert "Traceback" not in out
    assert sorted(p.name for p in files.iterdir()) == ["m.safetensors", "report"]


def test_a_mismatched_report_is_refused(files: Path) -> None:
    mlp_report((8, 20, 12, 4), {1: [1]}).save(files / "other")
    code, out = invoke(
        "prune", files / "m.safetensors", "--report", files / "other", "--out", files / "o"
    )
    assert code == 1
    assert "the report does not match" in out
    assert "(20, 8)" in out


def test_dormant_selects_dormant_gelu_neurons(files: Path) -> None:
    engine = Engine("gelu", min_rows=10)
    engine.add_layer("act1", "GELU")
    values = np.abs(np.random.default_rng(0).normal(size=(100, 16))) + 0.5
    values[:, 9] = 0.01  # fires (> 1e-3) on every row but is dormant
    engine.observe("act1", values)
    engine.set_wiring("act1", linear_wiring("fc1", "fc2", 16, 8, 12))
    Report.from_snapshot(engine.snapshot()).save(files / "gelu")
    code, out = invoke("reinit", files / "m.safetensors", "--report", files / "gelu", "--dry-run")
    assert code == 0
    assert out.splitlines()[0] == "reinit: would change 0 neurons in 0 layers"
    code, out = invoke(
        "reinit", files / "m.safetensors", "--report", files / "gelu", "--dry-run", "--dormant"
    )
    assert code == 0, out
    assert out.splitlines()[1] == "  act1: 1 dormant"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_swap_through_the_command(tmp_path: Path) -> None:
    import torch
    from torch import nn

    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2)).eval()
    torch.onnx.export(model, (torch.randn(2, 4),), str(tmp_path / "m.onnx"), dynamo=False)
    code, out = invoke("swap", tmp_path / "m.onnx", "--to", "gelu", "--dry-run")
    assert code == 0, out
    assert out.splitlines() == ["swap: would change 1 Relu nodes to Gelu: /1/Relu"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    code, out = invoke("swap", tmp_path / "m.onnx", "--out", tmp_path / "g.onnx", "--alpha", "0.3")
    assert code == 0, out
    assert out.splitlines()[0] == "swap: changed 1 Relu nodes to LeakyRelu: /1/Relu"
    manifest = json.loads((tmp_path / "g.onnx.manifest.json").read_text())
    assert manifest["parameters"]["alpha"] == 0.3


@pytest.mark.parametrize("flag", [(), ("--fsync",)])
def test_fsync_syncs_the_checkpoint_and_manifest_only_when_asked(
    files: Path, monkeypatch: pytest.MonkeyPatch, flag: tuple[str, ...]
) -> None:
    import os

    synced: list[str] = []
    real = os.fsync

    def record(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        real(fd)

    monkeypatch.setattr(os, "fsync", record)
    out_path = files / "p.safetensors"
    code, out = invoke(
        "prune", files / "m.safetensors", "--report", files / "report", "--out", out_path, *flag
    )
    assert code == 0, out
    # Temporary names: ".<target>.<random>.tmp", then the folder that holds the new names.
    files_synced = [Path(path) for path in synced if Path(path) != files]
    names = sorted(path.name[1:].removesuffix(".tmp").rsplit(".", 1)[0] for path in files_synced)
    assert names == (["p.safetensors", "p.safetensors.manifest.json"] if flag else [])
    assert synced[len(files_synced) :] == ([str(files)] if flag else [])
    assert load_file(str(out_path))["fc1.weight"].shape == (14, SIZES[0])
