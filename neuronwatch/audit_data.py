"""Data for audits: batches of named input arrays from files, or random ones (numpy only).

A DATA argument is one of:

- an ``.npz`` file whose arrays are named after the model's inputs; axis 0 indexes samples;
- a directory of ``.npz`` shards (or ``.npy`` shards for a one-input model), read in name
  order one shard at a time and never loaded whole (``.npy`` shards are memory-mapped);
- ``random=N``: N random samples shaped like the inputs, dynamic dimensions given per input.

Every batch is checked against the model's inputs before it runs: a missing input, a sample
shape that disagrees with the model's fixed dimensions, or a dtype of another kind (an integer
array for a float input) is a :class:`~neuronwatch.ConfigError` naming the file, the input and
the fix. Arrays of the right kind are cast (float64 data for a float32 input). A model whose
inputs fix the batch size (exported without a dynamic batch axis) runs batches of exactly that
size; the samples left over at the end are left out and counted (:attr:`DataSource.left_out`).
"""

from __future__ import annotations

import math
import os
import zipfile
import zlib
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .errors import ConfigError

__all__ = ["DataSource", "InputSpec", "fixed_batch", "open_data", "parse_shape"]

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


def fixed_batch(inputs: Sequence[InputSpec]) -> int | None:
    """The batch size the model's inputs fix (axis 0 a number, the same on every input), or
    None when the batch axis is dynamic."""
    firsts = {spec.shape[0] for spec in inputs if spec.shape}
    if len(firsts) == 1:
        (first,) = firsts
        return first if isinstance(first, int) else None
    return None


class _Checker:
    """Checks and casts arrays of samples (axis 0) against the model's inputs: every axis but
    the batch axis, which the batching sets (:meth:`DataSource.batches`)."""

    def __init__(self, inputs: Sequence[InputSpec], where: str) -> None:
        self.inputs = list(inputs)
        self.where = where

    def __call__(
        self, arrays: Mapping[str, NDArray[Any]], available: Sequence[str] | None = None
    ) -> Arrays:
        """``arrays`` checked; ``available`` names every array of the file (for the hint when
        an input is missing), default the keys of ``arrays``."""
        names = {spec.name for spec in self.inputs}
        missing = [spec.name for spec in self.inputs if spec.name not in arrays]
        if missing:
            extra = sorted(set(arrays if available is None else available) - names)
            hint = f"; it has {extra}" if extra else ""
            raise ConfigError(
                f"{self.where}: no array for model input(s) {missing}{hint}; name the arrays "
                f"after the model's inputs: {', '.join(s.describe() for s in self.inputs)}"
            )
        lengths = {name: _samples(arrays[name]) for name in names}
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
            # Axis 0 indexes samples: a model's fixed batch size is the batching's business.
            fixed = [(i, d) for i, d in enumerate(spec.shape) if isinstance(d, int) and i > 0]
            if len(shape) != len(spec.shape) or any(shape[i] != d for i, d in fixed):
                wanted = tuple("?" if not isinstance(d, int) else d for d in spec.shape)
                raise ConfigError(
                    f"{self.where}: input {spec.name!r} has shape {tuple(shape)} but the model "
                    f"takes {wanted}"
                )
        return np.ascontiguousarray(array, dtype=want)


def _samples(array: NDArray[Any]) -> int:
    return int(np.shape(array)[0]) if np.ndim(array) else 0


def _kind(dtype: np.dtype[Any]) -> str:
    if dtype.kind in "iu":
        return "integer"
    return {"f": "float", "b": "bool", "c": "complex"}.get(dtype.kind, dtype.kind)


@dataclass
class DataSource:
    """Batches of checked input arrays, and how many samples there are (None: unknown).

    ``fixed``: the batch size the model fixes, if any; then every batch has exactly that many
    samples and ``left_out`` counts those left over at the end (after :meth:`batches` ran).
    """

    samples: int | None
    _batches: Any
    fixed: int | None = None
    left_out: int = 0

    def batches(self, batch: int) -> Iterator[Arrays]:
        if batch < 1:
            raise ConfigError(f"--batch must be >= 1, got {batch}")
        if self.fixed is not None and batch != self.fixed:
            raise ConfigError(
                f"--batch {batch}: the model takes batches of exactly {self.fixed} samples (its "
                f"inputs fix axis 0); pass --batch {self.fixed}, or leave --batch out"
            )
        self.left_out = 0
        yielded = False
        for arrays in self._batches(batch):
            size = max((_samples(a) for a in arrays.values()), default=0)
            if self.fixed is not None and size != self.fixed:
                self.left_out += size  # a last, short batch: the model cannot run it
                continue
            yielded = True
            yield arrays
        if not yielded:
            if self.left_out:
                raise ConfigError(
                    f"{self.where}: its {self.left_out} samples do not fill one batch of "
                    f"{self.fixed}, the model's fixed batch size"
                )
            raise ConfigError(f"{self.where}: holds no samples")

    @property
    def runnable(self) -> int | None:
        """How many samples will run: all of them, or whole batches of the fixed size."""
        if self.samples is None or self.fixed is None:
            return self.samples
        return self.samples - self.samples % self.fixed

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


def _read_npz(path: Path, wanted: Sequence[str]) -> tuple[Arrays, list[str]]:
    """The arrays of ``path`` named in ``wanted`` (others are never read) and the names of
    every array in the file; an array that cannot be read is an error naming it."""
    archive = _load_npz(path)
    with archive:
        names = list(archive.files)
        arrays = {name: _member(archive, path, name) for name in names if name in wanted}
    return arrays, names


