"""Wiring found by tensor identity in the traced pass: producing/consuming parameter names, shapes
and axes for Linear, Conv, Conv+BatchNorm and Hugging Face GPT-2's transposed Conv1D; and the
active-parameter ratio computed from it."""

from __future__ import annotations

import os
from collections import OrderedDict

import pytest
import torch
from torch import nn
from torch_models import conv_bn_relu, conv_relu_conv_relu

import neuronwatch
from neuronwatch import ParamRef, Wiring


def refs(*entries: tuple[str, tuple[int, ...], int]) -> set[ParamRef]:
    return {ParamRef(name, shape, axis) for name, shape, axis in entries}


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(8, 16),
            act1=nn.ReLU(),
            drop=nn.Dropout(0.1),
            fc2=nn.Linear(16, 12),
            act2=nn.ReLU(),
            fc3=nn.Linear(12, 4),
        )
    )


def test_linear_wiring() -> None:
    model = mlp()
    with neuronwatch.watch(model, compile=False) as monitor:
        model(torch.randn(4, 8))
        wiring = monitor.snapshot().wiring
    first, second = wiring["act1"], wiring["act2"]
    assert first.feature_axis == -1
    assert first.producer == "fc1"
    assert first.consumer == "fc2"  # found through the Dropout
    assert set(first.produces) == refs(("fc1.weight", (16, 8), 0), ("fc1.bias", (16,), 0))
    assert set(first.consumes) == refs(("fc2.weight", (12, 16), 1))
    assert second.producer == "fc2"
    assert second.consumer == "fc3"
    assert set(second.produces) == refs(("fc2.weight", (12, 16), 0), ("fc2.bias", (12,), 0))
    assert set(second.consumes) == refs(("fc3.weight", (4, 12), 1))


def test_conv_wiring() -> None:
    model = conv_relu_conv_relu()
    with neuronwatch.watch(model, compile=False) as monitor:
        model(torch.randn(2, 3, 11, 13))
        wiring = monitor.snapshot().wiring
    first = wiring["act1"]
    assert first.feature_axis == 1
    assert (first.producer, first.consumer) == ("conv1", "conv2")
    assert set(first.produces) == refs(("conv1.weight", (8, 3, 3, 3), 0), ("conv1.bias", (8,), 0))
    assert set(first.consumes) == refs(("conv2.weight", (6, 8, 3, 3), 1))
    assert wiring["act2"].consumer is None
    assert wiring["act2"].consumes == ()


def test_conv_batchnorm_relu_wiring() -> None:
    model = conv_bn_relu()
    with neuronwatch.watch(model, compile=False) as monitor:
        model(torch.randn(2, 3, 9, 9))
        wiring = monitor.snapshot().wiring["act"]
    assert wiring.feature_axis == 1
    assert wiring.producer == "conv"  # walked back through the BatchNorm
    assert wiring.consumer == "conv2"
    assert set(wiring.produces) == refs(
        ("bn.weight", (8,), 0), ("bn.bias", (8,), 0), ("conv.weight", (8, 3, 3, 3), 0)
    )
    assert set(wiring.consumes) == refs(("conv2.weight", (4, 8, 1, 1), 1))


def test_active_parameter_ratio_by_hand() -> None:
    model = mlp()
    dead_1, dead_2 = [0, 7, 15], [3, 4]
    with torch.no_grad():
        model.fc1.bias[dead_1] = -50.0
        model.fc2.bias[dead_2] = -50.0
    model.eval()
    with neuronwatch.watch(model, compile=False, min_rows=100) as monitor:
        model(torch.randn(256, 8))
        report = monitor.report()
    assert report.layers["act1"].dead_indices.tolist() == dead_1
    assert report.layers["act2"].dead_indices.tolist() == dead_2
    d1, d2 = len(dead_1), len(dead_2)
    # fc1.weight [16,8] + fc1.bias [16] + fc2.weight [12,16] + fc2.bias [12] + fc3.weight [4,12]
    total = 16 * 8 + 16 + 12 * 16 + 12 + 4 * 12
    active = (
        (16 - d1) * 8  # fc1.weight rows of live act1 neurons
        + (16 - d1)  # fc1.bias
        + (12 - d2) * (16 - d1)  # fc2.weight: live act2 row and live act1 column
        + (12 - d2)  # fc2.bias
        + 4 * (12 - d2)  # fc3.weight columns of live act2 neurons
    )
    assert (total, active) == (396, 297)
    assert report.active_parameter_ratio() == pytest.approx(active / total)
    assert monitor.snapshot().active_parameter_ratio() == pytest.approx(active / total)
    assert report.summary()["totals"]["active_parameter_ratio"] == pytest.approx(active / total)


