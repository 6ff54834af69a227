"""Loading: bad files, external data (kept where it is, never escaping the folder)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from neuronwatch.adapters.onnx import watch_session
from neuronwatch.adapters.onnx_load import load_model
from onnx import helper
from onnx_graphs import FLOAT, mlp, model, save, tensor

from neuronwatch.errors import ConfigError


def test_not_onnx_empty_truncated_and_missing(tmp_path: Path) -> None:
    text = tmp_path / "notes.onnx"
    text.write_text("this is not a model\n")
    with pytest.raises(ConfigError, match=r"notes\.onnx: not an ONNX model"):
        load_model(text)
    empty = tmp_path / "empty.onnx"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        load_model(empty)
    whole = save(mlp(), tmp_path / "whole.onnx").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(whole[: len(whole) // 2])
    with pytest.raises(ConfigError, match=r"cut\.onnx: .*truncated or corrupt"):
        load_model(cut)
    with pytest.raises(ConfigError, match="no such model file"):
        load_model(tmp_path / "absent.onnx")


def test_a_model_without_activations_is_refused(tmp_path: Path) -> None:
    built = model(
        [helper.make_node("Identity", ["x"], ["y"])],
        [tensor("x", FLOAT, [2])],
        [tensor("y", FLOAT, [2])],
    )
    with pytest.raises(ConfigError, match="no activation"):
        watch_session(save(built, tmp_path / "plain.onnx"), provider="cpu")


def _external(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    path = folder / "mlp.onnx"
    onnx.save(mlp(), str(path), save_as_external_data=True, location="mlp.data", size_threshold=0)
    return path


def test_external_data_is_read_by_onnx_runtime_not_by_us(tmp_path: Path) -> None:
    path = _external(tmp_path)
    loaded = load_model(path)
    assert loaded.external
    assert all(not t.raw_data for t in loaded.proto.graph.initializer)  # weights not loaded
    x = np.random.default_rng(0).standard_normal((7, 4)).astype(np.float32)
    external = watch_session(path, provider="cpu", histogram_every=1)
    inline = watch_session(mlp(), provider="cpu", histogram_every=1)
    np.testing.assert_array_equal(external.run(None, {"x": x})[0], inline.run(None, {"x": x})[0])
    assert (
        external.monitor.report()
        .layers["act"]
        .partials.equals(inline.monitor.report().layers["act"].partials)
    )
    # The augmented graph was staged beside the data and is gone once the session exists.
    assert sorted(p.name for p in path.parent.iterdir()) == ["mlp.data", "mlp.onnx"]


@pytest.mark.parametrize("location", ["../outside.data", "/etc/passwd", "sub/../../x.data"])
def test_external_data_escaping_the_folder_is_refused(tmp_path: Path, location: str) -> None:
    path = _external(tmp_path)
    proto = onnx.load(str(path), load_external_data=False)
    for tensor_proto in proto.graph.initializer:
        for entry in tensor_proto.external_data:
            if entry.key == "location":
                entry.value = location
    onnx.save(proto, str(path))
    with pytest.raises(ConfigError, match="escapes the model's folder"):
        load_model(path)


def test_missing_external_data_file(tmp_path: Path) -> None:
    path = _external(tmp_path)
    (path.parent / "mlp.data").unlink()
    with pytest.raises(ConfigError, match=r"external data file .*mlp\.data is missing"):
        load_model(path)
