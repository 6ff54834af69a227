"""Shapes real models have: a module called twice, pass-through modules between a conv and its
activation, activation checkpointing, unbatched conv inputs, methods other than ``forward``.
Every dead set is checked against a plain reference computed here, call by call."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator

import numpy as np
import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop  # noqa: E402

import neuronwatch  # noqa: E402


def never_fired(values: torch.Tensor, axis: int) -> list[int]:
    """The plain reference: channels/features with no value > 0."""
    moved = values.detach().movedim(axis, -1).reshape(-1, values.shape[axis])
    return torch.nonzero((moved > 0).sum(0) == 0).flatten().tolist()


# -- torchvision's BasicBlock: one relu module, two calls ----------------------------------------


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock, as written there (no downsample)."""

    def __init__(self, planes: int = 8) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += identity
        return self.relu(out)


def resnet_block() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(stem=nn.Conv2d(3, 8, 3, padding=1), act=nn.ReLU(), block=BasicBlock())
    )
    with torch.no_grad():
        model.block.bn1.bias[[2, 5]] = -50.0  # dead at the first call of block.relu only
        model.block.bn2.bias[[6]] = -50.0  # dead at the second call (the identity is small)
    return model.eval()


def reference_block_calls(model: nn.Sequential, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        h = model.act(model.stem(x))
        block = model.block
        first = torch.relu(block.bn1(block.conv1(h)))
        second = torch.relu(block.bn2(block.conv2(first)) + h)
    return first, second


def test_a_reused_relu_is_one_layer_per_call_with_its_own_dead_channels() -> None:
    model = resnet_block()
    gen = torch.Generator().manual_seed(1)
    xs = [torch.randn(4, 3, 10, 10, generator=gen) for _ in range(3)]
    with neuronwatch.watch(model, compile=False, min_rows=100) as monitor:
        for x in xs:
            model(x)
        report = monitor.report()
    assert list(report.layers) == ["act", "block.relu", "block.relu#2"]
    firsts, seconds = zip(*(reference_block_calls(model, x) for x in xs), strict=True)
    first, second = report.layers["block.relu"], report.layers["block.relu#2"]
    assert first.rows == second.rows == 3 * 4 * 10 * 10  # not doubled
    assert first.neurons == second.neurons == 8
    assert first.dead_indices.tolist() == never_fired(torch.cat(firsts), 1) == [2, 5]
    assert second.dead_indices.tolist() == never_fired(torch.cat(seconds), 1) == [6]
    # Each call has its own wiring: the first is produced by conv1 (+ bn1) and read by conv2.
    assert report.wiring["block.relu"].producer == "block.conv1"
    assert report.wiring["block.relu"].consumer == "block.conv2"
    assert report.wiring["block.relu"].feature_axis == 1
    # The second call's input is the residual sum (a function, not a module): no producer.
    assert report.wiring["block.relu#2"].produces == ()


# -- pass-through modules between a conv and its activation --------------------------------------


def conv_bn_dropout_identity_relu() -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            conv=nn.Conv2d(3, 6, 3),
            bn=nn.BatchNorm2d(6),
            drop=nn.Dropout2d(0.3),
            drop_block=nn.Identity(),  # timm's placeholder
            act=nn.ReLU(),
            head=nn.Conv2d(6, 2, 1),
        )
    )
    with torch.no_grad():
        model.bn.bias[[1, 4]] = -50.0
    return model


def run_with_deadline(fn: Callable[[], object], seconds: float = 60.0) -> None:
    """Run ``fn`` in a daemon thread: a hang fails the test instead of hanging the suite."""
    failure: list[BaseException] = []

    def target() -> None:
        try:
            fn()
        except BaseException as exc:
            failure.append(exc)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"did not finish within {seconds} s"
    if failure:
        raise failure[0]


@pytest.mark.parametrize("train", [True, False])
def test_pass_through_modules_keep_the_channel_axis_and_do_not_hang(train: bool) -> None:
    model = conv_bn_dropout_identity_relu().train(train)
    gen = torch.Generator().manual_seed(2)
    xs = [torch.randn(4, 3, 9, 7, generator=gen) for _ in range(3)]
    captured: list[torch.Tensor] = []
    handle = model.act.register_forward_hook(lambda m, a, out: captured.append(out.detach()))
    reports: list[neuronwatch.Report] = []

    def watch() -> None:
        with neuronwatch.watch(model, compile=False, min_rows=50) as monitor:
            for x in xs:
                model(x)
            reports.append(monitor.report())

    run_with_deadline(watch)
    handle.remove()
    act = reports[0].layers["act"]
    assert act.neurons == 6  # channels, not the width 5
    assert act.rows == 3 * 4 * 7 * 5
    assert act.dead_indices.tolist() == never_fired(torch.cat(captured), 1) == [1, 4]
    wiring = reports[0].wiring["act"]
    assert wiring.feature_axis == 1
    assert wiring.producer == "conv"
    assert {p.name for p in wiring.produces} == {"conv.weight", "conv.bias", "bn.weight", "bn.bias"}
    reports[0].save  # noqa: B018  # the report is consistent enough to save (was a ShapeError)


