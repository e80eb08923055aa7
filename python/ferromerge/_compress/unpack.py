"""``decompress``: rebuild one fine-tune from an archive (format: docs/compress.md), and the rebuilding arithmetic
that ``pack.compress`` measures its errors with, so a model is written exactly as compress measured it.

Both directions work in row blocks of ``BLOCK_ELEMS`` elements (inputs are read, never memory-mapped) and write
atomically (a temporary directory beside the target, renamed onto it when complete; nothing is left on failure).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .._validate import format_bytes
from ..errors import InputError
from ..io.dtypes import ITEMSIZE, MERGEABLE_DTYPES, from_f32, numel, to_f32
from ..io.output_dir import OutputDir, check_free_space
from ..io.reader import ShardReader, row_blocks
from ..io.writer import PlannedTensor, SafetensorsWriter
from ..models.index import ModelIndex
from ..output_files import write_index
from .archive import (
    MANIFEST,
    MASK_FILE,
    TAU_FILE,
    load_manifest,
    model_file,
    open_base,
    pick_model,
    restore_side_files,
    verify_archive_file,
)

#: elements per row block (4 MiB per float32 array; tall keeps one such block per model), whatever the tensor's size
BLOCK_ELEMS = 1 << 20


FLOATS = tuple(MERGEABLE_DTYPES)


SAFETENSORS_META = {"format": "pt"}


F32 = npt.NDArray[np.float32]


@dataclass(frozen=True)
class ModelSummary:
    """Reconstruction error of one model over its 2-D float tensors that differ from the base."""

    name: str
    matrices: int
    max_error: float
    mean_error: float
    overall_error: float
    worst_tensor: str | None
    kinds: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        if not self.matrices:
            return f"{self.name}: no matrix differs from the base; rebuilt exactly"
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        return (f"{self.name}: relative error over {self.matrices} matrices: max {self.max_error:.4g} "
                f"({self.worst_tensor}), mean {self.mean_error:.4g}, overall {self.overall_error:.4g}  [{kinds}]")


@dataclass(frozen=True)
class DecompressReport:
    out_dir: Path
    model: str
    index: int
    tensors: int
    bytes_written: int
    seconds: float
    summary: ModelSummary
    #: information for the user (the rebuild went on): the CLI prints each as ``ferromerge: note: ...``
    notes: tuple[str, ...] = ()

    def lines(self) -> list[str]:
        return [f"rebuilt model {self.index} ({self.model}) into {self.out_dir}: {self.tensors} tensors, "
                f"{format_bytes(self.bytes_written)} in {self.seconds:.2f} s", "  " + self.summary.line()]


def rebuild_lowrank(base: F32, u: F32, v: F32, dtype: str) -> npt.NDArray[Any]:
    """θ0 + U·V for a block of rows, rounded to ``dtype`` (raw)."""
    theta = base + u @ v
    return from_f32(theta, dtype)


def rebuild_masked(base: F32, tau: F32, mask: npt.NDArray[np.bool_], dtype: str) -> npt.NDArray[Any]:
    """θ0 + m ⊙ τ_MTL for a block, rounded to ``dtype`` (raw); masked-out elements are the base's exactly."""
    return from_f32(np.where(mask, base + tau, base), dtype)


