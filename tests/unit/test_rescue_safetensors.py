"""safetensors streamed tensor by tensor: exact copies, edits readable by the reference library,
and every corrupt or lying file refused with the input untouched and no output left behind."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest
from rescue_helpers import mlp_report, mlp_weights, save_safetensors
from safetensors.numpy import load_file

from neuronwatch.rescue import CheckpointError, dtypes, prune, strip
from neuronwatch.rescue.formats.safetensors import SafetensorsCheckpoint

SIZES = (8, 16, 12, 4)


@pytest.fixture
def model(tmp_path: Path) -> tuple[Path, Path]:
    weights = mlp_weights(SIZES)
    weights["extra.counts"] = np.arange(5, dtype=np.int64)  # untouched, not a float
    checkpoint = save_safetensors(tmp_path / "model.safetensors", weights)
    report = mlp_report(SIZES, {1: [0, 5, 9], 2: [3]})
    report.save(tmp_path / "report")
    return checkpoint, tmp_path / "report"


def test_prune_streams_a_file_the_reference_library_reads(model: tuple[Path, Path]) -> None:
    checkpoint, report = model
    before = checkpoint.read_bytes()
    manifest = prune(checkpoint, report, checkpoint.with_name("pruned.safetensors"))
    assert checkpoint.read_bytes() == before
    new = load_file(str(checkpoint.with_name("pruned.safetensors")))
    old = load_file(str(checkpoint))
    keep1 = np.delete(np.arange(16), [0, 5, 9])
    keep2 = np.delete(np.arange(12), [3])
    np.testing.assert_array_equal(new["fc1.weight"], old["fc1.weight"][keep1])
    np.testing.assert_array_equal(new["fc2.weight"], old["fc2.weight"][np.ix_(keep2, keep1)])
    np.testing.assert_array_equal(new["fc3.weight"], old["fc3.weight"][:, keep2])
    np.testing.assert_array_equal(new["extra.counts"], old["extra.counts"])
    assert manifest.widths == {"act1": 13, "act2": 11}
    from blake3 import blake3

    assert manifest.inputs[0]["blake3"] == blake3(before).hexdigest()
    out = checkpoint.with_name("pruned.safetensors").read_bytes()
    assert manifest.outputs[0]["blake3"] == blake3(out).hexdigest()


@pytest.mark.parametrize("dtype", ["F16", "BF16", "F64"])
def test_untouched_entries_come_back_bit_for_bit(tmp_path: Path, dtype: str) -> None:
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file as load_torch
    from safetensors.torch import save_file as save_torch

    weights = mlp_weights(SIZES)
    kind = {"F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}[dtype]
    tensors = {k: torch.from_numpy(v).to(kind) for k, v in weights.items()}
    save_torch(tensors, str(tmp_path / "m.safetensors"))
    mlp_report(SIZES, {1: [2]}).save(tmp_path / "r")
    strip(tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "s.safetensors", fraction=0.5)
    new = load_torch(str(tmp_path / "s.safetensors"))
    assert new["fc1.weight"].dtype == kind
    rows = [r for r in range(16) if r != 2]
    assert torch.equal(new["fc1.weight"][rows], tensors["fc1.weight"][rows])
    assert torch.equal(new["fc2.weight"], tensors["fc2.weight"])
    changed = new["fc1.weight"][2] != tensors["fc1.weight"][2]
    assert int(changed.sum()) == 4  # ceil(0.5 * 8) most negative... if that many are negative
    assert (new["fc1.weight"][2][changed] == 0).all()


def test_bf16_conversion_rounds_like_torch() -> None:
    torch = pytest.importorskip("torch")
    values = np.random.default_rng(0).normal(size=10_000).astype(np.float32) * 100
    values[:4] = [np.inf, -np.inf, 0.0, -0.0]
    # Exact ties: the dropped half is 0x8000; they round to the even neighbour.
    values[4:6] = np.array([0x3F808000, 0x3F818000], dtype=np.uint32).view(np.float32)
    bits = dtypes.encode(values.astype(np.float64), "BF16", "x")
    reference = torch.from_numpy(values).to(torch.bfloat16).view(torch.int16).numpy()
    np.testing.assert_array_equal(bits.view(np.int16), reference)
    assert bits[4:6].tolist() == [0x3F80, 0x3F82]
    back = dtypes.decode(bits, "BF16", "x")
    np.testing.assert_array_equal(back, torch.from_numpy(values).to(torch.bfloat16).double())


# -- hostile and corrupt files ------------------------------------------------------------------


def _raw(path: Path, header: dict[str, object], data: bytes, length: int | None = None) -> Path:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text) if length is None else length) + text + data)
    return path


def _good(path: Path) -> Path:
    header = {
        "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [16, 24]},
    }
    return _raw(path, header, np.arange(6, dtype=np.float32).tobytes())


_TWICE = (
    b'{"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]},'
    b'"a":{"dtype":"U8","shape":[1],"data_offsets":[0,1]}}'
)
CORRUPT = {
    "truncated": (lambda p: p.write_bytes(_good(p).read_bytes()[:-5]), "truncated"),
    "offsets overlap": (
        lambda p: _raw(
            p,
            {
                "a": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
                "b": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
            },
            bytes(24),
        ),
        "lies about offsets",
    ),
    "offsets beyond the shape": (
        lambda p: _raw(
            p, {"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 400]}}, bytes(8)
        ),
        "the header lies",
    ),
    "gap": (
        lambda p: _raw(p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}, bytes(8)),
        "leaves a gap",
    ),
    "header length beyond the file": (
        lambda p: _raw(
            p, {"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}}, bytes(4), 10**6
        ),
        "does not fit",
    ),
    "newer dtype of the wrong size": (
        lambda p: _raw(p, {"a": {"dtype": "C64", "shape": [2], "data_offsets": [0, 8]}}, bytes(8)),
        "the header lies",
    ),
    "duplicate tensor": (
        lambda p: p.write_bytes(struct.pack("<Q", len(_TWICE)) + _TWICE + bytes(1)),
        "appears twice",
    ),
    "not json": (
        lambda p: p.write_bytes(struct.pack("<Q", 4) + b"{{{{" + bytes(4)),
        "not valid JSON",
    ),
    "empty": (lambda p: p.write_bytes(b""), "too short"),
}


@pytest.mark.parametrize("case", sorted(CORRUPT))
def test_corrupt_headers_are_refused(tmp_path: Path, case: str) -> None:
    make, message = CORRUPT[case]
    path = tmp_path / "bad.safetensors"
    make(path)
    with pytest.raises(CheckpointError, match=message):
        SafetensorsCheckpoint(path)


def test_a_lying_header_leaves_no_output_and_the_input_as_it_was(tmp_path: Path) -> None:
    good = save_safetensors(tmp_path / "m.safetensors", mlp_weights(SIZES))
    mlp_report(SIZES, {1: [1]}).save(tmp_path / "r")
    raw = bytearray(good.read_bytes())
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    header["fc1.bias"]["data_offsets"][1] += 4  # claims more bytes than its shape holds
    _raw(tmp_path / "lie.safetensors", header, bytes(raw[8 + length :]))
    before = (tmp_path / "lie.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match=r"fc1\.bias"):
        prune(tmp_path / "lie.safetensors", tmp_path / "r", tmp_path / "out.safetensors")
    assert (tmp_path / "lie.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lie.safetensors", "m.safetensors", "r"]


def test_wrong_dtype_in_the_wiring_is_refused(tmp_path: Path) -> None:
    weights = {k: v for k, v in mlp_weights(SIZES).items()}
    weights["fc1.bias"] = np.arange(16, dtype=np.int32)
    save_safetensors(tmp_path / "m.safetensors", weights)
    mlp_report(SIZES, {1: [1]}).save(tmp_path / "r")
    with pytest.raises(CheckpointError, match=r"'fc1.bias'.*I32"):
        prune(tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()
    assert not list(tmp_path.glob(".*"))


@pytest.mark.parametrize("dtype", ["F8_E8M0", "C64", "Q7"])
def test_untouched_tensors_of_newer_types_are_copied_byte_for_byte(
    tmp_path: Path, dtype: str
) -> None:
    weights = mlp_weights(SIZES)
    save_safetensors(tmp_path / "plain.safetensors", weights)
    raw = (tmp_path / "plain.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    extra = bytes(range(24))  # 3 C64 values; 24 F8_E8M0 scales; a type nobody knows yet
    shape = {"F8_E8M0": [24], "C64": [3], "Q7": [7]}[dtype]
    header["extra.scales"] = {
        "dtype": dtype,
        "shape": shape,
        "data_offsets": [len(data), len(data) + len(extra)],
    }
    _raw(tmp_path / "m.safetensors", header, data + extra)
    mlp_report(SIZES, {1: [0, 5]}).save(tmp_path / "r")
    manifest = prune(tmp_path / "m.safetensors", tmp_path / "r", tmp_path / "o.safetensors")
    assert manifest.widths == {"act1": 14}
    out = (tmp_path / "o.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", out[:8])
    written = json.loads(out[8 : 8 + length])
    begin, end = written["extra.scales"]["data_offsets"]
    assert written["extra.scales"]["dtype"] == dtype
    assert out[8 + length + begin : 8 + length + end] == extra
    # A tensor of such a type that an op would have to edit is refused, naming it.
    header["fc1.bias"]["dtype"] = "Q7"  # 16 values in 64 bytes: the size of a type unknown
    _raw(tmp_path / "bad.safetensors", header, data + extra)
    with pytest.raises(CheckpointError, match=r"'fc1\.bias'.*Q7"):
        prune(tmp_path / "bad.safetensors", tmp_path / "r", tmp_path / "b.safetensors")