def test_in_place_relu_then_pass_through_is_wired_to_its_linear() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(4, 8),
            act=nn.ReLU(inplace=True),
            drop=nn.Dropout(0.5),
            fc2=nn.Linear(8, 3),
        )
    ).eval()
    with torch.no_grad():
        model.fc1.bias[[0, 3, 7]] = -50.0
    x = torch.randn(256, 4, generator=torch.Generator().manual_seed(5))
    dead = never_fired(torch.relu(model.fc1(x)), 1)
    assert {0, 3, 7} <= set(dead)
    with neuronwatch.watch(model, compile=False, min_rows=10) as monitor:
        model(x)
        report = monitor.report()
    wiring = report.wiring["act"]
    assert (wiring.producer, wiring.consumer) == ("fc1", "fc2")
    assert report.layers["act"].dead_indices.tolist() == dead
    # By hand: fc1.weight 32 + fc1.bias 8 + fc2.weight 24 wired; each dead neuron takes its row
    # of fc1.weight (4), its bias (1) and its column of fc2.weight (3).
    assert report.active_parameter_ratio() == pytest.approx((64 - len(dead) * 8) / 64)


def test_unbatched_conv_input_uses_the_channel_axis() -> None:
    model = conv_bn_dropout_identity_relu().eval()
    model.bn = nn.Identity()  # BatchNorm2d needs a batch
    model.drop = nn.Identity()  # Dropout2d reads a 3-D input as [N, C, L]
    with torch.no_grad():
        model.conv.bias[[2]] = -50.0
    gen = torch.Generator().manual_seed(3)
    with neuronwatch.watch(model, compile=False, min_rows=10) as monitor:
        for _ in range(2):
            model(torch.randn(3, 8, 8, generator=gen))  # [C, H, W]
        act = monitor.report().layers["act"]
    assert act.neurons == 6  # channels (axis 0 here), not H
    assert act.rows == 2 * 6 * 6
    assert act.dead_indices.tolist() == [2]


# -- activation checkpointing ---------------------------------------------------------------------


