"""Hook hygiene (every hook removed, also after exceptions) and failing hooks (counted, logged
once, never raised into the forward unless ``strict=True``)."""

from __future__ import annotations

import logging
from collections import OrderedDict
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.modules import module as torch_module

import neuronwatch


def mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        OrderedDict(fc1=nn.Linear(4, 8), act1=nn.ReLU(), fc2=nn.Linear(8, 4), act2=nn.GELU())
    )


def hook_state(model: nn.Module) -> dict[str, Any]:
    """Every forward hook dict of every module, plus torch's global ones."""
    state: dict[str, Any] = {
        name: tuple(
            tuple(getattr(module, attr).keys())
            for attr in (
                "_forward_hooks",
                "_forward_pre_hooks",
                "_forward_hooks_with_kwargs",
                "_forward_hooks_always_called",
                "_forward_pre_hooks_with_kwargs",
            )
        )
        for name, module in model.named_modules()
    }
    state["<global>"] = (
        tuple(torch_module._global_forward_hooks),
        tuple(torch_module._global_forward_pre_hooks),
    )
    return state


def count_hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_context_manager_removes_every_hook() -> None:
    model = mlp()
    before = hook_state(model)
    assert count_hooks(model) == 0
    with neuronwatch.watch(model, compile=False, pre=True) as monitor:
        assert count_hooks(model) > 0  # the test can fail: hooks were really attached
        model(torch.randn(2, 4))
        assert monitor.sources[0].hooks == count_hooks(model)
    assert hook_state(model) == before
    assert count_hooks(model) == 0
    assert monitor.sources[0].hooks == 0


def test_close_removes_every_hook_and_is_idempotent() -> None:
    model = mlp()
    before = hook_state(model)
    monitor = neuronwatch.watch(model, compile=False)
    model(torch.randn(2, 4))
    monitor.close()
    assert hook_state(model) == before
    monitor.close()
    assert hook_state(model) == before
    # Data already collected stays readable after close.
    assert monitor.report().layers["act1"].rows == 2
    model(torch.randn(3, 4))  # no hook left: nothing is recorded any more
    assert monitor.report().layers["act1"].rows == 2


def test_close_before_any_forward_removes_the_hooks() -> None:
    model = mlp()
    before = hook_state(model)
    neuronwatch.watch(model, compile=False).close()
    assert hook_state(model) == before


def test_users_own_hooks_survive_and_stay_in_place() -> None:
    model = mlp()
    calls: list[str] = []
    model.fc1.register_forward_hook(lambda m, a, o: calls.append("fc1-post"))
    model.act1.register_forward_pre_hook(lambda m, a: calls.append("act1-pre"))
    model.register_forward_hook(lambda m, a, o: calls.append("root-post"))
    before = hook_state(model)
    with neuronwatch.watch(model, compile=False, pre=True):
        model(torch.randn(2, 4))
    assert hook_state(model) == before
    assert calls == ["fc1-post", "act1-pre", "root-post"]
    calls.clear()
    model(torch.randn(2, 4))
    assert calls == ["fc1-post", "act1-pre", "root-post"]


def test_exception_in_the_with_block_removes_every_hook() -> None:
    model = mlp()
    before = hook_state(model)

    def interrupted_run() -> None:
        with neuronwatch.watch(model, compile=False):
            model(torch.randn(2, 4))
            assert count_hooks(model) > 0
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        interrupted_run()
    assert hook_state(model) == before


class Exploding(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(8, 4)
        self.explode = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.fc1(x))
        if self.explode:
            raise ValueError("boom inside forward")
        return self.fc2(h)


def test_exception_inside_the_traced_forward_removes_every_hook() -> None:
    model = Exploding()
    before = hook_state(model)
    with pytest.raises(ValueError, match="boom"), neuronwatch.watch(model, compile=False):
        model(torch.randn(2, 4))  # the first (traced) pass dies half-way
    assert hook_state(model) == before


