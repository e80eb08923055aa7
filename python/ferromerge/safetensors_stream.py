"""A safetensors file written tensor by tensor, when only upper bounds of the tensors' shapes are known up front.

The safetensors header (names, dtypes, shapes, byte offsets) comes before the data, but some writers learn a
tensor's exact shape only when they compute it (``extract_lora``: the rank a singular-value threshold keeps). So
the header is not written first: space for it is reserved from the *bounds*, every tensor's data is written as
soon as it exists (nothing is held in memory), and the real header goes into the reserved space at the end,
padded with spaces (the format allows trailing whitespace in the header).

The reservation is safe because the real header can only be shorter: it has a subset of the planned names, the
same dtypes, each dimension at most its bound, and every offset at most the sum of all bounded sizes, which is the
value each offset gets in the reservation.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import OutputError


@dataclass(frozen=True)
class Planned:
    """A tensor that may be written: its name, safetensors dtype, largest shape and largest size in bytes."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    nbytes: int


def _header(entries: Mapping[str, tuple[str, Sequence[int], int, int]], metadata: Mapping[str, str]) -> bytes:
    body: dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    for name, (dtype, shape, start, end) in entries.items():
        body[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [start, end]}
    return json.dumps(body, separators=(",", ":")).encode()


class StreamWriter:
    """Writes ``path``: ``add`` each tensor (any subset of ``planned``, in any order), then ``close``.

    On any error the partial file is left for the caller's temporary directory to remove (``output.OutputDir``).
    """

    def __init__(self, path: str | os.PathLike[str], planned: Iterable[Planned], metadata: Mapping[str, str]) -> None:
        self.path = Path(path)
        self._planned = {p.name: p for p in planned}
        self._metadata = dict(metadata)
        total = sum(p.nbytes for p in self._planned.values())
        bound = _header({p.name: (p.dtype, p.shape, total, total) for p in self._planned.values()}, self._metadata)
        # 8-byte aligned data, as the reference implementation writes it
        self._reserved = len(bound) + (-len(bound) % 8)
        self._entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
        self._offset = 0
        try:
            self._file = open(self.path, "wb")  # noqa: SIM115 - closed by close()
            self._file.seek(8 + self._reserved)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e}") from None

    @property
    def bytes_written(self) -> int:
        return 8 + self._reserved + self._offset

    def add(self, name: str, dtype: str, shape: Sequence[int], blocks: Iterable[Any]) -> None:
        """Append tensor ``name``: its data is the concatenation of ``blocks`` (bytes-like: bytes, memoryviews,
        C-contiguous arrays; little-endian, C order)."""
        plan = self._planned.get(name)
        shape = tuple(int(d) for d in shape)
        if plan is None or name in self._entries:
            raise ValueError(f"{self.path}: tensor {name} was not planned, or is written twice")
        if dtype != plan.dtype or len(shape) != len(plan.shape) or any(d > b for d, b in zip(shape, plan.shape)):
            raise ValueError(f"{self.path}: tensor {name} is {dtype} {list(shape)}, beyond its plan "
                             f"{plan.dtype} {list(plan.shape)}")
        start = self._offset
        try:
            for block in blocks:
                self._offset += self._file.write(block)
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e}") from None
        if self._offset - start > plan.nbytes:
            raise ValueError(f"{self.path}: tensor {name} has {self._offset - start} bytes, beyond its plan "
                             f"{plan.nbytes}")
        self._entries[name] = (dtype, shape, start, self._offset)

    def close(self) -> None:
        """Write the header into the reserved space and close the file."""
        header = _header(self._entries, self._metadata)
        assert len(header) <= self._reserved, "the real header is never longer than its reservation"
        try:
            self._file.seek(0)
            self._file.write(struct.pack("<Q", self._reserved) + header + b" " * (self._reserved - len(header)))
            self._file.close()
        except OSError as e:
            raise OutputError(f"cannot write {self.path}: {e}") from None

    def abort(self) -> None:
        self._file.close()
