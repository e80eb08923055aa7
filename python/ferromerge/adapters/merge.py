"""``merge_adapters``: PEFT LoRA adapters in, one PEFT LoRA adapter out, one module at a time, without the base model.

The combination types are PEFT 0.21's ``add_weighted_adapter`` (``peft/tuners/lora/model.py``), so switching gives
the same adapter. Per module, with adapter i's factors A_i [r_i, in], B_i [out, r_i], scale s_i (PEFT's scaling)
and the user's weight w_i, over the adapters that have the module:

* ``cat``: A = [w_i·s_i·A_i] stacked, B = [B_i] side by side: exact, rank Σ r_i.
* ``linear``, ``ties``, ``dare_linear``, ``dare_ties``, ``magnitude_prune``: PEFT's merge_utils function applied
  to the A stack with weights √|w_i·s_i|·sign(w_i·s_i) and to the B stack with √|w_i·s_i| (the sign on one side
  only). Needs one rank per module; PEFT calls ``linear`` "a very rough approximation" (Σ B_i·Σ A_i ≠ Σ B_i·A_i).
* ``svd``: ΔW = Σ w_i·s_i·B_i·A_i re-factorised at ``rank``: B = U·S, A = Vᵀ (PEFT's split). ΔW is never built:
  orthonormal bases of the stacked factors [w_i·s_i·B_i] = Q_b·R_b and [A_i]ᵀ = Q_a·R_a (float64, from their
  Σr × Σr Gram matrices) give ΔW = Q_b·(R_b·R_aᵀ)·Q_aᵀ, so the engine's exact SVD of the small core is the SVD of
  ΔW (to float32 precision), in O((out+in)·(Σr)²).
* ``ties_svd``, ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd``: the function applied to the full
  deltas ΔW_i = s_i·B_i·A_i (the trims are elementwise, so ΔW_i is built, one module at a time, as PEFT does),
  then the SVD (randomized, keyed by ``seed`` and the module, unless ``exact``).
* ``svd_clamp`` (SVD types): B and A clipped to ±(the ``svd_clamp`` quantile of their entries together).
* With one adapter every type is ``linear`` (PEFT's rule).

The output: r = lora_alpha = PEFT's new rank (the common rank; Σ ranks for ``cat``; ``rank`` or the largest input
rank for the SVD types), modules of another rank in ``rank_pattern`` / ``alpha_pattern``, every scale folded into
the factors (scale 1), ``target_modules`` the union, the rest of the first adapter's config. A module only some
adapters have is merged over those (its weighted delta when only one has it).

Memory: one module at a time (its factors read, merged, written, let go); ``memory_limit`` bounds that module's
working set (``adapters.memory``: a module that cannot fit is refused before anything is written).

Departures from PEFT: DARE masks come from the engine's counter RNG (seed, module), not torch's; magnitude ties keep
the lowest index; ``cat`` and ``svd`` do not pad a module to the adapter-wide rank with zero rows (a module of
lower rank goes in ``rank_pattern``); ``use_rslora`` is off in the output (PEFT keeps the first adapter's, which
rescales its merged factors by √r); the output dtype is the adapters' (float32 when they differ).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _engine
from .._validate import check_seed, check_threads, memory_limit_bytes
from ..errors import InputError, MergeError, ParameterError
from ..io.dtypes import MERGEABLE_DTYPES, from_f32
from ..io.output_dir import OutputDir, check_free_space
from ..io.writer import PlannedTensor, SafetensorsWriter
from ..methods import default
from ..models.index import natural_key
from ..models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from . import combine, knots_global, memory
from .factors import Factors
from .peft_io import Adapter, merged_config, read_adapter, tensor_keys

__all__ = ["COMBINATIONS", "merge_adapters", "merge_module"]

F32 = npt.NDArray[np.float32]

#: types applied to the A and B stacks (PEFT's ``_generalized_task_arithmetic_weighted_adapter``)
STACK_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: types applied to the full deltas, then re-factorised (PEFT's ``_svd_generalized_task_arithmetic_weighted_adapter``)
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
#: KnOTS (adapters.knots): the factors aligned in a shared SVD basis, then merged there with the named method, with
#: the paper's statistics over all modules (adapters.knots_global)
KNOTS_TYPES = ("knots_ties", "knots_dare_ties", "knots_dare_linear", "knots_linear", "knots_magnitude_prune")
COMBINATIONS = ("cat", *STACK_TYPES, *SVD_TYPES, *KNOTS_TYPES)
_DENSITY_TYPES = {"ties", "dare_linear", "dare_ties", "magnitude_prune"}

Progress = Callable[[int, int], None]
#: the scratch file of KnOTS' global passes, in the output's temporary directory (removed before it is renamed)
SCRATCH = ".knots-scratch"


def _combine(kind: str, tasks: Iterable[F32], weights: Sequence[float], density: float | None, majority_sign: str,
             seed: int, name: str, threads: int | None) -> F32:
    """PEFT's merge_utils function ``kind`` (a STACK_TYPES name) over ``tasks`` (``ties`` and ``dare_ties`` prune
    each as it comes, so a generator holds one unpruned tensor at a time)."""
    if kind == "ties":
        return combine.ties(tasks, weights, density, majority_sign, threads=threads)
    if kind == "dare_ties":
        return combine.dare_ties(tasks, weights, density, majority_sign, seed=seed, name=name, threads=threads)
    seq = list(tasks)
    if kind == "linear":
        return combine.task_arithmetic(seq, weights, threads=threads)
    if kind == "dare_linear":
        return combine.dare_linear(seq, weights, density, seed=seed, name=name, threads=threads)
    if kind == "magnitude_prune":
        return combine.magnitude_prune(seq, weights, density, threads=threads)
    raise AssertionError(kind)


def _clamp(a: F32, b: F32, quantile: float | None) -> tuple[F32, F32]:
    """PEFT's ``svd_clamp``: B (= U·S) and A (= Vᵀ) clipped to ±(the quantile of all their entries)."""
    if quantile is None or a.size + b.size == 0:
        return a, b
    hi = np.float32(np.quantile(np.concatenate([b.ravel(), a.ravel()]).astype(np.float64), quantile))
    return np.clip(a, -hi, hi), np.clip(b, -hi, hi)


