"""KnOTS over every module of the adapters with the reference's global statistics, one module in memory at a time
(``merge_modules``, what ``merge_adapters`` runs for the ``knots_*`` types).

The reference flattens all of a task's layers into one vector before masking, so the trim's cut (the k-th smallest
|coefficient| of the task over *all* its modules) and the majority that resolves zero sums in the "total" election
(the sign of the sum of all elected signs) are global. Here, in passes over the modules:

1. each module's shared basis and coefficients (``knots.shared_basis``; after DARE for the ``dare_*`` merges) are
   computed once and spilled to a scratch file beside the output (``Spill``); each adapter's ``knots.Cut`` counts
   its coefficients' high magnitude bits (or, without a trim, the elected signs are tallied right away);
2. with a trim: the cuts' bins located, each module's coefficients read back to refine them to the exact cut;
   then, for the "total" election, read back once more to tally the elected signs after the trim;
3. each module read back, merged with the global cuts and majority (``knots.combine``), and handed on to be written.

Merges without global statistics (``linear``, ``dare_linear``, and ``frequency`` elections without a trim) take one
pass and no scratch file. Memory: one module's factors, basis and coefficients, plus per adapter two histograms
(256 KiB and 512 KiB); the scratch file holds every module's basis and coefficients (``spill_bytes``). An adapter
that lacks a module has no coefficients there: its vector is the concatenation over the modules it has, and the
module's election runs over the adapters that have it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import BinaryIO

import numpy as np
import numpy.typing as npt

from . import knots
from .factors import Factors

__all__ = ["Spill", "merge_modules", "spill_bytes"]

_F32 = npt.NDArray[np.float32]
#: module name -> (its factors, the positions of the adapters that have it)
Load = Callable[[str], tuple[list[Factors], list[int]]]


class Spill:
    """float32 arrays written once per module to a scratch file, read back by module (the file is removed on
    ``close``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: BinaryIO = open(path, "w+b")  # noqa: SIM115 (closed by close())
        self._index: dict[str, list[tuple[int, tuple[int, ...]]]] = {}

    def put(self, name: str, arrays: Sequence[_F32]) -> None:
        entries = []
        for a in arrays:
            a = np.ascontiguousarray(a, dtype=np.float32)
            entries.append((self._file.tell(), a.shape))
            a.tofile(self._file)
        self._index[name] = entries

    def get(self, name: str) -> list[_F32]:
        self._file.flush()
        return [np.fromfile(self.path, dtype=np.float32, count=int(np.prod(shape)), offset=offset).reshape(shape)
                for offset, shape in self._index[name]]

    def close(self) -> None:
        self._file.close()
        self.path.unlink(missing_ok=True)


def spill_bytes(shape: tuple[int, int], ranks: Sequence[int]) -> int:
    """An upper bound of the scratch bytes of one module: its basis (out × k) and T coefficient blocks (k × in),
    k at most Σ r."""
    k = min(sum(ranks), shape[0], len(ranks) * shape[1])
    return 4 * k * (shape[0] + len(ranks) * shape[1])


def merge_modules(
    modules: Sequence[str],
    load: Load,
    weights: Sequence[float],
    *,
    merge: str,
    density: float,
    majority_sign: str,
    seed: int,
    ranks: dict[str, int] | None,
    scratch: Path,
) -> Iterator[tuple[str, Factors]]:
    """Each module's merged factors, in ``modules`` order, with the reference's global statistics over all of
    them. ``load(name)``: the module's factors and their adapters' positions in ``weights``. ``ranks``: the output
    rank of each module (its best approximation of that rank), or None for Σ r (as ``knots.knots_merge``).
    ``scratch``: the spill file's path (removed when done)."""
    trim = knots.needs_trim(merge, density)
    majority = knots.needs_majority(merge, majority_sign)

    def finish(name: str, u: _F32, merged: _F32, total: int) -> Factors:
        return knots.finish(u, merged, total, None if ranks is None else ranks[name])

    def prepared(name: str) -> tuple[_F32, list[_F32], list[int], int]:
        facs, idx = load(name)
        knots.check(facs, [weights[i] for i in idx], merge, density, majority_sign, name)
        u, coeffs = knots.shared_basis(facs)
        return u, knots.prepare(coeffs, merge, density, seed, name), idx, sum(f.rank for f in facs)

    if not trim and not majority:  # nothing global: one pass
        for name in modules:
            u, xs, idx, total = prepared(name)
            yield name, finish(name, u, knots.combine(xs, [weights[i] for i in idx], merge, None, majority_sign, 0),
                               total)
        return

    spill = Spill(scratch)
    try:
        cuts = [knots.Cut(density) for _ in weights] if trim else None
        where: dict[str, tuple[list[int], int]] = {}
        balance = 0
        for name in modules:  # pass 1: bases and coefficients, spilled; high histograms or the sign tally
            u, xs, idx, total = prepared(name)
            where[name] = (idx, total)
            if cuts is not None:
                for i, x in zip(idx, xs, strict=True):
                    cuts[i].count(x)
            else:
                balance += knots.sign_balance(xs, None)
            spill.put(name, [u, *xs])
            del u, xs
        if cuts is not None:
            for cut in cuts:
                cut.locate()
            for name in modules:  # pass 2: the exact cuts
                idx, _ = where[name]
                for i, x in zip(idx, spill.get(name)[1:], strict=True):
                    cuts[i].refine(x)
            for cut in cuts:
                cut.finish()
            if majority:
                for name in modules:  # pass 3: the elected signs after the trim
                    idx, _ = where[name]
                    balance += knots.sign_balance(spill.get(name)[1:], [cuts[i] for i in idx])
        zero = int(np.sign(balance))
        for name in modules:  # last pass: merge and hand on
            idx, total = where[name]
            u, *xs = spill.get(name)
            merged = knots.combine(xs, [weights[i] for i in idx], merge,
                                   None if cuts is None else [cuts[i] for i in idx], majority_sign, zero)
            yield name, finish(name, u, merged, total)
    finally:
        spill.close()
