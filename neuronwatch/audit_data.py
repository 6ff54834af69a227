"""Data for audits: batches of named input arrays from files, or random ones (numpy only).

A DATA argument is one of:

- an ``.npz`` file whose arrays are named after the model's inputs; axis 0 indexes samples;
- a directory of ``.npz`` shards (or ``.npy`` shards for a one-input model), read in name
  order one shard at a time and never loaded whole (``.npy`` shards are memory-mapped);
- ``random=N``: N random samples shaped like the inputs, dynamic dimensions given per input.

Every batch is checked against the model's inputs before it runs: a missing input, a shape
that disagrees with the model's fixed dimensions, or a dtype of another kind (an integer array
for a float input) is a :class:`~neuronwatch.ConfigError` naming the file, the input and the
fix. Arrays of the right kind are cast (float64 data for a float32 input).
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import ConfigError

__all__ = ["DataSource", "InputSpec", "open_data", "parse_shape"]

Dim = int | str | None
Arrays = dict[str, NDArray[Any]]


@dataclass(frozen=True)
class InputSpec:
    """One model input: name, numpy dtype name, shape (ints, names of dynamic axes or None),
    and for integer inputs that index a table (token ids) the table's size."""

    name: str
    dtype: str
    shape: tuple[Dim, ...] | None
    index_limit: int | None = None

    def describe(self) -> str:
        dims = (
            "?"
            if self.shape is None
            else ", ".join("?" if d is None else str(d) for d in self.shape)
        )
        return f"{self.name} {self.dtype}[{dims}]"


def parse_shape(text: str) -> tuple[str, tuple[int, ...]]:
    """``"input_ids=128"`` or ``"x=3,224,224"`` -> name and the dims of ONE sample."""
    name, sep, dims = text.partition("=")
    try:
        values = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
    except ValueError:
        values = ()
    if not sep or not name or not values or any(v < 1 for v in values):
        raise ConfigError(
            f"--shape {text!r}: expected INPUT=DIMS with the dims of one sample, e.g. "
            "--shape input_ids=128"
        )
    return name, values


class _Checker:
    """Checks and casts one batch against the model's inputs."""

    def __init__(self, inputs: Sequence[InputSpec], where: str) -> None:
        self.inputs = list(inputs)
        self.where = where

    def __call__(self, arrays: Mapping[str, NDArray[Any]]) -> Arrays:
        names = {spec.name for spec in self.inputs}
        missing = [spec.name for spec in self.inputs if spec.name not in arrays]
        if missing:
            extra = sorted(set(arrays) - names)
            hint = f"; it has {extra}" if extra else ""
            raise ConfigError(
                f"{self.where}: no array for model input(s) {missing}{hint}; name the arrays "
                f"after the model's inputs: {', '.join(s.describe() for s in self.inputs)}"
            )
        lengths = {
            name: np.shape(arrays[name])[0] if np.ndim(arrays[name]) else 0 for name in names
        }
        if len(set(lengths.values())) > 1:
            raise ConfigError(
                f"{self.where}: the inputs hold different numbers of samples {lengths}; axis 0 "
                "of every array indexes samples"
            )
        return {spec.name: self._checked(spec, arrays[spec.name]) for spec in self.inputs}

    def _checked(self, spec: InputSpec, array: NDArray[Any]) -> NDArray[Any]:
        want = np.dtype(spec.dtype)
        have = np.asarray(array).dtype
        if _kind(have) != _kind(want):
            raise ConfigError(
                f"{self.where}: input {spec.name!r} is {have} but the model takes {want}; "
                f"save it as {want}"
            )
        if spec.shape is not None:
            shape = np.shape(array)
            fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int)]
            if len(shape) != len(spec.shape) or any(shape[i] != d for i, d in fixed):
                wanted = tuple("?" if not isinstance(d, int) else d for d in spec.shape)
                hint = (
                    " (set --batch to the model's batch size)" if fixed and fixed[0][0] == 0 else ""
                )
                raise ConfigError(
                    f"{self.where}: input {spec.name!r} has shape {tuple(shape)} but the model "
                    f"takes {wanted}{hint}"
                )
        return np.ascontiguousarray(array, dtype=want)


def _kind(dtype: np.dtype[Any]) -> str:
    if dtype.kind in "iu":
        return "integer"
    return {"f": "float", "b": "bool", "c": "complex"}.get(dtype.kind, dtype.kind)


@dataclass
class DataSource:
    """Batches of checked input arrays, and how many samples there are (None: unknown)."""

    samples: int | None
    _batches: Any

    def batches(self, batch: int) -> Iterator[Arrays]:
        if batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {batch}")
        yielded = False
        for arrays in self._batches(batch):
            yielded = True
            yield arrays
        if not yielded:
            raise ConfigError(f"{self.where}: holds no samples")

    @property
    def where(self) -> str:
        return str(getattr(self._batches, "where", "data"))


def _load_npz(path: Path) -> Any:
    """An open ``NpzFile`` (arrays are read when indexed)."""
    try:
        archive = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"{path}: cannot read it as .npz/.npy ({exc})") from exc
    if isinstance(archive, np.ndarray):
        raise ConfigError(f"{path}: a single .npy array; pass the directory holding it, or an .npz")
    return archive


def _slices(arrays: Mapping[str, NDArray[Any]], batch: int) -> Iterator[Arrays]:
    count = min((len(a) for a in arrays.values()), default=0)
    for start in range(0, count, batch):
        yield {name: np.asarray(a[start : start + batch]) for name, a in arrays.items()}


