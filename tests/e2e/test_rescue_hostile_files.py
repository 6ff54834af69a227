"""Defects a hostile review of rescue found (issue 8) in real torch and ONNX files: Lightning
and DDP checkpoints, optimizer groups out of order, a BatchNorm after the activation, hostile
and odd pickles, SIGTERM mid-run, float64 ONNX swaps."""

from __future__ import annotations

import os
import pickle
import signal
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from rescue_models import audit, build, data, plant_dead_by_bias
from safetensors.torch import save_file
from torch import nn

from neuronwatch import rescue
from neuronwatch.cli.rescue import rescue as rescue_command
from neuronwatch.rescue import CheckpointError

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

DEAD1 = [0, 5, 17]


def _train(model: nn.Module, params: object, x: torch.Tensor) -> torch.optim.Optimizer:
    optimizer = torch.optim.AdamW(params, lr=1e-3)  # type: ignore[arg-type]
    for _ in range(3):
        optimizer.zero_grad()
        model(x[:64]).square().mean().backward()
        optimizer.step()
    return optimizer


def _plant(model: nn.Module, x: torch.Tensor) -> None:
    with torch.no_grad():
        model.get_submodule("fc1").bias[DEAD1] = -100.0  # type: ignore[index]


# -- 3: Lightning keeps a list of optimizer states ---------------------------------------------


class Lit(nn.Module):
    """A LightningModule's layout: the network under ``self.model``."""

    def __init__(self) -> None:
        super().__init__()
        self.model = build("mlp")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.model(x)
        return out


def test_lightning_optimizer_states_list_has_its_moments_reset(tmp_path: Path) -> None:
    lit, x = Lit(), data("mlp")
    optimizer = _train(lit, lit.parameters(), x)
    _plant(lit.model, x)
    audit(lit, x).save(tmp_path / "r")
    checkpoint = {
        "epoch": 3,
        "state_dict": lit.state_dict(),
        "optimizer_states": [optimizer.state_dict()],
        "lr_schedulers": [],
    }
    torch.save(checkpoint, tmp_path / "last.ckpt")
    manifest = rescue.reinit(tmp_path / "last.ckpt", tmp_path / "r", tmp_path / "o.ckpt")
    assert manifest.notes["optimizer"]["at"] == "optimizer_states.0"
    old = torch.load(tmp_path / "last.ckpt", weights_only=True)
    new = torch.load(tmp_path / "o.ckpt", weights_only=True)
    changed = new["state_dict"]["model.fc1.weight"] != old["state_dict"]["model.fc1.weight"]
    assert changed[DEAD1].any()
    for key in ("exp_avg", "exp_avg_sq"):
        assert (new["optimizer_states"][0]["state"][0][key][changed] == 0).all()


# -- 6: DDP's module. prefix in param_names ----------------------------------------------------


