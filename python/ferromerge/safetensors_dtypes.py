"""The safetensors dtypes as stored: bytes per element and element counts (shared by the streaming reader and writer)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

#: bytes per element of the safetensors dtypes that whole tensors are copied in (only F32/F16/BF16 are decoded)
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}


def numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))
