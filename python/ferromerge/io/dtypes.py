"""The safetensors dtypes as stored: bytes per element, NumPy storage types, and the float codec (stored float data
to float32 exactly, float32 to a stored dtype with the engine's rounding) shared by every Python path that reads or
writes tensors itself (LoRA caches, extract-lora, compress)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _core
from ..models.index import MERGEABLE_DTYPES

#: bytes per element of the safetensors dtypes that whole tensors are copied in (only F32/F16/BF16 are decoded)
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
#: how the float dtypes (and the bytes of packed masks) are held in NumPy: bfloat16 as its uint16 bit patterns
RAW = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "U8": np.dtype("u1")}
#: mergekit's names of the float dtypes -> safetensors names
ST_NAME = {v: k for k, v in MERGEABLE_DTYPES.items()}


def numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def to_f32(raw: npt.NDArray[Any], dtype: str) -> npt.NDArray[np.float32]:
    """Exact float32 values of stored float data (bfloat16 given as uint16 bits). float32 data comes back without a
    copy (memory maps of whole tensors are decoded in row blocks): callers do not modify the result in place."""
    if dtype == "BF16":
        return (np.asarray(raw, dtype=np.uint32) << 16).view(np.float32)
    return np.asarray(raw, dtype=np.float32)


def from_f32(values: npt.NDArray[np.float32], dtype: str) -> npt.NDArray[Any]:
    """float32 rounded to ``dtype`` as the engine rounds (to nearest even), as raw little-endian data."""
    if dtype == "F32":
        return np.ascontiguousarray(values, dtype="<f4")
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        return np.empty(values.shape, RAW[dtype])
    # linear over one input with weight 1 is an exact copy followed by the output rounding: the engine's codec, so
    # what these paths write rounds exactly as a merge's output does
    out = _core.merge_arrays("linear", [flat], None, [1.0], [1.0], out_dtype=MERGEABLE_DTYPES[dtype],
                             normalize=False, threads=1)
    return np.asarray(out).astype(RAW[dtype], copy=False).reshape(values.shape)
