"""Manifests: JSON that ``json.load`` reads back exactly, index arrays streamed, never NaN."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from rescue_helpers import mlp_report, mlp_weights, save_safetensors

from neuronwatch.rescue import Manifest, strip
from neuronwatch.rescue.jsonout import dumps, plain


def test_arrays_and_nesting_round_trip_through_json() -> None:
    value = {
        "index": np.arange(70_000, dtype=np.int64),  # more than one chunk
        "values": np.array([0.1, -2.5e-8, 3.0]),
        "mask": np.array([True, False]),
        "pairs": [[3, np.array([1, 2])], [7, np.array([], dtype=np.intp)]],
        "nested": {"empty": {}, "list": [], "text": 'a "quoted" name', "none": None},
        "scalar": np.float32(0.5),
    }
    assert json.loads(dumps(value)) == plain(value)
    assert plain(value)["values"] == [0.1, -2.5e-8, 3.0]


@pytest.mark.parametrize("bad", [np.array([1.0, np.nan]), float("inf")])
def test_non_finite_values_are_refused(bad: object) -> None:
    with pytest.raises(ValueError, match="finite"):
        dumps({"x": bad})


def test_the_written_manifest_lists_every_zeroed_weight(tmp_path: Path) -> None:
    weights = mlp_weights((8, 16, 12, 4))
    save_safetensors(tmp_path / "m.safetensors", weights)
    mlp_report((8, 16, 12, 4), {1: [2, 9]}).save(tmp_path / "r")
    returned = strip(
        tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "s.safetensors", fraction=0.5
    )
    loaded = Manifest.load(tmp_path / "s.safetensors.manifest.json")
    assert loaded.to_json() == returned.to_json()
    (action,) = loaded.tensors[0]["actions"]
    for neuron, positions in action["zeroed"]:
        row = weights["fc1.weight"][neuron]
        negative = np.flatnonzero(row < 0)
        expected = negative[np.argsort(row[negative], kind="stable")][: int(np.ceil(0.5 * 8))]
        assert positions == sorted(expected.tolist())
    assert loaded.inputs[0]["path"].endswith("m.safetensors")
    assert len(loaded.outputs[0]["blake3"]) == 64


def test_the_docs_name_the_checksum_the_manifest_holds(tmp_path: Path) -> None:
    from neuronwatch.rescue import manifest as module
    from neuronwatch.rescue.checkpoint import CHECKSUM

    sizes = (8, 16, 4)
    save_safetensors(tmp_path / "m.safetensors", mlp_weights(sizes))
    written = strip(tmp_path / "m.safetensors", mlp_report(sizes, {1: [2]}), tmp_path / "o")
    assert CHECKSUM in written.to_json()["outputs"][0]
    docs = (Path(__file__).resolve().parents[2] / "docs" / "rescue.md").read_text()
    for text in (docs, module.__doc__ or ""):
        assert CHECKSUM.upper() in text
        assert "SHA-256" not in text
