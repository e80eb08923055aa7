"""Raw safetensors tensors read and written one block at a time (the compress archive and its rebuilt models).

``ShardReader`` reads a tensor's bytes, a block of its rows (dim 0) or its bytes in chunks, as stored (bfloat16
as ``uint16`` bits), into fresh buffers. ``to_f32`` / ``from_f32`` convert blocks exactly / with the
engine's rounding. ``StreamWriter`` writes a file whose tensors arrive block by block: when its tensors are
known in advance (``planned``) the header goes first and the data follows; otherwise (the low-rank factors' ranks
are known only after each SVD) the data is spooled to sidecar files and the header is written at ``close``, then
the spools are copied behind it. Either way memory holds one block, never a whole model.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from . import _core
from .errors import InputError, OutputError
from .models import MERGEABLE_DTYPES

#: bytes per element of the safetensors dtypes (the archive copies any of them; it decodes only the floats)
ITEMSIZE = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}
#: how the float dtypes are stored (bfloat16: its bit patterns)
RAW = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"), "U8": np.dtype("u1")}
#: mergekit's names of the float dtypes -> safetensors names
ST_NAME = {v: k for k, v in MERGEABLE_DTYPES.items()}

_COPY_CHUNK = 16 << 20


def numel(shape: Sequence[int]) -> int:
    return int(np.prod(shape, dtype=np.int64))


def row_blocks(shape: Sequence[int], block_elems: int) -> list[slice]:
    """Slices of dim 0 covering a tensor in blocks of about ``block_elems`` elements; every block but the last
    holds a multiple of 8 rows, so a block of a bit-packed mask starts on a byte (0-d: one block of one row)."""
    rows = int(shape[0]) if len(shape) else 1
    row = numel(shape[1:]) if len(shape) > 1 else 1
    step = max(8, (block_elems // max(row, 1)) // 8 * 8)
    return [slice(r, min(rows, r + step)) for r in range(0, rows, step)] or [slice(0, 0)]


def to_f32(raw: npt.NDArray[Any], dtype: str) -> npt.NDArray[np.float32]:
    """Exact float32 values of stored float data (bfloat16 given as uint16 bits); a fresh array."""
    if dtype == "BF16":
        return (np.asarray(raw, dtype=np.uint32) << 16).view(np.float32)
    return np.array(raw, dtype=np.float32)


def from_f32(values: npt.NDArray[np.float32], dtype: str) -> npt.NDArray[Any]:
    """float32 rounded to ``dtype`` as the engine rounds (to nearest even), as raw little-endian data."""
    if dtype == "F32":
        return np.ascontiguousarray(values, dtype="<f4")
    flat = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
    if flat.size == 0:
        return np.empty(values.shape, RAW[dtype])
    # linear over one input with weight 1 is an exact copy followed by the output rounding: the engine's codec
    out = _core.merge_arrays("linear", [flat], None, [1.0], [1.0], out_dtype=MERGEABLE_DTYPES[dtype],
                             normalize=False, threads=1)
    return np.asarray(out).astype(RAW[dtype], copy=False).reshape(values.shape)


class ShardReader:
    """Tensors' bytes read on demand (``pread``-style into fresh buffers, never memory-mapped: pages of tensors
    already processed are not kept resident); each file's header is validated by the engine and parsed once."""

    def __init__(self) -> None:
        self._files: dict[Path, tuple[Any, dict[str, tuple[str, list[int], int, int]]]] = {}

    def header(self, file: Path) -> dict[str, tuple[str, list[int], int, int]]:
        """``{tensor: (dtype, shape, start, end)}``, byte offsets in the file."""
        return self._open(file)[1]

    def _open(self, file: Path) -> tuple[Any, dict[str, tuple[str, list[int], int, int]]]:
        if file not in self._files:
            _core.read_header(str(file))  # InputError naming the file when missing, truncated or corrupt
            try:
                f = open(file, "rb", buffering=0)  # noqa: SIM115 - closed by close()
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
            except (OSError, ValueError) as e:
                raise InputError(f"{file}: cannot read: {e}") from None
            header.pop("__metadata__", None)
            spans = {
                k: (v["dtype"], list(v["shape"]), 8 + n + v["data_offsets"][0], 8 + n + v["data_offsets"][1])
                for k, v in header.items()
            }
            self._files[file] = (f, spans)
        return self._files[file]

    def entry(self, file: Path, name: str, what: str = "") -> tuple[str, list[int]]:
        """The stored dtype and shape of ``name``; ``InputError`` naming the file when it lacks the tensor."""
        spans = self.header(file)
        if name not in spans:
            raise InputError(f"{file}: has no tensor {name}{what}")
        dtype, shape, _, _ = spans[name]
        return dtype, shape

    def _read(self, file: Path, start: int, size: int) -> npt.NDArray[np.uint8]:
        f, _ = self._open(file)
        buf = np.empty(size, np.uint8)
        view = memoryview(buf)
        done = 0
        try:
            f.seek(start)
            while done < size:
                got = f.readinto(view[done:])
                if not got:
                    raise InputError(f"{file}: truncated (changed while being read?)")
                done += got
        except OSError as e:
            raise InputError(f"{file}: cannot read: {e}") from None
        return buf

    def chunks(self, file: Path, name: str, size: int = _COPY_CHUNK) -> Iterator[npt.NDArray[np.uint8]]:
        """The tensor's bytes, ``size`` at a time."""
        _, _, start, end = self._open(file)[1][name]
        for at in range(start, end, size):
            yield self._read(file, at, min(size, end - at))

    def bytes_at(self, file: Path, name: str, offset: int, size: int) -> npt.NDArray[np.uint8]:
        """``size`` bytes of the tensor from byte ``offset`` of its data."""
        _, _, start, end = self._open(file)[1][name]
        if offset + size > end - start:
            raise AssertionError(f"{file}: read past the end of tensor {name}")
        return self._read(file, start + offset, size)

    def raw(self, file: Path, name: str) -> npt.NDArray[np.uint8]:
        """All of the tensor's bytes (for small tensors: factors, masks)."""
        _, _, start, end = self._open(file)[1][name]
        return self._read(file, start, end - start)

    def rows(self, file: Path, name: str, rows: slice) -> npt.NDArray[Any]:
        """Rows ``rows`` (dim 0) of a float or U8 tensor as stored, in a fresh array (0-d: its one value)."""
        dtype, shape, start, _ = self._open(file)[1][name]
        row = numel(shape[1:]) * ITEMSIZE[dtype] if len(shape) > 1 else ITEMSIZE[dtype]
        block = self._read(file, start + rows.start * row, (rows.stop - rows.start) * row).view(RAW[dtype])
        return block.reshape((rows.stop - rows.start, *shape[1:]) if shape else ())

    def close(self) -> None:
        for f, _ in self._files.values():
            f.close()
        self._files.clear()


