"""Small real models shared by the torch adapter tests."""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn


def conv_bn_relu() -> nn.Sequential:
    """Conv2d(3->8) -> BatchNorm2d -> in-place ReLU -> Conv2d(8->4): channels on axis 1."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 8, 3, bias=False),
            bn=nn.BatchNorm2d(8),
            act=nn.ReLU(inplace=True),
            conv2=nn.Conv2d(8, 4, 1),
        )
    )


def conv_relu_conv_relu() -> nn.Sequential:
    """conv1(3->8) -> act1 -> conv2(8->6) -> act2, with biases."""
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(
            conv1=nn.Conv2d(3, 8, 3),
            act1=nn.ReLU(),
            conv2=nn.Conv2d(8, 6, 3),
            act2=nn.ReLU(),
        )
    )


def never_fired(values: torch.Tensor, axis: int) -> list[int]:
    """The plain reference: the features (or channels on ``axis``) with no value above 0."""
    moved = values.detach().movedim(axis, -1).reshape(-1, values.shape[axis])
    return torch.nonzero((moved > 0).sum(0) == 0).flatten().tolist()
