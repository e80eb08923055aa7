"""Index the tensors of a model's safetensors shards (its directory found from the reference by ``refs``), or of
its PyTorch pickles (``pytorch_model.bin``, sharded or not): those are read without running them
(``io.torch_pickle``) and their tensors planned from safetensors copies in a cache directory, which
``PickledModelIndex.convert`` writes (only the tensors a merge reads) before the engine runs.

``read_tensors`` loads a small model's tensors into NumPy
(for the demo and tests; merges never load whole tensors in Python).
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt

from .. import _engine
from ..errors import InputError, MergeError
from ..io.dtypes import MERGEABLE_DTYPES, RAW, to_f32
from ..io.json_file import read_json
from ..io.reader import ShardReader, read_header
from ..io.torch_pickle import StoredTensor, copy_tensors, read_checkpoint, tensor_chunks
from .refs import resolve

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX_FILE = "pytorch_model.bin.index.json"
#: bumped when the cache files written from the same pickles would change
_PICKLE_CACHE_VERSION = "1"

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
    #: what the user should know about how the model was read (for the plan's notes)
    notes: tuple[str, ...] = ()

    @property
    def stored_files(self) -> tuple[Path, ...]:
        """The files on disk that hold the model's weights (``files``, unless they are copies made later)."""
        return self.files


@dataclass(frozen=True)
class PickledModelIndex(ModelIndex):
    """A model stored as PyTorch pickles: ``tensors`` point into safetensors copies in a cache directory, which
    ``convert`` writes for the tensors a merge reads."""

    #: tensor -> its checkpoint file and where it lies there
    stored: Mapping[str, tuple[Path, StoredTensor]] = field(default_factory=dict)
    #: checkpoint file -> its cache file
    cache_files: Mapping[Path, Path] = field(default_factory=dict)

    @property
    def stored_files(self) -> tuple[Path, ...]:
        return tuple(self.cache_files)

    def pending_bytes(self, names: Iterable[str]) -> int:
        """Bytes ``convert(names)`` would write (0 when the cache already holds them)."""
        return sum(
            self.stored[n][1].nbytes for f, ns in self._wanted(names).items() if not _cached(f, ns, self) for n in ns
        )

    def convert(self, names: Iterable[str], log: Callable[[str], None] = lambda _: None) -> None:
        """Write the cache files holding ``names`` (those not there yet), each atomically: complete or absent. An
        ``InputError`` when a checkpoint changes while it is copied."""
        for cache, wanted in self._wanted(names).items():
            if _cached(cache, wanted, self):
                continue
            source = self.stored[wanted[0]][0]
            log(f"copying {len(wanted)} tensor(s) of {source} into {cache}")
            before = _identity(source)
            cache.parent.mkdir(parents=True, exist_ok=True)
            partial = cache.with_name(f".{cache.name}.partial-{os.getpid()}")
            try:
                copy_tensors(source, [(n, self.stored[n][1]) for n in wanted], partial, {"format": "pt"})
                if _identity(source) != before:
                    raise InputError(f"{source} changed while ferromerge was copying its tensors")
                os.replace(partial, cache)
            except BaseException:
                partial.unlink(missing_ok=True)
                raise

    def _wanted(self, names: Iterable[str]) -> dict[Path, list[str]]:
        """Cache file -> the wanted tensors it must hold, in the model's order."""
        wanted = set(names)
        out: dict[Path, list[str]] = {}
        for name, info in self.tensors.items():
            if name in wanted:
                out.setdefault(info.file, []).append(name)
        return out


