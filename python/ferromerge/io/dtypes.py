"""Every dtype fact in Python: the names (safetensors' and mergekit's), bytes per element, NumPy storage types, the
spellings configs and the in-memory API accept, and the float codec (stored float data to float32 exactly, float32
to a stored dtype with the engine's rounding) shared by every Python path that reads or writes tensors itself
(vocabulary alignment, LoRA caches, extract-lora, compress, synthetic models)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _engine

#: the float dtypes the engine merges: safetensors name -> the name mergekit, torch and the plan JSON use
MERGEABLE_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
#: mergekit's names of the float dtypes -> safetensors names
ST_NAME = {v: k for k, v in MERGEABLE_DTYPES.items()}

#: the dtypes that are not floats (integer and bool buffers: ``position_ids``, masks): copied from one model, never
#: merged (``_plan.build``). Floats the engine cannot merge (F64, F8_*) are not among them: mergekit merges those, so
#: copying one model's would silently differ; they stay an error.
COPIED_DTYPES = frozenset({"I64", "I32", "I16", "I8", "U64", "U32", "U16", "U8", "BOOL"})

#: bytes per element of the safetensors dtypes that whole tensors are copied in (only F32/F16/BF16 are decoded)
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
#: how the float dtypes (and the bytes of packed masks) are held in NumPy: bfloat16 as its uint16 bit patterns
RAW: dict[str, np.dtype[Any]] = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "U8": np.dtype("u1")}

#: Config ``dtype``/``out_dtype``: short names people write that mergekit does NOT accept (``dtype_from_name`` only
#: strips a ``torch.`` prefix); accepting them would make configs that mergekit then rejects, so the config gets a
#: "did you mean" error naming the spelling to write instead.
CONFIG_DTYPE_SUGGESTIONS = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16",
                            "bf16": "bfloat16"}

#: The in-memory API's ``out_dtype`` (``merge_tensors``): every common spelling is ACCEPTED, since no mergekit
#: config is involved; the value is the mergekit name.
API_DTYPE_SPELLINGS = {
    "float32": "float32",
    "fp32": "float32",
    "f32": "float32",
    "float": "float32",
    "float16": "float16",
    "fp16": "float16",
    "f16": "float16",
    "half": "float16",
    "bfloat16": "bfloat16",
    "bf16": "bfloat16",
}


def numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def to_f32(raw: npt.NDArray[Any], dtype: str) -> npt.NDArray[np.float32]:
    """Exact float32 values of stored float data (``dtype`` a safetensors name; bfloat16 given as uint16 bits),
    decoded by the engine. float32 data needs no decoding and comes back without a copy (memory maps of whole
    tensors are decoded in row blocks): callers do not modify the result in place."""
    if dtype == "F32":
        return np.asarray(raw, dtype=np.float32)
    return _engine.decode(raw, dtype)


def from_f32(values: npt.ArrayLike, dtype: str) -> npt.NDArray[Any]:
    """float32 rounded to ``dtype`` (a safetensors name) by the engine's codec, so that what Python writes rounds
    exactly as a merge's output does (to nearest even; NaN stays a quiet NaN with its sign), as raw little-endian
    data (bfloat16 as uint16 bits)."""
    if dtype == "F32":
        return np.ascontiguousarray(values, dtype="<f4")
    return _engine.encode(values, dtype).astype(RAW[dtype], copy=False)


def round_to(values: npt.NDArray[np.float32], dtype: str) -> npt.NDArray[np.float32]:
    """``values`` rounded to ``dtype`` (a safetensors name), as float32 again."""
    return to_f32(from_f32(values, dtype), dtype)
