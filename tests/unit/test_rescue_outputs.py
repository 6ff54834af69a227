"""Rescue outputs appear whole or not at all, and a failed commit puts back what was there."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from neuronwatch.rescue.outputs import staged


def test_commit_renames_every_output_into_place(tmp_path: Path) -> None:
    (tmp_path / "old.bin").write_text("previous")
    with staged() as stage:
        stage.file(tmp_path / "old.bin").write_text("new")
        folder = stage.directory(tmp_path / "shards")
        (folder / "a").write_text("shard")
        stage.commit()
    assert (tmp_path / "old.bin").read_text() == "new"
    assert (tmp_path / "shards" / "a").read_text() == "shard"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.bin", "shards"]


def _half_written(folder: Path) -> None:
    with staged() as stage:
        stage.file(folder / "out.bin").write_text("half")
        stage.directory(folder / "dir")
        raise RuntimeError("writer failed")


def test_an_error_before_commit_leaves_nothing(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="writer failed"):
        _half_written(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_a_failed_rename_restores_the_outputs_already_renamed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "model.onnx.data").write_text("old data")
    (tmp_path / "model.onnx").write_text("old model")
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        if Path(dst) == tmp_path / "model.onnx" and ".tmp" in str(src):
            raise OSError("disk full")
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)

    def write_both() -> None:
        with staged() as stage:
            stage.file(tmp_path / "model.onnx.data").write_text("new data")
            stage.file(tmp_path / "model.onnx").write_text("new model")
            stage.commit()

    with pytest.raises(OSError, match="disk full"):
        write_both()
    assert (tmp_path / "model.onnx.data").read_text() == "old data"
    assert (tmp_path / "model.onnx").read_text() == "old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx", "model.onnx.data"]