class Flaky(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 6)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(6, 2)
        self.fail = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.fail:
            raise RuntimeError("data loader hiccup")
        return self.fc2(h)


def test_wiring_complete_after_the_first_traced_pass_failed() -> None:
    model = Flaky()
    with neuronwatch.watch(model, compile=False) as monitor:
        with pytest.raises(RuntimeError, match="hiccup"):
            model(torch.randn(3, 4))
        model.fail = False
        model(torch.randn(3, 4))  # traced again, completely this time
        wiring = monitor.snapshot().wiring["act"]
    assert wiring.producer == "fc1"
    assert wiring.consumer == "fc2"
    assert set(wiring.produces) == refs(("fc1.weight", (6, 4), 0), ("fc1.bias", (6,), 0))
    assert set(wiring.consumes) == refs(("fc2.weight", (2, 6), 1))


# -- Hugging Face GPT-2 ---------------------------------------------------------------------------


def make_gpt2(activation: str = "gelu_new") -> nn.Module:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import transformers

    config = transformers.GPT2Config(
        n_layer=2, n_embd=64, n_head=4, vocab_size=100, n_positions=32,
        bos_token_id=0, eos_token_id=0, activation_function=activation,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.GPT2Model(config)
    with torch.no_grad():
        model.h[0].mlp.c_fc.bias[[0, 17, 255]] = -50.0
        model.h[1].mlp.c_fc.bias[[5]] = -50.0
    return model.eval()


@pytest.fixture(scope="module")
def gpt2() -> nn.Module:
    return make_gpt2()


def watch_gpt2(model: nn.Module) -> neuronwatch.Report:
    with neuronwatch.watch(model, compile=False, min_rows=32) as monitor:
        assert monitor.layers == ("h.0.mlp.act", "h.1.mlp.act")
        with torch.no_grad():
            for _ in range(4):
                model(torch.randint(0, 100, (2, 8)))
        return monitor.report()


def test_gpt2_activations_found_automatically(gpt2: nn.Module) -> None:
    from neuronwatch.adapters.torch import find_activations

    assert find_activations(gpt2) == ["h.0.mlp.act", "h.1.mlp.act"]
    assert type(gpt2.h[0].mlp.act).__name__ == "NewGELUActivation"
    report = watch_gpt2(gpt2)
    first = report.layers["h.0.mlp.act"]
    assert first.config.activation == "NewGELUActivation"
    assert first.config.family == "smooth"
    assert first.rows == 4 * 2 * 8
    assert first.neurons == 256
    # GELU passes gradient below zero: the planted neurons never fire but are not dead.
    assert first.indices("leaking").tolist() == [0, 17, 255]
    assert report.layers["h.1.mlp.act"].indices("leaking").tolist() == [5]
    assert report.count("dead") == 0
    assert report.active_parameter_ratio() == 1.0


def test_gpt2_relu_dead_parameters_counted_through_conv1d() -> None:
    report = watch_gpt2(make_gpt2("relu"))
    assert report.layers["h.0.mlp.act"].dead_indices.tolist() == [0, 17, 255]
    assert report.layers["h.1.mlp.act"].dead_indices.tolist() == [5]
    per_layer = 64 * 256 + 256 + 256 * 64  # c_fc.weight, c_fc.bias, c_proj.weight
    inactive = (3 + 1) * (64 + 1 + 64)
    assert report.active_parameter_ratio() == pytest.approx(
        (2 * per_layer - inactive) / (2 * per_layer)
    )


def test_gpt2_conv1d_transposed_wiring(gpt2: nn.Module) -> None:
    with neuronwatch.watch(gpt2, compile=False) as monitor, torch.no_grad():
        gpt2(torch.randint(0, 100, (1, 6)))
        wiring = monitor.snapshot().wiring
    assert set(wiring) == {"h.0.mlp.act", "h.1.mlp.act"}
    w = wiring["h.0.mlp.act"]
    assert isinstance(w, Wiring)
    assert w.feature_axis == -1
    assert (w.producer, w.consumer) == ("h.0.mlp.c_fc", "h.0.mlp.c_proj")
    # Conv1D stores its weight as [in, out]: the neurons are axis 1 of c_fc, axis 0 of c_proj.
    assert set(w.produces) == refs(
        ("h.0.mlp.c_fc.weight", (64, 256), 1), ("h.0.mlp.c_fc.bias", (256,), 0)
    )
    assert set(w.consumes) == refs(("h.0.mlp.c_proj.weight", (256, 64), 0))
    assert wiring["h.1.mlp.act"].producer == "h.1.mlp.c_fc"
