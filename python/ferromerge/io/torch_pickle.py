"""PyTorch checkpoints (``pytorch_model.bin``, and the shards of a sharded one) read without running their pickle,
and their tensors copied into safetensors files.

torch.save (since torch 1.6) writes a zip archive: ``<archive>/data.pkl`` is a pickle of the state dict, whose
tensors refer to their storages ``<archive>/data/<key>`` (stored uncompressed) by persistent id. Unpickling runs
whatever callable the pickle names, so ``read_checkpoint`` uses an unpickler that resolves only the globals a
tensor state dict needs (``_rebuild_tensor_v2``/``_v3``, ``_rebuild_parameter``, the storage classes, the torch
dtypes of v3, ``collections.OrderedDict``), each mapped to an inert constructor here: no torch, and nothing in the
file is ever executed. Any other global (``os.system`` through REDUCE, ``builtins.eval``, ...) stops the read with
an ``InputError`` naming the file and the global. Legacy (pre-1.6, not zip) pickles are refused with how to convert.

``copy_tensors`` writes chosen tensors into one safetensors file, each copied from its storage in chunks of at most
``CHUNK`` bytes (a tensor stored with other strides than C order is gathered from its storage's span, which must fit
``CHUNK`` too), so memory never holds a whole model, and the engine reads safetensors as always.
"""

from __future__ import annotations

import collections
import math
import os
import pickle
import struct
import zipfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError
from .dtypes import ITEMSIZE, numel
from .writer import PlannedTensor, SafetensorsWriter

#: bytes copied at a time (and the largest tensor stored in other than C order that is gathered whole)
CHUNK = 64 << 20
#: more elements than any real tensor has (a shape beyond it is a damaged or hostile file, not a model)
_MAX_ELEMENTS = 1 << 48

#: torch's typed storage classes (``torch.FloatStorage``, ...) -> safetensors dtype
_STORAGES = {
    "DoubleStorage": "F64", "FloatStorage": "F32", "HalfStorage": "F16", "BFloat16Storage": "BF16",
    "LongStorage": "I64", "IntStorage": "I32", "ShortStorage": "I16", "CharStorage": "I8",
    "ByteStorage": "U8", "BoolStorage": "BOOL",
}
#: torch dtypes (``_rebuild_tensor_v3``'s dtype argument) -> safetensors dtype
_DTYPES = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16", "float8_e4m3fn": "F8_E4M3",
    "float8_e5m2": "F8_E5M2", "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "uint16": "U16", "uint32": "U32", "uint64": "U64", "bool": "BOOL",
}
_CONVERT = (
    "convert it with torch: torch.save(torch.load(path, weights_only=True), path) (torch >= 1.6 writes the zip "
    "format), or save the model with safetensors"
)


@dataclass(frozen=True)
class StoredTensor:
    """A tensor of a checkpoint: dtype (safetensors name), shape and strides (elements), and where its storage's
    bytes lie in the checkpoint file (absolute offset of the storage's data and its length), with the tensor's
    offset in it (elements)."""

    dtype: str
    shape: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int
    storage_start: int
    storage_bytes: int

    @property
    def nbytes(self) -> int:
        return numel(self.shape) * ITEMSIZE[self.dtype]

    @property
    def contiguous(self) -> bool:
        expected = 1
        for d, s in zip(reversed(self.shape), reversed(self.stride), strict=True):
            if d != 1 and s != expected:
                return False
            expected *= d
        return True


class _Storage:
    """What the pickle's persistent id names: a storage of the archive (its key and dtype; None: untyped, v3)."""

    __slots__ = ("dtype", "key")

    def __init__(self, key: str, dtype: str | None) -> None:
        self.key = key
        self.dtype = dtype

    def __setstate__(self, state: Any) -> None:  # BUILD on it: never part of a tensor checkpoint
        raise pickle.UnpicklingError("BUILD of a storage")


