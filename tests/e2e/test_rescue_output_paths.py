"""Where `neuronwatch rescue` refuses to write: device nodes, FIFOs and sockets (never replaced
by a regular file), paths spelled as folders, and outputs nested in one another."""

from __future__ import annotations

import json
import os
import socket
import stat
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors.numpy import save_file

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "unit"))
from rescue_helpers import CLI_SIZES, invoke_rescue, mlp_weights, write_cli_files

SIZES = CLI_SIZES


@pytest.fixture
def files(tmp_path: Path) -> Path:
    return write_cli_files(tmp_path)


invoke = invoke_rescue


def _device(path: Path) -> None:
    # A copy of /dev/null's node in the test's own folder (the real one is never touched).
    try:
        os.mknod(path, stat.S_IFCHR | 0o644, os.makedev(1, 3))
    except PermissionError:
        pytest.skip("mknod needs root")


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _socket(path: Path) -> None:
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(path))


def _linked_device(path: Path) -> None:
    _device(path.with_name("node"))
    path.symlink_to("node")


MAKERS: dict[str, tuple[Callable[[Path], None], str]] = {
    "device": (_device, "is a character device, not a regular file"),
    "fifo": (_fifo, "is a FIFO (named pipe), not a regular file"),
    "socket": (_socket, "is a socket, not a regular file"),
    "symlink to a device": (_linked_device, "is a character device, not a regular file"),
}


@pytest.mark.parametrize("option", ["--out", "--manifest"])
@pytest.mark.parametrize("kind", list(MAKERS))
def test_a_special_file_is_refused_and_left_as_it_was(files: Path, option: str, kind: str) -> None:
    make, message = MAKERS[kind]
    special = files / "special"
    make(special)
    before = os.lstat(special)
    args = ["--out", files / "o.safetensors", "--manifest", special]
    if option == "--out":
        args = ["--out", special]
    code, out = invoke("strip", files / "m.safetensors", "--report", files / "report", *args)
    assert code == 1
    assert out.startswith(f"Error: {option} {special} {message}; rescue never replaces one")
    assert len(out.strip().splitlines()) == 1
    after = os.lstat(special)
    assert (after.st_mode, after.st_ino, after.st_rdev) == (
        before.st_mode,
        before.st_ino,
        before.st_rdev,
    )
    assert not (files / "o.safetensors").exists()
    assert not list(files.glob("*.manifest.json"))


def test_a_symlink_to_a_regular_file_is_still_replaced(files: Path) -> None:
    (files / "old.safetensors").write_bytes(b"old")
    (files / "link.safetensors").symlink_to("old.safetensors")
    code, out = invoke(
        "strip", files / "m.safetensors", "--report", files / "report", "--out",
        files / "link.safetensors",
    )  # fmt: skip
    assert code == 0, out
    assert not (files / "link.safetensors").is_symlink()
    assert (files / "old.safetensors").read_bytes() == b"old"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", ""], "Error: --out is empty: name the file to write"),
        (
            ["--out", "{d}/newdir/"],
            "Error: --out {d}/newdir/ names a folder, but a file is written there: name the "
            "file, e.g. --out {d}/newdir/m.safetensors",
        ),
        (["--out", "{d}/newdir/."], "Error: --out {d}/newdir/. names a folder"),
        (
            ["--out", "{d}/o.safetensors", "--manifest", "{d}/mdir/"],
            "Error: --manifest {d}/mdir/ names a folder, but a file is written there: name the "
            "file, e.g. --manifest {d}/mdir/manifest.json",
        ),
        (["--out", "{d}/o.safetensors", "--manifest", ""], "Error: --manifest is empty"),
    ],
)
def test_an_empty_or_folder_spelled_output_is_refused(
    files: Path, args: list[str], message: str
) -> None:
    given = [a.format(d=files) for a in args]
    code, out = invoke("strip", files / "m.safetensors", "--report", files / "report", *given)
    assert code == 1
    assert out.startswith(message.format(d=files))
    assert len(out.strip().splitlines()) == 1
    assert sorted(p.name for p in files.iterdir()) == ["m.safetensors", "report"]


def _sharded(folder: Path) -> Path:
    weights = mlp_weights(SIZES)
    shards = {"a.safetensors": ["fc1.weight", "fc1.bias"], "b.safetensors": None}
    rest = [n for n in weights if n not in ("fc1.weight", "fc1.bias")]
    shards["b.safetensors"] = rest
    source = folder / "sh"
    source.mkdir()
    weight_map = {}
    for shard, names in shards.items():
        save_file({n: weights[n] for n in names or []}, str(source / shard))
        weight_map.update(dict.fromkeys(names or [], shard))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (source / "model.safetensors.index.json").write_text(json.dumps(index))
    return source


@pytest.mark.parametrize("manifest", ["osh/model.safetensors.index.json", "osh/deep/m.json"])
def test_a_manifest_inside_the_new_shard_folder_is_refused_up_front(
    files: Path, manifest: str
) -> None:
    source = _sharded(files)
    code, out = invoke(
        "strip", source, "--report", files / "report", "--out", files / "osh", "--manifest",
        files / manifest,
    )  # fmt: skip
    assert code == 1
    assert out == (
        f"Error: --manifest {files / manifest} is inside --out {files / 'osh'}, which is renamed "
        "into place whole: give --manifest a path outside it\n"
    )
    assert sorted(p.name for p in files.iterdir()) == ["m.safetensors", "report", "sh"]
    # The same run with the manifest beside the folder works, and the shards are edited.
    code, out = invoke(
        "strip", source, "--report", files / "report", "--out", files / "osh", "--manifest",
        files / "osh.json",
    )  # fmt: skip
    assert code == 0, out
    assert (files / "osh" / "a.safetensors").exists()
    assert json.loads((files / "osh.json").read_text())["op"] == "strip"
