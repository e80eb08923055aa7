"""NaN and infinity in the inputs of an in-memory merge (CONTRACTS R2, docs/compat.md "Non-finite values").

Refused by default with an ``InputError`` naming the input and counting its values; with ``allow_nonfinite=True``
they flow through every method's arithmetic (never replaced by a finite value), with the same bytes at any thread
count and chunk size. The spectral methods refuse them either way (an SVD of NaN has no meaning).
"""

from __future__ import annotations

import numpy as np
import pytest

_engine = pytest.importorskip("ferromerge._engine")
from ferromerge.errors import InputError, ParameterError  # noqa: E402

ROWS, COLS = 8, 64
N = ROWS * COLS
AT = 77  # the poisoned element (row 1)

#: method -> (extra method params, number of non-base inputs)
METHODS: dict[str, tuple[dict[str, float], int]] = {
    "linear": ({}, 3),
    "task_arithmetic": ({}, 3),
    "ties": ({}, 3),
    "dare_ties": ({}, 3),
    "dare_linear": ({}, 3),
    "breadcrumbs": ({}, 3),
    "breadcrumbs_ties": ({}, 3),
    "della": ({}, 3),
    "della_linear": ({}, 3),
    "slerp": ({"t": 0.3}, 1),
    "nuslerp": ({}, 2),
    "multislerp": ({}, 3),
    "karcher": ({}, 3),
    "model_stock": ({}, 3),
    "sce": ({}, 3),
    "ram": ({}, 3),
    "ramplus_tl": ({}, 3),
    "nearswap": ({"t": 0.5}, 1),
    "arcee_fusion": ({}, 1),
    "consensus": ({}, 3),
    "tall_masks": ({"task": 0}, 3),
}

#: methods whose result at an element depends only on the inputs at that element (and whole-tensor selections,
#: which only mask): a NaN there makes that element NaN and no other.
ELEMENTWISE = {"linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
               "della", "della_linear", "consensus", "tall_masks", "ram", "ramplus_tl"}

#: methods whose arithmetic cannot run on a NaN at all: a ParameterError naming the tensor even when allowed.
REFUSE = {"multislerp"}


def _rows() -> dict[str, dict]:
    return {m["name"]: m for m in _engine.methods()}


def _data(n_inputs: int, bad: float, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(seed)
    base = rng.normal(0, 1, N).astype(np.float32)
    inputs = [(base + rng.normal(0, 0.1, N)).astype(np.float32) for _ in range(n_inputs)]
    inputs[-1][AT] = bad
    return base, inputs


def _merge(method: str, bad: float, *, allow: bool, threads: int = 2, chunk: int | None = None) -> np.ndarray:
    params, k = METHODS[method]
    base, inputs = _data(k, bad)
    row = _rows()[method]
    if row["base"] == "joins":
        base_arg = None
    else:
        base_arg = base
    density = {} if row["sparsify"] is None else {"density": 0.5}
    values = [{"weight": 1.0 / k, **density} for _ in inputs]
    return np.asarray(_engine.merge_arrays(
        {"name": method, "params": params}, inputs, base_arg, values, out_dtype="float32", name="w",
        shape=[ROWS, COLS], threads=threads, chunk_elems=chunk, allow_nonfinite=allow,
    ))


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_refused_by_default_naming_the_input_and_counts(method, bad):
    k = METHODS[method][1]
    with pytest.raises(InputError) as e:
        _merge(method, bad, allow=False)
    msg = str(e.value)
    counts = "1 NaN and 0 infinite values" if np.isnan(bad) else "0 NaN and 1 infinite values"
    assert f"inputs[{k - 1}]" in msg and "'w'" in msg and counts in msg, msg
    assert "allow_nonfinite=True" in msg and "--allow-nonfinite" in msg, msg


@pytest.mark.parametrize("method", sorted(METHODS))
def test_allowed_nan_flows_through_never_replaced(method):
    if method in REFUSE:
        with pytest.raises(ParameterError, match="'w'"):
            _merge(method, np.nan, allow=True)
        return
    out = _merge(method, np.nan, allow=True)
    assert np.isnan(out[AT]), f"{method}: the NaN became {out[AT]}"
    if method in ELEMENTWISE:
        assert np.isnan(out).sum() == 1, f"{method}: {np.isnan(out).sum()} NaN"
    # The others compute norms, dot products, weights or thresholds over a row or the whole tensor: the NaN makes
    # more of it NaN (docs/compat.md); what matters here is that it is never replaced by a finite value.


@pytest.mark.parametrize("method", sorted(METHODS))
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_allowed_nonfinite_bytes_do_not_depend_on_threads_or_chunks(method, bad):
    if method in REFUSE:
        return
    outs = [_merge(method, bad, allow=True, threads=t, chunk=c).tobytes() for t, c in [(1, 1024), (2, 100), (2, None)]]
    assert outs[0] == outs[1] == outs[2], method


def test_ties_keeps_a_nan_where_mergekit_does_instead_of_the_base_value():
    # Before CONTRACTS R2 the sign election skipped the NaN delta and wrote the base's value there.
    base, inputs = _data(3, np.nan)
    out = _merge("ties", np.nan, allow=True)
    assert np.isnan(out[AT]) and out[AT] != base[AT]


@pytest.mark.parametrize("method", ["tsv_m", "iso_c", "iso_cts", "star"])
def test_spectral_methods_refuse_nonfinite_even_when_allowed(method):
    base, inputs = _data(2, np.nan)
    values = [{"weight": 0.5}, {"weight": 0.5}]
    with pytest.raises((ParameterError, InputError)) as e:
        _engine.merge_arrays({"name": method}, inputs, base, values, out_dtype="float32", name="w",
                             shape=[ROWS, COLS], allow_nonfinite=True)
    assert "finite" in str(e.value) or "NaN" in str(e.value)


def test_16_bit_inputs_are_checked_too():
    base, inputs = _data(2, np.inf)
    enc = [_engine.encode(x, "bfloat16") for x in inputs]
    with pytest.raises(InputError, match="0 NaN and 1 infinite"):
        _engine.merge_arrays({"name": "linear"}, enc, None, [{"weight": 0.5}] * 2, out_dtype="bfloat16", name="w")
    half = [x.astype(np.float16) for x in inputs]
    with pytest.raises(InputError, match="0 NaN and 1 infinite"):
        _engine.merge_arrays({"name": "linear"}, half, None, [{"weight": 0.5}] * 2, out_dtype="float16", name="w")