def _padded(u: F32, s: F32, vt: F32, rank: int, shape: tuple[int, int]) -> tuple[F32, F32]:
    """A = Vᵀ, B = U·S with zero triplets added up to ``rank`` (the SVD drops singular values that are 0)."""
    k = s.shape[0]
    a = np.zeros((rank, shape[1]), np.float32)
    b = np.zeros((shape[0], rank), np.float32)
    a[:k] = vt[:rank]
    b[:, :k] = (u * s[None, :])[:, :rank]
    return a, b


def svd_rank(kind: str, rank: int, ranks: Sequence[int], shape: tuple[int, int]) -> int:
    """The rank a module gets from an SVD type: ``rank`` within ΔW's shape (and within Σ r_i for plain ``svd``,
    whose ΔW has no more)."""
    k = min(rank, shape[0], shape[1])
    return min(k, sum(ranks)) if kind == "svd" else k


def merge_module(
    kind: str,
    factors: Sequence[Factors],
    weights: Sequence[float],
    *,
    rank: int,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    name: str = "",
    exact: bool = False,
    svd_clamp: float | None = None,
    threads: int | None = None,
    svd_args: dict[str, Any] | None = None,
) -> Factors:
    """One module's merged factors (scale 1) by combination type ``kind`` (see the module docstring); ``rank``
    is used by the SVD types only. ``name`` keys the DARE masks and the randomized SVD's sketch."""
    if kind == "cat":
        a = np.concatenate([(f.a * np.float32(w)) * np.float32(f.scale) for f, w in zip(factors, weights, strict=True)])
        b = np.concatenate([f.b for f in factors], axis=1)
        return Factors(np.ascontiguousarray(a, np.float32), np.ascontiguousarray(b, np.float32))
    if kind in STACK_TYPES:
        ranks = {f.rank for f in factors}
        if len(ranks) != 1:
            raise ParameterError(f"{name}: the adapters have ranks {sorted(ranks)} there; combination {kind!r} merges "
                                 "the A and B factors entrywise and needs one rank (use 'cat' or an SVD type)")
        signed, unsigned = [], []
        for f, w in zip(factors, weights, strict=True):
            ws = float(w) * f.scale
            root = math.sqrt(abs(ws))
            signed.append(root if ws >= 0 else -root)
            unsigned.append(root)
        a = _combine(kind, [f.a for f in factors], signed, density, majority_sign, seed, f"{name}.lora_A", threads)
        b = _combine(kind, [f.b for f in factors], unsigned, density, majority_sign, seed, f"{name}.lora_B", threads)
        return Factors(a, b)
    if kind not in SVD_TYPES:
        raise AssertionError(kind)
    shape = factors[0].shape
    k = svd_rank(kind, rank, [f.rank for f in factors], shape)
    sargs = dict(svd_args or {})
    if kind == "svd":
        u, s, vt = _low_rank_svd(factors, weights, k, threads)
    else:
        # built one at a time: ties / dare_ties prune each before the next (memory: see adapters.memory)
        deltas = (f.delta() for f in factors)
        merged = _combine(kind.removesuffix("_svd"), deltas, [float(w) for w in weights], density, majority_sign,
                          seed, name, threads)
        u, s, vt = _engine.svd(np.ascontiguousarray(merged), rank=k, exact=exact, seed=seed, name=name,
                               threads=threads, **sargs)
    a, b = _padded(np.asarray(u, np.float32), np.asarray(s, np.float32), np.asarray(vt, np.float32), k, shape)
    a, b = _clamp(a, b, svd_clamp)
    return Factors(np.ascontiguousarray(a), np.ascontiguousarray(b))