class CheckpointedMLP(nn.Module):
    def __init__(self, reentrant: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 16)
        self.act = nn.ReLU()
        self.fc2 = nn.Linear(16, 2)
        self.reentrant = reentrant
        with torch.no_grad():
            self.fc1.bias[[5]] = -50.0

    def block(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = checkpoint(self.block, x, use_reentrant=self.reentrant)
        return self.fc2(h)


@pytest.mark.usefixtures("early_stop")
@pytest.mark.parametrize("reentrant", [False, True])
def test_recomputation_under_activation_checkpointing_is_not_counted(reentrant: bool) -> None:
    model = CheckpointedMLP(reentrant)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    with neuronwatch.watch(model, compile=False, min_rows=10) as monitor:
        for _ in range(2):
            x = torch.randn(20, 6, requires_grad=reentrant)
            model(x).sum().backward()  # recomputes block() inside backward
            optimizer.step()
            monitor.step()
        act = monitor.report().layers["act"]
    assert act.rows == 40  # the input's rows, not 80
    assert act.dead_indices.tolist() == [5]
    assert monitor.report().layers.keys() == {"act"}  # no "act#2" from the recomputation


class CheckpointedBlock(nn.Module):
    """The checkpointed part is itself a module, which a user also calls directly."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.block = nn.Sequential(OrderedDict(fc=nn.Linear(6, 16), act=nn.ReLU()))
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(checkpoint(self.block, x, use_reentrant=False))


@pytest.fixture(params=[True, False], ids=["early-stop", "full-recompute"])
def early_stop(request: pytest.FixtureRequest) -> Iterator[None]:
    """Non-reentrant checkpointing stops recomputing once the saved tensors are back (hooks of
    later modules do not run); without early stop every recomputed module runs its hooks."""
    with set_checkpoint_early_stop(request.param):
        yield


@pytest.mark.usefixtures("early_stop")
def test_recomputation_of_an_entry_module_is_not_a_forward() -> None:
    model = CheckpointedBlock()
    with neuronwatch.watch(model, compile=False, min_rows=1) as monitor:
        model.block(torch.randn(3, 6))  # called through another path: becomes an entry
        for _ in range(2):
            model(torch.randn(20, 6)).sum().backward()  # block() runs again in backward
        assert monitor.report().layers["block.act"].rows == 3 + 40


@pytest.mark.usefixtures("early_stop")
def test_recomputation_adds_no_hooks() -> None:
    model = CheckpointedMLP(reentrant=False)
    with neuronwatch.watch(model, compile=False, min_rows=1) as monitor:
        with torch.no_grad():
            model(torch.randn(4, 6))  # the traced forward; its tracer hooks are gone after it
        hooks = monitor.sources[0].hooks
        for _ in range(2):
            model(torch.randn(4, 6)).sum().backward()
        assert monitor.sources[0].hooks == hooks  # no entry found in backward's frames


# -- methods other than forward -------------------------------------------------------------------


class TwoTowers(nn.Module):
    """CLIP's shape: encode_image and encode_text call submodules, forward calls both."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.visual = nn.Sequential(OrderedDict(fc=nn.Linear(5, 7), act=nn.ReLU()))
        self.text = nn.Sequential(OrderedDict(fc=nn.Linear(3, 4), act=nn.GELU()))
        with torch.no_grad():
            self.visual.fc.bias[[1]] = -50.0

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)

    def encode_text(self, t: torch.Tensor) -> torch.Tensor:
        return self.text(t)

    def forward(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return self.encode_image(x).sum() + self.encode_text(t).sum()


def test_a_model_used_through_another_method_is_watched() -> None:
    model = TwoTowers()
    with neuronwatch.watch(model, compile=False, min_rows=10, every=2) as monitor:
        for _ in range(4):
            model.encode_image(torch.randn(6, 5))
        model.encode_text(torch.randn(2, 3))
        image = monitor.report().layers["visual.act"]
        # every=2: calls 1 and 3 of encode_image are watched; the first one too, although
        # nothing was hooked on its entry point before it ran.
        assert image.rows == 12
        assert image.dead_indices.tolist() == [1]
        model(torch.randn(6, 5), torch.randn(3, 3))
        model(torch.randn(6, 5), torch.randn(3, 3))
        report = monitor.report()
    assert report.layers["visual.act"].rows == 12 + 6  # one of the two forwards watched
    assert report.wiring["visual.act"].producer == "visual.fc"
    assert "visual.act#2" not in report.layers  # calls through a method are not call sites


# -- steps and windows ----------------------------------------------------------------------------


def test_step_k_honours_every_window_and_flush_boundary() -> None:
    model = nn.Sequential(OrderedDict(fc=nn.Linear(2, 3), act=nn.ReLU()))
    with neuronwatch.watch(model, compile=False, window=5, flush_every=3) as monitor:
        flushed: list[int] = []
        for _ in range(5):
            model(torch.randn(4, 2))
            monitor.step(2)
            latest = monitor.latest
            flushed.append(latest.layers("lifetime")["act"].rows if latest else 0)
        snapshot = monitor.snapshot()
    assert snapshot.windows_completed == 2  # boundaries at steps 5 and 10
    assert snapshot.step == 10
    # Steps 2, 4, 6, 8, 10: 2 crosses nothing, 4 crosses flush boundary 3, 6 window 5 (and
    # flush 6), 8 nothing (6 was already crossed), 10 flush 9 and window 10.
    assert flushed == [0, 8, 12, 12, 20]


def test_a_step_across_several_window_boundaries_counts_them_all() -> None:
    model = nn.Sequential(OrderedDict(fc=nn.Linear(2, 3), act=nn.ReLU()))
    with neuronwatch.watch(model, compile=False, window=4) as monitor:
        model(torch.randn(5, 2))
        monitor.step(9)
        snapshot = monitor.snapshot()
    assert snapshot.windows_completed == 2
    assert snapshot.layers("last")["act"].rows == 5


def test_many_threads_serving_one_model_keep_their_call_sites_apart() -> None:
    model = resnet_block()
    gen = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, 3, 6, 6, generator=gen) for _ in range(24)]
    with neuronwatch.watch(model, compile=False, min_rows=1) as monitor:
        model(xs[0])  # traced first
        threads = [
            threading.Thread(target=lambda chunk=chunk: [model(x) for x in chunk])
            for chunk in (xs[1:12], xs[12:])
        ]
        with torch.no_grad():
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        report = monitor.report()
    assert set(report.layers) == {"act", "block.relu", "block.relu#2"}
    for layer in report.layers.values():
        assert layer.rows == 24 * 2 * 6 * 6
    assert report.layers["block.relu#2"].dead_indices.tolist() == [6]
    assert np.all(report.layers["block.relu"].partials.nonfinite == 0)
