"""NumPy restatement of PEFT 0.21's ``add_weighted_adapter`` for one module, in float64 (read from
``peft/tuners/lora/model.py`` and ``peft/utils/merge_utils.py``), for the adapter tests.

``factors``: [(A_i [r, in], B_i [out, r], scale_i)] of the adapters that have the module; ``weights``: theirs.
The magnitude trim keeps the ``int(density·numel)`` largest |x| (the tests use values without ties at the cut).
DARE is random and is not restated (its structure is checked instead).
"""

from __future__ import annotations

import math

import numpy as np


def trim(x: np.ndarray, density: float) -> np.ndarray:
    if density >= 1:
        return x
    k = int(density * x.size)
    out = np.zeros_like(x)
    if k == 0:
        return out
    idx = np.argsort(-np.abs(x).ravel(), kind="stable")[:k]
    out.ravel()[idx] = x.ravel()[idx]
    return out


def ties(xs, ws, density, sign="total"):
    p = np.stack([trim(np.asarray(x, np.float64), density) for x in xs])
    score = p.sum(0) if sign == "total" else np.sign(p).sum(0)
    agree = np.sign(p) == np.where(score >= 0, 1.0, -1.0)
    w = np.asarray(ws, np.float64).reshape((-1,) + (1,) * (p.ndim - 1))
    return (p * w * agree).sum(0) / np.maximum(agree.sum(0), 1)


def magnitude_prune(xs, ws, density):
    return sum(w * trim(np.asarray(x, np.float64), density) for x, w in zip(xs, ws))


def linear(xs, ws):
    return sum(w * np.asarray(x, np.float64) for x, w in zip(xs, ws))


def stacks(kind, factors, weights, density=None, sign="total"):
    """(A, B) of the A/B-stack types: weights √|w·s|·sign on A, √|w·s| on B."""
    wa, wb = [], []
    for (_, _, s), w in zip(factors, weights):
        ws = w * s
        wa.append(math.sqrt(abs(ws)) * (1 if ws >= 0 else -1))
        wb.append(math.sqrt(abs(ws)))
    fn = {"linear": lambda xs, w: linear(xs, w), "ties": lambda xs, w: ties(xs, w, density, sign),
          "magnitude_prune": lambda xs, w: magnitude_prune(xs, w, density)}[kind]
    return fn([f[0] for f in factors], wa), fn([f[1] for f in factors], wb)


def cat(factors, weights):
    a = np.concatenate([np.asarray(f[0], np.float64) * w * f[2] for f, w in zip(factors, weights)])
    b = np.concatenate([np.asarray(f[1], np.float64) for f in factors], axis=1)
    return a, b


def full_delta(kind, factors, weights, density=None, sign="total"):
    """The merged ΔW of an SVD type before the SVD."""
    deltas = [f[2] * np.asarray(f[1], np.float64) @ np.asarray(f[0], np.float64) for f in factors]
    base = kind.removesuffix("_svd")
    if base == "svd":
        return linear(deltas, weights)
    if base == "ties":
        return ties(deltas, weights, density, sign)
    if base == "magnitude_prune":
        return magnitude_prune(deltas, weights, density)
    raise ValueError(kind)


def svd_factors(delta, rank, clamp=None):
    """PEFT's refactorisation: B = U·S, A = Vᵀ at ``rank``, then the quantile clamp."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    b, a = u[:, :rank] * s[:rank], vt[:rank]
    if clamp is not None:
        hi = np.quantile(np.concatenate([b.ravel(), a.ravel()]), clamp)
        a, b = np.clip(a, -hi, hi), np.clip(b, -hi, hi)
    return a, b
