"""``neuronwatch audit``: real ONNX files and data through the command, its errors as one line."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner, Result
from onnx import helper
from onnx_fixtures import DEAD, MLP, Encoder, encoder_batches, export

from neuronwatch import Report
from neuronwatch.cli.audit import audit
from neuronwatch.cli.rescue import rescue
from neuronwatch.errors import MissingExtraError


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(audit, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture(scope="module")
def mlp_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("mlp")
    x = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
    return export(MLP(), {"x": x}, folder / "mlp.onnx", dynamo=False)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    x = np.random.default_rng(1).standard_normal((300, 8)).astype(np.float32)
    np.savez(tmp_path / "data.npz", x=x)
    return tmp_path / "data.npz"


def test_audit_writes_report_plots_and_page(mlp_file: Path, data: Path, tmp_path: Path) -> None:
    out = tmp_path / "audit"
    result = invoke(
        mlp_file, "--data", data, "--out", out, "--min-rows", "100", "--provider", "cpu"
    )
    assert result.exit_code == 0, result.output
    assert "on CPUExecutionProvider" in result.output
    assert "300/300" in result.output
    assert "samples/s" in result.output
    assert "rows/s" in result.output
    assert {"report.json", "report.npz", "index.html"} <= {p.name for p in out.iterdir()}
    assert len(list(out.glob("*.png"))) >= 3
    report = Report.load(out)
    assert report.layers["act"].rows == 300
    assert report.layers["act"].dead_indices.tolist() == DEAD
    assert report.meta["onnx"]["provider"] == "CPUExecutionProvider"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".audit")]


def test_pre_audits_feed_rescue_lift(mlp_file: Path, data: Path, tmp_path: Path) -> None:
    # --pre watches each activation's input too: lift raises dead neurons' biases from those
    # statistics, and the lifted file's dead neurons fire when audited again.
    result = invoke(mlp_file, "--data", data, "--out", tmp_path / "pre", "--pre",
                    "--min-rows", "100", "--quiet")  # fmt: skip
    assert result.exit_code == 0, result.output
    report = Report.load(tmp_path / "pre")
    assert {"act", "act:pre"} <= set(report.layers)
    assert report.layers["act:pre"].rows == 300
    lifted = tmp_path / "lifted.onnx"
    rescued = CliRunner().invoke(
        rescue, ["lift", str(mlp_file), "--report", str(tmp_path / "pre"), "--out", str(lifted)]
    )
    assert rescued.exit_code == 0, rescued.output
    again = invoke(lifted, "--data", data, "--out", tmp_path / "after", "--min-rows", "100",
                   "--quiet")  # fmt: skip
    assert again.exit_code == 0, again.output
    assert Report.load(tmp_path / "after").layers["act"].dead_indices.tolist() == []


def test_budget_fails_the_build_and_writes_a_summary(
    mlp_file: Path, data: Path, tmp_path: Path
) -> None:
    summary = tmp_path / "gate.json"
    result = invoke(
        mlp_file, "--data", data, "--out", tmp_path / "audit", "--min-rows", "100",
        "--max-dead-ratio", "0.1", "--summary-json", summary, "--quiet",
    )  # fmt: skip
    assert result.exit_code == 1
    assert "over budget: act [post]: dead 0.1875 (3 of 16 neurons) > max 0.1" in result.output
    assert json.loads(summary.read_text())["exit_code"] == 1
    passed = invoke(
        mlp_file, "--data", data, "--out", tmp_path / "audit", "--min-rows", "100",
        "--max-dead-ratio", "0.2", "--quiet",
    )  # fmt: skip
    assert passed.exit_code == 0, passed.output


def test_shard_directory_and_random_data(mlp_file: Path, tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    rng = np.random.default_rng(2)
    for i in range(3):
        np.save(shards / f"{i}.npy", rng.standard_normal((70, 8)).astype(np.float32))
    result = invoke(mlp_file, "--data", shards, "--out", tmp_path / "a", "--batch", "16", "--quiet")
    assert result.exit_code == 0, result.output
    assert Report.load(tmp_path / "a").layers["act"].rows == 210
    result = invoke(mlp_file, "--random", "40", "--out", tmp_path / "b", "--quiet")
    assert result.exit_code == 0, result.output
    assert Report.load(tmp_path / "b").layers["act"].rows == 40


def test_transformer_audit_leaves_pad_positions_out(tmp_path: Path) -> None:
    batches = encoder_batches(n=2)
    model = export(Encoder(), batches[0], tmp_path / "encoder.onnx", dynamo=False)
    np.savez(
        tmp_path / "tokens.npz",
        input_ids=np.concatenate([b["input_ids"] for b in batches]),
        attention_mask=np.concatenate([b["attention_mask"] for b in batches]),
    )
    result = invoke(
        model,
        "--data",
        tmp_path / "tokens.npz",
        "--out",
        tmp_path / "out",
        "--batch",
        "4",
        "--quiet",
    )
    assert result.exit_code == 0, result.output
    real = sum(int(b["attention_mask"].sum()) for b in batches)
    report = Report.load(tmp_path / "out")
    assert [s.rows for s in report.layers.values()] == [real, real]


def _one_line_error(result: Result, message: str, out: Path) -> None:
    assert result.exit_code != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith("Error: "), result.output
    assert message in lines[0], lines[0]
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}")]


def test_bad_inputs_are_one_line_errors_and_leave_no_output(
    mlp_file: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    text = tmp_path / "notes.onnx"
    text.write_text("hello")
    _one_line_error(invoke(text, "--data", data, "--out", out), "not an ONNX model", out)
    whole = mlp_file.read_bytes()
    (tmp_path / "cut.onnx").write_bytes(whole[: len(whole) // 3])
    _one_line_error(
        invoke(tmp_path / "cut.onnx", "--data", data, "--out", out), "truncated or corrupt", out
    )
    np.savez(tmp_path / "names.npz", inputs=np.zeros((4, 8), np.float32))
    _one_line_error(
        invoke(mlp_file, "--data", tmp_path / "names.npz", "--out", out),
        "no array for model input(s) ['x']",
        out,
    )
    np.savez(tmp_path / "shape.npz", x=np.zeros((4, 9), np.float32))
    _one_line_error(
        invoke(mlp_file, "--data", tmp_path / "shape.npz", "--out", out),
        "has shape (4, 9) but the model takes ('?', 8)",
        out,
    )
    np.savez(tmp_path / "dtype.npz", x=np.zeros((4, 8), np.int64))
    _one_line_error(
        invoke(mlp_file, "--data", tmp_path / "dtype.npz", "--out", out),
        "is int64 but the model takes float32",
        out,
    )
    (tmp_path / "empty.npz").write_bytes(b"")
    _one_line_error(
        invoke(mlp_file, "--data", tmp_path / "empty.npz", "--out", out),
        "the data file is empty",
        out,
    )
    plain = helper.make_model(
        helper.make_graph(
            [helper.make_node("Identity", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 8])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 8])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    onnx.save(plain, str(tmp_path / "plain.onnx"))
    _one_line_error(
        invoke(tmp_path / "plain.onnx", "--data", data, "--out", out), "no activation to watch", out
    )


@pytest.mark.parametrize("ahead", [0, 1], ids=["newest-onnx-opset", "past-every-release"])
def test_an_opset_newer_than_onnx_runtime_reads(data: Path, tmp_path: Path, ahead: int) -> None:
    """The newest opset this ``onnx`` writes (ONNX Runtime may or may not read it yet: either
    it runs, or the error says how to fix it), and one past every release (always refused)."""
    opset = onnx.defs.onnx_opset_version() + ahead
    built = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"])],
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 8])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 8])],
        ),
        opset_imports=[helper.make_opsetid("", opset)],
    )
    onnx.save(built, str(tmp_path / "new.onnx"))
    out = tmp_path / "out"
    result = invoke(tmp_path / "new.onnx", "--data", data, "--out", out)
    if ahead == 0 and result.exit_code == 0:
        assert Report.load(out).layers  # this onnxruntime reads the newest opset: audited
        return
    _one_line_error(result, "export with an older opset", out)
    if ahead:
        assert f"opset {opset}" in result.stderr  # named, whichever check refused it


def test_a_plot_failure_keeps_the_report_and_says_so(
    mlp_file: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Defect 4 (no matplotlib, or any plot failure): the audit's report is never lost to a plot;
    # one line says why, and stale plots of an earlier audit are removed (they would lie).
    import neuronwatch.plots

    out = tmp_path / "out"
    assert invoke(mlp_file, "--data", data, "--out", out, "--quiet").exit_code == 0
    assert (out / "index.html").is_file()

    def broken(report: Report, directory: Path) -> list[Path]:
        raise MissingExtraError("matplotlib", "plots")

    monkeypatch.setattr(neuronwatch.plots, "write_plots", broken)
    result = invoke(mlp_file, "--data", data, "--out", out, "--quiet")
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "plots skipped" in warnings[0]
    assert "matplotlib" in warnings[0]
    assert Report.load(out).layers["act"].rows == 300
    assert sorted(p.name for p in out.iterdir()) == ["report.json", "report.npz"]


def test_a_failed_audit_keeps_the_previous_report(
    mlp_file: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "audit"
    assert invoke(mlp_file, "--data", data, "--out", out, "--quiet").exit_code == 0
    before = (out / "report.json").read_bytes()
    (tmp_path / "bad.npz").write_bytes(b"")
    assert invoke(mlp_file, "--data", tmp_path / "bad.npz", "--out", out).exit_code != 0
    assert (out / "report.json").read_bytes() == before
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / "elsewhere" / "keep.txt").write_text("mine")
    result = invoke(mlp_file, "--data", data, "--out", tmp_path / "elsewhere")
    assert result.exit_code != 0
    assert "holds something other than a neuronwatch report" in result.output
    assert (tmp_path / "elsewhere" / "keep.txt").read_text() == "mine"


# -- hostile use (issue 6's audit) ------------------------------------------------------------


def _fixed_batch_model(path: Path, batch: int) -> Path:
    """``y = relu(x)`` whose input fixes the batch axis (exported without dynamic axes)."""
    built = helper.make_model(
        helper.make_graph(
            [helper.make_node("Relu", ["x"], ["y"], name="/act/Relu")],
            "g",
            [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 8])],
            [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [batch, 8])],
        ),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    built.ir_version = 8
    onnx.save(built, str(path))
    return path


def test_an_audit_never_touches_files_it_did_not_write(
    mlp_file: Path, data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tmp_path / "runs" / "exp1"
    assert invoke(mlp_file, "--data", data, "--out", run, "--quiet").exit_code == 0
    (run / "checkpoint.pt").write_text("precious weights")
    (run / "logs").mkdir()
    (run / "logs" / "train.log").write_text("log")
    again = invoke(mlp_file, "--data", data, "--out", run, "--quiet")
    assert again.exit_code == 0, again.output
    assert (run / "checkpoint.pt").read_text() == "precious weights"
    assert (run / "logs" / "train.log").read_text() == "log"
    assert (run / "index.html").is_file()
    assert sorted(p.name for p in run.parent.iterdir()) == ["exp1"]
    # --out . in an empty working directory: written in place, nothing renamed away.
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    dot = invoke(mlp_file, "--data", data, "--out", ".", "--quiet")
    assert dot.exit_code == 0, dot.output
    assert {"report.json", "report.npz", "index.html"} <= {p.name for p in here.iterdir()}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data.npz", "here", "runs"]


def test_bad_input_exits_2_and_over_budget_exits_1(
    mlp_file: Path, data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    (tmp_path / "text.onnx").write_text("hello")
    for args in (
        (tmp_path / "text.onnx", "--data", data),
        (mlp_file, "--data", data, "--threshold", "nan"),
        (mlp_file, "--random", "4", "--shape", "x=8", "--mask", "attn_mask"),
    ):
        result = invoke(*args, "--out", out)
        assert result.exit_code == 2, (args, result.output)
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr
        assert not out.exists()
    typo = invoke(mlp_file, "--data", data, "--out", out, "--mask", "attn_mask")
    assert "--mask 'attn_mask': the model has no input of that name; its inputs: x" in typo.stderr
    over = invoke(mlp_file, "--data", data, "--out", out, "--max-dead-ratio", "0.01", "--quiet")
    assert over.exit_code == 1


def test_summary_json_never_overwrites_the_model_the_data_or_the_report(
    mlp_file: Path, data: Path, tmp_path: Path
) -> None:
    model_bytes, data_bytes = mlp_file.read_bytes(), data.read_bytes()
    out = tmp_path / "out"
    for target in (mlp_file, data, out / "report.json", out / "index.html"):
        result = invoke(mlp_file, "--data", data, "--out", out, "--summary-json", target)
        assert result.exit_code == 2, (target, result.output)
        assert "--summary-json" in result.stderr
        assert not out.exists()
    assert mlp_file.read_bytes() == model_bytes
    assert data.read_bytes() == data_bytes
    # An earlier summary is replaced; anything else at that path is not.
    summary = tmp_path / "gate.json"
    first = invoke(mlp_file, "--data", data, "--out", out, "--summary-json", summary, "--quiet")
    assert first.exit_code == 0, first.output
    again = invoke(mlp_file, "--data", data, "--out", out, "--summary-json", summary, "--quiet")
    assert again.exit_code == 0, again.output


def test_a_folder_with_another_tools_report_json_is_not_an_earlier_audit(
    mlp_file: Path, data: Path, tmp_path: Path
) -> None:
    site = tmp_path / "site"
    site.mkdir()
    (site / "report.json").write_text('{"tests": 3, "passed": 3}')
    (site / "index.html").write_text("<p>my page</p>")
    result = invoke(mlp_file, "--data", data, "--out", site, "--quiet")
    assert result.exit_code == 2, result.output
    assert "holds something other than a neuronwatch report" in result.stderr
    assert (site / "report.json").read_text() == '{"tests": 3, "passed": 3}'
    assert (site / "index.html").read_text() == "<p>my page</p>"


def test_a_fixed_batch_model_runs_whole_batches_and_counts_them(tmp_path: Path) -> None:
    model = _fixed_batch_model(tmp_path / "fixed.onnx", 4)
    np.savez(tmp_path / "d.npz", x=np.ones((10, 8), np.float32))
    out = tmp_path / "out"
    result = invoke(model, "--data", tmp_path / "d.npz", "--out", out, "--provider", "cpu")
    assert result.exit_code == 0, result.output
    assert "batches of 4 (the model's fixed batch size)" in result.output
    assert "8/8" in result.output
    assert "samples/s" in result.output
    assert "rows/s" in result.output
    assert "left out the last 2 samples" in result.output
    assert Report.load(out).layers["act"].rows == 8
    wrong = invoke(model, "--data", tmp_path / "d.npz", "--out", out, "--batch", "5")
    assert wrong.exit_code == 2
    assert "pass --batch 4" in wrong.stderr
