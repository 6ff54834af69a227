"""Rescue outputs appear whole or not at all, and a failed commit puts back what was there."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import pytest

from neuronwatch.errors import ConfigError
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


def _fifo_before_commit(target: Path) -> None:
    with staged() as stage:
        stage.file(target).write_text("new")
        os.mkfifo(target)
        stage.commit()


def test_a_fifo_that_appears_before_the_commit_is_not_replaced(tmp_path: Path) -> None:
    """Checked again at commit: the path may have become a FIFO (or a device node) since the
    run checked it; renaming onto it would turn it into a regular file."""
    target = tmp_path / "out.bin"
    with pytest.raises(ConfigError, match=r"out\.bin is a FIFO \(named pipe\), not a regular"):
        _fifo_before_commit(target)
    assert stat.S_ISFIFO(os.lstat(target).st_mode)
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def _fails_in_new_folders(folder: Path) -> None:
    with staged() as stage:
        stage.file(folder / "new" / "deep" / "out.bin").write_text("half")
        stage.directory(folder / "new" / "deep" / "er" / "shards")
        stage.file(folder / "kept" / "sub" / "m.json").write_text("half")
        raise RuntimeError("writer failed")


def test_folders_made_for_the_outputs_are_removed_when_the_run_fails(tmp_path: Path) -> None:
    (tmp_path / "kept").mkdir()
    with pytest.raises(RuntimeError, match="writer failed"):
        _fails_in_new_folders(tmp_path)
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["kept"]


def test_folders_made_for_the_outputs_stay_when_the_run_succeeds(tmp_path: Path) -> None:
    with staged() as stage:
        stage.file(tmp_path / "new" / "out.bin").write_text("done")
        stage.commit()
    assert (tmp_path / "new" / "out.bin").read_text() == "done"


@pytest.mark.parametrize("fsync", [False, True])
def test_fsync_puts_every_file_on_disk_before_the_first_rename(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    events: list[str] = []
    real_fsync, real_replace = os.fsync, os.replace

    def record_fsync(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))  # a temporary: .model.bin.<random>.tmp
        name = path.name
        for staged_as in ("model.bin", "shards"):
            if name.startswith(f".{staged_as}."):
                name = staged_as
        events.append(f"fsync {name}")
        real_fsync(fd)

    def record_replace(src: Any, dst: Any) -> None:
        events.append(f"rename {Path(dst).name}")
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", record_fsync)
    monkeypatch.setattr(os, "replace", record_replace)
    with staged(fsync) as stage:
        stage.file(tmp_path / "model.bin").write_text("new")
        (stage.directory(tmp_path / "shards") / "a").write_text("shard")
        stage.commit()
    renames = ["rename model.bin", "rename shards"]
    # ... and, after the renames, the folder that holds the new names (once).
    synced = ["fsync model.bin", "fsync a", "fsync shards", *renames, f"fsync {tmp_path.name}"]
    assert events == (synced if fsync else renames)


def test_a_commit_waits_for_another_run_committing_into_the_same_folder(tmp_path: Path) -> None:
    """Two runs writing the same checkpoint and manifest at once: each run's renames happen
    together (a lock on the folder), so a checkpoint never sits beside the other's manifest."""
    import fcntl
    import threading
    import time

    with staged() as stage:
        stage.file(tmp_path / "model.bin").write_text("ours")
        stage.file(tmp_path / "model.bin.manifest.json").write_text("{}")
        other_run = os.open(tmp_path, os.O_RDONLY)
        fcntl.flock(other_run, fcntl.LOCK_EX)  # another run is between its two renames
        try:
            committing = threading.Thread(target=stage.commit)
            committing.start()
            time.sleep(0.3)
            assert not (tmp_path / "model.bin").exists()
        finally:
            os.close(other_run)
        committing.join(10)
    assert (tmp_path / "model.bin").read_text() == "ours"
    assert (tmp_path / "model.bin.manifest.json").read_text() == "{}"


def _two_outputs(folder: Path) -> None:
    with staged() as stage:
        stage.file(folder / "model.bin").write_text("new model")
        stage.file(folder / "model.bin.manifest.json").write_text("new manifest")
        stage.commit()


