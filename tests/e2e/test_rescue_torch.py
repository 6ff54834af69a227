"""Rescue on real torch models (an MLP, a conv net with BatchNorm, a small Transformer) with
planted dead neurons, audited by neuronwatch: reinit and prune keep the outputs on the audit
data within 1e-5; strip, reinit and lift bring the planted neurons back on re-audit."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from rescue_models import (
    LAYERS,
    audit,
    build,
    data,
    dead,
    outputs,
    plant_dead_by_bias,
    plant_dead_by_weights,
)
from safetensors.torch import load_file, save_file

from neuronwatch import rescue

KINDS = ["mlp", "conv", "transformer"]
SUFFIX = {"mlp": ".safetensors", "conv": ".pt", "transformer": ".safetensors"}


def save(model: torch.nn.Module, path: Path) -> Path:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if path.suffix == ".safetensors":
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path


def load(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        return load_file(str(path))
    loaded: dict[str, torch.Tensor] = torch.load(path, weights_only=True)
    return loaded


def setup(
    kind: str, tmp_path: Path, plant: str = "bias"
) -> tuple[torch.nn.Module, torch.Tensor, Path, Path]:
    model = build(kind)
    if plant == "bias":
        plant_dead_by_bias(model, kind)
    else:
        plant_dead_by_weights(model, kind)
    x = data(kind)
    audit(model, x).save(tmp_path / "report")
    checkpoint = save(model, tmp_path / f"model{SUFFIX[kind]}")
    return model, x, checkpoint, tmp_path / "report"


def reloaded(kind: str, path: Path, widths: list[int] | None = None) -> torch.nn.Module:
    model = build(kind, widths)
    model.load_state_dict(load(path))
    return model


@pytest.mark.parametrize("kind", KINDS)
def test_the_audit_finds_exactly_the_planted_neurons(kind: str, tmp_path: Path) -> None:
    model, x, _, _ = setup(kind, tmp_path)
    assert dead(audit(model, x)) == {layer: n for layer, _, n in LAYERS[kind]}


@pytest.mark.parametrize("kind", KINDS)
def test_reinit_keeps_the_outputs_and_revives_the_dead(kind: str, tmp_path: Path) -> None:
    model, x, checkpoint, report = setup(kind, tmp_path)
    before = checkpoint.read_bytes()
    manifest = rescue.reinit(checkpoint, report, tmp_path / f"new{checkpoint.suffix}")
    assert checkpoint.read_bytes() == before
    assert manifest.neurons == sum(len(n) for _, _, n in LAYERS[kind])
    new = reloaded(kind, tmp_path / f"new{checkpoint.suffix}")
    torch.testing.assert_close(outputs(new, x), outputs(model, x), atol=1e-5, rtol=0)
    assert all(not neurons for neurons in dead(audit(new, x)).values())


@pytest.mark.parametrize("kind", KINDS)
def test_prune_removes_the_dead_and_keeps_the_outputs(kind: str, tmp_path: Path) -> None:
    model, x, checkpoint, report = setup(kind, tmp_path)
    out = tmp_path / f"pruned{checkpoint.suffix}"
    manifest = rescue.prune(checkpoint, report, out)
    planted = [(layer, n) for layer, _, n in LAYERS[kind]]
    widths = [manifest.widths[layer] for layer, _ in planted]
    full = [build(kind).state_dict()[name].shape[0] for _, name, _ in LAYERS[kind]]
    assert widths == [w - len(n) for w, (_, n) in zip(full, planted, strict=True)]
    new = reloaded(kind, out, widths)
    torch.testing.assert_close(outputs(new, x), outputs(model, x), atol=1e-5, rtol=0)
    assert all(not neurons for neurons in dead(audit(new, x)).values())
    assert out.stat().st_size < checkpoint.stat().st_size


@pytest.mark.parametrize("kind", KINDS)
def test_strip_revives_neurons_killed_by_negative_weights(kind: str, tmp_path: Path) -> None:
    model = build(kind)
    layer, planted = plant_dead_by_weights(model, kind)
    x = data(kind)
    report = audit(model, x)
    assert set(planted) <= set(report.layers[layer].dead_indices.tolist())
    report.save(tmp_path / "report")
    checkpoint = save(model, tmp_path / f"model{SUFFIX[kind]}")
    manifest = rescue.strip(checkpoint, tmp_path / "report", tmp_path / f"s{checkpoint.suffix}")
    zeroed = {
        a["layer"]: a["zeroed"]
        for t in manifest.tensors
        for a in t["actions"]
        if a["layer"] == layer
    }
    assert set(planted) <= {n for n, _ in zeroed[layer]}
    after = audit(reloaded(kind, tmp_path / f"s{checkpoint.suffix}"), x)
    assert not set(planted) & set(after.layers[layer].dead_indices.tolist())
    assert after.count("dead") < report.count("dead")


@pytest.mark.parametrize("kind", KINDS)
def test_lift_makes_the_dead_fire_on_about_the_top_rows(kind: str, tmp_path: Path) -> None:
    _, x, checkpoint, report = setup(kind, tmp_path)
    manifest = rescue.lift(checkpoint, report, tmp_path / f"l{checkpoint.suffix}", top=0.1)
    assert manifest.neurons == sum(len(n) for _, _, n in LAYERS[kind])
    after = audit(reloaded(kind, tmp_path / f"l{checkpoint.suffix}"), x)
    for layer, _, neurons in LAYERS[kind]:
        stats = after.layers[layer]
        assert not set(neurons) & set(stats.dead_indices.tolist())
        # Lifted on the first layer's statistics: later layers see changed inputs, so only
        # the first planted layer is held to the 10 % target.
        if layer == LAYERS[kind][0][0]:
            assert 0.03 < stats.frequency[neurons].min() <= stats.frequency[neurons].max() < 0.25