class _Kind:
    """An inert stand-in for a global the pickle may name: a storage class or a torch dtype."""

    __slots__ = ("dtype", "what")

    def __init__(self, what: str, dtype: str | None) -> None:
        self.what = what
        self.dtype = dtype

    def __call__(self, *args: Any) -> Any:
        raise pickle.UnpicklingError(f"a call of {self.what}")

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError(f"BUILD of {self.what}")


@dataclass(frozen=True)
class _Pending:
    """A tensor as the pickle describes it (its storage not yet located in the archive)."""

    storage: _Storage
    dtype: str
    offset: int
    shape: tuple[int, ...]
    stride: tuple[int, ...]

    def __setstate__(self, state: Any) -> None:
        raise pickle.UnpicklingError("BUILD of a tensor")


def _ints(value: Any, what: str) -> tuple[int, ...]:
    if not isinstance(value, tuple) or not all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        raise pickle.UnpicklingError(f"{what} is not a tuple of integers: {value!r}")
    return tuple(value)


def _tensor(storage: Any, offset: Any, size: Any, stride: Any, dtype: str | None) -> _Pending:
    if not isinstance(storage, _Storage):
        raise pickle.UnpicklingError(f"a tensor rebuilt from {type(storage).__name__}, not from a storage")
    if not isinstance(offset, int) or isinstance(offset, bool) or offset < 0:
        raise pickle.UnpicklingError(f"storage offset {offset!r}")
    shape, strides = _ints(size, "the tensor's size"), _ints(stride, "the tensor's stride")
    if len(shape) != len(strides) or any(d < 0 for d in shape) or any(s < 0 for s in strides):
        raise pickle.UnpicklingError(f"size {list(shape)} with stride {list(strides)}")
    if math.prod(shape) > _MAX_ELEMENTS:
        raise pickle.UnpicklingError(f"size {list(shape)}: more elements than a tensor can have")
    kind = dtype if dtype is not None else storage.dtype
    if kind is None:
        raise pickle.UnpicklingError("a tensor of an untyped storage without a dtype")
    return _Pending(storage, kind, offset, shape, strides)


def _rebuild_v2(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any = False, hooks: Any = None,
                metadata: Any = None) -> _Pending:
    return _tensor(storage, offset, size, stride, None)


def _rebuild_v3(storage: Any, offset: Any, size: Any, stride: Any, requires_grad: Any, hooks: Any, dtype: Any,
                metadata: Any = None) -> _Pending:
    if not isinstance(dtype, _Kind) or dtype.dtype is None or dtype.what.endswith("Storage"):
        raise pickle.UnpicklingError(f"dtype {dtype!r}")
    return _tensor(storage, offset, size, stride, dtype.dtype)


def _rebuild_parameter(data: Any, requires_grad: Any = False, hooks: Any = None) -> _Pending:
    if not isinstance(data, _Pending):
        raise pickle.UnpicklingError("a parameter that is not a tensor")
    return data


class _Unpickler(pickle.Unpickler):
    """Resolves the globals of a tensor state dict to the inert stand-ins above; refuses every other."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils":
            found = {"_rebuild_tensor_v2": _rebuild_v2, "_rebuild_tensor_v3": _rebuild_v3,
                     "_rebuild_parameter": _rebuild_parameter}.get(name)
            if found is not None:
                return found
        if module == "torch" and name in _STORAGES:
            return _Kind(f"torch.{name}", _STORAGES[name])
        if module == "torch" and name in _DTYPES:
            return _Kind(f"torch.{name}", _DTYPES[name])
        if (module, name) == ("torch.storage", "UntypedStorage"):
            return _Kind("torch.storage.UntypedStorage", None)
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if (
            not isinstance(pid, tuple)
            or len(pid) != 5
            or pid[0] != "storage"
            or not isinstance(pid[1], _Kind)
            or not pid[1].what.endswith("Storage")
            or not isinstance(pid[2], str)
        ):
            raise pickle.UnpicklingError(f"persistent id {pid!r} is not a storage reference")
        return _Storage(pid[2], pid[1].dtype)


class _Refused(pickle.UnpicklingError):
    """The pickle names a global outside the tensor checkpoint's vocabulary."""