def _low_rank_svd(factors: Sequence[Factors], weights: Sequence[float], k: int, threads: int | None
                  ) -> tuple[F32, F32, F32]:
    """The top-``k`` SVD of Σ w_i·s_i·B_i·A_i through the factors only: orthonormal bases of the stacked
    [w_i·s_i·B_i] = Q_b·R_b and [A_i]ᵀ = Q_a·R_a, then the engine's exact SVD of the small core R_b·R_aᵀ;
    U = Q_b·U_c, Vᵀ = V_cᵀ·Q_aᵀ."""
    bs = np.concatenate([f.b.astype(np.float64) * (float(w) * f.scale) for f, w in zip(factors, weights, strict=True)],
                        axis=1)
    at = np.concatenate([f.a for f in factors]).T.astype(np.float64)
    qb, rb = _orthonormal(bs)
    qa, ra = _orthonormal(at)
    if rb.shape[0] == 0 or ra.shape[0] == 0:  # ΔW = 0
        return (np.zeros((bs.shape[0], 0), np.float32), np.zeros(0, np.float32), np.zeros((0, at.shape[0]), np.float32))
    core = np.ascontiguousarray(rb @ ra.T, np.float32)
    uc, s, vct = _engine.svd(core, rank=k, exact=True, threads=threads)
    u = (qb @ np.asarray(uc, np.float64)).astype(np.float32)
    vt = (np.asarray(vct, np.float64) @ qa.T).astype(np.float32)
    return u, np.asarray(s, np.float32), np.ascontiguousarray(vt)


#: directions of a stacked factor with σ below this fraction of its largest are dropped (their part of ΔW is
#: below float32 rounding of the factors' products)
_ORTH_CUT = 1e-7


def _orthonormal(x: npt.NDArray[np.float64]) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """x (m × R, float64) = Q·R with Q orthonormal (m × k), from the eigen-decomposition of the R × R Gram matrix
    xᵀx in float64: O(m·R²), accurate to float32 precision (LAPACK's QR of a tall matrix is several times slower
    here, its blocked Householder steps spending their time in thread synchronisation)."""
    lam, v = np.linalg.eigh(x.T @ x)
    top = float(lam.max()) if lam.size else 0.0
    if top <= 0:
        return np.zeros((x.shape[0], 0)), np.zeros((0, x.shape[1]))
    keep = lam > top * _ORTH_CUT**2
    sig = np.sqrt(lam[keep])
    v = v[:, keep]
    return (x @ v) / sig[None, :], sig[:, None] * v.T


