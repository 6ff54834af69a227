"""Choosing what to watch: ``layers=`` names and globs, ``feature_axis=``, ``overrides=`` and
the errors that name the bad argument."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import neuronwatch
from neuronwatch import ConfigError


class Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 6)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc(x))


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([Block() for _ in range(3)])
        self.head = nn.Linear(6, 2)
        self.out_act = nn.Tanh()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return self.out_act(self.head(x))


def watched(**options: object) -> tuple[str, ...]:
    with neuronwatch.watch(Net(), compile=False, **options) as monitor:
        return monitor.layers


def test_default_watches_every_activation_module() -> None:
    assert watched() == ("blocks.0.act", "blocks.1.act", "blocks.2.act", "out_act")


def test_layers_by_name() -> None:
    assert watched(layers=["blocks.1.act"]) == ("blocks.1.act",)
    assert watched(layers=["out_act", "blocks.0.act"]) == ("out_act", "blocks.0.act")


def test_layers_by_glob_without_duplicates() -> None:
    assert watched(layers=["blocks.*.act"]) == ("blocks.0.act", "blocks.1.act", "blocks.2.act")
    assert watched(layers=["blocks.?.act", "blocks.1.act"]) == (
        "blocks.0.act",
        "blocks.1.act",
        "blocks.2.act",
    )


def test_a_non_activation_module_is_watched_as_generic() -> None:
    model = Net()
    with neuronwatch.watch(model, layers=["blocks.0.fc"], compile=False, min_rows=1) as m:
        model(torch.randn(5, 6))
        stats = m.report().layers["blocks.0.fc"]
    assert stats.config.family == "generic"
    assert stats.kind == "post"
    assert stats.rows == 5
    assert stats.neurons == 6
    assert (stats.partials.min < 0).any()  # the raw Linear output, before the ReLU


def test_unknown_layer_name_raises_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"'blocks\.0\.actt'") as info:
        neuronwatch.watch(Net(), layers=["blocks.0.actt"])
    assert "blocks.0.act" in str(info.value).replace("blocks.0.actt", "")  # a suggestion


def test_unknown_glob_raises_config_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"'encoder\.\*'"):
        neuronwatch.watch(Net(), layers=["blocks.*.act", "encoder.*"])


def test_model_without_activation_modules_needs_layers() -> None:
    with pytest.raises(ConfigError, match="Linear"):
        neuronwatch.watch(nn.Linear(3, 3))


def test_feature_axis_for_a_layer_whose_producer_is_unknown() -> None:
    class Reshaped(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(4, 12)
            self.act = nn.ReLU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            # [B, 12] -> [B, 3, 4]: 3 channels of length 4; no module produces this tensor.
            return self.act(self.fc(x).view(-1, 3, 4))

    model = Reshaped()
    with neuronwatch.watch(model, compile=False, min_rows=1) as default:
        model(torch.randn(5, 4))
        assert default.report().layers["act"].neurons == 4  # last axis when nothing is known
    with neuronwatch.watch(model, compile=False, min_rows=1, feature_axis={"act": 1}) as m:
        model(torch.randn(5, 4))
        act = m.report().layers["act"]
    assert act.neurons == 3
    assert act.rows == 5 * 4


def test_feature_axis_naming_an_unwatched_layer_raises() -> None:
    with pytest.raises(ConfigError, match=r"'blocks\.0\.fc'"):
        neuronwatch.watch(Net(), feature_axis={"blocks.0.fc": 1})


@pytest.mark.parametrize(
    ("option", "value"),
    [("every", 0), ("flush_every", -1), ("histogram_every", 1.5), ("window", 0)],
)
def test_bad_counts_raise_config_error_naming_the_argument(option: str, value: object) -> None:
    with pytest.raises(ConfigError, match=option):
        neuronwatch.watch(Net(), **{option: value})


def test_overrides_and_defaults_reach_the_layers() -> None:
    options = {"min_rows": 7, "overrides": {"blocks.1.*": {"fire_threshold": 0.5}}}
    with neuronwatch.watch(Net(), compile=False, **options) as monitor:
        configs = {name: monitor.engine.config(name) for name in monitor.layers}
    assert {c.min_rows for c in configs.values()} == {7}
    assert configs["blocks.1.act"].fire_threshold == 0.5
    assert configs["blocks.0.act"].fire_threshold == 0.0
    assert configs["out_act"].family == "tanh"
