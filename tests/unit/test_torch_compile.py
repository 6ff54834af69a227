"""The three reduction paths agree: compile=True (fused, inductor), compile=False (eager) and the
numpy engine (``Engine.observe``) on the very same activations. Counts are exact, float sums
allclose, extrema exact."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import AbstractContextManager, nullcontext

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import neuronwatch
from neuronwatch import Engine, Partials

EXACT = ("fired", "saturated", "nonfinite", "histogram", "max", "min")
SUMS = ("sum", "abs_sum", "sq_sum")


class Mixed(nn.Module):
    """Conv/ReLU channels, then Tanh, GELU and Sigmoid layers on [B, T, F] rows."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.cact = nn.ReLU()
        self.fc1 = nn.Linear(6, 12)
        self.tact = nn.Tanh()
        self.fc2 = nn.Linear(12, 16)
        self.gact = nn.GELU()
        self.fc3 = nn.Linear(16, 8)
        self.sact = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.cact(self.conv(x))  # [B, 6, H, W]
        rows = h.flatten(2).transpose(1, 2)  # [B, H*W, 6]
        return self.sact(self.fc3(self.gact(self.fc2(self.tact(self.fc1(rows))))))


AXES = {"cact": 1, "tact": -1, "gact": -1, "sact": -1}


def planted_mixed() -> Mixed:
    torch.manual_seed(0)
    model = Mixed()
    with torch.no_grad():
        model.conv.bias[2] = -50.0  # dead channel
        model.fc1.bias[3] = 50.0  # saturated tanh
        model.fc2.weight[:, 3] = 0.0  # ... whose constant output would shift every GELU input
        model.fc2.bias.zero_()
        model.fc2.bias[[4, 9]] = -50.0  # never-firing (leaking), dormant GELU
        model.fc3.bias[0] = -50.0  # saturated, dead sigmoid (no gradient on any row)
    return model


def calls() -> Iterator[tuple[torch.Tensor, AbstractContextManager[object]]]:
    """Changing shapes, grad/no-grad/inference mode, bf16 autocast, and non-finite inputs."""
    gen = torch.Generator().manual_seed(0)
    yield torch.randn(4, 3, 8, 8, generator=gen), nullcontext()
    yield torch.randn(2, 3, 9, 7, generator=gen), torch.no_grad()
    yield torch.randn(5, 3, 6, 6, generator=gen), torch.inference_mode()
    yield torch.randn(3, 3, 8, 5, generator=gen), torch.autocast("cpu", dtype=torch.bfloat16)
    x = torch.randn(2, 3, 7, 7, generator=gen)
    x[0, 1, 3, 3] = float("nan")
    x[1, 0, 0, 0] = float("inf")
    yield x, torch.no_grad()
    yield torch.randn(1, 3, 4, 4, generator=gen), nullcontext()


def run_monitor(compile: bool) -> dict[str, Partials]:
    model = planted_mixed()
    with neuronwatch.watch(model, compile=compile, histogram_every=1, min_rows=50) as monitor:
        for x, mode in calls():
            with mode:
                model(x)
        snapshot = monitor.snapshot()
    assert snapshot.errors == {}
    return {name: stats.partials for name, stats in snapshot.layers("lifetime").items()}


def run_numpy() -> dict[str, Partials]:
    """The reference: plain forward hooks hand each activation to ``Engine.observe``."""
    model = planted_mixed()
    engine = Engine("Mixed", min_rows=50)
    handles = []
    for name, axis in AXES.items():
        module = getattr(model, name)
        engine.add_layer(name, type(module).__name__)

        def hook(
            mod: nn.Module, args: object, out: torch.Tensor, name: str = name, axis: int = axis
        ) -> None:
            engine.observe(name, out.detach().float().numpy(), feature_axis=axis)

        handles.append(module.register_forward_hook(hook))
    try:
        for x, mode in calls():
            with mode:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    return {name: stats.partials for name, stats in engine.snapshot().layers("lifetime").items()}


