"""How a reference result is compared with the engine's output: ``Ref`` carries the expected values, an elementwise
error scale and the elements too close to call (excluded), and ``assert_matches`` allows ``rtol·scale + atol`` plus
one unit in the last place of a 16-bit output dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reference import codec


@dataclass
class Ref:
    out: np.ndarray  # float64 expected values
    scale: np.ndarray  # float64 elementwise error scale (>= 0)
    ambiguous: np.ndarray  # bool: sign election too close to call in float32

    def tolerance(self, out_dtype: str, rtol: float = 1e-5, atol: float = 1e-7) -> np.ndarray:
        """Allowed |got − expected|: f32 math error (rtol·scale + atol) plus one unit of the output dtype."""
        t = rtol * self.scale + atol
        if out_dtype != "float32":
            t = t + codec.ulp(np.abs(self.out) + t, out_dtype)
        return t


def assert_matches(got_values: np.ndarray, ref: Ref, out_dtype: str, *, rtol: float = 1e-5, atol: float = 1e-7,
                   context: str = "") -> None:
    """Compare decoded engine output (any float array) with a reference, skipping ambiguous elements."""
    got = np.asarray(got_values, dtype=np.float64).reshape(-1)
    exp = ref.out.reshape(-1)
    tol = ref.tolerance(out_dtype, rtol, atol).reshape(-1)
    ok = ~ref.ambiguous.reshape(-1)
    diff = np.abs(got - exp)
    bad = ok & ~(diff <= tol)
    if bad.any():
        i = np.flatnonzero(bad)[:8]
        raise AssertionError(
            f"{context}: {bad.sum()} of {got.size} elements out of tolerance ({out_dtype}); "
            f"idx={i.tolist()} got={got[i].tolist()} expected={exp[i].tolist()} tol={tol[i].tolist()}"
        )
