"""Tensor element types, named once for every checkpoint format, and float conversions.

Names are the safetensors spelling (``F32``, ``BF16``, ...); each format maps its own types onto
them. Edits are computed in the tensor's own float type (bfloat16 in float32) and each result is
rounded once when stored, so entries an edit does not touch come back bit for bit. bfloat16 has
no numpy type: its bits are kept as ``uint16`` and converted here (round to nearest even), so
no extra package is needed.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .checkpoint import CheckpointError

__all__ = [
    "EDITABLE",
    "STORAGE",
    "decode",
    "encode",
    "itemsize",
    "nbytes",
    "storage_dtype",
    "stored_bytes",
]

# How each element type is stored in memory: bfloat16 and the 8-bit floats as raw bits.
STORAGE: dict[str, np.dtype[Any]] = {
    "BOOL": np.dtype(np.bool_),
    "U8": np.dtype(np.uint8),
    "I8": np.dtype(np.int8),
    "U16": np.dtype("<u2"),
    "I16": np.dtype("<i2"),
    "U32": np.dtype("<u4"),
    "I32": np.dtype("<i4"),
    "U64": np.dtype("<u8"),
    "I64": np.dtype("<i8"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "F32": np.dtype("<f4"),
    "F64": np.dtype("<f8"),
    "F8_E5M2": np.dtype(np.uint8),
    "F8_E4M3": np.dtype(np.uint8),
}

# Element types an op may change: the float types numpy (or this module) can compute in.
EDITABLE: frozenset[str] = frozenset({"F16", "BF16", "F32", "F64"})

# Bits per element of the newer safetensors types that are never edited, only copied byte for
# byte: their sizes still let a header be checked. A type named nowhere here is copied too,
# its byte range checked only against its neighbours'.
_OTHER_BITS: dict[str, int] = {
    "F8_E8M0": 8,
    "F8_E4M3FNUZ": 8,
    "F8_E5M2FNUZ": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "C64": 64,
    "C128": 128,
}


def storage_dtype(dtype: str, where: str) -> np.dtype[Any]:
    try:
        return STORAGE[dtype]
    except KeyError:
        raise CheckpointError(
            f"{where}: unknown element type {dtype!r}; known: {', '.join(STORAGE)}"
        ) from None


def itemsize(dtype: str, where: str) -> int:
    return int(storage_dtype(dtype, where).itemsize)


def nbytes(shape: tuple[int, ...], dtype: str, where: str) -> int:
    return math.prod(shape) * itemsize(dtype, where)


def stored_bytes(shape: tuple[int, ...], dtype: str) -> int | None:
    """Bytes a tensor of ``dtype`` takes (sub-byte types packed), ``None`` for a type this
    module does not know or a packing that does not end on a byte."""
    bits = STORAGE[dtype].itemsize * 8 if dtype in STORAGE else _OTHER_BITS.get(dtype)
    if bits is None:
        return None
    total = math.prod(shape) * bits
    return total // 8 if total % 8 == 0 else None


def _bf16_to_f32(bits: NDArray[np.uint16]) -> NDArray[np.float32]:
    values: NDArray[np.float32] = (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return values


def _f32_to_bf16(values: NDArray[np.float32]) -> NDArray[np.uint16]:
    u = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    # Round to nearest, ties to even: add 0x7FFF plus the lowest kept bit, then truncate.
    rounded = (u + (np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))) >> np.uint32(16)
    bits: NDArray[np.uint16] = rounded.astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():  # keep NaNs NaN (the rounding could carry into the exponent)
        bits[nan] = ((u[nan] >> np.uint32(16)) | np.uint32(0x40)).astype(np.uint16)
    return bits


def decode(raw: NDArray[Any], dtype: str, where: str) -> NDArray[np.floating[Any]]:
    """Stored values of an editable type as a new, writable float array to compute in: the
    type itself for F16/F32/F64 (numpy rounds once when a result is stored into it), float32
    for BF16 (exact)."""
    if dtype not in EDITABLE:
        raise CheckpointError(
            f"{where} holds {dtype} values; only {', '.join(sorted(EDITABLE))} tensors can be "
            "edited (is the report wired to the right tensor?)"
        )
    if dtype == "BF16":
        return _bf16_to_f32(np.asarray(raw).view(np.uint16))
    values: NDArray[np.floating[Any]] = np.array(raw, dtype=STORAGE[dtype])
    return values


def encode(values: NDArray[np.floating[Any]], dtype: str, where: str) -> NDArray[Any]:
    """float values rounded once into the storage array of ``dtype``."""
    if dtype == "BF16":
        return _f32_to_bf16(np.asarray(values, dtype=np.float32))
    if dtype not in EDITABLE:
        raise CheckpointError(f"{where}: cannot write {dtype} values")
    return np.asarray(values).astype(STORAGE[dtype], copy=False)