class _File:
    def __init__(self, path: Path, check: _Checker, arrays: Mapping[str, NDArray[Any]]) -> None:
        self.path, self.check, self.where, self.arrays = path, check, str(path), arrays

    def __call__(self, batch: int) -> Iterator[Arrays]:
        yield from _slices(self.arrays, batch)


class _Shards:
    """A directory of shards streamed one at a time; batches span shard boundaries."""

    def __init__(self, folder: Path, check: _Checker) -> None:
        self.folder, self.check, self.where = folder, check, str(folder)
        self.files = sorted(p for p in folder.iterdir() if p.suffix in (".npz", ".npy"))
        if not self.files:
            raise ConfigError(f"{folder}: no .npz or .npy shards in this directory")
        if any(p.suffix == ".npy" for p in self.files) and len(check.inputs) != 1:
            raise ConfigError(
                f"{folder}: .npy shards hold one array; the model has "
                f"{len(check.inputs)} inputs, so use .npz shards named after them"
            )
        self._shard(self.files[0])  # the first shard is checked before any run

    def _shard(self, path: Path) -> Arrays:
        self.check.where = str(path)
        if path.suffix == ".npy":
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (ValueError, OSError) as exc:
                raise ConfigError(f"{path}: cannot read it as .npy ({exc})") from exc
            return self.check({self.check.inputs[0].name: array})
        archive = _load_npz(path)
        return self.check({name: archive[name] for name in archive.files})

    def __call__(self, batch: int) -> Iterator[Arrays]:
        carry: Arrays | None = None
        for path in self.files:
            arrays = self._shard(path)
            if carry is not None:
                arrays = {n: np.concatenate([carry[n], arrays[n]]) for n in arrays}
                carry = None
            count = min(len(a) for a in arrays.values())
            full = count - count % batch
            yield from _slices({n: a[:full] for n, a in arrays.items()}, batch)
            if full < count:
                carry = {n: np.asarray(a[full:]) for n, a in arrays.items()}
        if carry is not None:
            yield carry


class _Random:
    def __init__(
        self,
        samples: int,
        inputs: Sequence[InputSpec],
        shapes: Mapping[str, tuple[int, ...]],
        seed: int,
        mask: str | None,
        check: _Checker,
    ) -> None:
        unknown = sorted(set(shapes) - {spec.name for spec in inputs})
        if unknown:
            raise ConfigError(
                f"--shape names {unknown}, which are not model inputs: "
                f"{', '.join(s.describe() for s in inputs)}"
            )
        self.samples, self.seed, self.mask, self.check = samples, seed, mask, check
        self.where = "--random"
        self.dims = {spec.name: self._dims(spec, shapes.get(spec.name)) for spec in inputs}
        self.inputs = list(inputs)

    @staticmethod
    def _dims(spec: InputSpec, given: tuple[int, ...] | None) -> tuple[int, ...]:
        model = spec.shape
        if model is None:
            if given is None:
                raise ConfigError(
                    f"input {spec.name!r} has no known shape; give --shape {spec.name}=DIMS"
                )
            return given
        rest = model[1:]
        if given is not None:
            if len(given) != len(rest) or any(
                isinstance(d, int) and d != g for d, g in zip(rest, given, strict=True)
            ):
                raise ConfigError(
                    f"--shape {spec.name}={','.join(map(str, given))} does not fit the model's "
                    f"{spec.describe()} (give the dims of one sample, without the batch axis)"
                )
            return given
        if any(not isinstance(d, int) for d in rest):
            raise ConfigError(
                f"input {spec.describe()} has dynamic dimensions; give the dims of one sample "
                f"with --shape {spec.name}=DIMS"
            )
        return tuple(int(d) for d in rest if isinstance(d, int))

    def __call__(self, batch: int) -> Iterator[Arrays]:
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.samples, batch):
            size = min(batch, self.samples - start)
            arrays: Arrays = {}
            for spec in self.inputs:
                shape = (size, *self.dims[spec.name])
                dtype = np.dtype(spec.dtype)
                if spec.name == self.mask:
                    arrays[spec.name] = np.ones(shape, dtype)
                elif dtype.kind == "f":
                    arrays[spec.name] = rng.standard_normal(shape).astype(dtype)
                elif dtype.kind in "iu":
                    arrays[spec.name] = rng.integers(0, spec.index_limit or 2, shape).astype(dtype)
                else:
                    arrays[spec.name] = rng.integers(0, 2, shape).astype(dtype)
            yield self.check(arrays)


def open_data(
    data: str | Path | None,
    inputs: Sequence[InputSpec],
    *,
    random: int | None = None,
    shapes: Mapping[str, tuple[int, ...]] | None = None,
    seed: int = 0,
    mask: str | None = "attention_mask",
) -> DataSource:
    """Batches for ``inputs`` from ``data`` (an .npz file or a directory of shards), or
    ``random`` samples (exactly one of the two)."""
    if (data is None) == (random is None):
        raise ConfigError("give exactly one of --data DATA and --random N")
    if random is not None:
        check = _Checker(inputs, "--random")
        return DataSource(random, _Random(random, inputs, dict(shapes or {}), seed, mask, check))
    path = Path(data)  # type: ignore[arg-type]
    check = _Checker(inputs, str(path))
    if path.is_dir():
        return DataSource(None, _Shards(path, check))
    if not path.is_file():
        raise ConfigError(f"{path}: no such data file or directory")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: the data file is empty")
    archive = _load_npz(path)
    arrays = {name: archive[name] for name in archive.files}
    if not arrays:
        raise ConfigError(f"{path}: the data file holds no arrays")
    lengths = [a.shape[0] if a.ndim else 0 for a in arrays.values()]
    checked = check(arrays)  # before any run: a mismatch is reported up front
    return DataSource(min(lengths), _File(path, check, checked))
