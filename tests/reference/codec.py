"""The storage dtypes in NumPy: float32, float16 and bfloat16 (as uint16 bit patterns), their codec, rounding and
unit in the last place. Every other reference module decodes its inputs and rounds its outputs through these.
"""

from __future__ import annotations

import numpy as np

DTYPES = ("float32", "float16", "bfloat16")
STORAGE = {"float32": np.float32, "float16": np.float16, "bfloat16": np.uint16}
#: (explicit mantissa bits, minimum normal exponent) of each dtype
_FORMAT = {"float32": (23, -126), "float16": (10, -14), "bfloat16": (7, -126)}


def bf16_decode(bits: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (uint16 or int16) -> float32, exact."""
    bits = np.asarray(bits)
    return (bits.view(np.uint16).astype(np.uint32) << np.uint32(16)).view(np.float32)


def bf16_encode(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, round to nearest, ties to even; NaN stays NaN (quiet, sign kept)."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    lsb = (u >> np.uint64(16)) & np.uint64(1)
    rounded = ((u + np.uint64(0x7FFF) + lsb) >> np.uint64(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        quiet = ((u >> np.uint64(16)) | np.uint64(0x0040)).astype(np.uint16)
        rounded = np.where(nan, quiet, rounded)
    return rounded


def encode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values -> storage array of ``dtype`` (bfloat16 as uint16 bits), round to nearest even."""
    x = np.asarray(x, dtype=np.float32)
    if dtype == "float32":
        return x.copy()
    if dtype == "float16":
        return x.astype(np.float16)
    if dtype == "bfloat16":
        return bf16_encode(x)
    raise ValueError(dtype)


def decode(a: np.ndarray, dtype: str | None = None) -> np.ndarray:
    """Storage array -> float32 values (bfloat16 for uint16/int16 storage)."""
    a = np.asarray(a)
    if a.dtype in (np.uint16, np.int16) or dtype == "bfloat16":
        return bf16_decode(a)
    return a.astype(np.float32)


def dtype_of(a: np.ndarray) -> str:
    a = np.asarray(a)
    if a.dtype == np.float32:
        return "float32"
    if a.dtype == np.float16:
        return "float16"
    if a.dtype in (np.uint16, np.int16):
        return "bfloat16"
    raise ValueError(a.dtype)


def round_to(x: np.ndarray, dtype: str | None) -> np.ndarray:
    """Round float32 values to ``dtype`` and back to float32 (identity for None / float32)."""
    x = np.asarray(x, dtype=np.float32)
    if dtype is None or dtype == "float32":
        return x
    return decode(encode(x, dtype), dtype)


def ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    """Spacing of ``dtype`` numbers at magnitude ``|x|`` (float64), subnormals included."""
    mant, emin = _FORMAT[dtype]
    ax = np.abs(np.asarray(x, dtype=np.float64))
    with np.errstate(divide="ignore"):
        e = np.floor(np.log2(np.where(ax > 0, ax, 1.0)))
    e = np.where(ax > 0, np.maximum(e, emin), emin)
    return np.ldexp(1.0, (e - mant).astype(np.int64))