class StreamWriter:
    """One safetensors file written tensor by tensor, each tensor in one or more ``write`` calls.

    ``planned``: the tensors ``(name, dtype, shape)`` in the order they will be written; the header is written
    at once. Otherwise tensors are declared with ``begin`` as they come, into one of ``streams`` spools (the file
    lists stream 0's tensors first, then stream 1's, ...), and ``close`` writes the header and joins the spools.
    """

    def __init__(
        self,
        path: Path,
        *,
        planned: Sequence[tuple[str, str, Sequence[int]]] | None = None,
        streams: int = 1,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = path
        self.metadata = metadata or {}
        self._entries: list[list[tuple[str, str, list[int], int]]] = [[] for _ in range(streams)]
        self._open: list[tuple[int, int]] = [(0, 0)] * streams  # per stream: bytes expected, bytes written
        self._planned = None if planned is None else [(n, d, list(s)) for n, d, s in planned]
        try:
            if self._planned is not None:
                self._files: list[BinaryIO] = [open(path, "wb")]
                for name, dtype, shape in self._planned:
                    self._entries[0].append((name, dtype, shape, numel(shape) * ITEMSIZE[dtype]))
                self._files[0].write(self._header())
                self._next = 0
            else:
                self._files = [open(self._spool(i), "w+b") for i in range(streams)]
        except OSError as e:
            raise OutputError(f"cannot write {path}: {e}") from None

    def _spool(self, stream: int) -> Path:
        return self.path.with_name(f".{self.path.name}.spool{stream}")

    def _header(self) -> bytes:
        entries: dict[str, Any] = {"__metadata__": self.metadata} if self.metadata else {}
        offset = 0
        for stream in self._entries:
            for name, dtype, shape, size in stream:
                entries[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
        text = json.dumps(entries, separators=(",", ":")).encode()
        text += b" " * (-len(text) % 8)  # 8-byte aligned data, as the safetensors writers do
        return struct.pack("<Q", len(text)) + text

    def begin(self, name: str, dtype: str, shape: Sequence[int], stream: int = 0) -> None:
        """Start tensor ``name``; its ``numel * itemsize`` bytes follow through ``write``."""
        self._check_done(stream)
        size = numel(shape) * ITEMSIZE[dtype]
        if self._planned is not None:
            expected = self._planned[self._next] if self._next < len(self._planned) else None
            if expected != (name, dtype, list(shape)):
                raise AssertionError(f"{self.path}: tensor {name} written out of the planned order ({expected})")
            self._next += 1
        else:
            self._entries[stream].append((name, dtype, list(shape), size))
        self._open[stream] = (size, 0)

    def write(self, data: npt.NDArray[Any] | bytes | memoryview, stream: int = 0) -> None:
        if isinstance(data, np.ndarray):
            flat = np.ascontiguousarray(data).reshape(-1).view(np.uint8)
            buf = memoryview(flat) if flat.size else memoryview(b"")  # a view of an empty shape cannot be cast
        else:
            buf = memoryview(data).cast("B")
        size, done = self._open[stream]
        if done + buf.nbytes > size:
            raise AssertionError(f"{self.path}: more bytes than the tensor's shape holds")
        try:
            self._files[stream].write(buf)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e}") from None
        self._open[stream] = (size, done + buf.nbytes)

    def add(self, name: str, dtype: str, shape: Sequence[int], data: npt.NDArray[Any] | bytes, stream: int = 0) -> None:
        self.begin(name, dtype, shape, stream)
        self.write(data, stream)

    def _check_done(self, stream: int) -> None:
        size, done = self._open[stream]
        if done != size:
            raise AssertionError(f"{self.path}: a tensor got {done} of its {size} bytes")

    def close(self) -> int:
        """Finish the file; returns its size in bytes."""
        for s in range(len(self._files)):
            self._check_done(s)
        try:
            if self._planned is not None:
                if self._next != len(self._planned):
                    raise AssertionError(f"{self.path}: {len(self._planned) - self._next} planned tensors missing")
                self._files[0].close()
            else:
                with open(self.path, "wb") as out:
                    out.write(self._header())
                    for s, spool in enumerate(self._files):
                        spool.seek(0)
                        shutil.copyfileobj(spool, out, _COPY_CHUNK)
                        spool.close()
                        os.unlink(self._spool(s))
            return self.path.stat().st_size
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e}") from None