@pytest.mark.parametrize("existing", [True, False], ids=["replacing", "new"])
@pytest.mark.parametrize("after", [1, 2], ids=["first-rename", "second-rename"])
def test_an_exception_right_after_a_rename_still_undoes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, existing: bool, after: int
) -> None:
    """SystemExit from SIGTERM's handler can land between a rename and the line that would
    record it: the undo checks the files, not its notes, and puts back what was there."""
    if existing:
        (tmp_path / "model.bin").write_text("old model")
        (tmp_path / "model.bin.manifest.json").write_text("old manifest")
    before = {p.name: p.read_text() for p in tmp_path.iterdir()}
    real, renames = os.replace, [0]

    def replace(src: Any, dst: Any) -> None:
        real(src, dst)
        if ".tmp" in str(src):
            renames[0] += 1
            if renames[0] == after:
                raise SystemExit(143)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(SystemExit):
        _two_outputs(tmp_path)
    assert {p.name: p.read_text() for p in tmp_path.iterdir()} == before


def test_replacing_a_file_renames_over_it_and_keeps_no_moment_without_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old version is kept by a hard link while the new file is renamed over the name:
    the name never points at nothing, and a crash without fsync cannot lose both versions."""
    (tmp_path / "model.bin").write_text("old model")
    holder = tmp_path / "holder"
    os.link(tmp_path / "model.bin", holder)  # someone else's hard link to the old inode
    seen: list[bool] = []
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        seen.append(Path(dst).exists())
        real(src, dst)

    monkeypatch.setattr(os, "replace", replace)
    with staged() as stage:
        stage.file(tmp_path / "model.bin").write_text("new model")
        stage.commit()
    assert seen == [True]  # one rename, onto the existing name
    assert (tmp_path / "model.bin").read_text() == "new model"
    assert holder.read_text() == "old model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["holder", "model.bin"]


def test_a_signal_during_the_renames_waits_until_they_are_done(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Ctrl-C between the checkpoint's rename and the manifest's: both land, then the
    interrupt is delivered; never a checkpoint beside an old (or no) manifest."""
    import signal

    (tmp_path / "model.bin").write_text("old model")
    (tmp_path / "model.bin.manifest.json").write_text("old manifest")
    real = os.replace

    def replace(src: Any, dst: Any) -> None:
        real(src, dst)
        if Path(dst).name == "model.bin":
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        _two_outputs(tmp_path)
    assert (tmp_path / "model.bin").read_text() == "new model"
    assert (tmp_path / "model.bin.manifest.json").read_text() == "new manifest"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.bin.manifest.json"]


def test_an_old_version_that_cannot_be_deleted_does_not_fail_the_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "model.bin").write_text("old model")
    real = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self.name.endswith(".old"):
            raise OSError(5, "Input/output error")
        real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    with staged() as stage:
        stage.file(tmp_path / "model.bin").write_text("new model")
        stage.commit()
    assert (tmp_path / "model.bin").read_text() == "new model"
    assert "could not be deleted (Input/output error): delete it yourself" in caplog.text


def test_a_failing_folder_sync_is_an_error_that_says_the_outputs_are_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = os.fsync

    def fsync(fd: int) -> None:
        if Path(os.readlink(f"/proc/self/fd/{fd}")) == tmp_path:
            raise OSError(5, "Input/output error")
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)

    def write() -> None:
        with staged(fsync=True) as stage:
            stage.file(tmp_path / "model.bin").write_text("new model")
            stage.commit()

    with pytest.raises(ConfigError, match="the outputs are in place, but syncing the folder"):
        write()
    assert (tmp_path / "model.bin").read_text() == "new model"


def test_open_staged_on_a_longer_existing_file_leaves_none_of_its_bytes(tmp_path: Path) -> None:
    from neuronwatch.rescue.outputs import open_staged

    path = tmp_path / "mine.bin"
    path.write_bytes(b"OLDOLDOLDOLD")
    with open_staged(path) as handle:
        handle.write(b"new")
    assert path.read_bytes() == b"new"
