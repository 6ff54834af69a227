"""Audit data: .npz files, streamed shard directories, random samples, checked against inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from neuronwatch.audit_data import InputSpec, open_data, parse_shape
from neuronwatch.errors import ConfigError

TOKENS = [
    InputSpec("input_ids", "int64", ("batch", "tokens"), index_limit=30),
    InputSpec("attention_mask", "int64", ("batch", "tokens")),
]
IMAGE = [InputSpec("x", "float32", ("batch", 3, 4))]


def concat(batches: list[dict[str, np.ndarray]], name: str) -> np.ndarray:
    return np.concatenate([b[name] for b in batches])


def test_npz_batches_cover_every_sample_cast_within_kind(tmp_path: Path) -> None:
    x = np.arange(10 * 12, dtype=np.float64).reshape(10, 3, 4)
    np.savez(tmp_path / "d.npz", x=x, labels=np.arange(10))
    source = open_data(tmp_path / "d.npz", IMAGE)
    batches = list(source.batches(4))
    assert source.samples == 10
    assert [len(b["x"]) for b in batches] == [4, 4, 2]
    assert all(b["x"].dtype == np.float32 and set(b) == {"x"} for b in batches)
    np.testing.assert_array_equal(concat(batches, "x"), x.astype(np.float32))


def test_shards_are_streamed_and_batches_span_them(tmp_path: Path) -> None:
    ids = np.arange(7 * 5).reshape(7, 5)
    for i, (start, stop) in enumerate([(0, 3), (3, 4), (4, 7)]):
        np.savez(
            tmp_path / f"{i:03d}.npz",
            input_ids=ids[start:stop],
            attention_mask=np.ones((stop - start, 5), np.int32),
        )
    (tmp_path / "README.txt").write_text("ignored")
    batches = list(open_data(tmp_path, TOKENS).batches(2))
    assert [len(b["input_ids"]) for b in batches] == [2, 2, 2, 1]
    np.testing.assert_array_equal(concat(batches, "input_ids"), ids)
    assert batches[0]["attention_mask"].dtype == np.int64


def test_npy_shards_for_a_one_input_model(tmp_path: Path) -> None:
    x = np.random.default_rng(0).standard_normal((5, 3, 4)).astype(np.float32)
    np.save(tmp_path / "a.npy", x[:2])
    np.save(tmp_path / "b.npy", x[2:])
    np.testing.assert_array_equal(concat(list(open_data(tmp_path, IMAGE).batches(3)), "x"), x)
    with pytest.raises(ConfigError, match=r"\.npy shards hold one array; the model has 2 inputs"):
        open_data(tmp_path, TOKENS)


def test_empty_inputs_are_refused(tmp_path: Path) -> None:
    (tmp_path / "empty.npz").write_bytes(b"")
    with pytest.raises(ConfigError, match=r"empty\.npz: the data file is empty"):
        open_data(tmp_path / "empty.npz", IMAGE)
    np.savez(tmp_path / "none.npz")
    with pytest.raises(ConfigError, match="holds no arrays"):
        open_data(tmp_path / "none.npz", IMAGE)
    np.savez(tmp_path / "zero.npz", x=np.zeros((0, 3, 4), np.float32))
    with pytest.raises(ConfigError, match="holds no samples"):
        list(open_data(tmp_path / "zero.npz", IMAGE).batches(2))
    folder = tmp_path / "shards"
    folder.mkdir()
    with pytest.raises(ConfigError, match=r"no \.npz or \.npy shards"):
        open_data(folder, IMAGE)
    (tmp_path / "text.npz").write_text("not a zip")
    with pytest.raises(ConfigError, match=r"text\.npz: cannot read it"):
        open_data(tmp_path / "text.npz", IMAGE)


def test_name_shape_and_dtype_mismatches_name_the_input(tmp_path: Path) -> None:
    np.savez(tmp_path / "names.npz", input=np.zeros((2, 3, 4), np.float32))
    with pytest.raises(
        ConfigError, match=r"no array for model input\(s\) \['x'\]; it has \['input'\]"
    ):
        list(open_data(tmp_path / "names.npz", IMAGE).batches(2))
    np.savez(tmp_path / "shape.npz", x=np.zeros((2, 3, 5), np.float32))
    with pytest.raises(
        ConfigError, match=r"input 'x' has shape \(2, 3, 5\) but the model takes \('\?', 3, 4\)"
    ):
        list(open_data(tmp_path / "shape.npz", IMAGE).batches(2))
    np.savez(tmp_path / "dtype.npz", x=np.zeros((2, 3, 4), np.int32))
    with pytest.raises(ConfigError, match="input 'x' is int32 but the model takes float32"):
        list(open_data(tmp_path / "dtype.npz", IMAGE).batches(2))
    np.savez(
        tmp_path / "len.npz", input_ids=np.zeros((2, 5), np.int64), attention_mask=np.zeros((3, 5))
    )
    with pytest.raises(ConfigError, match="different numbers of samples"):
        list(open_data(tmp_path / "len.npz", TOKENS).batches(2))


def test_random_samples_take_dynamic_dims_from_shape() -> None:
    source = open_data(None, TOKENS, random=5, shapes={"input_ids": (6,), "attention_mask": (6,)})
    batches = list(source.batches(2))
    assert [b["input_ids"].shape for b in batches] == [(2, 6), (2, 6), (1, 6)]
    ids = concat(batches, "input_ids")
    assert ids.min() >= 0
    assert ids.max() < 30
    assert (concat(batches, "attention_mask") == 1).all()  # a mask of real tokens
    with pytest.raises(ConfigError, match="dynamic dimensions; give the dims of one sample"):
        open_data(None, TOKENS, random=5)
    with pytest.raises(ConfigError, match="not model inputs"):
        open_data(None, IMAGE, random=5, shapes={"y": (3, 4)})
    with pytest.raises(ConfigError, match="does not fit the model"):
        open_data(None, IMAGE, random=5, shapes={"x": (3, 5)})
    with pytest.raises(ConfigError, match="exactly one of --data DATA and --random N"):
        open_data(None, IMAGE)


def test_parse_shape() -> None:
    assert parse_shape("input_ids=128") == ("input_ids", (128,))
    assert parse_shape("x=3,224,224") == ("x", (3, 224, 224))
    for bad in ("x", "x=", "x=a,b", "=3", "x=0"):
        with pytest.raises(ConfigError, match="expected INPUT=DIMS"):
            parse_shape(bad)


# -- hostile data (issue 6's audit) ---------------------------------------------------------


def test_shards_padded_to_different_lengths_run_without_a_concat_crash(tmp_path: Path) -> None:
    # Each shard padded to its own longest sequence: leftovers of one shard cannot be glued
    # to the next; they run as a batch of their own and every sample is still seen once.
    for i, tokens in enumerate((5, 9, 7)):
        np.savez(
            tmp_path / f"{i}.npz",
            input_ids=np.full((3, tokens), i),
            attention_mask=np.ones((3, tokens), np.int64),
        )
    batches = list(open_data(tmp_path, TOKENS).batches(2))
    assert [b["input_ids"].shape for b in batches] == [
        (2, 5), (1, 5), (2, 9), (1, 9), (2, 7), (1, 7),
    ]  # fmt: skip
    assert sum(int(b["attention_mask"].sum()) for b in batches) == 3 * (5 + 9 + 7)


def test_object_arrays_and_damaged_npz_are_one_line_errors_naming_the_file(
    tmp_path: Path,
) -> None:
    np.savez(tmp_path / "obj.npz", x=np.array([np.zeros((3, 4)), None], dtype=object))
    with pytest.raises(ConfigError, match=r"obj\.npz: cannot read array 'x' .*numeric array"):
        open_data(tmp_path / "obj.npz", IMAGE)
    np.savez(tmp_path / "crc.npz", x=np.zeros((8, 3, 4), np.float32))
    raw = bytearray((tmp_path / "crc.npz").read_bytes())
    at = raw.index(bytes(8 * 3 * 4 * 4)) + 100  # inside the stored array's data
    raw[at] ^= 0xFF
    (tmp_path / "crc.npz").write_bytes(bytes(raw))
    with pytest.raises(ConfigError, match=r"crc\.npz: cannot read array 'x' .*damaged"):
        open_data(tmp_path / "crc.npz", IMAGE)
    # An unreadable array the model does not take (labels) is never read.
    np.savez(tmp_path / "extra.npz", x=np.zeros((2, 3, 4)), labels=np.array([None], object))
    assert open_data(tmp_path / "extra.npz", IMAGE).samples == 2


def test_a_model_with_a_fixed_batch_size_gets_exactly_that_many_samples(tmp_path: Path) -> None:
    fixed = [InputSpec("x", "float32", (4, 3, 4))]
    np.savez(tmp_path / "d.npz", x=np.zeros((10, 3, 4), np.float32))
    source = open_data(tmp_path / "d.npz", fixed)
    assert (source.fixed, source.runnable) == (4, 8)
    assert [len(b["x"]) for b in source.batches(4)] == [4, 4]
    assert source.left_out == 2
    with pytest.raises(ConfigError, match="exactly 4 samples"):
        list(source.batches(3))
    np.savez(tmp_path / "few.npz", x=np.zeros((3, 3, 4), np.float32))
    with pytest.raises(ConfigError, match="do not fill one batch of 4"):
        list(open_data(tmp_path / "few.npz", fixed).batches(4))
    one = [InputSpec("x", "float32", (1, 3, 4))]
    assert [len(b["x"]) for b in open_data(None, one, random=3).batches(1)] == [1, 1, 1]


def test_random_inputs_sharing_a_dynamic_dim_take_one_size() -> None:
    source = open_data(None, TOKENS, random=3, shapes={"input_ids": (6,)})
    batch = next(source.batches(3))
    assert batch["input_ids"].shape == batch["attention_mask"].shape == (3, 6)
    with pytest.raises(ConfigError, match="dimension 'tokens' 7, but --shape input_ids makes it 6"):
        open_data(None, TOKENS, random=3, shapes={"input_ids": (6,), "attention_mask": (7,)})
    huge = open_data(None, TOKENS, random=3, shapes={"input_ids": (10**11,)})
    with pytest.raises(ConfigError, match="does not fit in memory"):
        next(huge.batches(3))
