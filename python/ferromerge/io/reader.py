"""safetensors files read in Python: the one header parser (``read_header``), and raw tensors read one block at a
time (``ShardReader``: the compress archive and the models it holds).

``ShardReader`` reads a tensor's bytes, a block of its rows (dim 0) or its bytes in chunks, as stored (bfloat16
as ``uint16`` bits), into fresh buffers, so memory holds one block, never a whole model. ``io.dtypes`` decodes
the blocks; ``io.writer`` is the counterpart for writing. Every caller has the engine validate a file's header
(``_engine.read_header``) before parsing it here for byte offsets.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from .. import _engine
from ..errors import InputError
from .dtypes import ITEMSIZE, RAW, numel

_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class Header:
    """A safetensors file's header: its bytes as stored (the 8 length bytes and the JSON), and every tensor's dtype,
    shape and absolute byte span in the file (``__metadata__`` left out)."""

    raw: bytes
    tensors: dict[str, tuple[str, list[int], int, int]]

    @property
    def data_start(self) -> int:
        return len(self.raw)


def read_header(source: str | os.PathLike[str] | BinaryIO) -> Header:
    """Parse the header of a safetensors file (a path, or a binary file positioned at its start). ``OSError`` or
    ``ValueError`` when it cannot be read; callers say which file and why in their own error."""
    if isinstance(source, (str, os.PathLike)):
        with open(source, "rb") as f:
            return read_header(f)
    head = source.read(8)
    if len(head) < 8:
        raise ValueError("truncated header")
    (n,) = struct.unpack("<Q", head)
    text = source.read(n)
    entries = json.loads(text)
    entries.pop("__metadata__", None)
    start = 8 + n
    spans = {
        k: (v["dtype"], list(v["shape"]), start + v["data_offsets"][0], start + v["data_offsets"][1])
        for k, v in entries.items()
    }
    return Header(head + text, spans)


def row_blocks(shape: Sequence[int], block_elems: int) -> list[slice]:
    """Slices of dim 0 covering a tensor in blocks of about ``block_elems`` elements; every block but the last
    holds a multiple of 8 rows, so a block of a bit-packed mask starts on a byte (0-d: one block of one row)."""
    rows = int(shape[0]) if len(shape) else 1
    row = numel(shape[1:]) if len(shape) > 1 else 1
    step = max(8, (block_elems // max(row, 1)) // 8 * 8)
    return [slice(r, min(rows, r + step)) for r in range(0, rows, step)] or [slice(0, 0)]


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
            _engine.read_header(str(file))  # InputError naming the file when missing, truncated or corrupt
            try:
                f = open(file, "rb", buffering=0)  # noqa: SIM115 - closed by close()
                spans = read_header(f).tensors
            except (OSError, ValueError) as e:
                raise InputError(f"{file}: cannot read: {e}") from None
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
