"""Saving and loading reports so that they never lie.

- **Save** serialises and checks everything in memory first (meta, JSON, the npz bytes), then
  writes both files under temporary names and renames the npz, then the JSON. The JSON carries
  the npz's SHA-256, so a crash between the two renames, or two files from different saves put
  side by side, are caught by ``load`` instead of being read as one report.
- **Load** turns every malformed input (missing, truncated, empty or garbage files; wrong types,
  shapes or keys) into a :class:`ReportError` naming the file and what is wrong, then recomputes
  every verdict from the arrays and checks it against the summary.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import zipfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager, suppress
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from .atomic import write_files_atomic
from .config import LayerConfig
from .errors import NeuronwatchError, ReportError
from .jsonmeta import decode_meta
from .partials import FIELDS, Partials, histogram_bins
from .report import SCHEMA_VERSION, Report
from .states import STATES
from .stats import LayerStats, summarize
from .wiring import Wiring

__all__ = ["JSON_NAME", "NPZ_NAME", "load_report", "save_report"]

JSON_NAME = "report.json"
NPZ_NAME = "report.npz"
# Derived per-neuron arrays saved beside the partials for users who read the npz directly.
# State masks are named "is_<state>" so that "saturated" (a mask) never collides with the
# partials field "saturated" (a count).
_DERIVED: dict[str, str] = {
    "frequency": "frequency",
    "mean_abs": "mean_abs",
    "dormancy": "dormancy",
    "known": "is_known",
    **{state.value: f"is_{state.value}" for state in STATES},
}

T = TypeVar("T")


# -- locking ----------------------------------------------------------------------------------


@contextmanager
def _locked(directory: Path, exclusive: bool) -> Iterator[None]:
    """An advisory lock on the report directory itself (POSIX ``flock`` on its descriptor):
    saves are exclusive, loads shared, so two processes saving, or one loading while another
    saves, never interleave the two files. Without fcntl (Windows) it is a no-op: the checksum
    still catches a mismatched pair."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        # A file system without locks (ENOLCK on some NFS mounts): the checksum still pairs
        # the two files.
        with suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # closing releases the lock


# -- save -------------------------------------------------------------------------------------


def _npz_bytes(report: Report) -> bytes:
    arrays: dict[str, NDArray[Any]] = {}
    for name, stats in report.layers.items():
        arrays[f"{name}/rows"] = np.asarray(stats.rows, dtype=np.int64)
        for key, array in stats.partials.arrays():
            arrays[f"{name}/{key}"] = array
        for attribute, key in _DERIVED.items():
            arrays[f"{name}/{key}"] = getattr(stats, attribute)
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]  # numpy stub quirk
    return buffer.getvalue()


def save_report(report: Report, out: Path) -> Path:
    if out.exists() and not out.is_dir():
        raise ReportError(f"{out} exists and is not a directory; pass a directory path")
    # Everything that can fail on the report's content fails here, before a file is touched.
    npz = _npz_bytes(report)
    summary = report.summary()
    summary["npz_sha256"] = hashlib.sha256(npz).hexdigest()
    try:
        text = json.dumps(summary, indent=2, allow_nan=False) + "\n"
    except ValueError as exc:  # a non-finite float outside meta: a bug, but never invalid JSON
        raise ReportError(f"report of {report.model!r} cannot be written as JSON: {exc}") from exc
    out.mkdir(parents=True, exist_ok=True)
    # The npz goes first and the JSON commits; a failure in between restores the previous npz,
    # and a crash in between leaves a checksum mismatch that load() reports. The lock keeps
    # two processes saving (or one loading) from interleaving their two files.
    with _locked(out, exclusive=True):
        write_files_atomic({out / NPZ_NAME: npz, out / JSON_NAME: text.encode("utf-8")})
    return out


# -- load -------------------------------------------------------------------------------------


