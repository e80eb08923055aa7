"""Index the tensors of a model's safetensors shards (its directory found from the reference by ``refs``).

``read_tensors`` loads a small model's tensors into NumPy
(for the demo and tests; merges never load whole tensors in Python).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .. import _engine
from ..errors import InputError
from ..io.dtypes import MERGEABLE_DTYPES, RAW, to_f32
from ..io.json_file import read_json
from ..io.reader import read_header
from .refs import resolve

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"



@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor is stored: its shard file (absolute), safetensors dtype name and shape."""

    file: Path
    dtype: str
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass(frozen=True)
class ModelIndex:
    """Every tensor of a model directory, in shard order, then in natural name order within a shard."""

    ref: str
    path: Path
    files: tuple[Path, ...]
    tensors: dict[str, TensorInfo]


def natural_key(name: str) -> list[object]:
    """``layers.2`` before ``layers.10``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def index_model(ref: str) -> ModelIndex:
    """Resolve ``ref`` and read (and validate) the header of every shard of its safetensors weights."""
    path = resolve(ref)
    index_path = path / INDEX_FILE
    if index_path.is_file():
        weight_map = _read_weight_map(index_path)
        files = sorted({path / f for f in weight_map.values()}, key=lambda p: natural_key(p.name))
        headers: dict[Path, dict[str, tuple[str, list[int]]]] = {}
        for file in files:
            if not file.is_file():
                raise InputError(f"{index_path}: names shard {file.name}, but {file} does not exist")
            headers[file] = _engine.read_header(str(file))
        for name, shard in weight_map.items():
            if name not in headers[path / shard]:
                raise InputError(
                    f"{index_path}: says tensor {name} is in {path / shard}, but that shard does not contain it"
                )
        # Tensors a shard holds beyond the index's weight_map are not part of the model (transformers ignores
        # them too), so only the weight_map's tensors are indexed.
        order = sorted(weight_map, key=lambda n: (files.index(path / weight_map[n]), natural_key(n)))
        tensors = {n: _info(path / weight_map[n], headers[path / weight_map[n]][n]) for n in order}
        return ModelIndex(ref, path, tuple(files), tensors)
    single = path / SINGLE_FILE
    if single.is_file():
        header = _engine.read_header(str(single))
        tensors = {n: _info(single, header[n]) for n in sorted(header, key=natural_key)}
        return ModelIndex(ref, path, (single,), tensors)
    if any((path / f).exists() for f in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise InputError(
            f"model {ref!r}: {path} has only PyTorch .bin weights; ferromerge reads safetensors only "
            "(convert with transformers: model.save_pretrained(dir, safe_serialization=True))"
        )
    found = sorted(p.name for p in path.glob("*.safetensors"))
    also = f" (found {', '.join(found)})" if found else ""
    raise InputError(f"model {ref!r}: {path} has no {SINGLE_FILE} or {INDEX_FILE}{also}")


def _read_weight_map(index_path: Path) -> dict[str, str]:
    data = read_json(index_path, "the shard index")
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) and v and Path(v).name == v for k, v in weight_map.items()
    ):
        raise InputError(f"{index_path}: weight_map must map tensor names to shard file names in the same directory")
    if not weight_map:
        raise InputError(f"{index_path}: weight_map is empty")
    return weight_map


def _info(file: Path, entry: tuple[str, list[int]]) -> TensorInfo:
    dtype, shape = entry
    return TensorInfo(file, dtype, tuple(int(d) for d in shape))


def read_tensors(file: str | os.PathLike[str]) -> dict[str, npt.NDArray[np.float32]]:
    """Load every F32/F16/BF16 tensor of one safetensors file as float32 (exact), in file order.

    For small files (demo, tests): reads the whole file into memory. The header is validated by the engine first.
    """
    file = Path(file)
    header = _engine.read_header(str(file))
    spans = read_header(file).tensors
    raw = memoryview(file.read_bytes())
    out: dict[str, npt.NDArray[np.float32]] = {}
    # in the order of the data in the file (the engine's header map is unordered)
    for name in sorted(header, key=lambda n: spans[n][2]):
        dtype, shape = header[name]
        _, _, start, end = spans[name]
        if dtype not in MERGEABLE_DTYPES:
            raise InputError(f"{file}: tensor {name}: dtype {dtype} is not a float dtype ferromerge reads")
        # a copy: the caller owns (and may modify) what it gets
        values = np.array(to_f32(np.frombuffer(raw[start:end], dtype=RAW[dtype]), dtype))
        out[name] = values.reshape(shape)
    return out