def _member(archive: Any, path: Path, name: str) -> NDArray[Any]:
    try:
        return np.asarray(archive[name])
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, zlib.error) as exc:
        fix = (
            "save it as a numeric array"
            if "allow_pickle" in str(exc)
            else "the file is damaged: write it again"
        )
        raise ConfigError(f"{path}: cannot read array {name!r} ({exc}); {fix}") from exc


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
        arrays, names = _read_npz(path, [spec.name for spec in self.check.inputs])
        return self.check(arrays, names)

    def __call__(self, batch: int) -> Iterator[Arrays]:
        carry: Arrays | None = None
        for path in self.files:
            arrays = self._shard(path)
            if carry is not None:
                if all(carry[n].shape[1:] == arrays[n].shape[1:] for n in arrays):
                    arrays = {n: np.concatenate([carry[n], arrays[n]]) for n in arrays}
                else:  # padded to another length (tokens): the leftovers run on their own
                    yield carry
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
        symbols = _symbols(inputs, shapes)
        self.dims = {spec.name: self._dims(spec, shapes.get(spec.name), symbols) for spec in inputs}
        self.inputs = list(inputs)

    @staticmethod
    def _dims(
        spec: InputSpec, given: tuple[int, ...] | None, symbols: Mapping[str, tuple[int, str]]
    ) -> tuple[int, ...]:
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
        # A dynamic dim another input's --shape set (input_ids and attention_mask share "t").
        dims = [
            d
            if isinstance(d, int)
            else symbols[d][0]
            if isinstance(d, str) and d in symbols
            else None
            for d in rest
        ]
        if any(d is None for d in dims):
            raise ConfigError(
                f"input {spec.describe()} has dynamic dimensions; give the dims of one sample "
                f"with --shape {spec.name}=DIMS"
            )
        return tuple(int(d) for d in dims if d is not None)

    def __call__(self, batch: int) -> Iterator[Arrays]:
        rng = np.random.default_rng(self.seed)
        for start in range(0, self.samples, batch):
            size = min(batch, self.samples - start)
            arrays = {spec.name: self._array(rng, spec, size) for spec in self.inputs}
            yield self.check(arrays)

    def _array(self, rng: np.random.Generator, spec: InputSpec, size: int) -> NDArray[Any]:
        shape = (size, *self.dims[spec.name])
        dtype = np.dtype(spec.dtype)
        _fits_in_memory(spec.name, shape, dtype)
        try:
            if spec.name == self.mask:
                return np.ones(shape, dtype)
            if dtype.kind == "f":
                return rng.standard_normal(shape).astype(dtype)
            if dtype.kind in "iu":
                return rng.integers(0, spec.index_limit or 2, shape).astype(dtype)
            return rng.integers(0, 2, shape).astype(dtype)
        except MemoryError as exc:
            raise _too_big(spec.name, shape) from exc


def _symbols(
    inputs: Sequence[InputSpec], shapes: Mapping[str, tuple[int, ...]]
) -> dict[str, tuple[int, str]]:
    """Named dynamic dims set by ``--shape``: symbol -> (size, the input whose --shape set it).
    Inputs sharing a symbol must agree."""
    symbols: dict[str, tuple[int, str]] = {}
    for spec in inputs:
        given = shapes.get(spec.name)
        if given is None or spec.shape is None or len(given) != len(spec.shape) - 1:
            continue
        for dim, size in zip(spec.shape[1:], given, strict=True):
            if not isinstance(dim, str):
                continue
            known = symbols.setdefault(dim, (size, spec.name))
            if known[0] != size:
                raise ConfigError(
                    f"--shape {spec.name} makes dimension {dim!r} {size}, but --shape "
                    f"{known[1]} makes it {known[0]}; inputs that share a dimension take one size"
                )
    return symbols


def _fits_in_memory(name: str, shape: tuple[int, ...], dtype: np.dtype[Any]) -> None:
    """Refuse a random batch larger than the machine's memory before allocating it: with
    memory overcommit the allocation may succeed and the process be killed while filling it."""
    size = math.prod(shape) * dtype.itemsize
    try:
        physical = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):  # not POSIX
        return
    if size > physical > 0:
        raise _too_big(name, shape)


def _too_big(name: str, shape: tuple[int, ...]) -> ConfigError:
    return ConfigError(
        f"--random: a batch of input {name!r} of shape {shape} does not fit in memory; give "
        "smaller --shape dims or a smaller --batch"
    )


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
        return DataSource(
            random,
            _Random(random, inputs, dict(shapes or {}), seed, mask, check),
            fixed_batch(inputs),
        )
    path = Path(data)  # type: ignore[arg-type]
    check = _Checker(inputs, str(path))
    if path.is_dir():
        return DataSource(None, _Shards(path, check), fixed_batch(inputs))
    if not path.is_file():
        raise ConfigError(f"{path}: no such data file or directory")
    if path.stat().st_size == 0:
        raise ConfigError(f"{path}: the data file is empty")
    arrays, names = _read_npz(path, [spec.name for spec in inputs])
    if not names:
        raise ConfigError(f"{path}: the data file holds no arrays")
    checked = check(arrays, names)  # before any run: a mismatch is reported up front
    # Samples of the model's inputs only: other arrays in the file (labels) are not run.
    samples = min((_samples(a) for a in checked.values()), default=0)
    return DataSource(samples, _File(path, check, checked), fixed_batch(inputs))
