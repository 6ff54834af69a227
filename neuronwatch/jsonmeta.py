"""User metadata of reports: normalised to JSON values, non-finite floats kept as valid JSON.

``meta`` accepts what users put there in practice (numpy scalars and arrays, paths, tuples) and
turns it into plain JSON values once, when the report is made, so that a saved and reloaded
report compares equal. NaN and infinities are not JSON; they are written as ``{"$float": "nan"}``
(``"inf"``, ``"-inf"``) and read back as floats.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import ReportError

__all__ = ["decode_meta", "encode_meta", "meta_key", "normalize_meta"]

_FLOAT_TAG = "$float"


# Deeper than this is not metadata; it would also overflow the JSON reader on load.
MAX_DEPTH = 64


def _cannot(where: str, value: Any) -> ReportError:
    return ReportError(
        f"{where} is a {type(value).__name__}, which a report cannot store; use a str, number, "
        "bool, None, path, numpy scalar or array, or a list or dict of those"
    )


def _normal(value: Any, where: str, parents: tuple[int, ...]) -> Any:
    if value is None or isinstance(value, bool | str | int | float):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)  # longdouble too: .item() would hand it back unchanged
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if not isinstance(value, Mapping | list | tuple | np.ndarray):
        raise _cannot(where, value)
    if id(value) in parents:
        raise ReportError(f"{where} refers back to a container it is in; meta must be a tree")
    if len(parents) >= MAX_DEPTH:
        raise ReportError(f"{where} is nested more than {MAX_DEPTH} levels deep")
    inside = (*parents, id(value))
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "biuf":
            raise _cannot(where, value)
        plain = value.astype(np.float64) if value.dtype.kind == "f" else value
        return _normal(plain.tolist(), where, inside)
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                raise ReportError(
                    f"{where} has key {key!r} of type {type(key).__name__}; meta keys must be "
                    "strings"
                )
            out[key] = _normal(item, f"{where}[{key!r}]", inside)
        return out
    return [_normal(item, f"{where}[{i}]", inside) for i, item in enumerate(value)]


def normalize_meta(meta: Mapping[str, Any]) -> dict[str, Any]:
    """``meta`` as plain JSON-compatible values; raises ReportError naming the bad key."""
    if not isinstance(meta, Mapping):
        raise ReportError(f"meta must be a mapping of names to values, got {type(meta).__name__}")
    normal = _normal(dict(meta), "meta", ())
    assert isinstance(normal, dict)
    return normal


def encode_meta(value: Any) -> Any:
    """Normalised meta with non-finite floats tagged, ready for ``json.dumps(allow_nan=False)``."""
    if isinstance(value, float) and not math.isfinite(value):
        return {_FLOAT_TAG: "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf")}
    if isinstance(value, dict):
        return {key: encode_meta(item) for key, item in value.items()}
    if isinstance(value, list):
        return [encode_meta(item) for item in value]
    return value


def decode_meta(value: Any) -> Any:
    """Inverse of :func:`encode_meta`."""
    if isinstance(value, dict):
        if set(value) == {_FLOAT_TAG} and value[_FLOAT_TAG] in ("nan", "inf", "-inf"):
            return float(value[_FLOAT_TAG])
        return {key: decode_meta(item) for key, item in value.items()}
    if isinstance(value, list):
        return [decode_meta(item) for item in value]
    return value


def meta_key(meta: Mapping[str, Any]) -> str:
    """A canonical text of ``meta`` for equality (NaN equals NaN here, unlike in Python)."""
    return json.dumps(encode_meta(dict(meta)), sort_keys=True, allow_nan=False)
