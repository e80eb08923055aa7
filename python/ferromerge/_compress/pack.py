"""``compress``: store a family of fine-tunes of one base as an archive of task vectors, by either scheme
(``lowrank``: TSV-C, truncated SVDs of each 2-D task vector; ``tall``: one summed task vector plus TALL masks),
reporting each model's reconstruction error measured on exactly what ``unpack.decompress`` will write.

The schemes, the archive layout, the kinds of stored tensors and the choices behind them are specified once, in
docs/compress.md; ``archive`` reads and writes the manifest and the side files.

The module reads top-down: the options, checks on the family, the two schemes, then the report and ``compress``.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _engine
from .._validate import check_positive_int, check_seed, check_threads, format_bytes
from ..errors import InputError, ParameterError
from ..io.dtypes import ITEMSIZE, ST_NAME, from_f32, numel, to_f32
from ..io.output_dir import OutputDir
from ..io.reader import ShardReader, row_blocks
from ..io.writer import SafetensorsWriter
from ..methods import default
from ..models.index import INDEX_FILE, ModelIndex, TensorInfo, index_model
from . import unpack
from .archive import (
    FORMAT,
    MASK_FILE,
    SCHEMES,
    TAU_FILE,
    VERSION,
    base_fingerprint,
    model_file,
    sha256_file,
    store_side_files,
    write_manifest,
)


@dataclass(frozen=True)
class CompressReport:
    archive: Path
    scheme: str
    models: list[unpack.ModelSummary]
    archive_bytes: int
    finetune_bytes: int
    seconds: float

    @property
    def ratio(self) -> float:
        """Archive bytes over the fine-tunes' bytes (weights and the copied files); the base is not counted."""
        return self.archive_bytes / self.finetune_bytes if self.finetune_bytes else 0.0

    @property
    def saved_bytes(self) -> int:
        return self.finetune_bytes - self.archive_bytes

    def lines(self) -> list[str]:
        head = (f"compressed {len(self.models)} model(s) ({self.scheme}) into {self.archive}: "
                f"{format_bytes(self.archive_bytes)} for {format_bytes(self.finetune_bytes)} of fine-tunes "
                f"(ratio {self.ratio:.3f}, saved {format_bytes(max(self.saved_bytes, 0))}) in {self.seconds:.2f} s")
        return [head, *("  " + m.line() for m in self.models)]


@dataclass(frozen=True)
class _Options:
    scheme: str
    rank: int | None
    fraction: float | None
    energy: float | None
    exact: bool
    lam: float
    dtype: str | None  # safetensors name of the storage dtype, None: the fine-tunes'
    seed: int
    threads: int | None

    def manifest(self) -> dict[str, Any]:
        return {"rank": self.rank, "fraction": self.fraction, "energy": self.energy, "exact": self.exact,
                "tall_mask_lambda": self.lam, "dtype": self.dtype, "seed": self.seed}


def _options(scheme: str, rank: Any, fraction: Any, energy: Any, exact: Any, lam: Any, dtype: Any, seed: Any,
             threads: Any) -> _Options:
    if scheme not in SCHEMES:
        raise ParameterError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    given = [k for k, v in (("rank", rank), ("fraction", fraction), ("energy", energy)) if v is not None]
    if len(given) > 1:
        raise ParameterError(f"give at most one of rank, fraction, energy (got {', '.join(given)})")
    if scheme == "tall" and (given or exact):
        raise ParameterError(f"{', '.join(given) or 'exact'}: the tall scheme has no SVD (these apply to lowrank)")
    if rank is not None:
        check_positive_int(rank, "rank")
    for key, v in (("fraction", fraction), ("energy", energy)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 1):
            raise ParameterError(f"{key} must be in (0, 1], got {v!r}")
    if isinstance(lam, bool) or not isinstance(lam, (int, float)) or not (math.isfinite(lam) and lam >= 0):
        raise ParameterError(f"tall_mask_lambda must be a finite number >= 0, got {lam!r}")
    if dtype is not None and dtype not in ST_NAME:
        raise ParameterError(f"dtype must be one of {', '.join(ST_NAME)} (or None: the models'), got {dtype!r}")
    seed = check_seed(seed)
    threads = check_threads(threads)
    return _Options(scheme, rank, None if fraction is None else float(fraction),
                    None if energy is None else float(energy), bool(exact), float(lam),
                    None if dtype is None else ST_NAME[dtype], seed, threads)


