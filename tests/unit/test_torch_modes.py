"""The adapter works under no_grad, inference_mode, eval, CPU autocast (bf16, fp16), training
with backward, and with batch/sequence/spatial sizes changing between calls; it never changes
the model's outputs or gradients."""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterator

import pytest
import torch
from torch import nn

import neuronwatch

DEAD_1 = [2, 11]
DEAD_2 = [5]


def planted_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(8, 16),
            act1=nn.ReLU(),
            drop=nn.Dropout(0.5),
            fc2=nn.Linear(16, 8),
            act2=nn.ReLU(),
            out=nn.Linear(8, 2),
        )
    )
    with torch.no_grad():
        model.fc1.bias.zero_()
        model.fc1.bias[DEAD_1] = -50.0
        model.fc2.bias.zero_()
        model.fc2.bias[DEAD_2] = -50.0
    return model


def _autocast(dtype: torch.dtype) -> contextlib.AbstractContextManager[None]:
    return torch.autocast("cpu", dtype=dtype)


def _fp16_autocast_supported() -> bool:
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.Linear(2, 2)(torch.ones(1, 2)).dtype == torch.float16
    except (RuntimeError, AssertionError):
        return False


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    model.eval()
    with torch.no_grad():
        yield


MODES: dict[str, Callable[[nn.Module], contextlib.AbstractContextManager[None]]] = {
    "no_grad": lambda model: torch.no_grad(),
    "inference_mode": lambda model: torch.inference_mode(),
    "eval": lambda model: _eval_no_grad(model),
    "autocast_bf16": lambda model: _autocast(torch.bfloat16),
    "autocast_fp16": lambda model: _autocast(torch.float16),
}


@pytest.mark.parametrize("mode", list(MODES))
def test_planted_dead_found_in_every_mode(mode: str) -> None:
    if mode == "autocast_fp16" and not _fp16_autocast_supported():
        pytest.skip("CPU autocast does not support float16 in this torch")
    model = planted_mlp()
    gen = torch.Generator().manual_seed(0)
    with neuronwatch.watch(model, compile=False, min_rows=100) as monitor:
        with MODES[mode](model):
            for _ in range(5):
                y = model(torch.randn(64, 8, generator=gen))
        if mode.startswith("autocast"):
            assert y.dtype != torch.float32  # autocast really was on
        layers = monitor.report().layers
    assert monitor.snapshot().errors == {}
    assert layers["act1"].rows == layers["act2"].rows == 320
    assert layers["act1"].dead_indices.tolist() == DEAD_1
    assert layers["act2"].dead_indices.tolist() == DEAD_2
    assert layers["act1"].count("active") == 16 - len(DEAD_1)


def test_training_with_backward_and_mixed_modes() -> None:
    model = planted_mlp()
    gen = torch.Generator().manual_seed(0)
    with neuronwatch.watch(model, compile=False, min_rows=100) as monitor:
        with torch.inference_mode():  # buffers are first allocated as inference tensors
            model(torch.randn(32, 8, generator=gen))
        for _ in range(3):
            model(torch.randn(32, 8, generator=gen)).sum().backward()
        with torch.inference_mode():
            model(torch.randn(16, 8, generator=gen))
        assert monitor.snapshot().layers("lifetime")["act1"].rows == 144
        model(torch.randn(16, 8, generator=gen)).sum().backward()  # after a flush
        with torch.autocast("cpu", dtype=torch.bfloat16):
            model(torch.randn(16, 8, generator=gen))
        snapshot = monitor.snapshot()
    assert snapshot.errors == {}
    act1 = snapshot.layers("lifetime")["act1"]
    assert act1.rows == 176
    assert act1.dead_indices.tolist() == DEAD_1


def test_outputs_and_gradients_unchanged_by_the_monitor() -> None:
    model = planted_mlp().eval()  # no dropout randomness between the two runs
    x = torch.randn(32, 8)
    plain = model(x)
    plain.sum().backward()
    plain_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with neuronwatch.watch(model, compile=False, pre=True) as monitor:
        watched = model(x)
        watched.sum().backward()
        assert monitor.report().layers["act1"].rows == 32
    assert torch.equal(plain, watched)
    for before, p in zip(plain_grads, model.parameters(), strict=True):
        assert torch.equal(before, p.grad)


class Block(nn.Module):
    def __init__(self, d: int = 16, hidden: int = 32) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, 2, batch_first=True)
        self.fc = nn.Linear(d, hidden)
        self.act = nn.GELU()
        self.proj = nn.Linear(hidden, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.ln(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.proj(self.act(self.fc(self.ln(x))))


def test_changing_batch_and_sequence_sizes() -> None:
    torch.manual_seed(0)
    model = Block()
    with torch.no_grad():
        model.fc.bias[[1, 30]] = -50.0
    shapes = [(2, 5), (3, 7), (1, 16), (4, 1), (2, 9)]
    with neuronwatch.watch(model, compile=False, min_rows=50) as monitor:
        for b, t in shapes:
            model(torch.randn(b, t, 16))
        act = monitor.report().layers["act"]
    assert act.rows == sum(b * t for b, t in shapes)
    assert act.neurons == 32
    assert act.indices("leaking").tolist() == [1, 30]


def test_changing_spatial_sizes_in_a_conv_net() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(OrderedDict(conv=nn.Conv2d(3, 6, 3, padding=1), act=nn.ReLU()))
    with torch.no_grad():
        model.conv.bias[4] = -50.0
    shapes = [(2, 8, 8), (1, 5, 11), (3, 4, 4)]
    with neuronwatch.watch(model, compile=False, min_rows=100) as monitor:
        for b, h, w in shapes:
            model(torch.randn(b, 3, h, w))
        act = monitor.report().layers["act"]
    assert act.neurons == 6
    assert act.rows == sum(b * h * w for b, h, w in shapes)
    assert act.dead_indices.tolist() == [4]
