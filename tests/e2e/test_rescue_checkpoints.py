"""PyTorch files as users save them: training checkpoints with Adam moments, files that want to
run code, truncated files, tied weights; and activations swapped in a live model."""

from __future__ import annotations

import os
import pathlib
from pathlib import Path

import pytest
import torch
from rescue_models import audit, build, data, plant_dead_by_bias
from torch import nn

from neuronwatch import rescue
from neuronwatch.rescue import CheckpointError

DEAD1, DEAD2 = [0, 5, 17], [3, 11]


def trained(kind: str, named: bool) -> tuple[nn.Module, torch.optim.Optimizer, torch.Tensor]:
    model = build(kind)
    plant_dead_by_bias(model, kind)
    x = data(kind)
    params = model.named_parameters() if named else model.parameters()
    optimizer = torch.optim.Adam(params, lr=1e-3)
    for chunk in x.split(300):
        optimizer.zero_grad()
        model(chunk).square().mean().backward()
        optimizer.step()
    return model, optimizer, x


def save_training(tmp_path: Path, kind: str, named: bool) -> tuple[Path, nn.Module, torch.Tensor]:
    model, optimizer, x = trained(kind, named)
    model.eval()
    audit(model, x).save(tmp_path / "report")
    checkpoint = {
        "epoch": 3,
        "model_state_dict": model.state_dict(),
        "optimizer": optimizer.state_dict(),
    }
    torch.save(checkpoint, tmp_path / "train.pt")
    return tmp_path / "train.pt", model, x


def moments(checkpoint: dict, name: str, named_order: list[str]) -> dict[str, torch.Tensor]:
    index = named_order.index(name)
    state: dict[str, torch.Tensor] = checkpoint["optimizer"]["state"][index]
    return state


@pytest.mark.parametrize("named", [True, False], ids=["param_names", "order"])
def test_reinit_resets_the_adam_moments_of_the_touched_rows_and_columns(
    tmp_path: Path, named: bool
) -> None:
    path, model, _ = save_training(tmp_path, "mlp", named)
    manifest = rescue.reinit(path, tmp_path / "report", tmp_path / "new.pt")
    assert manifest.notes["optimizer"]["mapped_by"] == ("param_names" if named else "order")
    old = torch.load(path, weights_only=True)
    new = torch.load(tmp_path / "new.pt", weights_only=True)
    assert new["epoch"] == 3
    order = [n for n, _ in model.named_parameters()]
    for key in ("exp_avg", "exp_avg_sq"):
        before = moments(old, "fc1.weight", order)[key]
        after = moments(new, "fc1.weight", order)[key]
        assert (after[DEAD1] == 0).all()
        live = [i for i in range(32) if i not in DEAD1]
        torch.testing.assert_close(after[live], before[live], rtol=0, atol=0)
        consumer = moments(new, "fc2.weight", order)[key]
        assert (consumer[:, DEAD1] == 0).all()
        assert (consumer[DEAD2] == 0).all()
        assert (moments(new, "fc3.weight", order)[key][:, DEAD2] == 0).all()
        assert (moments(new, "fc1.bias", order)[key][DEAD1] == 0).all()
    assert moments(new, "fc1.weight", order)["step"] == moments(old, "fc1.weight", order)["step"]


def test_prune_shrinks_the_moments_and_training_resumes(tmp_path: Path) -> None:
    # param_names: by order, the BatchNorms' weight and bias (one shape) could be swapped
    # unseen, and that mapping is refused (test_rescue_torch_refusals.py).
    path, model, x = save_training(tmp_path, "conv", named=True)
    manifest = rescue.prune(path, tmp_path / "report", tmp_path / "pruned.pt")
    widths = [manifest.widths["act1"], manifest.widths["act2"]]
    assert widths == [6, 7]
    new = torch.load(tmp_path / "pruned.pt", weights_only=True)
    pruned = build("conv", widths)
    pruned.load_state_dict(new["model_state_dict"])  # BatchNorm running stats pruned too
    assert new["model_state_dict"]["bn1.running_mean"].shape == (6,)
    torch.testing.assert_close(pruned(x[:4]), model(x[:4]), atol=1e-5, rtol=0)
    optimizer = torch.optim.Adam(pruned.parameters(), lr=1e-3)
    optimizer.load_state_dict(new["optimizer"])
    assert optimizer.state[pruned.conv2.weight]["exp_avg"].shape == (7, 6, 3, 3)
    pruned.train()
    pruned(x[:8]).square().mean().backward()
    optimizer.step()  # shapes agree everywhere, or this raises


