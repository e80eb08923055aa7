"""``model+lora`` references: a PEFT LoRA adapter merged into its model before the merge, streamed into a cache.

mergekit (0.1.5) loads the whole model with transformers, merges the adapter with PEFT's ``merge_and_unload`` and
saves a full copy into ``--lora-merge-cache``. ferromerge reads only headers to plan (``ferromerge plan`` writes
nothing), then ``LoraModelIndex.materialise`` writes just the tensors the adapter changes, one at a time and in row
blocks of at most ``BLOCK_BYTES`` of float32, into one cache file per model shard; every other tensor is read from
the model's own shards (no copy). The merged view is a ``ModelIndex`` like any other, so planning does not care.

Per adapted weight W (PEFT's formula, float32 math, one rounding back to W's dtype):

* ``lora_A`` (r × in) / ``lora_B`` (out × r): W' = W + (B·A)·s, with s = lora_alpha / r (``use_rslora``:
  lora_alpha / √r; ``rank_pattern`` / ``alpha_pattern`` override r and alpha per module). ``fan_in_fan_out``
  (GPT-2's Conv1D) stores W as in × out: W' = W + (B·A)ᵀ·s.
* ``lora_embedding_A`` (r × vocab) / ``lora_embedding_B`` (dim × r): W' = W + (B·A)ᵀ·s.
* any other adapter tensor that names a model tensor (``modules_to_save`` copies, trained biases) replaces it.

A malformed adapter is an ``InputError`` naming the adapter file and tensor: A without B, ranks that disagree,
a target the model does not have, shapes that do not fit, DoRA or other variants PEFT merges differently.

The module reads top-down: the merged view's index and how it is built (the adapter's config and updates,
checked against the model), then writing the cache (stored tensors read through headers the engine validated,
W + (B·A)·s in row blocks), then the entry points the planner and ``run`` call.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _engine
from ..errors import InputError, MergeError
from ..io.dtypes import ITEMSIZE, MERGEABLE_DTYPES, RAW, from_f32, numel, to_f32
from ..io.json_file import read_json
from ..io.reader import Header, read_header
from ..io.writer import header_bytes
from .architecture import PEFT_PREFIX
from .index import ModelIndex, TensorInfo, index_model
from .refs import resolve, split_ref

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: float32 bytes of one row block of an update (bounds the memory of materialising, whatever the tensor size)
BLOCK_BYTES = 64 << 20
#: bumped when the cache files' content for the same inputs would change
_CACHE_VERSION = "1"

LORA_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
EMBED_KEY = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$")
UNSUPPORTED_KEY = re.compile(r"\.(lora_magnitude_vector|lora_B\.bias|lora_A\.bias)(\.|$)")


@dataclass(frozen=True)
class _Stored:
    """A tensor of a safetensors file: file, name, dtype (safetensors name) and shape."""

    file: Path
    name: str
    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class Update:
    """How one model tensor changes: ``kind`` is ``lora`` (W + B·A·s), ``lora_t`` (W + (B·A)ᵀ·s) or ``replace``."""

    target: str
    kind: str
    weight: _Stored
    a: _Stored | None = None
    b: _Stored | None = None
    scale: float = 1.0


@dataclass(frozen=True)
class LoraModelIndex(ModelIndex):
    """A model with an adapter merged in: ``tensors`` point into the cache for the updated ones."""

    adapter: Path = Path()
    #: cache file -> the updates it holds, in file order
    cache_files: Mapping[Path, tuple[Update, ...]] = field(default_factory=dict)

    @property
    def cache_bytes(self) -> int:
        """Bytes the cache files take (0 once they exist)."""
        return sum(
            sum(int(np.prod(u.weight.shape, dtype=np.int64)) * ITEMSIZE[u.weight.dtype] for u in ups)
            for f, ups in self.cache_files.items()
            if not f.is_file()
        )

    def materialise(self, log: Callable[[str], None] = lambda _: None) -> None:
        """Write the cache files that do not exist yet (each atomically: complete or absent)."""
        for file, updates in self.cache_files.items():
            if file.is_file() and _header_matches(file, updates):
                continue
            log(f"merging LoRA {self.adapter} into {self.path}: {len(updates)} tensor(s) -> {file}")
            _write_cache_file(file, updates, str(self.adapter))


def adapter_files(ref: str, what: str) -> tuple[Path, dict[str, Any], Path]:
    """A PEFT adapter's directory (``ref``: a directory or an id in the local Hugging Face cache), its checked
    ``adapter_config.json`` and its weights file, which must exist; ``what`` names the adapter in a resolution error.
    Shared by ``model+lora`` references and ``adapters`` (merge-lora)."""
    try:
        adapter_dir = resolve(ref)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None
    config = read_adapter_config(adapter_dir)
    weights_file = adapter_dir / ADAPTER_WEIGHTS
    if not weights_file.is_file():
        bin_note = " (adapter_model.bin is not read: save the adapter with safe_serialization)" if (
            adapter_dir / "adapter_model.bin"
        ).is_file() else ""
        raise InputError(f"LoRA adapter {adapter_dir}: {ADAPTER_WEIGHTS} not found{bin_note}")
    return adapter_dir, config, weights_file


def index_lora_model(ref: str, cache_dir: str | os.PathLike[str]) -> LoraModelIndex:
    """Index ``model+lora``: validate the adapter against the model's headers and plan the cache files."""
    split = split_ref(ref, "model reference")
    if split is None:
        raise ValueError(f"{ref!r} is not a model+lora reference")
    model_ref, adapter_ref = split
    model = index_model(model_ref)
    adapter_dir, config, weights_file = adapter_files(adapter_ref, f"LoRA adapter of {ref!r}")
    header = _engine.read_header(str(weights_file))
    updates = _updates(config, adapter_dir / ADAPTER_CONFIG, weights_file, header, model)

    key = _cache_key(model, adapter_dir, weights_file, updates)
    folder = Path(cache_dir).expanduser().absolute() / f"{model.path.name}+{adapter_dir.name}-{key}"
    by_shard: dict[Path, list[Update]] = {}
    for u in updates:
        by_shard.setdefault(u.weight.file, []).append(u)
    cache_files: dict[Path, tuple[Update, ...]] = {}
    shard_cache: dict[Path, Path] = {}
    for shard, ups in by_shard.items():
        cache = folder / f"lora-{shard.name}"
        shard_cache[shard] = cache
        order = {n: i for i, n in enumerate(model.tensors)}
        cache_files[cache] = tuple(sorted(ups, key=lambda u: order[u.target]))
    updated = {u.target: u for u in updates}
    tensors = {
        name: TensorInfo(shard_cache[info.file], info.dtype, info.shape) if name in updated else info
        for name, info in model.tensors.items()
    }
    files = tuple(model.files) + tuple(cache_files)
    return LoraModelIndex(ref, model.path, files, tensors, adapter=adapter_dir, cache_files=cache_files)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / ADAPTER_CONFIG
    if not path.is_file():
        raise InputError(f"LoRA adapter {adapter_dir}: {ADAPTER_CONFIG} not found (a PEFT LoRA adapter directory has "
                         f"{ADAPTER_CONFIG} and {ADAPTER_WEIGHTS})")
    data = read_json(path, "the adapter config")
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object")
    peft_type = data.get("peft_type", "LORA")
    if peft_type != "LORA":
        raise InputError(f"{path}: peft_type {peft_type!r}: only LoRA adapters (LORA) can be merged")
    if data.get("use_dora"):
        raise InputError(f"{path}: use_dora: DoRA adapters are not supported (their merge rescales each column)")
    r = data.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InputError(f"{path}: r must be a positive integer, got {r!r}")
    alpha = data.get("lora_alpha", 8)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)):
        raise InputError(f"{path}: lora_alpha must be a number, got {alpha!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        value = data.get(key) or {}
        if not isinstance(value, dict) or not all(
            isinstance(v, (int, float)) and not isinstance(v, bool) for v in value.values()
        ):
            raise InputError(f"{path}: {key} must map module patterns to numbers, got {value!r}")
    return data


def pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """PEFT's ``get_pattern_key``: the first pattern that matches the end of the module name (at a dot)."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _targeted(config: Mapping[str, Any], module: str) -> bool:
    """Whether ``target_modules`` names ``module`` (PEFT: a regex matched in full, or a list of name suffixes)."""
    targets = config.get("target_modules")
    if targets is None or targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def _updates(
    config: Mapping[str, Any],
    config_path: Path,
    weights_file: Path,
    header: Mapping[str, tuple[str, list[int]]],
    model: ModelIndex,
) -> list[Update]:
    pairs: dict[str, dict[str, _Stored]] = {}
    embed: dict[str, bool] = {}
    replaced: list[tuple[str, _Stored]] = []
    for key, (dtype, shape) in header.items():
        stored = _Stored(weights_file, key, dtype, tuple(int(d) for d in shape))
        if dtype not in MERGEABLE_DTYPES:
            raise InputError(f"{weights_file}: tensor {key} has dtype {dtype}; adapters must be F32, F16 or BF16")
        if UNSUPPORTED_KEY.search(key):
            raise InputError(
                f"{weights_file}: tensor {key}: DoRA magnitudes and LoRA biases (lora_bias) are not supported"
            )
        name = key.removeprefix(PEFT_PREFIX)
        m = LORA_KEY.match(name) or EMBED_KEY.match(name)
        if m is not None:
            kind = m["kind"]
            pairs.setdefault(m["module"], {})[kind[-1]] = stored
            embed[m["module"]] = kind.startswith("lora_embedding")
        else:
            replaced.append((name.replace(".modules_to_save.default.", ".").replace(".original_module.", "."), stored))
    if not pairs and not replaced:
        raise InputError(f"{weights_file}: the adapter has no tensors")

    r0, alpha0 = config["r"], config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    fan_in_fan_out = bool(config.get("fan_in_fan_out", False))
    out: list[Update] = []
    for module, ab in pairs.items():
        for have, lack in (("A", "B"), ("B", "A")):
            if have in ab and lack not in ab:
                raise InputError(
                    f"{weights_file}: tensor {ab[have].name} has no matching lora_{lack} "
                    f"(a LoRA needs both lora_A and lora_B for {module})"
                )
        a, b = ab["A"], ab["B"]
        if not _targeted(config, module):
            raise InputError(
                f"{weights_file}: tensor {a.name}: module {module} is not in target_modules "
                f"{config.get('target_modules')!r} of {config_path}"
            )
        target = f"{module}.weight"
        info = model.tensors.get(target)
        if info is None:
            raise InputError(
                f"{weights_file}: tensor {a.name} adapts {target}, which model {model.ref!r} ({model.path}) "
                "does not have (is this adapter for another model?)"
            )
        if info.dtype not in MERGEABLE_DTYPES:
            raise InputError(f"{info.file}: tensor {target} has dtype {info.dtype}; only F32/F16/BF16 can be adapted")
        r = pattern_value(config.get("rank_pattern") or {}, module, r0)
        alpha = pattern_value(config.get("alpha_pattern") or {}, module, alpha0)
        if len(a.shape) != 2 or len(b.shape) != 2:
            raise InputError(
                f"{weights_file}: tensor {a.name} has shape {list(a.shape)} and {b.name} {list(b.shape)}: only "
                "2-D LoRA factors (linear and embedding layers) are supported"
            )
        if a.shape[0] != r or b.shape[1] != r:
            raise InputError(
                f"{weights_file}: rank mismatch for {module}: {a.name} has shape {list(a.shape)} and {b.name} "
                f"{list(b.shape)}, but {config_path} gives rank r = {r}"
            )
        transposed = embed[module] or fan_in_fan_out
        expected = (a.shape[1], b.shape[0]) if transposed else (b.shape[0], a.shape[1])
        if info.shape != expected:
            raise InputError(
                f"{weights_file}: LoRA factors of {module} ({a.name} {list(a.shape)}, {b.name} {list(b.shape)}) make "
                f"a {list(expected)} update, but {info.file} has {target} with shape {list(info.shape)}"
            )
        scale = float(alpha) / (float(r) ** 0.5 if rslora else float(r))
        weight = _Stored(info.file, target, info.dtype, info.shape)
        out.append(Update(target, "lora_t" if transposed else "lora", weight, a, b, scale))
    seen = {u.target for u in out}
    for name, stored in replaced:
        info = model.tensors.get(name)
        if info is None:
            raise InputError(
                f"{weights_file}: tensor {stored.name} is neither a LoRA factor nor a tensor of model {model.ref!r} "
                f"({model.path}: no {name})"
            )
        if info.shape != stored.shape:
            raise InputError(
                f"{weights_file}: tensor {stored.name} has shape {list(stored.shape)} but {info.file} has {name} "
                f"with shape {list(info.shape)}"
            )
        if name in seen:
            raise InputError(f"{weights_file}: tensor {stored.name} replaces {name}, which a LoRA also adapts")
        seen.add(name)
        out.append(Update(name, "replace", _Stored(info.file, name, info.dtype, info.shape), a=stored))
    return out


def _cache_key(model: ModelIndex, adapter_dir: Path, weights_file: Path, updates: list[Update]) -> str:
    """A digest of everything the cache files depend on: paths, sizes and mtimes of the files read, version."""
    h = hashlib.sha256(_CACHE_VERSION.encode())
    files = sorted({weights_file, adapter_dir / ADAPTER_CONFIG} | {u.weight.file for u in updates})
    for f in files:
        st = f.stat()
        h.update(f"{f.resolve()}\0{st.st_size}\0{st.st_mtime_ns}\0".encode())
    return h.hexdigest()[:16]


def _open(stored: _Stored, headers: dict[Path, Header]) -> np.memmap:
    """The stored tensor as a read-only memory map of its raw dtype (bfloat16: uint16 bits)."""
    if stored.file not in headers:
        headers[stored.file] = read_header(stored.file)
    _, _, start, _ = headers[stored.file].tensors[stored.name]
    return np.memmap(stored.file, dtype=RAW[stored.dtype], mode="r", offset=start, shape=stored.shape)


def merged_rows(update: Update, rows: slice, headers: dict[Path, Any]) -> npt.NDArray[np.float32]:
    """Rows ``rows`` of the updated tensor in float32 (before rounding to the tensor's dtype)."""
    if update.kind == "replace":
        assert update.a is not None
        src = _open(update.a, headers)
        return to_f32(src[rows] if src.ndim else src, update.a.dtype)
    assert update.a is not None and update.b is not None
    w = to_f32(_open(update.weight, headers)[rows], update.weight.dtype)
    a = to_f32(_open(update.a, headers), update.a.dtype)
    b = to_f32(_open(update.b, headers), update.b.dtype)
    # PEFT's order of operations: delta = (B @ A) * scale, then W + delta
    if update.kind == "lora":
        delta = _product(b[rows], a) * np.float32(update.scale)
    else:
        delta = _product(b, a[:, rows]).T * np.float32(update.scale)
    return (w + delta).astype(np.float32, copy=False)


def _product(b: npt.NDArray[np.float32], a: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """B·A summed over the rank in a fixed order: a BLAS matmul's rounding depends on the block's shape (and the
    machine), and the cache's bytes must not depend on ``BLOCK_BYTES``."""
    out = np.multiply.outer(b[:, 0], a[0])
    for k in range(1, a.shape[0]):
        out += np.multiply.outer(b[:, k], a[k])
    return out


def _header_bytes(updates: tuple[Update, ...], adapter: str) -> tuple[bytes, list[tuple[Update, int, int]]]:
    spans = []
    offset = 0
    for u in updates:
        size = numel(u.weight.shape) * ITEMSIZE[u.weight.dtype]
        spans.append((u, offset, offset + size))
        offset += size
    entries = [(u.target, u.weight.dtype, u.weight.shape, start, end) for u, start, end in spans]
    return header_bytes(entries, {"format": "pt", "ferromerge_lora_adapter": adapter}), spans


def _header_matches(file: Path, updates: tuple[Update, ...]) -> bool:
    """A cache file from an earlier run is reused when it holds exactly these tensors (names, dtypes, shapes)."""
    try:
        header = _engine.read_header(str(file))
    except MergeError:
        return False
    want = {u.target: (u.weight.dtype, list(u.weight.shape)) for u in updates}
    return {k: (d, list(s)) for k, (d, s) in header.items()} == want


def _write_cache_file(file: Path, updates: tuple[Update, ...], adapter: str) -> None:
    head, spans = _header_bytes(updates, adapter)
    file.parent.mkdir(parents=True, exist_ok=True)
    partial = file.with_name(f".{file.name}.partial-{os.getpid()}")
    headers: dict[Path, Any] = {}
    try:
        with open(partial, "wb") as out:
            out.write(head)
            for u, _, _ in spans:
                shape = u.weight.shape
                n_rows = shape[0] if shape else 1
                row = int(np.prod(shape[1:], dtype=np.int64)) if len(shape) > 1 else 1
                step = max(1, BLOCK_BYTES // (4 * max(row, 1)))
                if not shape:
                    out.write(from_f32(merged_rows(u, slice(None), headers), u.weight.dtype).tobytes())
                    continue
                for r in range(0, n_rows, step):
                    block = merged_rows(u, slice(r, min(n_rows, r + step)), headers)
                    out.write(from_f32(block, u.weight.dtype).tobytes())
        os.replace(partial, file)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def default_cache_dir() -> Path:
    """Where ``ferromerge plan`` places (never writes) the cache when none is given: the system temp directory."""
    import tempfile

    return Path(tempfile.gettempdir()) / "ferromerge-lora-merge"


def index_any(ref: str, cache_dir: str | os.PathLike[str] | None) -> ModelIndex:
    """``index_model`` for a plain reference, ``index_lora_model`` for ``model+lora`` (cache: ``cache_dir``, where
    a PyTorch-pickled model's tensors are copied too)."""
    cache = cache_dir if cache_dir is not None else default_cache_dir()
    if split_ref(ref, "model reference") is None:
        return index_model(ref, cache)
    return index_lora_model(ref, cache)


def materialise_all(models: Any, log: Callable[[str], None] = lambda _: None) -> None:
    """Write the LoRA caches of every ``model+lora`` among ``models`` (other models need nothing)."""
    for m in models:
        if isinstance(m, LoraModelIndex):
            m.materialise(log)


def pending_bytes(models: Any) -> int:
    """Bytes the LoRA caches of ``models`` will write (for the free-space check)."""
    return sum(m.cache_bytes for m in models if isinstance(m, LoraModelIndex))
