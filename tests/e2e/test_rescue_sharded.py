"""Sharded checkpoints in the Hugging Face layout, edited shard by shard."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from neuronwatch import Engine, ParamRef, Report, Wiring
from neuronwatch.rescue import CheckpointError, prune, reinit

SHARDS = {
    "model-00001-of-00002.safetensors": ["fc1.weight", "fc1.bias", "fc2.bias"],
    "model-00002-of-00002.safetensors": ["fc2.weight", "fc3.weight", "fc3.bias"],
}
INDEX = "model.safetensors.index.json"


def weights() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    shapes = {
        "fc1.weight": (16, 8),
        "fc1.bias": (16,),
        "fc2.weight": (12, 16),
        "fc2.bias": (12,),
        "fc3.weight": (4, 12),
        "fc3.bias": (4,),
    }
    return {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}


def report(dead: dict[str, list[int]]) -> Report:
    engine = Engine("sharded", min_rows=10)
    rng = np.random.default_rng(1)
    for layer, width, producer, consumer, fan_in, out in (
        ("act1", 16, "fc1", "fc2", 8, 12),
        ("act2", 12, "fc2", "fc3", 16, 4),
    ):
        engine.add_layer(layer, "ReLU")
        values = np.abs(rng.normal(size=(50, width))) + 0.1
        values[:, dead.get(layer, [])] = 0.0
        engine.observe(layer, values)
        engine.set_wiring(
            layer,
            Wiring(
                producer=producer,
                consumer=consumer,
                produces=(
                    ParamRef(f"{producer}.weight", (width, fan_in), 0),
                    ParamRef(f"{producer}.bias", (width,), 0),
                ),
                consumes=(ParamRef(f"{consumer}.weight", (out, width), 1),),
            ),
        )
    return Report.from_snapshot(engine.snapshot())


def sharded(folder: Path, tensors: dict[str, np.ndarray]) -> Path:
    folder.mkdir()
    for shard, names in SHARDS.items():
        save_file({n: tensors[n] for n in names}, str(folder / shard))
    weight_map = {n: shard for shard, names in SHARDS.items() for n in names}
    total = sum(t.nbytes for t in tensors.values())
    (folder / INDEX).write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map})
    )
    (folder / "config.json").write_text('{"hidden": 16}')
    return folder


def test_prune_edits_shard_by_shard_and_updates_the_index(tmp_path: Path) -> None:
    tensors = weights()
    folder = sharded(tmp_path / "model", tensors)
    report({"act1": [2, 7], "act2": [0]}).save(tmp_path / "report")
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    manifest = prune(folder, tmp_path / "report", tmp_path / "pruned")
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    out = tmp_path / "pruned"
    assert sorted(p.name for p in out.iterdir()) == sorted([*SHARDS, INDEX, "config.json"])
    merged = {**load_file(str(out / next(iter(SHARDS)))), **load_file(str(out / list(SHARDS)[1]))}
    keep1, keep2 = np.delete(np.arange(16), [2, 7]), np.delete(np.arange(12), [0])
    np.testing.assert_array_equal(merged["fc1.weight"], tensors["fc1.weight"][keep1])
    np.testing.assert_array_equal(merged["fc2.weight"], tensors["fc2.weight"][np.ix_(keep2, keep1)])
    np.testing.assert_array_equal(merged["fc2.bias"], tensors["fc2.bias"][keep2])
    index = json.loads((out / INDEX).read_text())
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in merged.values())
    assert manifest.widths == {"act1": 14, "act2": 11}
    assert len(manifest.outputs) == 3
    assert len(manifest.inputs) == 3
    assert manifest.notes["copied"] == ["config.json"]


def test_torch_shards_are_edited_too(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    tensors = weights()
    folder = tmp_path / "model"
    folder.mkdir()
    weight_map = {}
    for i, (_, names) in enumerate(SHARDS.items(), start=1):
        shard = f"pytorch_model-0000{i}-of-00002.bin"
        torch.save({n: torch.from_numpy(tensors[n]) for n in names}, folder / shard)
        weight_map.update(dict.fromkeys(names, shard))
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    report({"act1": [3]}).save(tmp_path / "report")
    reinit(folder / "pytorch_model.bin.index.json", tmp_path / "report", tmp_path / "new")
    shard2 = torch.load(tmp_path / "new" / "pytorch_model-00002-of-00002.bin", weights_only=True)
    assert (shard2["fc2.weight"][:, 3] == 0).all()
    shard1 = torch.load(tmp_path / "new" / "pytorch_model-00001-of-00002.bin", weights_only=True)
    assert shard1["fc1.bias"][3] == 0


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update({"fc1.weight": "../elsewhere.safetensors"}), "outside its folder"),
        (lambda m: m.update({"fc1.weight": list(SHARDS)[1]}), "disagree"),
        (lambda m: m.update({"ghost": next(iter(SHARDS))}), "no shard holds: ghost"),
    ],
)
def test_an_index_that_lies_is_refused(tmp_path: Path, edit: object, message: str) -> None:
    folder = sharded(tmp_path / "model", weights())
    data = json.loads((folder / INDEX).read_text())
    edit(data["weight_map"])  # type: ignore[operator]
    (folder / INDEX).write_text(json.dumps(data))
    report({"act1": [1]}).save(tmp_path / "report")
    with pytest.raises(CheckpointError, match=message):
        prune(folder, tmp_path / "report", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_output_folder_may_not_sit_inside_the_input(tmp_path: Path) -> None:
    from neuronwatch import ConfigError

    folder = sharded(tmp_path / "model", weights())
    report({"act1": [1]}).save(tmp_path / "report")
    with pytest.raises(ConfigError, match="would overwrite the input"):
        prune(folder, tmp_path / "report", folder / "pruned")
    assert sorted(p.name for p in folder.iterdir()) == sorted([*SHARDS, INDEX, "config.json"])


@pytest.mark.parametrize("side", ["file", "folder"])
def test_a_full_disk_while_copying_side_files_names_the_output_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, side: str
) -> None:
    """The copy's error names where it failed to write, never the input (config.json), and a
    tokenizer folder's failures are one line, not shutil's list of every file."""
    import errno
    import shutil

    folder = sharded(tmp_path / "model", weights())
    if side == "folder":
        (folder / "config.json").unlink()
        (folder / "tokenizer").mkdir()
        (folder / "tokenizer" / "vocab.txt").write_text("a\nb\n")
    report({"act1": [2]}).save(tmp_path / "report")

    def full(source: str, destination: str, *args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device", source)

    def full_tree(source: str, destination: str, *args: object, **kwargs: object) -> None:
        raise shutil.Error([(f"{source}/vocab.txt", str(destination), "[Errno 28] No space left")])

    monkeypatch.setattr(shutil, "copy2", full)
    monkeypatch.setattr(shutil, "copytree", full_tree)
    with pytest.raises(CheckpointError) as caught:
        prune(folder, tmp_path / "report", tmp_path / "out" / "pruned")
    message = str(caught.value)
    assert f"({tmp_path / 'out'})" in message
    assert str(folder) not in message
    assert "[(" not in message
    assert not (tmp_path / "out").exists() or list((tmp_path / "out").iterdir()) == []
