"""Padding is not data: rows at masked positions are left out of every statistic, on the
device, so a padded batch gives exactly the statistics of its sequences run one by one."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import neuronwatch  # noqa: E402
from neuronwatch.partials import FIELDS  # noqa: E402

PAD = 0


class TokenMLP(nn.Module):
    """A token-wise model with the Hugging Face call convention (input_ids, attention_mask).

    Integer weights and inputs keep every activation an exact float, so padded and unpadded
    runs can be compared with ==: nothing here depends on the other positions.
    """

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.embed = nn.Embedding(20, 6)
        self.fc = nn.Linear(6, 10)
        self.act = nn.ReLU()
        self.out = nn.Linear(10, 3)
        with torch.no_grad():
            self.embed.weight.copy_(torch.randint(-3, 4, (20, 6), generator=gen).float())
            self.fc.weight.copy_(torch.randint(-2, 3, (10, 6), generator=gen).float())
            self.fc.bias.copy_(torch.randint(-2, 3, (10,), generator=gen).float())
            self.fc.bias[7] = -100.0  # dead on every real token...
            # ... but the pad token's embedding makes neuron 7 fire: only pad rows fire it.
            self.embed.weight[PAD] = 0.0
            self.embed.weight[PAD, 0] = 100.0
            self.fc.weight[7] = 0.0
            self.fc.weight[7, 0] = 2.0

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.out(self.act(self.fc(self.embed(input_ids))))


def sequences() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(1, 20, (n,), generator=gen) for n in (5, 9, 2, 7, 9, 1)]


def padded(batch: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in batch)
    ids = torch.full((len(batch), width), PAD)
    mask = torch.zeros(len(batch), width, dtype=torch.long)
    for i, s in enumerate(batch):
        ids[i, : len(s)] = s
        mask[i, : len(s)] = 1
    return ids, mask


def statistics(run: Any, **options: Any) -> Mapping[str, Any]:
    model = TokenMLP()
    with neuronwatch.watch(model, min_rows=1, histogram_every=1, **options) as monitor:
        run(model)
        return monitor.report().layers


def one_by_one(model: nn.Module) -> None:
    for s in sequences():
        model(s.unsqueeze(0), attention_mask=torch.ones(1, len(s), dtype=torch.long))


def as_batches(model: nn.Module) -> None:
    seqs = sequences()
    for batch in (seqs[:4], seqs[4:]):
        ids, mask = padded(batch)
        model(ids, attention_mask=mask)


def positional(model: nn.Module) -> None:
    for batch in (sequences()[:4], sequences()[4:]):
        model(*padded(batch))  # the mask passed positionally, as HF models allow


@pytest.mark.parametrize("compile", [False, True])
@pytest.mark.parametrize("run", [as_batches, positional])
def test_a_padded_batch_equals_its_sequences_one_by_one(run: Any, compile: bool) -> None:
    alone = statistics(one_by_one, compile=compile)["act"]
    batched = statistics(run, compile=compile)["act"]
    real_tokens = sum(len(s) for s in sequences())
    assert alone.rows == batched.rows == real_tokens
    for name in FIELDS:
        if name != "last_fired_step":
            np.testing.assert_array_equal(
                getattr(batched.partials, name), getattr(alone.partials, name), err_msg=name
            )
    assert batched.dead_indices.tolist() == [7]  # the pad rows would have made it fire


def test_pad_rows_count_when_no_mask_is_used() -> None:
    batched = statistics(as_batches, compile=False, mask=None)["act"]
    ids = [padded(b)[0] for b in (sequences()[:4], sequences()[4:])]
    assert batched.rows == sum(i.numel() for i in ids)
    assert batched.dead_indices.tolist() == []  # neuron 7 fired on pad rows only


def test_a_mask_in_another_layout_comes_from_a_function() -> None:
    # PyTorch's key_padding_mask convention: True marks padding.
    def run(model: nn.Module) -> None:
        for batch in (sequences()[:4], sequences()[4:]):
            ids, mask = padded(batch)
            model.padding = mask == 0
            model(ids)

    def real_tokens(module: nn.Module, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> Any:
        return ~module.padding

    batched = statistics(run, compile=False, mask=real_tokens)["act"]
    alone = statistics(one_by_one, compile=False)["act"]
    assert batched.rows == alone.rows
    np.testing.assert_array_equal(batched.partials.fired, alone.partials.fired)


def test_a_bad_mask_argument_is_refused() -> None:
    with pytest.raises(neuronwatch.ConfigError, match="mask must be"):
        neuronwatch.watch(TokenMLP(), mask=3)
