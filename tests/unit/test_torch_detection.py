"""Planted dead, asleep, dormant and saturated neurons in real torch models are found exactly
through ``neuronwatch.watch`` (eager reductions; compile=True is compared in test_torch_compile)."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from torch import nn
from torch_models import conv_bn_relu, conv_relu_conv_relu

import neuronwatch

IN = 8
DEAD_1 = [3, 17, 30]  # act1 neurons killed by a -50 bias
DEAD_2 = [0, 9]  # act2 neurons killed by a -50 bias
RARE = 5  # act1 neuron that fires on exactly 1 row in 200 (0.5 %)


def planted_mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(IN, 32),
            act1=nn.ReLU(),
            fc2=nn.Linear(32, 16),
            act2=nn.ReLU(),
            out=nn.Linear(16, 4),
        )
    )
    with torch.no_grad():
        model.fc1.bias.zero_()  # every other neuron fires on about half the rows
        model.fc1.bias[DEAD_1] = -50.0  # ordinary weights, a large negative bias
        model.fc2.bias[DEAD_2] = -50.0
        # Input feature 0 is positive on 0.5 % of rows and only the rare neuron reads it.
        model.fc1.weight[:, 0] = 0.0
        model.fc1.weight[RARE] = 0.0
        model.fc1.weight[RARE, 0] = 10.0
        model.fc1.bias[RARE] = 0.0
    return model


def mlp_batch(gen: torch.Generator, rows: int = 200) -> torch.Tensor:
    x = torch.randn(rows, IN, generator=gen)
    x[:, 0] = -1.0
    x[::200, 0] = 1.0  # one row in 200
    return x


def test_mlp_dead_neurons_found_exactly_and_rare_neuron_is_asleep() -> None:
    model = planted_mlp()
    gen = torch.Generator().manual_seed(1)
    batches = [mlp_batch(gen) for _ in range(20)]  # 4000 rows
    # Reference verdicts from plain torch, so the planted set is the true one.
    with torch.no_grad():
        h1 = torch.cat([model.act1(model.fc1(x)) for x in batches])
        h2 = model.act2(model.fc2(h1))
    assert torch.nonzero((h1 > 0).sum(0) == 0).flatten().tolist() == DEAD_1
    assert torch.nonzero((h2 > 0).sum(0) == 0).flatten().tolist() == DEAD_2
    frequency = (h1 > 0).double().mean(0)
    assert torch.nonzero((frequency > 0) & (frequency < 0.05)).flatten().tolist() == [RARE]

    with neuronwatch.watch(model, compile=False, min_rows=1000) as monitor:
        assert monitor.layers == ("act1", "act2")
        for x in batches[:4]:  # 800 rows: below min_rows, nothing may be called dead
            model(x)
        early = monitor.snapshot().layers("lifetime")
        assert early["act1"].rows == 800
        assert early["act1"].count("dead") == 0
        assert early["act1"].count("unknown") == 32
        for x in batches[4:]:
            model(x)
        layers = monitor.report().layers

    act1, act2 = layers["act1"], layers["act2"]
    assert act1.rows == act2.rows == 4000
    assert act1.neurons == 32
    assert act2.neurons == 16
    assert act1.dead_indices.tolist() == DEAD_1
    assert act2.dead_indices.tolist() == DEAD_2
    assert np.flatnonzero(act1.asleep).tolist() == [RARE]
    assert act1.partials.fired[RARE] == 20
    assert act1.frequency[RARE] == pytest.approx(0.005)
    assert act1.count("active") == 32 - len(DEAD_1) - 1
    assert act1.complete


def test_unbatched_input_is_one_row_per_call() -> None:
    # nn.Linear accepts an unbatched [F] vector: that is one row of F neurons.
    model = planted_mlp()
    gen = torch.Generator().manual_seed(2)
    with neuronwatch.watch(model, compile=False, min_rows=50) as monitor:
        for x in mlp_batch(gen, rows=100):
            model(x)
        act1 = monitor.report().layers["act1"]
    assert act1.rows == 100
    assert act1.neurons == 32
    assert act1.partials.fired[DEAD_1].tolist() == [0, 0, 0]
    assert act1.dead_indices.tolist() == DEAD_1


def conv_net() -> nn.Sequential:
    model = conv_relu_conv_relu()
    with torch.no_grad():
        model.conv1.bias[[2, 5]] = -50.0
        model.conv2.bias[[1]] = -50.0
    return model


def test_conv_dead_channels_found_on_axis_1() -> None:
    model = conv_net()
    gen = torch.Generator().manual_seed(0)
    with neuronwatch.watch(model, compile=False, min_rows=500) as monitor:
        for _ in range(3):
            model(torch.randn(4, 3, 11, 13, generator=gen))  # act1: [4, 8, 9, 11]
        snapshot = monitor.snapshot()
    act1, act2 = snapshot.layers("lifetime")["act1"], snapshot.layers("lifetime")["act2"]
    assert act1.neurons == 8  # channels, not the last axis (11)
    assert act2.neurons == 6
    assert act1.rows == 3 * 4 * 9 * 11
    assert act2.rows == 3 * 4 * 7 * 9
    assert act1.dead_indices.tolist() == [2, 5]
    assert act2.dead_indices.tolist() == [1]
    assert snapshot.wiring["act1"].feature_axis == 1
    assert snapshot.wiring["act2"].feature_axis == 1


def test_conv1d_channels_come_from_the_producing_conv() -> None:
    # [B, C, L] with C=5, L=18: guessing "last axis" would give 18 neurons.
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv1d(3, 5, 3), act=nn.ReLU()))
    with torch.no_grad():
        model.conv.bias[4] = -50.0
    with neuronwatch.watch(model, compile=False, min_rows=100) as monitor:
        model(torch.randn(8, 3, 20))
        act = monitor.report().layers["act"]
    assert act.neurons == 5
    assert act.rows == 8 * 18
    assert act.dead_indices.tolist() == [4]


def test_conv_batchnorm_relu_dead_channels() -> None:
    model = conv_bn_relu()
    with torch.no_grad():
        model.bn.bias[[1, 6]] = -50.0  # BN's shift kills the channel after normalisation
    gen = torch.Generator().manual_seed(0)
    with neuronwatch.watch(model, compile=False, min_rows=500) as monitor:
        for _ in range(3):
            model(torch.randn(4, 3, 11, 13, generator=gen))
        snapshot = monitor.snapshot()
    act = snapshot.layers("lifetime")["act"]
    assert act.neurons == 8
    assert act.rows == 3 * 4 * 9 * 11
    assert act.dead_indices.tolist() == [1, 6]
    assert snapshot.wiring["act"].feature_axis == 1


class Block(nn.Module):
    """A pre-norm transformer block on [B, T, D] with a Linear->GELU->Linear MLP."""

    def __init__(self, d: int = 32, heads: int = 4, hidden: int = 64) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(d)
        self.fc = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.proj(self.act(self.fc(self.ln2(x))))


def planted_transformer() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(Block(), Block())
    with torch.no_grad():
        model[0].fc.bias[[3, 40]] = -50.0  # GELU(~-50) is ~0: dead and dormant
        model[1].fc.bias[[0, 63]] = -50.0
        # Tiny but always positive: GELU(0.01) ~ 0.005 > 1e-3 fires on every row, yet its
        # mean |a| is far below the layer's: dormant but not dead.
        model[0].fc.weight[10] = 0.0
        model[0].fc.bias[10] = 0.01
        # GELU(0.001) ~ 0.0005: positive on every row, yet below the smooth threshold 1e-3.
        model[1].fc.weight[20] = 0.0
        model[1].fc.bias[20] = 0.001
    return model


def test_transformer_gelu_dormant_and_dead() -> None:
    model = planted_transformer()
    gen = torch.Generator().manual_seed(0)
    with neuronwatch.watch(model, compile=False, min_rows=100) as monitor:
        assert monitor.layers == ("0.act", "1.act")
        for _ in range(4):
            model(torch.randn(4, 10, 32, generator=gen))
        layers = monitor.report().layers
    first, second = layers["0.act"], layers["1.act"]
    assert first.config.family == "smooth"
    assert first.config.fire_threshold == 1e-3
    assert first.rows == second.rows == 4 * 4 * 10  # B*T rows
    assert first.neurons == 64
    # GELU's negative lobe still passes gradient: never firing is leaking, never dead.
    assert first.count("dead") == second.count("dead") == 0
    assert first.indices("leaking").tolist() == [3, 40]
    assert np.flatnonzero(first.dormant).tolist() == [3, 10, 40]
    assert first.active[10]
    assert first.partials.fired[10] == first.rows
    assert second.indices("leaking").tolist() == [0, 20, 63]
    assert second.partials.min[20] > 0  # never exactly zero, still never fired at 1e-3
    assert np.flatnonzero(second.dormant).tolist() == [0, 20, 63]


@pytest.mark.parametrize("activation", [nn.Tanh, nn.Sigmoid])
def test_bounded_activation_saturated_neurons(activation: type[nn.Module]) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(fc=nn.Linear(IN, 16), act=activation(), out=nn.Linear(16, 2)))
    with torch.no_grad():
        model.fc.bias[1] = 50.0  # flat at the top on every row
        model.fc.bias[4] = -50.0  # flat at the bottom on every row (and dead)
        # Flat on every row but one: not saturated over the window.
        model.fc.weight[7] = 0.0
        model.fc.weight[7, 0] = 100.0
        model.fc.bias[7] = 0.0
    gen = torch.Generator().manual_seed(0)
    with neuronwatch.watch(model, compile=False, min_rows=500) as monitor:
        for batch in range(5):
            x = torch.randn(128, IN, generator=gen)
            x[:, 0] = 1.0
            if batch == 3:
                x[17, 0] = 1e-3  # pre-activation 0.1: mid-range once
            model(x)
        act = monitor.report().layers["act"]
    assert act.rows == 640
    assert act.config.saturates
    assert np.flatnonzero(act.saturated).tolist() == [1, 4]
    assert act.partials.saturated[7] == act.rows - 1
    # Stuck at the bottom on every row: never fires and passes no gradient, so dead.
    assert act.dead_indices.tolist() == [4]
    assert act.count("leaking") == 0


def test_relu_never_reports_saturated() -> None:
    model = planted_mlp()
    with neuronwatch.watch(model, compile=False, min_rows=10) as monitor:
        model(torch.randn(64, IN) * 100)
        assert monitor.report().layers["act1"].count("saturated") == 0


def test_pre_watches_the_activation_input() -> None:
    model = planted_mlp()
    gen = torch.Generator().manual_seed(3)
    with neuronwatch.watch(model, pre=True, compile=False, min_rows=100) as monitor:
        assert monitor.layers == ("act1", "act1:pre", "act2", "act2:pre")
        for _ in range(3):
            model(mlp_batch(gen))
        layers = monitor.report().layers
    post, pre = layers["act1"], layers["act1:pre"]
    assert pre.kind == "pre"
    assert post.kind == "post"
    assert pre.config.family == "generic"
    assert pre.rows == post.rows == 600
    assert pre.neurons == 32
    # The input is the Linear output: about -50 for the killed neurons, negative elsewhere too.
    assert (pre.partials.max[DEAD_1] < -40).all()
    assert (post.partials.max[DEAD_1] == 0.0).all()
    assert (pre.partials.min < 0).all()
    assert (post.partials.min >= 0).all()
    assert pre.dead_indices.tolist() == DEAD_1
    assert layers["act2:pre"].kind == "pre"


def test_pre_on_conv_uses_the_channel_axis() -> None:
    model = conv_net()
    with neuronwatch.watch(model, layers=["act1"], pre=True, compile=False, min_rows=10) as m:
        model(torch.randn(2, 3, 11, 13))
        pre = m.report().layers["act1:pre"]
    assert pre.neurons == 8
    assert pre.rows == 2 * 9 * 11
    assert (pre.partials.max[[2, 5]] < -40).all()
