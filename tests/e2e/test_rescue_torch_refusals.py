"""What the report's wiring and a training checkpoint cannot tell rescue, it refuses or skips:
optimizer moments matched by an order that shapes cannot verify, and a norm without weight and
bias that no wiring places."""

from __future__ import annotations

import itertools
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from rescue_models import audit
from safetensors.torch import load_file, save_file
from torch import nn

from neuronwatch import rescue
from neuronwatch.rescue import CheckpointError

DEAD = [0, 5, 7]


def _square_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(16, 16), act1=nn.ReLU(), fc2=nn.Linear(16, 16), act2=nn.ReLU(),
            fc3=nn.Linear(16, 16),
        )
    )  # fmt: skip


def _train_in_reverse(tmp_path: Path, named: bool) -> tuple[Path, nn.Sequential]:
    """Adam given fc3, fc2, fc1 (not the state_dict's order), every layer 16 x 16."""
    model = _square_mlp()
    x = torch.randn(1000, 16, generator=torch.Generator().manual_seed(1))
    modules = (model.fc3, model.fc2, model.fc1)
    if named:
        prefixes = ("fc3", "fc2", "fc1")
        params: object = [
            (f"{prefix}.{key}", value)
            for prefix, module in zip(prefixes, modules, strict=True)
            for key, value in module.named_parameters()
        ]
    else:
        params = itertools.chain(*(m.parameters() for m in modules))
    return _train_and_save(tmp_path, model, x, params), model


def _train_and_save(tmp_path: Path, model: nn.Sequential, x: torch.Tensor, params: object) -> Path:
    """Three Adam steps on ``params``, fc1's DEAD neurons planted, the audit saved as
    ``report`` and model and optimizer as ``train.pt``."""
    optimizer = torch.optim.Adam(params, lr=1e-3)  # type: ignore[arg-type]
    for _ in range(3):
        optimizer.zero_grad()
        model(x).square().mean().backward()
        optimizer.step()
    with torch.no_grad():
        model.fc1.bias[DEAD] = -100.0
    audit(model, x).save(tmp_path / "report")
    path = tmp_path / "train.pt"
    torch.save({"model": model.state_dict(), "optimizer": optimizer.state_dict()}, path)
    return path


def test_moments_matched_by_an_unverifiable_order_are_refused(tmp_path: Path) -> None:
    path, _ = _train_in_reverse(tmp_path, named=False)
    with pytest.raises(CheckpointError) as raised:
        rescue.reinit(path, tmp_path / "report", tmp_path / "new.pt")
    message = str(raised.value)
    assert "has no param_names and 'fc1.bias' shares its shape with another parameter" in message
    assert "model.named_parameters()" in message
    assert "\n" not in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report", "train.pt"]


def test_the_same_order_with_param_names_resets_the_right_moments(tmp_path: Path) -> None:
    path, _ = _train_in_reverse(tmp_path, named=True)
    manifest = rescue.reinit(path, tmp_path / "report", tmp_path / "new.pt")
    assert manifest.notes["optimizer"]["mapped_by"] == "param_names"
    old = torch.load(path, weights_only=True)["optimizer"]["state"]
    new = torch.load(tmp_path / "new.pt", weights_only=True)["optimizer"]["state"]
    # Optimizer ids follow the chain: fc3.weight 0, fc3.bias 1, ..., fc1.weight 4.
    assert (new[4]["exp_avg"][DEAD] == 0).all()
    torch.testing.assert_close(new[0]["exp_avg"], old[0]["exp_avg"], rtol=0, atol=0)
    assert (new[2]["exp_avg"][:, DEAD] == 0).all()  # fc2.weight: the outgoing columns


def _affine_free_norm(width: int = 16) -> nn.Sequential:
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(8, width), act1=nn.ReLU(), bn=nn.BatchNorm1d(width, affine=False),
            fc2=nn.Linear(width, 4),
        )
    )  # fmt: skip


@pytest.mark.parametrize("op", ["reinit", "prune"])
def test_a_norm_without_weight_and_bias_skips_the_layer(tmp_path: Path, op: str) -> None:
    torch.manual_seed(0)
    model = _affine_free_norm()
    with torch.no_grad():
        model.fc1.bias[[0, 5]] = -100.0
        model.bn.running_mean.uniform_(0.1, 0.5)
        model.bn.running_var.uniform_(0.5, 1.5)
    model.eval()
    x = torch.randn(2000, 8, generator=torch.Generator().manual_seed(1))
    report = audit(model, x)
    assert report.layers["act1"].dead_indices.tolist() == [0, 5]
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    manifest = getattr(rescue, op)(tmp_path / "m.safetensors", report, tmp_path / "o.safetensors")
    assert manifest.layers == []
    [skip] = manifest.skipped
    assert skip["layer"] == "act1"
    assert "running statistics of this layer's width ('bn')" in skip["reason"]
    assert "BatchNorm1d(affine=False)" in skip["reason"]
    again = _affine_free_norm()
    again.load_state_dict(load_file(tmp_path / "o.safetensors"))
    again.eval()
    with torch.no_grad():
        torch.testing.assert_close(again(x), model(x), rtol=0, atol=0)
    # strip acts on the incoming weights only: the norm does not matter to it.
    stripped = rescue.strip(tmp_path / "m.safetensors", report, tmp_path / "s.safetensors")
    assert [layer["layer"] for layer in stripped.layers] == ["act1"]


def test_an_optimizer_in_the_state_dicts_order_can_be_trusted_explicitly(tmp_path: Path) -> None:
    # The common case, Adam(model.parameters()): refused by default (shapes repeat, the order
    # cannot be checked), accepted with trust_optimizer_order, and then the right moments go.
    model = _square_mlp()
    x = torch.randn(1000, 16, generator=torch.Generator().manual_seed(1))
    path = _train_and_save(tmp_path, model, x, model.parameters())
    with pytest.raises(CheckpointError, match="--trust-optimizer-order"):
        rescue.reinit(path, tmp_path / "report", tmp_path / "refused.pt")
    manifest = rescue.reinit(
        path, tmp_path / "report", tmp_path / "new.pt", trust_optimizer_order=True
    )
    assert manifest.notes["optimizer"]["mapped_by"] == "order (trusted: --trust-optimizer-order)"
    old = torch.load(path, weights_only=True)["optimizer"]["state"]
    new = torch.load(tmp_path / "new.pt", weights_only=True)["optimizer"]["state"]
    # model.parameters() order: fc1.weight 0, fc1.bias 1, fc2.weight 2, ...
    assert (new[0]["exp_avg"][DEAD] == 0).all()
    assert (new[2]["exp_avg"][:, DEAD] == 0).all()
    torch.testing.assert_close(new[4]["exp_avg"], old[4]["exp_avg"], rtol=0, atol=0)
    alive = [i for i in range(16) if i not in DEAD]
    torch.testing.assert_close(new[0]["exp_avg"][alive], old[0]["exp_avg"][alive], rtol=0, atol=0)
