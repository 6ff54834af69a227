"""Activations applied as functions: nn.TransformerEncoderLayer's feed-forward neurons are
found by themselves, ``inputs=`` watches a module's input features, and a functional activation
nobody watches is named in one warning instead of being skipped in silence."""

from __future__ import annotations

import logging
from collections import OrderedDict

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

import neuronwatch  # noqa: E402


def never_fired(values: torch.Tensor) -> list[int]:
    flat = values.detach().reshape(-1, values.shape[-1])
    return torch.nonzero((flat > 0).sum(0) == 0).flatten().tolist()


def encoder(activation: str = "relu") -> nn.TransformerEncoder:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(
        d_model=16, nhead=2, dim_feedforward=32, activation=activation, batch_first=True
    )
    model = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
    with torch.no_grad():
        model.layers[0].linear1.bias[[3, 30]] = -50.0
        model.layers[1].linear1.bias[[0]] = -50.0
    return model


def reference(model: nn.TransformerEncoder, xs: list[torch.Tensor]) -> dict[str, list[int]]:
    """ReLU of linear1's outputs, captured with plain hooks in a separate pass."""
    outs: dict[str, list[torch.Tensor]] = {"layers.0": [], "layers.1": []}
    handles = [
        model.layers[i].linear1.register_forward_hook(
            lambda m, a, out, key=f"layers.{i}": outs[key].append(torch.relu(out))
        )
        for i in range(2)
    ]
    with torch.no_grad():
        for x in xs:
            model(x)
    for handle in handles:
        handle.remove()
    return {key: never_fired(torch.cat(values)) for key, values in outs.items()}


@pytest.mark.parametrize("train", [False, True])
def test_transformer_encoder_layer_feed_forward_neurons_are_found(train: bool) -> None:
    model = encoder().train(train)
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(3, 7, 16, generator=gen) for _ in range(3)]
    torch.manual_seed(2)  # the same dropout masks in both passes
    with neuronwatch.watch(model, compile=False, min_rows=20) as monitor:
        assert monitor.layers == ("layers.0.activation", "layers.1.activation")
        with torch.no_grad():
            for x in xs:
                model(x)
        report = monitor.report()
    torch.manual_seed(2)
    expected = reference(model, xs)
    first = report.layers["layers.0.activation"]
    assert first.config.activation == "ReLU"
    assert first.rows == 3 * 3 * 7
    assert first.neurons == 32
    assert first.dead_indices.tolist() == expected["layers.0"] == [3, 30]
    assert report.layers["layers.1.activation"].dead_indices.tolist() == expected["layers.1"]
    wiring = report.wiring["layers.0.activation"]
    assert (wiring.producer, wiring.consumer) == ("layers.0.linear1", "layers.0.linear2")
    assert {p.name for p in wiring.consumes} == {"layers.0.linear2.weight"}


def test_gelu_encoder_layer_is_smooth() -> None:
    model = encoder("gelu").eval()
    with neuronwatch.watch(model, compile=False, min_rows=5) as monitor:
        model(torch.randn(2, 5, 16))
        layer = monitor.report().layers["layers.0.activation"]
    assert layer.config.activation == "GELU"
    assert layer.config.family == "smooth"
    assert layer.indices("leaking").tolist() == [3, 30]


class FunctionalMLP(nn.Module):
    """A custom MLP with one activation module and one functional GELU."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(4, 8)
        self.act1 = nn.ReLU()
        self.fc2 = nn.Linear(8, 12)
        self.fc3 = nn.Linear(12, 2)
        with torch.no_grad():
            self.fc2.bias[[5]] = -50.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.gelu(self.fc2(self.act1(self.fc1(x)))))


def test_an_unwatched_functional_activation_is_named_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="neuronwatch")
    model = FunctionalMLP()
    with neuronwatch.watch(model, compile=False) as monitor:
        for _ in range(3):
            model(torch.randn(4, 4))
        assert monitor.layers == ("act1",)
    warnings = [r.getMessage() for r in caplog.records if r.name.startswith("neuronwatch")]
    assert len(warnings) == 1, warnings
    assert "GELU" in warnings[0]
    assert "'fc3'" in warnings[0]
    assert "inputs=['fc3']" in warnings[0]


def test_inputs_watch_the_input_features_of_a_module() -> None:
    model = FunctionalMLP()
    gen = torch.Generator().manual_seed(3)
    xs = [torch.randn(16, 4, generator=gen) for _ in range(2)]
    with neuronwatch.watch(model, inputs=["fc3"], compile=False, min_rows=10) as monitor:
        for x in xs:
            model(x)
        report = monitor.report()
    layer = report.layers["fc3:input"]
    assert layer.config.activation == "GELU"  # found in the traced forward
    assert layer.neurons == 12
    assert layer.rows == 32
    with torch.no_grad():
        gelu = torch.cat([F.gelu(model.fc2(model.act1(model.fc1(x)))) for x in xs])
    expected = torch.nonzero((gelu > 1e-3).sum(0) == 0).flatten().tolist()
    assert 5 in expected
    assert layer.indices("leaking").tolist() == expected
    wiring = report.wiring["fc3:input"]
    assert wiring.consumer == "fc3"
    assert wiring.producer == "fc2"  # walked back through F.gelu
    named = neuronwatch.watch(FunctionalMLP(), inputs={"fc3": "relu"}, compile=False)
    FunctionalMLP()(torch.randn(2, 4))
    named.close()
    assert named.engine.config("fc3:input").activation == "relu"


def test_inputs_patterns_that_match_nothing_are_refused() -> None:
    with pytest.raises(neuronwatch.ConfigError, match="inputs: 'fc9'"):
        neuronwatch.watch(FunctionalMLP(), inputs=["fc9"])


def test_a_pure_functional_model_with_inputs_needs_no_activation_module() -> None:
    model = nn.Sequential(OrderedDict(fc1=nn.Linear(3, 5), fc2=nn.Linear(5, 1)))
    with pytest.raises(neuronwatch.ConfigError, match="inputs="):
        neuronwatch.watch(model)
    with neuronwatch.watch(model, inputs=["fc2"], compile=False, min_rows=1) as monitor:
        model(torch.randn(2, 3))
        assert monitor.report().layers["fc2:input"].rows == 2


def test_pre_watches_the_input_of_a_functional_transformer_activation() -> None:
    model = encoder().eval()
    x = torch.randn(2, 5, 16)
    with neuronwatch.watch(model, compile=False, min_rows=5, pre=True) as monitor:
        model(x)
        report = monitor.report()
    pre = report.layers["layers.0.activation:pre"]
    post = report.layers["layers.0.activation"]
    assert pre.kind == "pre"
    assert pre.rows == post.rows == 10
    assert (pre.partials.max[[3, 30]] < -40).all()  # the planted -50 bias, before the ReLU
    assert report.wiring["layers.0.activation:pre"] == report.wiring["layers.0.activation"]


def test_a_watched_linear_is_its_own_producer() -> None:
    model = FunctionalMLP()
    with neuronwatch.watch(model, layers=["fc2"], compile=False, min_rows=1) as monitor:
        model(torch.randn(4, 4))
        report = monitor.report()
    wiring = report.wiring["fc2"]
    assert wiring.producer == "fc2"
    assert {p.name for p in wiring.produces} == {"fc2.weight", "fc2.bias"}
    assert report.active_parameter_ratio() is not None  # consistent with fc2's 12 neurons
