"""Property tests of ``kernels/disjoint.rs`` (``_core.disjoint_mean``, PEFT's TIES election and disjoint mean) against
``reference.peft_ties``: bit-identical output for every thread count, at sizes around the kernel's 16384-element
chunks, for values of each storage dtype (float16 / bfloat16 values widened to float32, as adapters hold them),
with exact zero scores and zeros made common by small-integer inputs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import codec
from reference import peft_ties as ref

from ferromerge import _engine
from ferromerge.errors import ParameterError

SETTINGS = dict(deadline=None, max_examples=60)
CHUNK = 1 << 14


@settings(**SETTINGS)
@given(
    n=st.one_of(st.integers(0, 40), st.sampled_from([CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 5])),
    models=st.integers(1, 5),
    dtype=st.sampled_from(codec.DTYPES),
    values=st.sampled_from(["normal", "small_integers"]),
    weights=st.lists(st.one_of(st.floats(-3, 3), st.sampled_from([0.0, 1.0, -1.0, 0.1])), min_size=5, max_size=5),
    majority_sign=st.sampled_from(["total", "frequency"]),
    seed=st.integers(0, 2**32 - 1),
)
def test_disjoint_mean_matches_the_reference_bit_for_bit(n, models, dtype, values, weights, majority_sign, seed):
    rng = np.random.default_rng(seed)
    xs = []
    for _ in range(models):
        x = (rng.standard_normal(n) if values == "normal" else rng.integers(-2, 3, n) * 0.5).astype(np.float32)
        x[rng.random(n) < 0.3] = 0.0  # pruned entries
        xs.append(codec.decode(codec.encode(x, dtype), dtype) if dtype != "float32" else x)
    ws = weights[:models]
    want = ref.disjoint_mean(xs, ws, majority_sign)
    for threads in (1, 2, 3):
        got = _engine.disjoint_mean(xs, ws, majority_sign, threads=threads)
        assert got.dtype == np.float32 and got.shape == (n,)
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32)), (threads, majority_sign)


def test_disjoint_mean_is_peft_s_rule():
    """The sign from the unweighted sum (here +: 1 + 1 - 1.5), the weighted agreeing values over their count."""
    xs = [np.float32([1.0, 0.0]), np.float32([1.0, -2.0]), np.float32([-1.5, 0.0])]
    got = _engine.disjoint_mean(xs, [0.5, 2.0, 10.0], "total")
    assert got.tolist() == [(0.5 + 2.0) / 2, -4.0]
    # frequency: two + against one -, and a zero never agrees
    got = _engine.disjoint_mean(xs, [0.5, 2.0, 10.0], "frequency")
    assert got.tolist() == [(0.5 + 2.0) / 2, -4.0]


def test_bad_arguments_are_refused():
    x = np.zeros(4, np.float32)
    with pytest.raises(ParameterError, match="majority_sign"):
        _engine.disjoint_mean([x], [1.0], "sum")
    with pytest.raises(ParameterError, match="one weight per input"):
        _engine.disjoint_mean([x, x], [1.0], "total")
    with pytest.raises(ParameterError, match="inputs\\[1\\] has 3 elements"):
        _engine.disjoint_mean([x, x[:3].copy()], [1.0, 1.0], "total")
    with pytest.raises(ParameterError, match="C-contiguous"):
        _engine.disjoint_mean([np.zeros(8, np.float32)[::2]], [1.0], "total")
