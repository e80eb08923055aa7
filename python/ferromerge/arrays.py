"""Arrays in and out of the engine: NumPy, ml_dtypes and torch tensors to flat NumPy storage and back."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InputError, ParameterError
from .io.dtypes import API_DTYPE_SPELLINGS, ST_NAME


def is_torch(x: Any) -> bool:
    return type(x).__module__.split(".", 1)[0] == "torch"


def torch_dtype_name(dtype: Any) -> str | None:
    """The mergekit name of a torch dtype the kernels take (float32, float16, bfloat16); None for any other."""
    name = str(dtype).removeprefix("torch.")
    return name if name in ST_NAME else None


def _ml_bfloat16() -> Any:
    try:
        import ml_dtypes
    except ImportError:  # pragma: no cover - optional
        return None
    return np.dtype(ml_dtypes.bfloat16)


def dtype_name(dtype: Any, what: str = "dtype") -> str | None:
    """Normalise a dtype given as a name, NumPy/ml_dtypes dtype or torch dtype to a mergekit name."""
    if dtype is None:
        return None
    if isinstance(dtype, str):
        key = dtype.lower().removeprefix("torch.")
        if key in API_DTYPE_SPELLINGS:
            return API_DTYPE_SPELLINGS[key]
        raise ParameterError(f"{what}: unsupported dtype {dtype!r}; use float32, float16 or bfloat16")
    if is_torch(dtype):
        return dtype_name(str(dtype), what)
    try:
        npd = np.dtype(dtype)
    except TypeError:
        raise ParameterError(f"{what}: unsupported dtype {dtype!r}; use float32, float16 or bfloat16") from None
    if npd == np.float32:
        return "float32"
    if npd == np.float16:
        return "float16"
    bf = _ml_bfloat16()
    if bf is not None and npd == bf:
        return "bfloat16"
    raise ParameterError(f"{what}: unsupported dtype {dtype!r}; use float32, float16 or bfloat16")


@dataclass(frozen=True)
class ArrayKind:
    """How to give a result back: "numpy", "ml_dtypes" or "torch" (with the device)."""

    kind: str
    device: Any = None


@dataclass
class FlatArray:
    flat: np.ndarray  # C-contiguous 1-D float32/float16/uint16
    dtype: str
    shape: tuple[int, ...]
    kind: ArrayKind


def _from_torch(x: Any, where: str) -> FlatArray:
    import torch

    t = x.detach()
    kind = ArrayKind("torch", t.device)
    if t.device.type != "cpu":
        t = t.to("cpu")
    shape = tuple(t.shape)
    t = t.contiguous()
    if t.dtype == torch.float32:
        arr, name = t.numpy(), "float32"
    elif t.dtype == torch.float16:
        arr, name = t.numpy(), "float16"
    elif t.dtype == torch.bfloat16:
        arr, name = t.view(torch.int16).numpy().view(np.uint16), "bfloat16"
    else:
        raise InputError(f"{where}: unsupported torch dtype {t.dtype}; use float32, float16 or bfloat16")
    return FlatArray(arr.reshape(-1), name, shape, kind)


def as_array(x: Any, where: str) -> FlatArray:
    if is_torch(x):
        return _from_torch(x, where)
    if not isinstance(x, np.ndarray):
        raise InputError(f"{where}: expected a NumPy array or torch tensor, got {type(x).__name__}")
    kind = ArrayKind("numpy")
    bf = _ml_bfloat16()
    if bf is not None and x.dtype == bf:
        kind = ArrayKind("ml_dtypes")
        x = x.view(np.uint16)
    dt = x.dtype
    if dt == np.float32:
        name = "float32"
    elif dt == np.float16:
        name = "float16"
    elif dt in (np.uint16, np.int16):
        name = "bfloat16"
    else:
        raise InputError(
            f"{where}: unsupported array dtype {dt}; use float32, float16, or uint16/ml_dtypes.bfloat16 for bfloat16"
        )
    if not dt.isnative:
        x = x.astype(dt.newbyteorder("="))
    shape = tuple(x.shape)
    flat = np.ascontiguousarray(x).reshape(-1)
    if flat.dtype == np.int16:
        flat = flat.view(np.uint16)
    return FlatArray(flat, name, shape, kind)


def give_back(flat: np.ndarray, out_dtype: str, shape: tuple[int, ...], kind: ArrayKind) -> Any:
    arr = np.asarray(flat).reshape(shape)
    if out_dtype == "bfloat16" and arr.dtype == np.int16:
        arr = arr.view(np.uint16)
    if kind.kind == "torch":
        import torch

        if out_dtype == "bfloat16":
            t = torch.from_numpy(np.ascontiguousarray(arr).view(np.int16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.ascontiguousarray(arr))
        if kind.device is not None and kind.device.type != "cpu":
            t = t.to(kind.device)
        return t
    if kind.kind == "ml_dtypes" and out_dtype == "bfloat16":
        return arr.view(_ml_bfloat16())
    return arr