def _adapter_list(adapters: Any) -> list[tuple[str, float]]:
    if isinstance(adapters, (str, os.PathLike)) or not isinstance(adapters, Sequence) or not adapters:
        raise ParameterError("adapters: expected a non-empty list of (path, weight) pairs or paths")
    out = []
    for item in adapters:
        if isinstance(item, (str, os.PathLike)):
            path, weight = item, 1.0
        elif isinstance(item, Sequence) and len(item) == 2:
            path, weight = item
        else:
            raise ParameterError(f"adapters: expected (path, weight) or a path, got {item!r}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ParameterError(f"adapters: the weight of {os.fspath(path)!r} must be a finite number, got {weight!r}")
        out.append((os.fspath(path), float(weight)))
    return out


def _check_modules(adapters: Sequence[Adapter]) -> dict[str, list[int]]:
    """Module -> the adapters that have it (in order); the same module must mean the same layer in each."""
    where: dict[str, list[int]] = {}
    for i, ad in enumerate(adapters):
        for name in ad.modules:
            where.setdefault(name, []).append(i)
    for name, idx in where.items():
        first = adapters[idx[0]].modules[name]
        for j in idx[1:]:
            other = adapters[j].modules[name]
            if other.shape != first.shape or other.embedding != first.embedding:
                what = lambda m: f"{'embedding' if m.embedding else 'linear'} ΔW {list(m.shape)}"  # noqa: E731
                raise InputError(f"module {name}: {adapters[idx[0]].weights_file} has a {what(first)} but "
                                 f"{adapters[j].weights_file} a {what(other)} (adapters of different models?)")
    fan = {bool(a.config.get("fan_in_fan_out", False)) for a in adapters}
    if len(fan) > 1:
        raise InputError("the adapters disagree on fan_in_fan_out: "
                         + ", ".join(f"{a.path}: {a.config.get('fan_in_fan_out', False)}" for a in adapters))
    return where


def merge_adapters(
    out: str | os.PathLike[str],
    adapters: Sequence[tuple[str | os.PathLike[str], float] | str | os.PathLike[str]],
    *,
    combination: str = "svd",
    rank: int | None = None,
    density: float | None = None,
    majority_sign: str = "total",
    seed: int = 0,
    exact: bool = False,
    svd_clamp: float | None = None,
    dtype: str | None = None,
    base_model: str | None = None,
    threads: int | None = None,
    memory_limit: str | int | None = None,
    oversample: int = default("tsv_m", "oversample"),
    power_iters: int = default("tsv_m", "power_iters"),
    overwrite: bool = False,
    quiet: bool = True,
    on_progress: Progress | None = None,
) -> dict[str, Any]:
    """Merge PEFT LoRA adapters into one PEFT LoRA adapter written into ``out`` (see the module docstring).

    ``adapters``: ``(path, weight)`` pairs (a bare path: weight 1); a path is a directory or an id in the local
    Hugging Face cache. ``combination``: one of ``COMBINATIONS`` (PEFT's names; ``knots_*``: ``adapters.knots``,
    with its trim's cut and sign majority over all modules as in the paper's code: ``adapters.knots_global``).
    ``rank``: the SVD types' output rank (default: the largest input rank, as PEFT). ``density``: the fraction kept
    by the pruning types. ``majority_sign``: ``total`` or ``frequency``. ``seed``: DARE masks and randomized SVD
    sketches. ``exact``: exact SVD of the full-delta types (plain ``svd`` is always exact). ``svd_clamp``: the
    quantile clamp of the SVD types. ``dtype``: ``float32``/``bfloat16``/``float16`` (default: the adapters'
    dtype, float32 when they differ). ``base_model``: the output's ``base_model_name_or_path`` (default: the first
    adapter's). ``memory_limit``: the budget (bytes or a size such as "2GiB", at least 64 MiB; default
    ``_engine.default_memory_limit()``) of the one module merged at a time; a module that needs more
    (``adapters.memory``) is a ``ParameterError`` before anything is written; it never changes the output. The
    output is built beside ``out`` and renamed onto it when complete; an existing ``out`` is an
    ``OutputError`` unless ``overwrite``.

    Returns a summary: ``out``, ``combination`` (the one applied), ``r``, ``ranks`` per module, ``modules``,
    ``target_modules``, ``notes``, ``bytes_written``, ``seconds``.
    """
    start = time.perf_counter()
    pairs = _adapter_list(adapters)
    if combination not in COMBINATIONS:
        raise ParameterError(f"combination {combination!r} is not one of: {', '.join(COMBINATIONS)}")
    if rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank < 1):
        raise ParameterError(f"rank must be a positive integer, got {rank!r}")
    if majority_sign not in ("total", "frequency"):
        raise ParameterError(f"majority_sign must be 'total' or 'frequency', got {majority_sign!r}")
    if svd_clamp is not None and (isinstance(svd_clamp, bool) or not isinstance(svd_clamp, (int, float))
                                  or not 0 <= svd_clamp <= 1):
        raise ParameterError(f"svd_clamp must be a quantile in [0, 1], got {svd_clamp!r}")
    if dtype is not None and dtype not in MERGEABLE_DTYPES.values():
        raise ParameterError(f"dtype must be one of {', '.join(MERGEABLE_DTYPES.values())}, got {dtype!r}")
    seed = check_seed(seed)
    threads = check_threads(threads)
    limit = memory_limit_bytes(memory_limit)
    budget = _engine.default_memory_limit() if limit is None else limit
    budget_source = "the default: half of RAM or of the cgroup limit, at most 8 GiB" if limit is None else "asked"
    notes: list[str] = []
    kind = combination
    if len(pairs) == 1 and kind != "linear":
        # PEFT's add_weighted_adapter merges a single adapter with "linear" whatever the type asked
        notes.append(f"one adapter: combination {combination!r} is applied as 'linear' (PEFT's rule)")
        kind = "linear"
    base = kind.removeprefix("knots_").removesuffix("_svd")
    if base in _DENSITY_TYPES:
        combine.check_density(density, combination)
    elif density is not None:
        notes.append(f"density {density} is used by the pruning types only; {kind!r} prunes nothing")
    log: Callable[[str], None] = (lambda _: None) if quiet else (lambda m: print(f"ferromerge: {m}", file=sys.stderr))

    output = OutputDir(out, overwrite=overwrite)
    ads = [read_adapter(p) for p, _ in pairs]
    output.check_inputs([a.path for a in ads])
    weights = [w for _, w in pairs]
    where = _check_modules(ads)
    stored = {d for a in ads for m in a.modules.values() for d in (m.dtype_a, m.dtype_b)}
    st_dtype = ({v: k for k, v in MERGEABLE_DTYPES.items()}[dtype] if dtype is not None
                else (stored.pop() if len(stored) == 1 else "F32"))
    adapter_ranks = [a.max_rank for a in ads]
    if kind in STACK_TYPES and len(set(adapter_ranks)) != 1:
        raise ParameterError(f"combination {kind!r} needs adapters of one rank (PEFT's rule), got ranks "
                             + ", ".join(f"{a.path}: {r}" for a, r in zip(ads, adapter_ranks, strict=True))
                             + "; use 'cat' or an SVD type")
    if kind == "cat" or (kind in KNOTS_TYPES and rank is None):
        new_rank = sum(adapter_ranks)  # KnOTS, like cat, keeps every component unless a rank is asked for
    else:
        new_rank = adapter_ranks[0] if kind in STACK_TYPES else rank or max(adapter_ranks)
    if rank is not None and kind not in SVD_TYPES and not kind.startswith("knots_"):
        notes.append(f"rank {rank} is used by the SVD types only; {kind!r} gives rank {new_rank}")

    # plan every module's output rank (known before any math) so the file is written in one pass
    modules = sorted(where, key=natural_key)
    ranks: dict[str, int] = {}
    for name in modules:
        infos = [ads[i].modules[name] for i in where[name]]
        shape = infos[0].shape
        if kind == "cat":
            ranks[name] = sum(m.rank for m in infos)
        elif kind in STACK_TYPES:
            ranks[name] = infos[0].rank
        elif kind in SVD_TYPES:
            ranks[name] = svd_rank(kind, new_rank, [m.rank for m in infos], shape)
        else:
            ranks[name] = sum(m.rank for m in infos) if rank is None else min(rank, sum(m.rank for m in infos), *shape)
    planned = []
    for name in modules:
        info = ads[where[name][0]].modules[name]
        key_a, key_b = tensor_keys(name, info.embedding)
        planned.append(PlannedTensor.of(key_a, st_dtype, (ranks[name], info.shape[1])))
        planned.append(PlannedTensor.of(key_b, st_dtype, (info.shape[0], ranks[name])))
    base_layers = _base_layers(ads)
    for key, (_, dtype, full) in base_layers.items():
        planned.append(PlannedTensor.of(key, dtype, full))
    needs = {name: memory.module_bytes(kind, ads[where[name][0]].modules[name].shape,
                                       [ads[i].modules[name].rank for i in where[name]], ranks[name], exact=exact,
                                       oversample=oversample) for name in modules}
    memory.check_modules(needs, budget, kind, budget_source)
    spill = 0
    if kind.startswith("knots_"):  # the global statistics' passes spill every module's coefficients beside the output
        spill = sum(knots_global.spill_bytes(ads[where[n][0]].modules[n].shape,
                                             [ads[i].modules[n].rank for i in where[n]]) for n in modules)
    check_free_space(output.target, sum(p.nbytes for p in planned) + spill)
    for note in notes:
        log(f"note: {note}")
    svd_args = dict(oversample=oversample, power_iters=power_iters)

    def load(name: str) -> tuple[list[Factors], list[int]]:
        return [ads[i].factors(name) for i in where[name]], where[name]

    def merged_modules(tmp: Path) -> Iterator[tuple[str, Factors]]:
        if kind.startswith("knots_"):
            # KnOTS' statistics (the trim's cut, the zero-sign majority) are over all modules, as the paper's
            yield from knots_global.merge_modules(
                modules, load, weights, merge=kind.removeprefix("knots_"), density=1.0 if density is None else density,
                majority_sign=majority_sign, seed=seed, ranks=None if rank is None else ranks, scratch=tmp / SCRATCH)
            return
        for name in modules:
            facs, idx = load(name)
            try:
                merged = merge_module(kind, facs, [weights[i] for i in idx], rank=new_rank, density=density,
                                      majority_sign=majority_sign, seed=seed, name=name, exact=exact,
                                      svd_clamp=svd_clamp, threads=threads, svd_args=svd_args)
            except MergeError as e:
                raise type(e)(f"module {name}: {e}") from None
            del facs
            yield name, merged

    with output.building(log) as tmp:
        writer = SafetensorsWriter(tmp / ADAPTER_WEIGHTS, planned=planned, metadata={"format": "pt"})
        try:
            for done, (name, merged) in enumerate(merged_modules(tmp)):
                merged = _truncate(merged, ranks[name], name, threads)
                info = ads[where[name][0]].modules[name]
                key_a, key_b = tensor_keys(name, info.embedding)
                a, b = merged.a * np.float32(merged.scale), merged.b
                writer.add(key_a, st_dtype, a.shape, from_f32(a, st_dtype))
                writer.add(key_b, st_dtype, b.shape, from_f32(b, st_dtype))
                if on_progress is not None:
                    on_progress(done + 1, len(modules))
            for key, (i, dtype, full) in base_layers.items():
                start, end = ads[i].raw_span(key)
                writer.begin(key, dtype, full)
                for block in _blocks(ads[i].weights_file, start, end, _block_size(budget)):
                    writer.write(block)
            bytes_written = writer.close()
        except BaseException:
            writer.abort()
            raise
        config = merged_config(ads, ranks, new_rank, base_model)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return {
        "out": str(output.target),
        "combination": kind,
        "r": new_rank,
        "ranks": ranks,
        "modules": len(modules),
        "target_modules": config["target_modules"],
        "dtype": st_dtype,
        "notes": notes,
        "bytes_written": bytes_written,
        "seconds": time.perf_counter() - start,
    }