def assert_same(mine: Partials, reference: Partials, where: str) -> None:
    assert mine.rows == reference.rows, where
    for field in EXACT:
        np.testing.assert_array_equal(
            getattr(mine, field), getattr(reference, field), err_msg=f"{where}: {field}"
        )
    # float32 partial sums: the rounding error is bounded relative to the sum of |a|, which
    # also covers sums that cancel to about zero.
    tolerance = 1e-5 * reference.abs_sum + 1e-9
    for field in SUMS:
        error = np.abs(getattr(mine, field) - getattr(reference, field))
        assert (error <= tolerance).all(), f"{where}: {field} differs by {error.max()}"


@pytest.fixture(scope="module")
def paths() -> dict[str, dict[str, Partials]]:
    return {"compiled": run_monitor(True), "eager": run_monitor(False), "numpy": run_numpy()}


def test_compile_really_compiles(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    run_monitor(True)
    fallbacks = [r for r in caplog.records if "torch.compile failed" in r.getMessage()]
    assert fallbacks == []


@pytest.mark.parametrize("path", ["compiled", "eager"])
def test_torch_paths_equal_the_numpy_engine(
    paths: dict[str, dict[str, Partials]], path: str
) -> None:
    reference = paths["numpy"]
    assert set(paths[path]) == set(reference) == set(AXES)
    for name in AXES:
        assert_same(paths[path][name], reference[name], f"{path} {name}")


def test_compiled_equals_eager(paths: dict[str, dict[str, Partials]]) -> None:
    for name in AXES:
        assert_same(paths["compiled"][name], paths["eager"][name], f"compiled vs eager {name}")


def test_the_comparison_covers_what_it_claims(paths: dict[str, dict[str, Partials]]) -> None:
    numpy_path = paths["numpy"]
    cact = numpy_path["cact"]
    assert cact.neurons == 6
    assert cact.rows == 4 * 64 + 2 * 63 + 5 * 36 + 3 * 40 + 2 * 49 + 16
    assert cact.nonfinite.sum() > 0  # the NaN/Inf inputs reached the layer
    assert cact.fired[2] == 0
    tact = numpy_path["tact"]
    assert tact.saturated[3] == tact.rows - tact.nonfinite[3]
    assert (numpy_path["gact"].fired[[4, 9]] == 0).all()
    assert numpy_path["sact"].histogram.sum() > 0


@pytest.mark.parametrize("compile", [False, True])
def test_planted_verdicts_with_compile(compile: bool) -> None:
    model = planted_mixed()
    with neuronwatch.watch(model, compile=compile, min_rows=50) as monitor:
        for x, mode in calls():
            with mode:
                model(x)
        layers = monitor.report().layers
    assert layers["cact"].dead_indices.tolist() == [2]
    assert np.flatnonzero(layers["tact"].saturated).tolist() == [3]
    assert layers["gact"].indices("leaking").tolist() == [4, 9]
    assert np.flatnonzero(layers["gact"].dormant).tolist() == [4, 9]
    assert np.flatnonzero(layers["sact"].saturated).tolist() == [0]
    # Stuck at 0 on every row: saturated, never fires, no gradient: dead.
    assert layers["sact"].dead_indices.tolist() == [0]
    assert layers["sact"].count("leaking") == 0


class Tap(nn.Module):
    """An identity "activation": the values the test writes are the values watched."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Tapped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tap = Tap()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.tap(x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("compile", [False, True])
def test_values_on_a_threshold_are_judged_like_numpy(compile: bool, dtype: torch.dtype) -> None:
    # 0.1 and 0.3 are not float32 numbers: float32(0.1) = 0.10000000149 > 0.1, so it fires at
    # fire_threshold=0.1 and lies above the histogram edge 0.1 in the numpy engine. In float64
    # the value *is* the threshold and must not fire: float64 activations stay float64.
    values = torch.tensor([[0.1, 0.3, -0.3, 0.05]] * 8, dtype=dtype)
    settings_ = {"min_rows": 1, "fire_threshold": 0.1, "saturation_high": 0.3}
    model = Tapped()
    with neuronwatch.watch(
        model, layers=["tap"], compile=compile, histogram_every=1, **settings_
    ) as monitor:
        model(values)
        mine = monitor.snapshot().layers("lifetime")["tap"].partials
    engine = Engine("Tapped", **settings_)
    engine.observe("tap", values.numpy())
    reference = engine.snapshot().layers("lifetime")["tap"].partials
    float32 = dtype == torch.float32
    assert reference.fired.tolist() == ([8, 8, 0, 0] if float32 else [0, 8, 0, 0])
    assert reference.saturated.tolist() == ([0, 8, 0, 0] if float32 else [0, 0, 0, 0])
    assert_same(mine, reference, f"compile={compile}")


# Multiples of 1/8 never sit on a threshold or an edge in either float32 or float64, so this
# compares the reductions themselves, over arbitrary shapes, axes and non-finite values.
_values = st.one_of(
    st.integers(-100, 100).map(lambda k: k / 8),
    st.sampled_from([float("nan"), float("inf"), float("-inf"), 0.0, -0.0]),
)


@st.composite
def activations(draw: st.DrawFn) -> tuple[np.ndarray, int]:
    shape = tuple(draw(st.lists(st.integers(1, 5), min_size=2, max_size=4)))
    flat = draw(st.lists(_values, min_size=int(np.prod(shape)), max_size=int(np.prod(shape))))
    axis = draw(st.integers(0, len(shape) - 1))
    return np.asarray(flat, dtype=np.float32).reshape(shape), axis


@settings(max_examples=40, deadline=None)
@given(activations(), st.sampled_from(["Tap", "Tanh", "Sigmoid", "GELU"]))
def test_eager_reduction_equals_numpy_on_arbitrary_arrays(
    case: tuple[np.ndarray, int], family: str
) -> None:
    array, axis = case
    model = Tapped()
    # Borrow a family's thresholds through overrides: the module itself stays an identity.
    family_settings = {
        "Tap": {},
        "Tanh": {"fire_threshold": 1e-3, "saturation_low": -0.99, "saturation_high": 0.99},
        "Sigmoid": {"fire_threshold": 1e-3, "saturation_low": 0.01, "saturation_high": 0.99},
        "GELU": {"fire_threshold": 1e-3},
    }[family]
    with neuronwatch.watch(
        model, layers=["tap"], compile=False, histogram_every=1, min_rows=1,
        feature_axis={"tap": axis}, **family_settings,
    ) as monitor:  # fmt: skip
        model(torch.from_numpy(array))
        mine = monitor.snapshot().layers("lifetime")["tap"].partials
    engine = Engine("Tapped", min_rows=1, **family_settings)
    engine.observe("tap", array, feature_axis=axis)
    assert_same(mine, engine.snapshot().layers("lifetime")["tap"].partials, "eager vs numpy")


def test_a_torch_compiled_model_is_watched_under_its_own_names() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    with torch.no_grad():
        model[0].bias[[3, 7]] = -100.0
    compiled = torch.compile(model)
    with neuronwatch.watch(compiled, min_rows=100, compile=False) as monitor:
        for _ in range(5):
            compiled(torch.randn(64, 16)).sum().backward()
            monitor.step()
        snapshot = monitor.snapshot()
    stats = snapshot.layers("lifetime")["1"]  # not "_orig_mod.1"
    assert stats.rows == 5 * 64
    assert stats.dead_indices.tolist() == [3, 7]
    assert snapshot.wiring["1"].produces[0].name == "0.weight"
    assert {ref.name for ref in snapshot.wiring["1"].produces} <= set(model.state_dict())
    assert not snapshot.errors