def _check_family(base: ModelIndex, models: list[ModelIndex]) -> None:
    """Every model has the base's tensors with the base's shapes (``InputError`` naming file and tensor)."""
    for m in models:
        missing = [n for n in base.tensors if n not in m.tensors]
        extra = [n for n in m.tensors if n not in base.tensors]
        if missing:
            raise InputError(f"model {m.ref} ({m.path}) has no tensor {missing[0]}, which the base "
                             f"({base.tensors[missing[0]].file}) has" + (f" (and {len(missing) - 1} more)"
                                                                          if len(missing) > 1 else ""))
        if extra:
            raise InputError(f"{m.tensors[extra[0]].file}: tensor {extra[0]} is not in the base model {base.path}"
                             + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
        for n, info in base.tensors.items():
            if m.tensors[n].shape != info.shape:
                raise InputError(f"{m.tensors[n].file}: tensor {n} has shape {list(m.tensors[n].shape)}, the "
                                 f"base's ({info.file}) is {list(info.shape)}")


def _names(refs: Sequence[str], models: list[ModelIndex]) -> list[str]:
    """Each model's name in the archive: its directory name (a hub reference as given), made unique."""
    names: list[str] = []
    for ref, m in zip(refs, models, strict=True):
        name = m.path.name if Path(ref).expanduser().is_dir() else ref
        names.append(name if name not in names else f"{name}-{len(names)}")
    return names


def _same_bytes(rd: ShardReader, a: TensorInfo, b: TensorInfo, name: str) -> bool:
    if a.dtype != b.dtype:
        return False
    return all(np.array_equal(x, y) for x, y in zip(rd.chunks(a.file, name), rd.chunks(b.file, name), strict=True))


def _not_finite(info: TensorInfo, base: TensorInfo, name: str) -> InputError:
    return InputError(f"{info.file}: tensor {name}: the task vector (against {base.file}) has NaN or infinite "
                      "values; cannot compress it")


def _sq_norm(x: unpack.F32) -> float:
    """Σ x² of a float32 array: float32 dot products over runs of 2¹⁶ elements, added in float64 (about 1e-6
    relative, plenty for an error report, and 8x faster than converting to float64 first)."""
    flat = x.reshape(-1)
    step = 1 << 16
    return math.fsum(float(np.dot(flat[i : i + step], flat[i : i + step])) for i in range(0, flat.size, step))


def _error(err2: float, dn2: float) -> float | None:
    return math.sqrt(err2 / dn2) if dn2 > 0 else (0.0 if err2 == 0 else None)


class _Compressor:
    def __init__(self, tmp: Path, base: ModelIndex, models: list[ModelIndex], opts: _Options) -> None:
        self.tmp, self.base, self.models, self.opts = tmp, base, models, opts
        self.rd = ShardReader()
        self._own: dict[int, SafetensorsWriter] = {}

    def own(self, i: int) -> SafetensorsWriter:
        """model-<i>.safetensors, created when model i first stores a tensor."""
        if i not in self._own:
            self._own[i] = SafetensorsWriter(self.tmp / model_file(i), metadata={"ferromerge_archive": "model"})
        return self._own[i]

    def store_whole(self, i: int, name: str, info: TensorInfo) -> None:
        w = self.own(i)
        w.begin(name, info.dtype, info.shape)
        for chunk in self.rd.chunks(info.file, name):
            w.write(chunk)

    def run(self) -> list[dict[str, Any]]:
        if self.opts.scheme == "lowrank":
            for i in range(len(self.models)):
                self.own(i)  # every model has its file under lowrank, even with nothing but base tensors
        tensors = []
        shared = self._shared_writers()
        for name, binfo in self.base.tensors.items():
            entries = (self.lowrank_tensor(name, binfo) if self.opts.scheme == "lowrank"
                       else self.tall_tensor(name, binfo, *shared))
            for e, m in zip(entries, self.models, strict=True):
                e["shard"] = m.tensors[name].file.name
            tensors.append({"name": name, "shape": list(binfo.shape), "dtype": binfo.dtype, "models": entries})
        for w in [*shared, *self._own.values()]:
            w.close()
        self.rd.close()
        return tensors

    def _shared_writers(self) -> tuple[SafetensorsWriter, ...]:
        if self.opts.scheme == "lowrank":
            return ()
        return (SafetensorsWriter(self.tmp / TAU_FILE, metadata={"ferromerge_archive": "tau_mtl"}),
                SafetensorsWriter(self.tmp / MASK_FILE, streams=len(self.models),
                             metadata={"ferromerge_archive": "masks"}))

    # lowrank ----------------------------------------------------------------------------------------------

    def lowrank_tensor(self, name: str, binfo: TensorInfo) -> list[dict[str, Any]]:
        out = []
        for i, m in enumerate(self.models):
            info = m.tensors[name]
            entry: dict[str, Any] = {"dtype": info.dtype, "kind": "full", "error": 0.0, "delta_norm": None}
            if _same_bytes(self.rd, binfo, info, name):
                entry.update(kind="base", delta_norm=0.0)
            elif binfo.dtype not in unpack.FLOATS or info.dtype not in unpack.FLOATS:
                self.store_whole(i, name, info)
            elif len(info.shape) != 2 or min(info.shape) == 0:
                entry["delta_norm"] = math.sqrt(self._delta(name, binfo, info, keep=False)[1])
                self.store_whole(i, name, info)
            else:
                entry.update(self._factorise(i, name, binfo, info))
            out.append(entry)
        return out

    def _delta(self, name: str, binfo: TensorInfo, info: TensorInfo, keep: bool) -> tuple[unpack.F32 | None, float]:
        """τ = θ_t − θ0 in float32 (when ``keep``) and ||τ||² (``_sq_norm``)."""
        delta = np.empty(info.shape, np.float32) if keep else None
        dn2 = 0.0
        for rows in row_blocks(info.shape, unpack.BLOCK_ELEMS):
            d = (to_f32(self.rd.rows(info.file, name, rows), info.dtype)
                 - to_f32(self.rd.rows(binfo.file, name, rows), binfo.dtype))
            dn2 += _sq_norm(d)
            if delta is not None:
                delta[rows] = d
        if not math.isfinite(dn2):
            raise _not_finite(info, binfo, name)
        return delta, dn2

    def _rank_args(self, shape: tuple[int, ...]) -> dict[str, Any]:
        o = self.opts
        if o.fraction is not None:
            return {"fraction": o.fraction}
        if o.energy is not None:
            return {"energy": o.energy}
        if o.rank is not None:
            return {"rank": o.rank}
        # TSV-C's default: each of the T tasks keeps ⌊min(m, n)/T⌋ singular triplets
        return {"rank": max(1, min(shape) // len(self.models))}

    def _factorise(self, i: int, name: str, binfo: TensorInfo, info: TensorInfo) -> dict[str, Any]:
        delta, dn2 = self._delta(name, binfo, info, keep=True)
        assert delta is not None
        if dn2 == 0:  # bytes differ but values do not (signed zeros): nothing to factorise
            self.store_whole(i, name, info)
            return {"kind": "full", "error": 0.0, "delta_norm": 0.0}
        m, n = info.shape
        u, s, vt = _engine.svd(delta, **self._rank_args(info.shape), exact=self.opts.exact, seed=self.opts.seed,
                             name=name, threads=self.opts.threads)
        del delta
        r = int(s.shape[0])
        store = self.opts.dtype or info.dtype
        if r * (m + n) * ITEMSIZE[store] >= m * n * ITEMSIZE[info.dtype]:
            self.store_whole(i, name, info)  # the factors would not be smaller than the matrix
            return {"kind": "full", "error": 0.0, "delta_norm": math.sqrt(dn2)}
        root = np.sqrt(np.maximum(s, 0)).astype(np.float32)
        u_raw = from_f32(np.asarray(u, np.float32) * root, store)
        v_raw = from_f32(root[:, None] * np.asarray(vt, np.float32), store)
        w = self.own(i)
        w.add(f"{name}.U", store, (m, r), u_raw)
        w.add(f"{name}.V", store, (r, n), v_raw)
        # the error of what decompress will write: the stored factors, the same blocks, the same roundings
        u32, v32 = to_f32(u_raw, store), to_f32(v_raw, store)
        err2 = 0.0
        for rows in row_blocks(info.shape, unpack.BLOCK_ELEMS):
            b = to_f32(self.rd.rows(binfo.file, name, rows), binfo.dtype)
            rebuilt = to_f32(unpack.rebuild_lowrank(b, u32[rows], v32, info.dtype), info.dtype)
            err2 += _sq_norm(rebuilt - to_f32(self.rd.rows(info.file, name, rows), info.dtype))
        return {"kind": "lowrank", "rank": r, "error": _error(err2, dn2), "delta_norm": math.sqrt(dn2)}

    # tall -------------------------------------------------------------------------------------------------

    def tall_tensor(self, name: str, binfo: TensorInfo, tau_w: SafetensorsWriter, mask_w: SafetensorsWriter
                    ) -> list[dict[str, Any]]:
        infos = [m.tensors[name] for m in self.models]
        out: list[dict[str, Any]] = [{"dtype": x.dtype, "kind": "base", "error": 0.0, "delta_norm": 0.0}
                                     for x in infos]
        differ = [i for i, x in enumerate(infos) if not _same_bytes(self.rd, binfo, x, name)]
        if not differ:
            return out
        if binfo.dtype not in unpack.FLOATS or any(infos[i].dtype not in unpack.FLOATS for i in differ):
            for i in differ:  # nothing to add up: whole copies
                out[i].update(kind="full", delta_norm=None)
                self.store_whole(i, name, infos[i])
            return out
        dtypes = {infos[i].dtype for i in differ}
        store = self.opts.dtype or (dtypes.pop() if len(dtypes) == 1 else "F32")
        shape = binfo.shape
        tau_w.begin(name, store, shape)
        packed = ((numel(shape) + 7) // 8,)
        for i in differ:
            mask_w.begin(f"{name}.mask.{i}", "U8", packed, stream=i)
        lam = np.float32(self.opts.lam)
        err2 = dict.fromkeys(differ, 0.0)
        dn2 = dict.fromkeys(differ, 0.0)
        for rows in row_blocks(shape, unpack.BLOCK_ELEMS):
            b = to_f32(self.rd.rows(binfo.file, name, rows), binfo.dtype)
            thetas = {i: to_f32(self.rd.rows(infos[i].file, name, rows), infos[i].dtype) for i in differ}
            deltas = {i: thetas[i] - b for i in differ}
            # τ_MTL = Σ_t τ_t in float32, t ascending (models equal to the base add exact zeros)
            tau = np.zeros(b.shape, np.float32)
            for i in differ:
                tau += deltas[i]
            tau_raw = from_f32(tau, store)
            tau_w.write(tau_raw)
            tau_stored = to_f32(tau_raw, store)
            for i in differ:
                d = deltas[i]
                mask = np.abs(d) > lam * np.abs(tau - d)
                mask_w.write(np.packbits(mask.reshape(-1)), stream=i)
                rebuilt = to_f32(unpack.rebuild_masked(b, tau_stored, mask, infos[i].dtype), infos[i].dtype)
                err2[i] += _sq_norm(rebuilt - thetas[i])
                dn2[i] += _sq_norm(d)
        for i in differ:
            if not math.isfinite(dn2[i]):
                raise _not_finite(infos[i], binfo, name)
            out[i].update(kind="masked", error=_error(err2[i], dn2[i]), delta_norm=math.sqrt(dn2[i]))
        return out


def _summaries(names: list[str], tensors: list[dict[str, Any]]) -> list[unpack.ModelSummary]:
    out = []
    for i, name in enumerate(names):
        errors: list[tuple[float, str, float]] = []
        kinds: dict[str, int] = {}
        for t in tensors:
            e = t["models"][i]
            kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
            if len(t["shape"]) == 2 and e["kind"] != "base" and e["delta_norm"] is not None:
                errors.append((math.inf if e["error"] is None else e["error"], t["name"], e["delta_norm"]))
        if not errors:
            out.append(unpack.ModelSummary(name, 0, 0.0, 0.0, 0.0, None, kinds))
            continue
        worst = max(errors)
        total = sum(n * n for _, _, n in errors)
        overall = math.sqrt(sum((e * n) ** 2 for e, _, n in errors) / total) if total else 0.0
        out.append(unpack.ModelSummary(name, len(errors), worst[0], sum(e for e, _, _ in errors) / len(errors), overall,
                                worst[1], kinds))
    return out


def _summary_dict(s: unpack.ModelSummary) -> dict[str, Any]:
    return {"matrices": s.matrices, "max_error": s.max_error, "mean_error": s.mean_error,
            "overall_error": s.overall_error, "worst_tensor": s.worst_tensor, "kinds": s.kinds}


def _weights_bytes(m: ModelIndex) -> int:
    extra = m.path / INDEX_FILE
    return sum(f.stat().st_size for f in m.files) + (extra.stat().st_size if extra.is_file() else 0)


def compress(
    base: str | os.PathLike[str],
    models: Sequence[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    *,
    scheme: str = "lowrank",
    rank: int | None = None,
    fraction: float | None = None,
    energy: float | None = None,
    exact: bool = False,
    tall_mask_lambda: float = default("tall_masks", "tall_mask_lambda"),
    dtype: str | None = None,
    seed: int = 0,
    threads: int | None = None,
    overwrite: bool = False,
) -> CompressReport:
    """Store the fine-tunes ``models`` of ``base`` in the archive directory ``out`` (see the module docstring).

    ``scheme``: ``"lowrank"`` or ``"tall"``. lowrank's rank: at most one of ``rank``, ``fraction`` (of
    min(m, n)) and ``energy`` (share of ||τ||²_F kept), default ⌊min(m, n)/T⌋; ``exact`` for the exact thin SVD
    instead of the randomized one (``seed``-keyed, per tensor name). tall: ``tall_mask_lambda``. ``dtype``: the
    factors' and τ_MTL's storage dtype (``float32``, ``float16``, ``bfloat16``; default the models'). Reads one
    tensor at a time; returns sizes and the reconstruction errors of what ``decompress`` rebuilds.
    """
    start = time.perf_counter()
    opts = _options(scheme, rank, fraction, energy, exact, tall_mask_lambda, dtype, seed, threads)
    refs = [str(m) for m in models]
    if not refs:
        raise ParameterError("compress needs at least one model besides the base")
    base_idx = index_model(str(base))
    idxs = [index_model(r) for r in refs]
    _check_family(base_idx, idxs)
    names = _names(refs, idxs)
    target = OutputDir(out, overwrite=overwrite)
    target.check_inputs([base_idx.path, *(m.path for m in idxs)])
    with target.building() as tmp:
        tensors = _Compressor(tmp, base_idx, idxs, opts).run()
        summaries = _summaries(names, tensors)
        entries = []
        for i, (name, m) in enumerate(zip(names, idxs, strict=True)):
            entries.append({
                "name": name, "source": str(m.path), "indexed": (m.path / INDEX_FILE).is_file(),
                "shards": [f.name for f in m.files], "files": store_side_files(tmp, i, m.path),
                "summary": _summary_dict(summaries[i]),
            })
        archive_files = {p.name: {"size": p.stat().st_size, "sha256": sha256_file(p)}
                         for p in sorted(tmp.glob("*.safetensors"))}
        manifest = {
            "format": FORMAT, "version": VERSION, "scheme": opts.scheme, "options": opts.manifest(),
            "base": {"path": str(base_idx.path), "shards": base_fingerprint(base_idx)},
            "models": entries, "archive_files": archive_files, "tensors": tensors,
        }
        write_manifest(tmp, manifest)
        archive_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
    finetune_bytes = sum(_weights_bytes(m) + sum(f["size"] for f in e["files"].values())
                         for m, e in zip(idxs, entries, strict=True))
    return CompressReport(target.target, opts.scheme, summaries, archive_bytes, finetune_bytes,
                          time.perf_counter() - start)