class Wrapper(nn.Module):
    """DistributedDataParallel's layout: the network under ``self.module``."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.module = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.module(x)
        return out


def test_ddp_prefixed_param_names_are_matched_without_the_prefix(tmp_path: Path) -> None:
    net, x = build("mlp"), data("mlp")
    wrapped = Wrapper(net)
    optimizer = _train(wrapped, wrapped.named_parameters(), x)
    _plant(net, x)
    audit(net, x).save(tmp_path / "r")
    torch.save({"model": net.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c.pt")
    manifest = rescue.reinit(tmp_path / "c.pt", tmp_path / "r", tmp_path / "o.pt")
    assert manifest.notes["optimizer"]["mapped_by"] == "param_names"
    assert "module." in manifest.notes["optimizer"]["param_names"]
    old = torch.load(tmp_path / "c.pt", weights_only=True)
    new = torch.load(tmp_path / "o.pt", weights_only=True)
    changed = new["model"]["fc1.weight"] != old["model"]["fc1.weight"]
    assert changed.any()
    assert (new["optimizer"]["state"][0]["exp_avg"][changed] == 0).all()


# -- 10: optimizer groups in another order than the state_dict ---------------------------------


def test_an_optimizer_whose_order_cannot_be_verified_is_refused(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(8, 32, bias=False),
            act1=nn.ReLU(),
            fc2=nn.Linear(32, 32, bias=False),
            act2=nn.ReLU(),
            fc3=nn.Linear(32, 32, bias=False),
            act3=nn.ReLU(),
            fc4=nn.Linear(32, 4, bias=False),
        )
    )
    x = data("mlp")
    order = ["fc1", "fc3", "fc2", "fc4"]  # per-layer learning rates, not state_dict order
    groups = [{"params": [model.get_submodule(n).weight], "lr": 1e-3} for n in order]
    optimizer = _train(model, groups, x)
    with torch.no_grad():
        model.fc2.weight[[3, 9]] = -1.0  # inputs are ReLU outputs >= 0: act2 3, 9 dead
    audit(model, x).save(tmp_path / "r")
    torch.save(
        {"model": model.state_dict(), "optimizer": optimizer.state_dict()}, tmp_path / "c.pt"
    )
    with pytest.raises(CheckpointError, match="cannot be verified"):
        rescue.reinit(tmp_path / "c.pt", tmp_path / "r", tmp_path / "o.pt", layers=["act2"])
    assert not (tmp_path / "o.pt").exists()


# -- 4: a BatchNorm between the neurons and their consumer --------------------------------------


@pytest.mark.parametrize("centred", [True, False], ids=["beta", "running_mean"])
def test_reinit_through_a_batchnorm_after_the_relu_keeps_the_outputs(
    tmp_path: Path, centred: bool
) -> None:
    torch.manual_seed(0)
    # Keras' eps (1e-3), which a state_dict does not record: where it matters, reinit skips.
    model = nn.Sequential(
        OrderedDict(
            fc1=nn.Linear(8, 32),
            act1=nn.ReLU(),
            bn1=nn.BatchNorm1d(32, eps=1e-5 if centred else 1e-3),
            fc2=nn.Linear(32, 4),
        )
    ).eval()
    x = data("mlp")
    with torch.no_grad():
        model.fc1.bias[DEAD1] = -100.0
        model.bn1.running_mean.uniform_(0.1, 0.5)
        model.bn1.running_var.uniform_(0.5, 1.5)
        model.bn1.bias.uniform_(-1.0, 1.0)  # the dead channels' norm output is beta, not 0
        if centred:  # dead since initialisation: the norm passes exactly beta, whatever eps
            model.bn1.running_mean[DEAD1] = 0.0
        else:  # a small variance: the eps assumed (1e-5) would give a different constant
            model.bn1.running_var[DEAD1] = 1e-3
        expected = model(x)
    audit(model, x).save(tmp_path / "r")
    save_file(model.state_dict(), str(tmp_path / "m.safetensors"))
    manifest = rescue.reinit(tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "o.safetensors")
    if centred:
        assert [layer["neurons"] for layer in manifest.layers] == [DEAD1], manifest.skipped
    else:
        assert manifest.layers == []
        assert "eps" in manifest.skipped[0]["reason"]
    from safetensors.torch import load_file

    model.load_state_dict(load_file(tmp_path / "o.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected, atol=1e-5, rtol=0)


# -- 16: a hostile or odd pickle is refused in one line -----------------------------------------


def test_a_protocol_4_pickle_is_refused_in_one_line_without_warnings(
    tmp_path: Path, recwarn: pytest.WarningsRecorder
) -> None:
    model = build("mlp")
    x = data("mlp")
    plant_dead_by_bias(model, "mlp")
    audit(model, x).save(tmp_path / "r")
    torch.save(model.state_dict(), tmp_path / "p4.pt", pickle_protocol=4)
    recwarn.clear()
    result = CliRunner().invoke(
        rescue_command,
        [
            "strip",
            str(tmp_path / "p4.pt"),
            "--report",
            str(tmp_path / "r"),
            "--out",
            str(tmp_path / "o.pt"),
        ],
    )
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert "pickle protocol" in result.output
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p4.pt", "r"]


def test_empty_and_text_pt_files_get_one_line_errors(tmp_path: Path) -> None:
    build_report = build("mlp")
    audit(build_report, data("mlp")).save(tmp_path / "r")
    (tmp_path / "empty.pt").write_bytes(b"")
    (tmp_path / "text.pt").write_text("hello, this is not a pickle\n")
    for name, message in (("empty.pt", "is empty"), ("text.pt", "not a PyTorch checkpoint")):
        result = CliRunner().invoke(
            rescue_command,
            [
                "prune",
                str(tmp_path / name),
                "--report",
                str(tmp_path / "r"),
                "--out",
                str(tmp_path / "o.pt"),
            ],
        )
        assert result.exit_code == 1
        assert "Traceback" not in result.output
        assert message in result.output
        assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "o.pt").exists()


def test_a_pickle_that_runs_code_is_refused_in_one_line(tmp_path: Path) -> None:
    audit(build("mlp"), data("mlp")).save(tmp_path / "r")

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[object, ...]]:
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    (tmp_path / "evil.pt").write_bytes(pickle.dumps({"fc1.weight": Payload()}, protocol=2))
    result = CliRunner().invoke(
        rescue_command,
        [
            "strip",
            str(tmp_path / "evil.pt"),
            "--report",
            str(tmp_path / "r"),
            "--out",
            str(tmp_path / "o.pt"),
        ],
    )
    assert result.exit_code == 1
    assert "needs code to load" in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert not (tmp_path / "pwned").exists()


# -- 12: SIGTERM during a run leaves no temporary file ------------------------------------------


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP], ids=["TERM", "HUP"])
def test_sigterm_mid_write_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, signum: int
) -> None:
    """SIGTERM (kill, a scheduler's timeout) and SIGHUP (a closed terminal)."""
    model = build("mlp")
    x = data("mlp")
    plant_dead_by_bias(model, "mlp")
    audit(model, x).save(tmp_path / "r")
    torch.save({"model": model.state_dict()}, tmp_path / "m.pt")
    from neuronwatch.rescue import steps

    real = steps.Strip.apply

    def apply_then_terminate(self: object, *args: object, **kwargs: object) -> object:
        os.kill(os.getpid(), signum)
        return real(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(steps.Strip, "apply", apply_then_terminate)
    out = tmp_path / "out"
    out.mkdir()
    # A handler of the test's own, so that a missing rescue handler fails the test rather
    # than killing pytest; rescue must put it back afterwards.
    received: list[int] = []

    def ours(number: int, frame: object) -> None:
        received.append(number)

    previous = signal.signal(signum, ours)
    try:
        result = CliRunner().invoke(
            rescue_command,
            [
                "strip",
                str(tmp_path / "m.pt"),
                "--report",
                str(tmp_path / "r"),
                "--out",
                str(out / "o.pt"),
            ],
        )
        assert signal.getsignal(signum) is ours
    finally:
        signal.signal(signum, previous)
    assert received == []
    assert result.exit_code == 128 + signum
    assert list(out.iterdir()) == []


def test_a_full_disk_under_torch_save_is_one_line_naming_the_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.save's zip writer hides the OSError of a full disk behind its own RuntimeError
    ("unexpected pos ...") when it closes: the user still gets the one-line error."""
    model = build("mlp")
    plant_dead_by_bias(model, "mlp")
    audit(model, data("mlp")).save(tmp_path / "r")
    torch.save(model.state_dict(), tmp_path / "m.pt")
    real = torch.save

    def full_disk(obj: object, handle: object) -> None:
        try:
            raise OSError(28, "No space left on device")
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] unexpected pos") from None

    monkeypatch.setattr(torch, "save", full_disk)
    out = tmp_path / "out"
    out.mkdir()
    result = CliRunner().invoke(
        rescue_command,
        [
            "strip",
            str(tmp_path / "m.pt"),
            "--report",
            str(tmp_path / "r"),
            "--out",
            str(out / "o.pt"),
        ],
    )
    monkeypatch.setattr(torch, "save", real)
    assert result.exit_code == 1, result.output
    assert "o.pt was not written: No space left on device" in result.output
    assert "Traceback" not in result.output
    assert list(out.iterdir()) == []


# -- 17: float64 graphs swap to operators ONNX Runtime runs -------------------------------------


def _relu_graph(opset: int, element: int, dtype: type[np.floating]) -> object:
    helper, numpy_helper = onnx.helper, onnx.numpy_helper
    weight = np.random.default_rng(0).standard_normal((8, 16)).astype(dtype)
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
            helper.make_node("Relu", ["h"], ["y"], name="relu1"),
        ],
        "g",
        [helper.make_tensor_value_info("x", element, ["b", 8])],
        [helper.make_tensor_value_info("y", element, ["b", 16])],
        [numpy_helper.from_array(weight, "W")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8 if opset < 20 else 9
    return model


@pytest.mark.parametrize("opset", [13, 17, 20])
@pytest.mark.parametrize("alpha", [0.2, 1.5])
def test_leaky_relu_swap_of_a_float64_graph_runs_and_is_exact(
    tmp_path: Path, opset: int, alpha: float
) -> None:
    model = _relu_graph(opset, onnx.TensorProto.DOUBLE, np.float64)
    onnx.save(model, str(tmp_path / "m.onnx"))
    manifest = rescue.swap_onnx(
        tmp_path / "m.onnx", tmp_path / "s.onnx", to="leaky_relu", alpha=alpha
    )
    assert manifest.notes["swapped_nodes"] == ["relu1"]
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((32, 8))
    weight = onnx.numpy_helper.to_array(model.graph.initializer[0])  # type: ignore[attr-defined]
    h = x @ weight
    np.testing.assert_array_equal(session.run(None, {"x": x})[0], np.where(h > 0, h, alpha * h))


@pytest.mark.parametrize("opset", [13, 20])
def test_gelu_swap_of_a_float16_graph_matches_gelu(tmp_path: Path, opset: int) -> None:
    model = _relu_graph(opset, onnx.TensorProto.FLOAT16, np.float16)
    onnx.save(model, str(tmp_path / "m.onnx"))
    manifest = rescue.swap_onnx(tmp_path / "m.onnx", tmp_path / "s.onnx", to="gelu")
    assert manifest.notes["written_as"] == ("Gelu" if opset >= 20 else "Erf/Tanh decomposition")
    session = ort.InferenceSession(str(tmp_path / "s.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((32, 8)).astype(np.float16)
    weight = onnx.numpy_helper.to_array(model.graph.initializer[0])  # type: ignore[attr-defined]
    h = torch.from_numpy((x @ weight).astype(np.float32))
    expected = nn.functional.gelu(h).numpy()
    np.testing.assert_allclose(session.run(None, {"x": x})[0], expected, atol=2e-2, rtol=0)


def test_float64_erf_gelu_and_old_opset_bfloat16_leaky_relu_are_refused(tmp_path: Path) -> None:
    from neuronwatch.errors import ConfigError

    onnx.save(_relu_graph(17, onnx.TensorProto.DOUBLE, np.float64), str(tmp_path / "d.onnx"))
    with pytest.raises(ConfigError, match="no float64 Erf/Gelu kernel"):
        rescue.swap_onnx(tmp_path / "d.onnx", tmp_path / "s.onnx", to="gelu")
    bf16 = _relu_graph(13, onnx.TensorProto.FLOAT, np.float32)
    for value in (*bf16.graph.input, *bf16.graph.output):  # type: ignore[attr-defined]
        value.type.tensor_type.elem_type = onnx.TensorProto.BFLOAT16
    bf16.graph.initializer[0].CopyFrom(  # type: ignore[attr-defined]
        onnx.helper.make_tensor("W", onnx.TensorProto.BFLOAT16, [8, 16], [0.5] * 128)
    )
    onnx.save(bf16, str(tmp_path / "b.onnx"))
    with pytest.raises(ConfigError, match="bfloat16 values, which LeakyRelu accepts from opset 16"):
        rescue.swap_onnx(tmp_path / "b.onnx", tmp_path / "s.onnx", to="leaky_relu")
    assert not (tmp_path / "s.onnx").exists()


# -- 11: bad option values and broken weights are one-line errors ------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["reinit", "--seed", "-1"], "--seed must be an integer >= 0"),
        (["prune", "--constant-tol", "nan"], "--constant-tol must be a finite number"),
        (["prune", "--constant-tol", "inf"], "--constant-tol must be a finite number"),
        (["reinit", "--match-norm", "--layers", "act1"], "hold non-finite weights"),
    ],
)
def test_bad_values_are_one_line_errors(tmp_path: Path, args: list[str], message: str) -> None:
    model = build("mlp")
    plant_dead_by_bias(model, "mlp")
    audit(model, data("mlp")).save(tmp_path / "r")
    weights = model.state_dict()
    weights["fc1.weight"][1, 0] = float("nan")  # a live neuron: no norm to match
    save_file(weights, str(tmp_path / "m.safetensors"))
    op, *options = args
    result = CliRunner().invoke(
        rescue_command,
        [
            op,
            str(tmp_path / "m.safetensors"),
            "--report",
            str(tmp_path / "r"),
            "--out",
            str(tmp_path / "o.safetensors"),
            *options,
        ],
    )
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1
    assert message in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors", "r"]
