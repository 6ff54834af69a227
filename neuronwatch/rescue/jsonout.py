"""JSON for manifests that list millions of indices: numpy arrays written in chunks, on one line.

``json.dumps`` would first turn every index into a Python int (about 36 bytes each), which for
a stripped billion-parameter checkpoint costs more memory than the edit itself. Here arrays
stay arrays until they are written, 64k values at a time; nested objects are indented, lists
of numbers stay on one line.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Callable, Mapping
from typing import IO, Any

import numpy as np

__all__ = ["dumps", "plain", "write_json"]

_CHUNK = 1 << 16


def plain(value: Any) -> Any:
    """``value`` with every numpy array and scalar turned into plain Python values."""
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


def _scalar(value: Any) -> str:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"manifest values must be finite, got {value}")
    return json.dumps(value)


def _item(value: Any) -> str:
    """:func:`_scalar` of a list item, with the common cases first: a manifest's lists hold tens
    of thousands of plain ints (neuron indices), and ``json.dumps`` per int was most of the time
    to write one (0.1 s of a 1 GiB prune)."""
    kind = type(value)
    if kind is int:  # not bool: ``type`` is exact
        return str(value)
    if kind is float and math.isfinite(value):
        return repr(value)
    return _scalar(plain(value))


def _array(array: np.ndarray, out: IO[str]) -> None:
    flat = array.reshape(-1)
    if flat.dtype.kind == "f":
        if not np.isfinite(flat).all():
            raise ValueError("manifest arrays must be finite")
        text: Callable[[Any], str] = repr  # a finite Python float's repr is its JSON
    elif flat.dtype.kind == "b":
        text = {True: "true", False: "false"}.__getitem__
    else:
        text = str
    out.write("[")
    for start in range(0, flat.size, _CHUNK):
        chunk = flat[start : start + _CHUNK].tolist()
        out.write((", " if start else "") + ", ".join(map(text, chunk)))
    out.write("]")


def _flat(values: list[Any] | tuple[Any, ...]) -> bool:
    return all(isinstance(v, int | float | str | bool | np.generic) or v is None for v in values)


def _write(value: Any, out: IO[str], level: int) -> None:
    pad = "\n" + " " * (level + 1)
    if isinstance(value, np.ndarray):
        _array(value, out)
    elif isinstance(value, np.generic):
        out.write(_scalar(value.item()))
    elif isinstance(value, Mapping):
        if not value:
            out.write("{}")
            return
        out.write("{")
        for i, (key, item) in enumerate(value.items()):
            out.write(("," if i else "") + pad + json.dumps(str(key)) + ": ")
            _write(item, out, level + 1)
        out.write("\n" + " " * level + "}")
    elif isinstance(value, list | tuple):
        if _flat(value):
            out.write("[" + ", ".join(map(_item, value)) + "]")
            return
        out.write("[")
        for i, item in enumerate(value):
            out.write(("," if i else "") + pad)
            _write(item, out, level + 1)
        out.write("\n" + " " * level + "]")
    else:
        out.write(_scalar(value))


def write_json(value: Any, out: IO[str]) -> None:
    _write(value, out, 0)
    out.write("\n")


def dumps(value: Any) -> str:
    buffer = io.StringIO()
    write_json(value, buffer)
    return buffer.getvalue()
