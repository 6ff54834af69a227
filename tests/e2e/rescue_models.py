"""Real torch models with planted dead neurons, audited with neuronwatch, for the rescue tests.

Each model takes its widths as arguments, so a pruned checkpoint loads into the same class built
with the manifest's new widths.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

import neuronwatch


def mlp(widths: Sequence[int] = (32, 24)) -> nn.Sequential:
    """fc1(8 -> w1) act1 fc2(w1 -> w2) act2 fc3(w2 -> 4)."""
    w1, w2 = widths
    return nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(8, w1),
            act1=nn.ReLU(),
            fc2=nn.Linear(w1, w2),
            act2=nn.ReLU(),
            fc3=nn.Linear(w2, 4),
        )
    )


class ConvNet(nn.Module):
    """conv1 -> bn1 -> act1 -> conv2 -> act2 -> conv3 (1x1) -> spatial mean."""

    def __init__(self, widths: Sequence[int] = (8, 8)) -> None:
        super().__init__()
        c1, c2 = widths
        self.conv1 = nn.Conv2d(3, c1, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.act2 = nn.ReLU()
        self.conv3 = nn.Conv2d(c2, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act2(self.conv2(self.act1(self.bn1(self.conv1(x)))))
        return self.conv3(x).mean(dim=(2, 3))


class TinyTransformer(nn.Module):
    """Two post-norm encoder layers with a functional ReLU in their feed-forward, then a head."""

    def __init__(self, widths: Sequence[int] = (32, 32)) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                16, 2, width, dropout=0.0, activation="relu", batch_first=True
            )
            for width in widths
        )
        self.head = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return self.head(x)


def build(kind: str, widths: Sequence[int] | None = None) -> nn.Module:
    torch.manual_seed(0)
    if kind == "mlp":
        return mlp(widths or (32, 24))
    if kind == "conv":
        model: nn.Module = ConvNet(widths or (8, 8))
        model.eval()  # BatchNorm uses its running statistics: a deterministic function
        with torch.no_grad():
            model.bn1.running_mean.uniform_(-0.2, 0.2)
            model.bn1.running_var.uniform_(0.5, 1.5)
            model.bn1.weight.uniform_(0.5, 1.5)
        return model
    return TinyTransformer(widths or (32, 32))


def data(kind: str, rows: int = 1500) -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return torch.randn(rows, 8, generator=generator)
    if kind == "conv":
        return torch.randn(rows // 50, 3, 8, 8, generator=generator)  # 64 rows per image
    return torch.randn(rows // 10, 10, 16, generator=generator)


# Per model: (post layer, producer bias to plant with, neurons) for each planted layer.
LAYERS = {
    "mlp": [("act1", "fc1.bias", [0, 5, 17]), ("act2", "fc2.bias", [3, 11])],
    "conv": [("act1", "bn1.bias", [2, 6]), ("act2", "conv2.bias", [1])],
    "transformer": [
        ("layers.0.activation", "layers.0.linear1.bias", [4, 9, 30]),
        ("layers.1.activation", "layers.1.linear1.bias", [0]),
    ],
}


def plant_dead_by_bias(model: nn.Module, kind: str) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for _, bias, neurons in LAYERS[kind]:
            params[bias][neurons] = -100.0


def audit(model: nn.Module, x: torch.Tensor) -> neuronwatch.Report:
    """Every activation of ``model`` on ``x``, with the ``:pre`` statistics lift needs.

    The torch adapter has no ``:pre`` layer for a Transformer layer's functional ReLU, so its
    input (``linear1``'s output) is fed to the same engine by a hook of our own, the way any
    framework feeds neuronwatch.
    """
    with neuronwatch.watch(model, pre=True, compile=False, min_rows=100) as monitor:
        engine = monitor.engine
        handles = []
        if isinstance(model, TinyTransformer):
            for index, layer in enumerate(model.layers):
                name = f"layers.{index}.activation:pre"
                engine.add_layer(name, None, kind="pre")

                def hook(_: nn.Module, __: object, out: torch.Tensor, name: str = name) -> None:
                    engine.observe(name, out.detach().numpy())

                handles.append(layer.linear1.register_forward_hook(hook))
        try:
            for chunk in x.split(500):
                model(chunk)
        finally:
            for handle in handles:
                handle.remove()
        snapshot = monitor.snapshot()
        for name in engine.layers:
            if name.endswith(":pre") and name not in snapshot.wiring:
                engine.set_wiring(name, snapshot.wiring[name[: -len(":pre")]])
        return monitor.report()


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.cat([model(chunk) for chunk in x.split(500)])


def dead(report: neuronwatch.Report) -> dict[str, list[int]]:
    return {
        name: stats.dead_indices.tolist()
        for name, stats in report.layers.items()
        if stats.kind == "post"
    }


def plant_dead_by_weights(model: nn.Module, kind: str) -> tuple[str, list[int]]:
    """Kill neurons the way Synaptic Stripping undoes: a few large negative incoming weights
    on inputs that are always positive. Returns the layer and its planted neurons."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        if kind == "mlp":
            params["fc1.bias"][[1, 2]] = 10.0  # act1 neurons 1 and 2 always on
            params["fc2.weight"][[4, 9], 1:3] = -30.0
            return "act2", [4, 9]
        if kind == "conv":
            params["bn1.bias"][0] = 10.0  # act1 channel 0 always on
            params["conv2.weight"][3, 0, 0:2, :] = -30.0
            return "act2", [3]
        params["layers.0.norm1.bias"][[0, 1]] = 10.0  # two always-positive input features
        params["layers.0.linear1.weight"][5, 0:2] = -30.0
        return "layers.0.activation", [5]