def is_legacy_pickle(path: Path) -> bool:
    """Whether ``path`` starts like a pickle (torch's pre-1.6 format) rather than a zip archive."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x80"


def read_checkpoint(path: str | os.PathLike[str]) -> dict[str, StoredTensor]:
    """The tensors of a torch checkpoint (a state dict, or a dict with one under ``state_dict``, as mergekit reads
    it) in the pickle's order. ``InputError`` naming the file for anything else: another global in the pickle, a
    legacy pickle, a compressed or damaged archive, a tensor that reaches outside its storage."""
    path = Path(path)
    try:
        if not zipfile.is_zipfile(path):
            if is_legacy_pickle(path):
                raise InputError(
                    f"{path}: a legacy PyTorch pickle (written by torch < 1.6 or with _use_new_zipfile_serialization="
                    f"False); ferromerge reads only the zip format, without running the pickle: {_CONVERT}"
                )
            raise InputError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor a pickle)")
        with zipfile.ZipFile(path) as archive, open(path, "rb") as raw:
            pkl = [i for i in archive.infolist() if i.filename.count("/") == 1 and i.filename.endswith("/data.pkl")]
            if len(pkl) != 1:
                raise InputError(f"{path}: a zip archive without one <archive>/data.pkl: not a torch.save checkpoint")
            prefix = pkl[0].filename[: -len("data.pkl")]
            members = {i.filename: i for i in archive.infolist()}
            order = members.get(f"{prefix}byteorder")
            if order is not None and archive.read(order).strip() != b"little":
                raise InputError(f"{path}: a big-endian checkpoint; ferromerge reads little-endian ones: {_CONVERT}")
            with archive.open(pkl[0]) as f:
                loaded = _load(f, path)
            tensors = _state_dict(loaded, path)
            return {name: _locate(path, name, t, prefix, members, raw) for name, t in tensors.items()}
    except (OSError, zipfile.BadZipFile, EOFError) as e:
        raise InputError(f"{path}: cannot read the checkpoint: {e}") from None


def _load(f: Any, path: Path) -> Any:
    try:
        return _Unpickler(f).load()
    except _Refused as e:
        raise InputError(
            f"{path}: the pickle asks for {e}, which is not part of a tensor checkpoint; refused (ferromerge never "
            "runs a pickle's code: only tensors, their storages and dicts are read)"
        ) from None
    except (pickle.UnpicklingError, ValueError, TypeError, AttributeError, IndexError, KeyError) as e:
        raise InputError(f"{path}: not a tensor checkpoint that can be read without running it: {e}") from None


def _state_dict(loaded: Any, path: Path) -> dict[str, _Pending]:
    if isinstance(loaded, dict) and "state_dict" in loaded and isinstance(loaded["state_dict"], dict):
        loaded = loaded["state_dict"]  # mergekit's reader does the same
    if not isinstance(loaded, dict):
        raise InputError(f"{path}: holds a {type(loaded).__name__}, not a state dict (names -> tensors)")
    for name, value in loaded.items():
        if not isinstance(name, str) or not isinstance(value, _Pending):
            raise InputError(
                f"{path}: entry {name!r} is a {type(value).__name__}, not a tensor; ferromerge reads state dicts "
                "of tensors only"
            )
    return dict(loaded)


def _member_start(raw: Any, info: zipfile.ZipInfo) -> int:
    """Absolute offset of a stored member's data: after its local header (whose name and extra field lengths
    may differ from the central directory's)."""
    raw.seek(info.header_offset)
    head = raw.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise zipfile.BadZipFile(f"bad local header of {info.filename}")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return int(info.header_offset + 30 + name_len + extra_len)