def unpack_mask(rd: ShardReader, file: Path, key: str, start: int, shape: tuple[int, ...]) -> npt.NDArray[np.bool_]:
    """The mask of a block of ``shape`` starting at element ``start`` (a multiple of 8: see ``row_blocks``)."""
    n = numel(shape)
    return np.unpackbits(rd.bytes_at(file, key, start // 8, (n + 7) // 8), count=n).astype(bool).reshape(shape)


def _check_stored(rd: ShardReader, file: Path, key: str, dtypes: Sequence[str], shape: Sequence[int], what: str
                  ) -> str:
    dtype, have = rd.entry(file, key, f" ({what})")
    if dtype not in dtypes or list(have) != list(shape):
        raise InputError(f"{file}: tensor {key} ({what}) is {dtype} {have}, expected {'/'.join(dtypes)} "
                         f"{list(shape)}")
    return dtype


class _Rebuilder:
    """Writes model ``i``'s tensors from the base and the archive, block by block."""

    def __init__(self, archive: Path, manifest: dict[str, Any], i: int, base: ModelIndex) -> None:
        self.archive, self.manifest, self.i, self.base = archive, manifest, i, base
        self.rd = ShardReader()
        scheme = manifest["scheme"]
        kinds = {t["models"][i]["kind"] for t in manifest["tensors"]}
        self.own = verify_archive_file(archive, manifest, model_file(i)) if (
            scheme == "lowrank" or "full" in kinds) else None
        self.tau = verify_archive_file(archive, manifest, TAU_FILE) if "masked" in kinds else None
        self.masks = verify_archive_file(archive, manifest, MASK_FILE) if "masked" in kinds else None

    def check(self, t: dict[str, Any]) -> None:
        """The base and archive hold what tensor ``t`` needs, with the manifest's dtypes and shapes."""
        name, shape, e = t["name"], t["shape"], t["models"][self.i]
        info = self.base.tensors.get(name)
        if info is None or list(info.shape) != shape or info.dtype != t["dtype"]:
            raise InputError(f"base model {self.base.path}: tensor {name} is missing or differs from the archive's "
                             f"base ({t['dtype']} {shape})")
        if e["kind"] == "full":
            assert self.own is not None
            _check_stored(self.rd, self.own, name, [e["dtype"]], shape, "stored whole")
        elif e["kind"] == "lowrank":
            assert self.own is not None
            m, n = shape
            du = _check_stored(self.rd, self.own, f"{name}.U", FLOATS, [m, e["rank"]], "low-rank factor")
            _check_stored(self.rd, self.own, f"{name}.V", [du], [e["rank"], n], "low-rank factor")
        elif e["kind"] == "masked":
            assert self.tau is not None and self.masks is not None
            _check_stored(self.rd, self.tau, name, FLOATS, shape, "tau_MTL")
            _check_stored(self.rd, self.masks, f"{name}.mask.{self.i}", ["U8"], [(numel(shape) + 7) // 8], "mask")
        if e["dtype"] not in FLOATS and e["kind"] not in ("full", "base"):
            raise InputError(f"{self.archive / MANIFEST}: tensor {name} of dtype {e['dtype']} cannot be {e['kind']}")

    def write(self, w: SafetensorsWriter, t: dict[str, Any]) -> None:
        name, shape, e = t["name"], tuple(t["shape"]), t["models"][self.i]
        binfo = self.base.tensors[name]
        dtype = e["dtype"]
        w.begin(name, dtype, shape)
        if e["kind"] in ("base", "full"):
            source = binfo.file if e["kind"] == "base" else self.own
            assert source is not None
            for chunk in self.rd.chunks(source, name):
                w.write(chunk)
            return
        if e["kind"] == "lowrank":
            assert self.own is not None
            store = self.rd.entry(self.own, f"{name}.U")[0]
            u = to_f32(self.rd.rows(self.own, f"{name}.U", slice(0, shape[0])), store)
            v = to_f32(self.rd.rows(self.own, f"{name}.V", slice(0, e["rank"])), store)
        else:
            assert self.tau is not None and self.masks is not None
            store = self.rd.entry(self.tau, name)[0]
            row = numel(shape[1:]) if len(shape) > 1 else 1
        for rows in row_blocks(shape, BLOCK_ELEMS):
            b = to_f32(self.rd.rows(binfo.file, name, rows), binfo.dtype)
            if e["kind"] == "lowrank":
                w.write(rebuild_lowrank(b, u[rows], v, dtype))
            else:
                tau = to_f32(self.rd.rows(self.tau, name, rows), store)
                mask = unpack_mask(self.rd, self.masks, f"{name}.mask.{self.i}", rows.start * row, b.shape)
                w.write(rebuild_masked(b, tau, mask, dtype))


def _summary_from(manifest: dict[str, Any], i: int) -> ModelSummary:
    s = manifest["models"][i].get("summary") or {}
    return ModelSummary(manifest["models"][i]["name"], int(s.get("matrices", 0)), float(s.get("max_error", 0.0)),
                        float(s.get("mean_error", 0.0)), float(s.get("overall_error", 0.0)),
                        s.get("worst_tensor"), dict(s.get("kinds", {})))


def decompress(
    archive: str | os.PathLike[str],
    model: str | int,
    out: str | os.PathLike[str],
    *,
    base: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
) -> DecompressReport:
    """Rebuild one model of ``archive`` (by name or 0-based index) into the model directory ``out``.

    ``base``: the base model when it is no longer at the path recorded in the archive; it must have the same
    shards (names, sizes, headers) as the one the archive was made from. The output has the model's own shard
    names, shard index, dtypes, config and tokenizer files.
    """
    start = time.perf_counter()
    arch = Path(archive).expanduser().absolute()
    manifest = load_manifest(arch)
    i = pick_model(manifest, arch, model)
    entry = manifest["models"][i]
    notes: list[str] = []
    base_idx = open_base(manifest, arch, None if base is None else str(base), notes)
    target = OutputDir(out, overwrite=overwrite)
    target.check_inputs([arch, base_idx.path])
    rebuild = _Rebuilder(arch, manifest, i, base_idx)
    tensors = manifest["tensors"]
    for t in tensors:
        rebuild.check(t)
    by_shard: dict[str, list[dict[str, Any]]] = {s: [] for s in entry["shards"]}
    for t in tensors:
        by_shard[t["models"][i]["shard"]].append(t)
    sizes = {t["name"]: numel(t["shape"]) * ITEMSIZE[t["models"][i]["dtype"]] for t in tensors}
    total = sum(sizes.values())
    check_free_space(target.target, total + sum(int(f.get("size", 0)) for f in entry["files"].values()))
    written = 0
    with target.building() as tmp:
        for shard, members in by_shard.items():
            planned = [PlannedTensor.of(t["name"], t["models"][i]["dtype"], t["shape"]) for t in members]
            w = SafetensorsWriter(tmp / shard, planned=planned, in_order=True, metadata=dict(SAFETENSORS_META))
            for t in members:
                rebuild.write(w, t)
            written += w.close()
        if entry["indexed"]:
            write_index(tmp, {t["name"]: t["models"][i]["shard"] for t in tensors}, total)
        restore_side_files(arch, entry["files"], tmp)
        rebuild.rd.close()
    return DecompressReport(target.target, entry["name"], i, len(tensors), written, time.perf_counter() - start,
                            _summary_from(manifest, i), tuple(notes))