def _field(data: Mapping[str, Any], key: str, kind: type[T] | tuple[type, ...], where: str) -> T:
    if key not in data:
        raise ReportError(f"{where} has no {key!r}")
    value = data[key]
    if isinstance(value, bool) and kind is not bool:
        raise ReportError(f"{where}: {key!r} must be {_kind_name(kind)}, got {value!r}")
    if not isinstance(value, kind):
        raise ReportError(f"{where}: {key!r} must be {_kind_name(kind)}, got {value!r}")
    return value  # type: ignore[return-value]


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "an object",
    }
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _parse(what: str, build: Callable[[], T]) -> T:
    try:
        return build()
    except ReportError:
        raise
    except (NeuronwatchError, KeyError, TypeError, ValueError) as exc:
        raise ReportError(f"{what} is malformed: {exc}") from exc


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ReportError(f"{path} is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise ReportError(f"{path} is nested too deeply to be a report") from exc
    except OSError as exc:
        raise ReportError(f"{path} cannot be read: {exc}") from exc
    if not isinstance(data, dict):
        raise ReportError(f"{path} must hold a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION:
        raise ReportError(
            f"{path} has schema_version {version!r}; this neuronwatch reads {SCHEMA_VERSION} "
            "(write the report again with this version, or upgrade neuronwatch for newer ones)"
        )
    return data


def _read_npz(path: Path, expected_sha: str) -> Mapping[str, NDArray[Any]]:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ReportError(f"{path} cannot be read: {exc}") from exc
    if hashlib.sha256(raw).hexdigest() != expected_sha:
        raise ReportError(
            f"{path} does not belong to the {JSON_NAME} beside it (its checksum differs): the two "
            "files come from different saves; save the report again"
        )
    try:
        loaded = np.load(io.BytesIO(raw), allow_pickle=False)
        if not isinstance(loaded, np.lib.npyio.NpzFile):
            raise ValueError(f"it holds one {type(loaded).__name__}, not an archive of arrays")
        with loaded as npz:
            arrays = {key: npz[key] for key in npz.files}
    except (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError) as exc:
        raise ReportError(f"{path} is not a readable npz archive: {exc}") from exc
    for key, value in arrays.items():
        if not isinstance(value, np.ndarray):
            raise ReportError(f"{path}: member {key!r} is not an array (.npy)")
    return arrays


def _layer(
    entry: Any, index: int, arrays: Mapping[str, NDArray[Any]], json_path: Path, npz_path: Path
) -> tuple[LayerStats, Wiring | None]:
    where = f"{json_path}: layers[{index}]"
    if not isinstance(entry, dict):
        raise ReportError(f"{where} must be an object, got {type(entry).__name__}")
    name = _field(entry, "name", str, where)
    where = f"{json_path}: layer {name!r}"
    thresholds = _field(entry, "thresholds", dict, where)
    config = _parse(f"{where} thresholds", lambda: LayerConfig.from_json(thresholds))
    if config.name != name:
        raise ReportError(f"{where}: thresholds are for layer {config.name!r}")
    raw_wiring = entry.get("wiring")
    wiring = (
        None
        if raw_wiring is None
        else _parse(
            f"{where} wiring", lambda: Wiring.from_json(_field(entry, "wiring", dict, where))
        )
    )
    missing = [key for key in ("rows", *FIELDS) if f"{name}/{key}" not in arrays]
    if missing:
        raise ReportError(f"{npz_path} lacks the arrays {missing} of layer {name!r}")
    rows = arrays[f"{name}/rows"]
    if rows.shape != () or not np.issubdtype(rows.dtype, np.integer):
        raise ReportError(f"{npz_path}: '{name}/rows' must be one integer, got {rows!r}")
    partials = _parse(
        f"{npz_path}: arrays of layer {name!r}",
        lambda: Partials.from_arrays(
            rows=int(rows),
            bins=histogram_bins(config.histogram_edges),
            **{key: arrays[f"{name}/{key}"] for key in FIELDS},
        ),
    ).frozen()
    stats = summarize(config, partials)
    for state in STATES:
        said = _field(entry, state.value, int, where)
        if stats.count(state) != said:
            raise ReportError(
                f"{where} says {said} {state.value} neurons in {JSON_NAME} but the arrays of "
                f"{NPZ_NAME} give {stats.count(state)}; the summary was edited or is corrupt"
            )
    return stats, wiring


def load_report(where: Path) -> Report:
    json_path, npz_path = where / JSON_NAME, where / NPZ_NAME
    for path in (json_path, npz_path):
        if not path.is_file():
            raise ReportError(
                f"{path} not found: a report directory holds {JSON_NAME} and {NPZ_NAME} "
                "(write one with monitor.report().save(DIR))"
            )
    with _locked(where, exclusive=False):
        data = _read_json(json_path)
        sha = _field(data, "npz_sha256", str, str(json_path))
        arrays = _read_npz(npz_path, sha)
    model = _field(data, "model", str, str(json_path))
    window = _field(data, "window", str, str(json_path))
    step = _field(data, "step", int, str(json_path))
    created: float = _field(data, "created", (int, float), str(json_path))
    meta = _field(data, "meta", dict, str(json_path))
    entries = _field(data, "layers", list, str(json_path))
    layers: dict[str, LayerStats] = {}
    wiring: dict[str, Wiring] = {}
    for index, entry in enumerate(entries):
        stats, layer_wiring = _layer(entry, index, arrays, json_path, npz_path)
        if stats.name in layers:
            raise ReportError(f"{json_path}: layer {stats.name!r} appears twice")
        layers[stats.name] = stats
        if layer_wiring is not None:
            wiring[stats.name] = layer_wiring
    return Report(
        model=model,
        window=window,
        step=step,
        layers=MappingProxyType(layers),
        wiring=MappingProxyType(wiring),
        meta=decode_meta(meta),
        created=float(created),
    )