def natural_key(name: str) -> list[object]:
    """``layers.2`` before ``layers.10``: digit runs compare as numbers."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def index_model(ref: str, cache_dir: str | os.PathLike[str] | None = None) -> ModelIndex:
    """Resolve ``ref`` and read (and validate) the header of every shard of its safetensors weights; without
    safetensors, its PyTorch pickles, planned from copies in ``cache_dir`` (None: pickles are refused)."""
    path = resolve(ref)
    index_path = path / INDEX_FILE
    single = path / SINGLE_FILE
    if _exists(index_path):
        _check_regular(index_path, "the shard index")
        weight_map = _read_weight_map(index_path)
        files = sorted({path / f for f in weight_map.values()}, key=lambda p: natural_key(p.name))
        headers: dict[Path, dict[str, tuple[str, list[int]]]] = {}
        for file in files:
            _check_shard(index_path, file)
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
        notes: tuple[str, ...] = ()
        if _exists(single):
            # mergekit reads the index too; transformers' from_pretrained would load model.safetensors
            notes = (
                f"model {ref!r}: {path} has both {SINGLE_FILE} and {INDEX_FILE}; the shards the index names are "
                f"read, as mergekit does (transformers would load {SINGLE_FILE}): remove the one that is stale",
            )
        return ModelIndex(ref, path, tuple(files), tensors, notes)
    if _exists(single):
        _check_regular(single, "the model's weights")
        header = _engine.read_header(str(single))
        tensors = {n: _info(single, header[n]) for n in sorted(header, key=natural_key)}
        return ModelIndex(ref, path, (single,), tensors)
    if _exists(path / PICKLE_INDEX_FILE) or _exists(path / PICKLE_FILE):
        if cache_dir is None:
            raise InputError(
                f"model {ref!r}: {path} has only PyTorch .bin weights, which only merges (ferromerge run, plan) read, "
                "and not as the model of a model+lora reference; convert them with transformers: "
                "model.save_pretrained(dir, safe_serialization=True)"
            )
        return _index_pickled(ref, path, Path(cache_dir))
    found = sorted(p.name for p in path.glob("*.safetensors"))
    also = f" (found {', '.join(found)})" if found else ""
    raise InputError(f"model {ref!r}: {path} has no {SINGLE_FILE} or {INDEX_FILE}{also}")


def _exists(path: Path) -> bool:
    """Whether anything is at ``path`` (a dangling symbolic link counts: it is reported, not skipped)."""
    return path.exists() or path.is_symlink()


def _kind(path: Path) -> str | None:
    """What ``path`` is when it is not a regular file (following links): "does not exist", "is a directory", ..."""
    try:
        mode = path.stat().st_mode
    except FileNotFoundError:
        return "does not exist" + (" (a dangling symbolic link)" if path.is_symlink() else "")
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "is a directory, not a file"
    if stat.S_ISFIFO(mode):
        return "is a FIFO (named pipe), not a regular file"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "is a device, not a regular file"
    if stat.S_ISSOCK(mode):
        return "is a socket, not a regular file"
    return "is not a regular file"


def _check_regular(path: Path, what: str) -> None:
    kind = _kind(path)
    if kind is not None:
        raise InputError(f"{path} ({what}) {kind}")


def _check_shard(index_path: Path, file: Path) -> None:
    kind = _kind(file)
    if kind is not None:
        raise InputError(f"{index_path}: names shard {file.name}, but {file} {kind}")


def _index_pickled(ref: str, path: Path, cache_dir: Path) -> PickledModelIndex:
    """The model's pickles read (never run), each tensor planned from the cache file of its checkpoint."""
    index_path = path / PICKLE_INDEX_FILE
    if _exists(index_path):
        _check_regular(index_path, "the shard index")
        weight_map = _read_weight_map(index_path)
        files = sorted({path / f for f in weight_map.values()}, key=lambda p: natural_key(p.name))
        checkpoints: dict[Path, dict[str, StoredTensor]] = {}
        for file in files:
            _check_shard(index_path, file)
            checkpoints[file] = read_checkpoint(file)
        for name, shard in weight_map.items():
            if name not in checkpoints[path / shard]:
                raise InputError(
                    f"{index_path}: says tensor {name} is in {path / shard}, but that checkpoint does not contain it"
                )
        order = sorted(weight_map, key=lambda n: (files.index(path / weight_map[n]), natural_key(n)))
        stored = {n: (path / weight_map[n], checkpoints[path / weight_map[n]][n]) for n in order}
    else:
        single = path / PICKLE_FILE
        _check_regular(single, "the model's weights")
        files = [single]
        checkpoint = read_checkpoint(single)
        stored = {n: (single, checkpoint[n]) for n in sorted(checkpoint, key=natural_key)}
    digest = hashlib.sha256(_PICKLE_CACHE_VERSION.encode())
    for f in files:
        st = f.stat()
        digest.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    folder = cache_dir.expanduser().absolute() / f"pickled-{path.name}-{digest.hexdigest()[:16]}"
    cache_files = {f: folder / f"{f.stem}.safetensors" for f in files}
    tensors = {n: TensorInfo(cache_files[f], t.dtype, t.shape) for n, (f, t) in stored.items()}
    return PickledModelIndex(
        ref, path, tuple(cache_files.values()), tensors, stored=stored, cache_files=cache_files
    )


def _identity(path: Path) -> tuple[int, int, int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns, st.st_dev, st.st_ino


def _cached(cache: Path, wanted: list[str], model: PickledModelIndex) -> bool:
    """Whether the cache file (from an earlier run) holds every wanted tensor with its dtype and shape."""
    if not cache.is_file():
        return False
    try:
        header = _engine.read_header(str(cache))
    except MergeError:
        return False
    return all(n in header and (header[n][0], tuple(header[n][1])) == (model.tensors[n].dtype, model.tensors[n].shape)
               for n in wanted)


def _wanted(model: PickledModelIndex, reads: Iterable[tuple[Path, str]]) -> set[str]:
    files = set(model.cache_files.values())
    return {tensor for file, tensor in reads if file in files}


def convert_pickled(models: Iterable[ModelIndex], reads: Iterable[tuple[Path, str]],
                    log: Callable[[str], None] = lambda _: None) -> None:
    """Copy the tensors a run reads (``reads``: (file, tensor) pairs, ``Plan.reads``) of every pickled model among
    ``models`` into its cache files."""
    reads = set(reads)
    for m in models:
        if isinstance(m, PickledModelIndex):
            m.convert(_wanted(m, reads), log)


def pickled_pending_bytes(models: Iterable[ModelIndex], reads: Iterable[tuple[Path, str]]) -> int:
    """Bytes ``convert_pickled`` will write (for the free-space check)."""
    reads = set(reads)
    return sum(m.pending_bytes(_wanted(m, reads)) for m in models if isinstance(m, PickledModelIndex))


def tensor_bytes(model: ModelIndex, name: str) -> Iterator[bytes]:
    """The stored bytes of tensor ``name`` of ``model``, a chunk at a time (from its pickle when it has one: the
    cache may not be written yet)."""
    if isinstance(model, PickledModelIndex):
        source, stored = model.stored[name]
        yield from tensor_chunks(source, stored)
        return
    reader = ShardReader()
    try:
        for block in reader.chunks(model.tensors[name].file, name):
            yield block.tobytes()
    finally:
        reader.close()


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