def _locate(
    path: Path, name: str, t: _Pending, prefix: str, members: dict[str, zipfile.ZipInfo], raw: Any
) -> StoredTensor:
    member = f"{prefix}data/{t.storage.key}"
    info = members.get(member)
    if info is None:
        raise InputError(f"{path}: tensor {name}: its storage {member} is missing from the archive")
    if info.compress_type != zipfile.ZIP_STORED or info.flag_bits & 0x1:
        raise InputError(f"{path}: tensor {name}: its storage {member} is compressed or encrypted; torch.save "
                         f"stores storages uncompressed: {_CONVERT}")
    if t.dtype not in ITEMSIZE:
        raise InputError(f"{path}: tensor {name}: dtype {t.dtype} is not supported")
    item = ITEMSIZE[t.dtype]
    reach = t.offset + 1 + sum((d - 1) * s for d, s in zip(t.shape, t.stride, strict=True)) if math.prod(t.shape) else 0
    if reach * item > info.file_size:
        raise InputError(
            f"{path}: tensor {name} (shape {list(t.shape)}, stride {list(t.stride)}, offset {t.offset}) reaches "
            f"beyond its storage {member} ({info.file_size} bytes): the checkpoint is damaged"
        )
    return StoredTensor(t.dtype, t.shape, t.stride, t.offset, _member_start(raw, info), info.file_size)


def _read(f: Any, path: Path, start: int, size: int) -> bytes:
    f.seek(start)
    data = f.read(size)
    if len(data) != size:
        raise InputError(f"{path}: truncated (changed while being read?)")
    return bytes(data)


def tensor_chunks(path: Path, tensor: StoredTensor, f: Any = None, chunk: int = CHUNK) -> Iterator[bytes]:
    """The tensor's bytes in C order, at most ``chunk`` at a time (``f``: the checkpoint opened for reading)."""
    if f is None:
        with open(path, "rb") as own:
            yield from tensor_chunks(path, tensor, own, chunk)
        return
    item = ITEMSIZE[tensor.dtype]
    if tensor.contiguous or tensor.nbytes == 0:
        start = tensor.storage_start + tensor.offset * item
        for at in range(0, tensor.nbytes, chunk):
            yield _read(f, path, start + at, min(chunk, tensor.nbytes - at))
        return
    # strided (a saved view: transposed, sliced, expanded): gathered whole from the storage's span it covers, so
    # both that span and the tensor must fit the chunk
    low = tensor.offset
    high = tensor.offset + 1 + sum((d - 1) * s for d, s in zip(tensor.shape, tensor.stride, strict=True))
    if max(high - low, numel(tensor.shape)) * item > chunk:
        raise InputError(
            f"{path}: a tensor of shape {list(tensor.shape)} is stored with strides {list(tensor.stride)} (not in C "
            f"order) and takes more than the {chunk} bytes ferromerge gathers at once; re-save the checkpoint with "
            "contiguous tensors (tensor.contiguous()) or as safetensors"
        )
    span = np.frombuffer(_read(f, path, tensor.storage_start + low * item, (high - low) * item), np.uint8)
    view = np.lib.stride_tricks.as_strided(
        span.view(np.dtype(f"V{item}")), tensor.shape, tuple(s * item for s in tensor.stride), writeable=False
    )
    yield np.ascontiguousarray(view).tobytes()


def copy_tensors(source: Path, tensors: Iterable[tuple[str, StoredTensor]], out: Path, metadata: dict[str, str]) -> None:
    """Write ``tensors`` of checkpoint ``source`` (in the given order) into the safetensors file ``out``."""
    chosen = list(tensors)
    planned = [PlannedTensor(n, t.dtype, t.shape, t.nbytes) for n, t in chosen]
    writer = SafetensorsWriter(out, planned=planned, in_order=True, metadata=metadata)
    try:
        with open(source, "rb") as f:
            for name, t in chosen:
                writer.begin(name, t.dtype, t.shape)
                for block in tensor_chunks(source, t, f):
                    writer.write(block)
    except BaseException as e:
        writer.abort()
        if isinstance(e, OSError):
            raise InputError(f"{source}: cannot read: {e}") from None
        raise
    writer.close()
