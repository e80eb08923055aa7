"""A safetensors file written tensor by tensor, each tensor's data written as it is produced (a block at a time, never
a whole model in memory).

The header (names, dtypes, shapes, byte offsets) comes before the data, but the writers often learn what they write
only as they go. ``SafetensorsWriter`` handles the three cases ferromerge has:

* **exact plan** (``planned=...``, ``in_order=True``; ``decompress``): the tensors, their shapes and their order are
  known up front, so the space reserved in front of the data is exactly the header's.
* **bounded plan** (``planned=...``; ``extract_lora``): each tensor that *may* be written is known with an upper bound
  of its shape (the rank an SVD keeps is known only after it); any subset is written, in any order. The reservation
  is the header of every planned tensor at its bounds with every offset set to the sum of all bounded sizes. The
  real header can only be shorter (a subset of the names, the same dtypes, each dimension and each offset at most
  its bound), so it always fits; it is padded with spaces, which the format allows at the end of the header.
* **no plan** (``compress``: whether a tensor is stored at all, and its factors' rank, are known only after its SVD):
  the data goes to spool files beside the output, and ``close`` writes the header and then copies the spools behind
  it. ``streams`` > 1 gives one spool per sequence of tensors that arrive interleaved (the masks of several models):
  the file holds stream 0's tensors, then stream 1's, ...

With a plan the data goes straight into the output file and the header is written into its reserved space at
``close``. The data always starts 8-byte aligned, as the reference implementation writes it. On an error the partial
file (and any spool) is left for the caller's temporary directory to remove (``io.output_dir.OutputDir``).
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import numpy.typing as npt

from ..errors import OutputError
from .dtypes import ITEMSIZE, numel

_COPY_CHUNK = 16 << 20


@dataclass(frozen=True)
class PlannedTensor:
    """A tensor that may be written: its name, safetensors dtype, largest shape and largest size in bytes (given, not
    derived, so that tensors of dtypes the writer has no item size for can be copied byte for byte)."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int

    @classmethod
    def of(cls, name: str, dtype: str, shape: Sequence[int]) -> PlannedTensor:
        """A tensor of a dtype in ``ITEMSIZE``, its size from its shape."""
        shape = tuple(int(d) for d in shape)
        return cls(name, dtype, shape, numel(shape) * ITEMSIZE[dtype])


