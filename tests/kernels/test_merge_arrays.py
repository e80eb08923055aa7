"""The contract every method kernel shares in ``_core.merge_arrays``: inputs equal to the base give the base, bad
method parameters are ``ParameterError``s, and the ``shape`` argument (element count, default one row).
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers.kernels import make_data, merge, store, values
from reference import arcee_fusion as arcee_fusion_ref
from reference import codec
from reference.result import assert_matches

_engine = pytest.importorskip("ferromerge._engine")
from ferromerge import errors  # noqa: E402


BASE_METHODS = {
    # method: (n inputs, params, extra kwargs)
    "slerp": (1, {"t": 0.3}, {}),
    "nearswap": (1, {"t": 0.01}, {}),
    "arcee_fusion": (1, None, {}),
    "nuslerp": (2, None, {}),
    "model_stock": (2, None, {}),
    "sce": (3, {"select_topk": 0.5}, {}),
    "ram": (3, None, {}),
    "ramplus_tl": (3, None, {}),
    "breadcrumbs": (3, None, {"densities": [0.5] * 3, "gammas": [0.1] * 3}),
    "breadcrumbs_ties": (3, None, {"densities": [0.5] * 3, "gammas": [0.1] * 3, "normalize": True}),
    "della": (3, None, {"densities": [0.5] * 3, "normalize": True}),
    "della_linear": (3, None, {"densities": [0.5] * 3, "rescale": "inverse_density"}),
    "multislerp": (2, None, {}),
}


@pytest.mark.parametrize("method", sorted(BASE_METHODS))
@pytest.mark.parametrize("dtype", codec.DTYPES)
def test_inputs_equal_to_base_give_the_base(method, dtype):
    """Zero task vectors: nothing to merge, the base comes back (within one rounding for the interpolations)."""
    k, params, kw = BASE_METHODS[method]
    b, _ = make_data(20, (9, 23), 0, "near")
    bs = store(b, dtype)
    out = merge(method, [bs.copy() for _ in range(k)], bs, shape=b.shape, params=params, out_dtype=dtype, **kw)
    if method in ("slerp", "nuslerp"):  # (1 − t)·b + t·b in float32
        np.testing.assert_allclose(codec.decode(out, dtype), values(bs, dtype).reshape(-1), rtol=1e-6, atol=0)
    else:
        np.testing.assert_array_equal(out, bs.reshape(-1))


@pytest.mark.parametrize(
    "method,n_inputs,base,params,kw",
    [
        ("slerp", 1, True, None, {}),                      # t is required
        ("slerp", 1, True, {"t": 0.5, "tt": 1.0}, {}),     # unknown key
        ("slerp", 2, True, {"t": 0.5}, {}),                # exactly one other input
        ("slerp", 1, False, {"t": 0.5}, {}),               # base required
        ("nearswap", 1, True, None, {}),
        ("nearswap", 2, True, {"t": 0.5}, {}),
        ("arcee_fusion", 2, True, None, {}),
        ("nuslerp", 3, True, None, {}),
        ("nuslerp", 1, False, None, {}),
        ("model_stock", 1, True, None, {}),
        ("karcher", 2, True, None, {}),                    # base forbidden (it joins as an input)
        ("karcher", 2, False, {"t": 0.5}, {}),
        ("sce", 2, False, None, {}),
        ("ram", 2, True, {"r": 0.1}, {}),                  # r belongs to ramplus_tl
        ("breadcrumbs", 2, True, {"epsilon": 0.1}, {}),
        ("della", 1, True, {"per_row": 1.0}, {}),
    ],
)
def test_bad_method_parameters_are_parameter_errors(method, n_inputs, base, params, kw):
    b, xs = make_data(21, (4, 5), n_inputs, "near")
    with pytest.raises(errors.ParameterError):
        merge(method, xs, b if base else None, shape=b.shape, params=params, **kw)


def test_shape_must_match_the_element_count():
    b, (x,) = make_data(22, (4, 5), 1, "near")
    with pytest.raises((ValueError, errors.MergeError)):
        merge("arcee_fusion", [x], b, shape=[3, 5])


def test_default_shape_is_one_row():
    """shape=None means [numel]: a row-wise method sees the whole tensor as one row."""
    b, (x,) = make_data(23, (6, 7), 1, "near", 0.2)
    flat = merge("arcee_fusion", [x], b, shape=[42])
    assert merge("arcee_fusion", [x], b, shape=None).tobytes() == flat.tobytes()
    assert_matches(flat, arcee_fusion_ref.arcee_fusion(b, x, (42,))[0], "float32", context="arcee_fusion one row")