def test_a_pickle_that_runs_code_is_refused_and_never_executed(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (pathlib.Path.touch, (marker,))

    model = build("mlp")
    torch.save({"model": model.state_dict(), "hook": Payload()}, tmp_path / "evil.pt")
    audit(model, data("mlp")).save(tmp_path / "report")
    with pytest.raises(CheckpointError, match=r"needs code to load \(\w+.*never runs"):
        rescue.prune(tmp_path / "evil.pt", tmp_path / "report", tmp_path / "out.pt")
    assert not marker.exists()
    assert not (tmp_path / "out.pt").exists()
    # The payload is real: a plain unpickler would have run it.
    torch.load(tmp_path / "evil.pt", weights_only=False)
    assert marker.exists()


def test_a_truncated_file_is_refused(tmp_path: Path) -> None:
    model = build("mlp")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    data_ = (tmp_path / "m.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data_[: len(data_) // 2])
    audit(model, data("mlp")).save(tmp_path / "report")
    with pytest.raises(CheckpointError, match="truncated or not a PyTorch checkpoint"):
        rescue.reinit(tmp_path / "cut.pt", tmp_path / "report", tmp_path / "out.pt")
    assert sorted(os.listdir(tmp_path)) == ["cut.pt", "m.pt", "report"]


def test_tied_tensors_are_skipped(tmp_path: Path) -> None:
    model = build("mlp")
    plant_dead_by_bias(model, "mlp")
    x = data("mlp")
    audit(model, x).save(tmp_path / "report")
    state = model.state_dict()
    state["head_copy.weight"] = state["fc2.weight"]  # same storage, as tied weights are saved
    torch.save(state, tmp_path / "tied.pt")
    manifest = rescue.reinit(tmp_path / "tied.pt", tmp_path / "report", tmp_path / "out.pt")
    reasons = {s["layer"]: s["reason"] for s in manifest.skipped}
    assert "tied weights" in reasons["act1"]
    assert "tied weights" in reasons["act2"]
    assert manifest.layers == []


def test_swap_activations_replaces_relus_in_place() -> None:
    model = build("mlp")
    x = data("mlp")
    swapped = rescue.swap_activations(model, "leaky_relu", negative_slope=0.1)
    assert swapped == ["act1", "act2"]
    assert isinstance(model.act1, nn.LeakyReLU)
    assert model.act1.negative_slope == 0.1
    reference = nn.Sequential(model.fc1, nn.LeakyReLU(0.1), model.fc2, nn.LeakyReLU(0.1), model.fc3)
    torch.testing.assert_close(model(x), reference(x))


def test_swap_reaches_a_transformer_layers_functional_relu_and_its_fast_path() -> None:
    model = build("transformer").eval()
    x = data("transformer")[:4]
    assert rescue.swap_activations(model, "gelu") == [
        "layers.0.activation",
        "layers.1.activation",
    ]
    reference = build("transformer").eval()
    for layer in reference.layers:
        layer.activation = torch.nn.functional.gelu
        layer.activation_relu_or_gelu = 2
    with torch.no_grad():  # eval + no_grad: the fused inference kernel runs
        torch.testing.assert_close(model(x), reference(x))
        relu = build("transformer").eval()
        assert not torch.allclose(model(x), relu(x))


def test_legacy_files_and_extra_state_entries_load(tmp_path: Path) -> None:
    model = build("mlp")
    plant_dead_by_bias(model, "mlp")
    x = data("mlp")
    audit(model, x).save(tmp_path / "report")
    state = dict(model.state_dict())
    state["fc3._extra_state"] = b"opaque"  # what a module's get_extra_state() may save
    torch.save({"model": state}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    rescue.prune(tmp_path / "old.pt", tmp_path / "report", tmp_path / "new.pt")
    new = torch.load(tmp_path / "new.pt", weights_only=True)["model"]
    assert new["fc3._extra_state"] == b"opaque"
    assert new["fc1.weight"].shape == (29, 8)