def header_bytes(
    entries: Iterable[tuple[str, str, Sequence[int], int, int]], metadata: dict[str, str], reserved: int | None = None
) -> bytes:
    """The one safetensors header writer in Python: the header's JSON (``reserved``: padded with spaces to that
    length; else to 8-byte aligned data) after its little-endian length. ``entries``: (name, dtype, shape, start,
    end) in file order, offsets relative to the data section."""
    body: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    for name, dtype, shape, start, end in entries:
        body[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    text = json.dumps(body, separators=(",", ":")).encode()
    if reserved is None:
        reserved = len(text) + (-len(text) % 8)  # 8-byte aligned data
    assert len(text) <= reserved, "the real header is never longer than its reservation"
    return struct.pack("<Q", reserved) + text + b" " * (reserved - len(text))


class SafetensorsWriter:
    """Writes ``path`` (see the module docstring for ``planned``, ``in_order`` and ``streams``): ``begin`` a tensor
    and ``write`` its bytes in as many blocks as convenient (or ``add`` it in one), then ``close``.

    Each tensor must receive exactly the bytes its dtype and shape hold (a tensor of a dtype outside ``ITEMSIZE``:
    its planned ``nbytes``); breaking that, or the plan, is a programming error (``AssertionError``)."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        planned: Iterable[PlannedTensor] | None = None,
        in_order: bool = False,
        streams: int = 1,
        metadata: dict[str, str] | None = None,
    ) -> None:
        self.path = Path(path)
        self.metadata = dict(metadata or {})
        self._plan = None if planned is None else {p.name: p for p in planned}
        self._order = list(self._plan) if self._plan is not None and in_order else None
        if self._plan is not None and streams != 1:
            raise AssertionError("streams need spools: a planned file has one")
        # per stream: (name, dtype, shape, size) in the order written
        self._entries: list[list[tuple[str, str, tuple[int, ...], int]]] = [[] for _ in range(streams)]
        self._open: list[tuple[int, int]] = [(0, 0)] * streams  # per stream: the current tensor's bytes, bytes written
        self._names: set[str] = set()
        self._reserved: int | None = None
        try:
            if self._plan is None:
                self._files: list[BinaryIO] = [open(self._spool(s), "w+b") for s in range(streams)]
            else:
                self._reserved = len(header_bytes(self._reservation(), self.metadata)) - 8
                self._files = [open(self.path, "wb")]
                self._files[0].seek(8 + self._reserved)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e}") from None

    def _reservation(self) -> list[tuple[str, str, Sequence[int], int, int]]:
        """Header entries whose header is at least as long as the real one will be (see the module docstring)."""
        assert self._plan is not None
        plan = list(self._plan.values())
        if self._order is not None:
            offsets = [0, *accumulate(p.nbytes for p in plan)]
            return [(p.name, p.dtype, p.shape, offsets[k], offsets[k + 1]) for k, p in enumerate(plan)]
        total = sum(p.nbytes for p in plan)
        return [(p.name, p.dtype, p.shape, total, total) for p in plan]

    def _spool(self, stream: int) -> Path:
        return self.path.with_name(f".{self.path.name}.spool{stream}")

    def begin(self, name: str, dtype: str, shape: Sequence[int], stream: int = 0) -> None:
        """Start tensor ``name``; its bytes follow through ``write``."""
        self._check_done(stream)
        shape = tuple(int(d) for d in shape)
        if name in self._names:
            raise AssertionError(f"{self.path}: tensor {name} written twice")
        size = self._size(name, dtype, shape)
        self._names.add(name)
        self._entries[stream].append((name, dtype, shape, size))
        self._open[stream] = (size, 0)

    def _size(self, name: str, dtype: str, shape: tuple[int, ...]) -> int:
        """The tensor's size in bytes, once it is checked against the plan."""
        if self._plan is None:
            return numel(shape) * ITEMSIZE[dtype]
        plan = self._plan.get(name)
        if self._order is not None:
            done = len(self._entries[0])
            expected = self._plan[self._order[done]] if done < len(self._order) else None
            if expected is None or (name, dtype, shape) != (expected.name, expected.dtype, expected.shape):
                raise AssertionError(f"{self.path}: tensor {name} written out of the planned order ({expected})")
        if plan is None:
            raise AssertionError(f"{self.path}: tensor {name} was not planned")
        if dtype != plan.dtype or len(shape) != len(plan.shape) or any(d > b for d, b in zip(shape, plan.shape)):
            raise AssertionError(f"{self.path}: tensor {name} is {dtype} {list(shape)}, beyond its plan "
                                 f"{plan.dtype} {list(plan.shape)}")
        return plan.nbytes if shape == plan.shape else numel(shape) * ITEMSIZE[dtype]

    def write(self, data: npt.NDArray[Any] | bytes | memoryview, stream: int = 0) -> None:
        """The current tensor's next bytes in ``stream`` (arrays: little-endian, any layout, written in C order)."""
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

    def add(self, name: str, dtype: str, shape: Sequence[int], data: npt.NDArray[Any] | bytes, stream: int = 0
            ) -> None:
        """A whole tensor at once."""
        self.begin(name, dtype, shape, stream)
        self.write(data, stream)

    def _check_done(self, stream: int) -> None:
        size, done = self._open[stream]
        if done != size:
            raise AssertionError(f"{self.path}: a tensor got {done} of its {size} bytes")

    def _final_header(self) -> bytes:
        entries = []
        offset = 0
        for stream in self._entries:
            for name, dtype, shape, size in stream:
                entries.append((name, dtype, shape, offset, offset + size))
                offset += size
        return header_bytes(entries, self.metadata, self._reserved)

    def close(self) -> int:
        """Finish the file; returns its size in bytes."""
        for s in range(len(self._files)):
            self._check_done(s)
        if self._order is not None and len(self._entries[0]) != len(self._order):
            raise AssertionError(f"{self.path}: {len(self._order) - len(self._entries[0])} planned tensors missing")
        try:
            if self._reserved is not None:
                self._files[0].seek(0)
                self._files[0].write(self._final_header())
                self._files[0].close()
            else:
                with open(self.path, "wb") as out:
                    out.write(self._final_header())
                    for s, spool in enumerate(self._files):
                        spool.seek(0)
                        shutil.copyfileobj(spool, out, _COPY_CHUNK)
                        spool.close()
                        os.unlink(self._spool(s))
            return self.path.stat().st_size
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e}") from None

    def abort(self) -> None:
        """Close the files after an error (what was written stays, for the caller to remove)."""
        for f in self._files:
            f.close()
