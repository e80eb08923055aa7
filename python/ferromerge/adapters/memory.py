"""The memory budget of an adapter merge: what merging one module needs (``module_bytes``), checked against the budget
before anything is written (``check_modules``).

An adapter merge holds one module at a time (``merge.merge_adapters``): its factors, the merge's temporaries and its
result, then writes it and lets it go; what it keeps besides is small (the plan, KnOTS' per-adapter histograms).
So the budget bounds the largest module's working set, and a module that cannot fit is refused up front with a
``ParameterError`` that names it, what it needs and what would fit. The figures are upper bounds of the temporaries
each path allocates (float32 = 4 bytes, float64 = 8), checked by ``tests/adapters/test_memory.py`` under a real
cgroup limit; the interpreter and the loaded libraries (about 150 MB) are outside the budget, as for ``run``.

Per module of ΔW shape (m, n), Σr the inputs' ranks, k the output rank, T the adapters holding it:

* ``cat``, the stack types, ``svd`` and KnOTS work on the factors only: a few copies of the (m + n)·Σr factors
  (float64 for ``svd``'s bases and KnOTS' shared basis) and KnOTS' T coefficient blocks (k × n each).
* The full-delta types (``ties_svd``, ``dare_*_svd``, ``magnitude_prune_svd``) build the m × n deltas: ``ties`` and
  ``dare_ties`` prune each as it is built (T pruned + one unpruned + the merge's output), the others hold the T
  deltas and the output; then the SVD: the merged ΔW plus the randomized solver's copy and sketches, or the exact
  solver's float64 copy, its U and V and its workspace.
"""

from __future__ import annotations

from collections.abc import Sequence

from .._validate import format_bytes
from ..errors import ParameterError

__all__ = ["check_modules", "module_bytes"]

_F32, _F64 = 4, 8
#: what every module adds beyond its arrays: reading and decoding the stored factors, encoding and writing the
#: result, and the allocator's slack (freed blocks of one size that the next allocations cannot all reuse: measured
#: up to a fifth over the live arrays)
_FIXED, _SLACK = 16 << 20, 1.25


def _svd_bytes(m: int, n: int, k: int, exact: bool, oversample: int) -> int:
    """The engine's SVD of an m × n float32 matrix beyond the matrix itself (measured: randomized ≈ 1.3 matrices
    plus the sketches; exact ≈ a float64 copy, U and V of min(m, n) columns and O(p²) workspace)."""
    p = min(m, n)
    if exact:
        return _F64 * (m * n + 2 * (m + n) * p + 12 * p * p)
    width = min(p, k + oversample)
    return 2 * _F32 * m * n + 6 * _F32 * (m + n) * width


def module_bytes(kind: str, shape: tuple[int, int], ranks: Sequence[int], out_rank: int, *, exact: bool = False,
                 oversample: int = 10) -> int:
    """An upper bound of the bytes merging one module by ``kind`` (a ``merge.COMBINATIONS`` name) holds at once:
    ΔW shape ``shape`` (m, n), the inputs' ``ranks``, ``out_rank`` the output's."""
    return _FIXED + int(_SLACK * _arrays(kind, shape, ranks, out_rank, exact, oversample))


def _arrays(kind: str, shape: tuple[int, int], ranks: Sequence[int], out_rank: int, exact: bool,
            oversample: int) -> int:
    """The bytes of the arrays ``module_bytes`` counts."""
    m, n = shape
    t, total = len(ranks), sum(ranks)
    factors = _F32 * (m + n) * total  # the inputs' factors, decoded to float32
    out = _F32 * (m + n) * max(out_rank, 1)
    if kind == "cat":
        return 2 * factors + out
    if kind.startswith("knots_"):
        # float64 stacked B and its basis, float64 copies of each A, T coefficient blocks in float32 and the
        # election's float64 stack of them (and its temporaries)
        return 3 * factors + 3 * _F64 * m * total + 2 * _F64 * n * total + 4 * _F64 * t * total * n + out
    if kind == "svd":
        return 2 * factors + 4 * _F64 * (m + n) * total + out
    if not kind.endswith("_svd"):  # the stack types: one stack (A or B) and the kernel's inputs, base and output
        return 2 * factors + _F32 * max(m, n) * max(ranks) * (t + 2) + out
    delta = _F32 * m * n
    merging = (t + 2) * delta if kind in ("ties_svd", "dare_ties_svd") else (t + 1) * delta
    return factors + out + max(merging, delta + _svd_bytes(m, n, out_rank, exact, oversample))


def check_modules(needs: dict[str, int], budget: int, kind: str, source: str) -> None:
    """Refuse (``ParameterError``) when a module needs more than ``budget`` bytes; ``needs``: module -> bytes
    (``module_bytes``), ``source`` says where the budget came from (the option, or the default)."""
    if not needs:
        return
    name = max(needs, key=lambda k: needs[k])
    if needs[name] <= budget:
        return
    hint = ("; the full-delta types build the out × in deltas: svd, cat and the knots_* types merge the factors "
            "alone" if kind.endswith("_svd") and kind != "svd" else "")
    raise ParameterError(
        f"module {name}: combination {kind!r} needs about {format_bytes(needs[name])} to merge this one module, "
        f"more than the memory limit of {format_bytes(budget)} ({source}); raise it with --memory-limit / "
        f"memory_limit= (an adapter merge holds one module at a time){hint}"
    )