def test_traced_hooks_do_not_pile_up_after_a_failed_traced_pass() -> None:
    model = Exploding()
    with neuronwatch.watch(model, compile=False) as monitor:
        source = monitor.sources[0]
        leaves = sum(1 for m in model.modules() if next(m.children(), None) is None)
        permanent = source.hooks - 2 * leaves  # minus the tracer's pre/post hook per leaf
        assert permanent == 3  # root pre/post + one per watched layer
        with pytest.raises(ValueError, match="boom"):
            model(torch.randn(2, 4))
        model.explode = False
        model(torch.randn(2, 4))
        assert count_hooks(model) == permanent
        assert source.hooks == permanent
        model(torch.randn(2, 4))
        assert count_hooks(model) == permanent


def test_watch_failing_on_bad_arguments_leaves_no_hook() -> None:
    model = mlp()
    before = hook_state(model)
    with pytest.raises(neuronwatch.ConfigError):
        neuronwatch.watch(model, layers=["nope"])
    with pytest.raises(neuronwatch.ConfigError):
        neuronwatch.watch(model, min_rowz=10)
    with pytest.raises(neuronwatch.ConfigError):
        neuronwatch.watch(model, every=0)
    assert hook_state(model) == before


# -- failing hooks --------------------------------------------------------------------------------


class DictActivation(nn.Module):
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"out": torch.relu(x)}


class WithDictActivation(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.odd = DictActivation()
        self.fc2 = nn.Linear(8, 4)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.odd(self.fc1(x))["out"]))


class SharedActivation(nn.Module):
    """One ReLU module applied to 8 then 6 neurons: the neuron count changes between calls."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(4, 8)
        self.fc2 = nn.Linear(8, 6)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc2(self.act(self.fc1(x))))


def warnings_from_neuronwatch(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records
        if r.name.startswith("neuronwatch") and r.levelno >= logging.WARNING
    ]  # fmt: skip


def test_non_tensor_output_is_counted_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    torch.manual_seed(0)
    model = WithDictActivation()
    x = torch.randn(5, 4)
    expected = model(x)
    with neuronwatch.watch(model, layers=["odd", "act"], compile=False, min_rows=1) as monitor:
        for _ in range(3):
            assert torch.equal(model(x), expected)
        snapshot = monitor.snapshot()
    assert snapshot.errors == {"odd": 3}
    assert snapshot.layers("lifetime")["act"].rows == 15  # the healthy layer goes on
    assert "odd" not in snapshot.layers("lifetime")
    failures = [r for r in warnings_from_neuronwatch(caplog) if "hook failed" in r.getMessage()]
    assert len(failures) == 1
    assert "'odd'" in failures[0].getMessage()


def test_a_module_called_twice_is_two_layers() -> None:
    torch.manual_seed(0)
    model = SharedActivation()
    with neuronwatch.watch(model, compile=False, min_rows=1) as monitor:
        for _ in range(4):
            model(torch.randn(5, 4))
        snapshot = monitor.snapshot()
    assert snapshot.errors == {}
    first, second = (snapshot.layers("lifetime")[n] for n in ("act", "act#2"))
    assert (first.neurons, second.neurons) == (8, 6)
    assert first.rows == second.rows == 20


def test_changing_neuron_count_is_counted_and_logged_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING)
    torch.manual_seed(0)
    model = SharedActivation()
    x = torch.randn(5, 4)
    expected = model(x)
    with neuronwatch.watch(model, compile=False, min_rows=1, per_call_site=False) as monitor:
        for _ in range(4):
            assert torch.equal(model(x), expected)
        snapshot = monitor.snapshot()
    assert snapshot.errors == {"act": 4}  # the second call of every forward
    act = snapshot.layers("lifetime")["act"]
    assert act.neurons == 8
    assert act.rows == 20  # the first call of every forward still counts
    records = warnings_from_neuronwatch(caplog)
    assert len(records) == 1
    assert "'act'" in records[0].getMessage()


def test_strict_raises_a_non_tensor_output() -> None:
    model = WithDictActivation()
    with (
        neuronwatch.watch(model, layers=["odd"], compile=False, strict=True),
        pytest.raises(TypeError, match="odd"),
    ):
        model(torch.randn(2, 4))


def test_strict_raises_a_changing_neuron_count() -> None:
    model = SharedActivation()
    before = hook_state(model)
    with (
        pytest.raises(ValueError, match="neurons"),
        neuronwatch.watch(model, compile=False, strict=True, per_call_site=False),
    ):
        model(torch.randn(2, 4))
    assert hook_state(model) == before