def _block_size(budget: int) -> int:
    """Bytes per block of a base-layer copy: 64 MiB, or an eighth of a smaller budget."""
    return max(1 << 20, min(64 << 20, budget // 8))


def _blocks(file: Path, start: int, end: int, size: int = 64 << 20) -> Iterator[bytes]:
    """Bytes ``start:end`` of ``file`` in blocks of at most ``size``."""
    with open(file, "rb") as f:
        f.seek(start)
        while start < end:
            block = f.read(min(size, end - start))
            if not block:
                raise InputError(f"{file}: truncated (shorter than its header says)")
            start += len(block)
            yield block


def _base_layers(ads: Sequence[Adapter]) -> dict[str, tuple[int, str, tuple[int, ...]]]:
    """Base-layer copies to carry over: key -> (the first adapter holding it, dtype, shape); every adapter that
    holds one must hold the same tensor (they are copies of the one base model's)."""
    out: dict[str, tuple[int, str, tuple[int, ...]]] = {}
    for j, ad in enumerate(ads):
        for key, (dtype, shape) in ad.base_layers.items():
            if key not in out:
                out[key] = (j, dtype, shape)
                continue
            i, d0, s0 = out[key]
            first = ads[i]
            same = (d0, s0) == (dtype, shape) and all(
                x == y for x, y in zip(_blocks(first.weights_file, *first.raw_span(key)),
                                       _blocks(ad.weights_file, *ad.raw_span(key)), strict=True))
            if not same:
                raise InputError(f"{ad.weights_file}: tensor {key} differs from {first.weights_file}'s (the "
                                 "adapters' base layers must be the same model's)")
    return out


def _truncate(f: Factors, rank: int, name: str, threads: int | None) -> Factors:
    """``f`` at exactly ``rank`` (KnOTS returns Σ r_i): the exact SVD through the factors when it has more."""
    if f.rank == rank and f.scale == 1.0:
        return f
    u, s, vt = _low_rank_svd([f], [1.0], min(rank, f.rank, *f.shape), threads)
    a, b = _padded(u, s, vt, rank, f.shape)
    return Factors(a, b)
