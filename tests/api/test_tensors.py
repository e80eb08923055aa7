"""The public in-memory API: ``ferromerge.tensors.merge_tensors`` / ``merge_state_dicts``."""

from __future__ import annotations

import numpy as np
import pytest
from helpers.kernels import kernel_merge

from reference import codec
from reference import task_arithmetic as task_arithmetic_ref
from reference.result import assert_matches

_engine = pytest.importorskip("ferromerge._engine")
from ferromerge import errors  # noqa: E402
from ferromerge.tensors import merge_state_dicts, merge_tensors  # noqa: E402

ParameterError = errors.ParameterError
InputError = errors.InputError


def family(shape=(6, 5), n=2, seed=0, scale=0.1):
    rng = np.random.default_rng(seed)
    base = rng.normal(size=shape).astype(np.float32)
    return base, [(base + rng.normal(0, scale, shape)).astype(np.float32) for _ in range(n)]


# ----------------------------------------------------------------------------------------------------------------
# merge_tensors
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 4), (2, 3, 5), (1, 1, 1)])
def test_shape_round_trip_and_mergekit_call_shape(shape):
    base, (a, b) = family(shape)
    out = merge_tensors([a, b, base], "ties", parameters={"weight": [0.5, 0.5], "density": 0.5}, base_index=2)
    assert isinstance(out, np.ndarray) and out.shape == shape and out.dtype == np.float32
    expected = task_arithmetic_ref.ties(base, [a, b], [0.5, 0.5], [0.5, 0.5], normalize=True)
    assert_matches(out, expected, "float32")


def test_matches_core_and_default_parameters():
    base, xs = family((40,), 3, seed=1)
    out = merge_tensors([base, *xs], "task_arithmetic", {"weight": 0.3}, base_index=0)
    core = kernel_merge("task_arithmetic", xs, base, [0.3] * 3, [1.0] * 3, out_dtype="float32", normalize=False)
    np.testing.assert_array_equal(out, core)
    # ties defaults: normalize true, density 1, lambda 1
    out = merge_tensors([*xs, base], "ties", {"weight": [1.0, 0.5, 0.25]}, base_index=3)
    core = kernel_merge("ties", xs, base, [1.0, 0.5, 0.25], [1.0] * 3, out_dtype="float32", normalize=True)
    np.testing.assert_array_equal(out, core)
    # dare_ties defaults: rescale true (l1), normalize false
    out = merge_tensors([*xs, base], "dare_ties", {"weight": 1.0, "density": 0.5}, base_index=3, seed=4, name="x")
    core = kernel_merge("dare_ties", xs, base, [1.0] * 3, [0.5] * 3, out_dtype="float32", normalize=False,
                              rescale="l1", seed=4, name="x")
    np.testing.assert_array_equal(out, core)
    out = merge_tensors([*xs, base], "dare_linear", {"weight": 1.0, "density": 0.5, "rescale_mode": "inverse_density"},
                        base_index=3, seed=4, name="x")
    core = kernel_merge("dare_linear", xs, base, [1.0] * 3, [0.5] * 3, out_dtype="float32", normalize=False,
                              rescale="inverse_density", seed=4, name="x")
    np.testing.assert_array_equal(out, core)


def test_per_model_parameters_as_list_mapping_and_numpy():
    base, xs = family((30,), 2, seed=2)
    a = merge_tensors([xs[0], base, xs[1]], "ties", {"weight": [0.2, 0.9], "density": [0.3, 0.8]}, base_index=1)
    b = merge_tensors([xs[0], base, xs[1]], "ties", {"weight": {0: 0.2, 2: 0.9}, "density": np.array([0.3, 0.8])},
                      base_index=1)
    np.testing.assert_array_equal(a, b)
    expected = task_arithmetic_ref.ties(base, xs, [0.2, 0.9], [0.3, 0.8], normalize=True)
    assert_matches(a, expected, "float32")


def test_linear_base_index_is_one_more_input():
    base, xs = family((9,), 2, seed=3)
    out = merge_tensors([xs[0], base, xs[1]], "linear", {"weight": [1.0, 2.0, 3.0]}, base_index=1)
    expected = task_arithmetic_ref.linear([xs[0], base, xs[1]], [1.0, 2.0, 3.0], normalize=True)
    assert_matches(out, expected, "float32")
    # without a base index: same thing
    np.testing.assert_array_equal(out, merge_tensors([xs[0], base, xs[1]], "linear", {"weight": [1.0, 2.0, 3.0]}))


def test_uint16_is_bfloat16_bits():
    base, xs = family((4, 8), 2, seed=4)
    bb, xb = codec.encode(base, "bfloat16").reshape(4, 8), [codec.encode(x, "bfloat16").reshape(4, 8) for x in xs]
    out = merge_tensors([*xb, bb], "task_arithmetic", {"weight": [0.5, 0.5]}, base_index=2)
    assert out.dtype == np.uint16 and out.shape == (4, 8)
    expected = task_arithmetic_ref.task_arithmetic(codec.decode(bb), [codec.decode(x) for x in xb], [0.5, 0.5])
    assert_matches(codec.decode(out).reshape(-1), expected, "bfloat16")
    # int16 views read the same
    out2 = merge_tensors([*(x.view(np.int16) for x in xb), bb.view(np.int16)], "task_arithmetic",
                         {"weight": [0.5, 0.5]}, base_index=2)
    np.testing.assert_array_equal(out2.view(np.uint16), out)
    # out_dtype float32 from bf16 inputs
    out32 = merge_tensors([*xb, bb], "task_arithmetic", {"weight": [0.5, 0.5]}, base_index=2, out_dtype="float32")
    assert out32.dtype == np.float32
    assert_matches(out32.reshape(-1), expected, "float32")


def test_ml_dtypes_bfloat16_round_trip():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    base, xs = family((3, 7), 2, seed=5)
    bf = ml_dtypes.bfloat16
    out = merge_tensors([xs[0].astype(bf), xs[1].astype(bf), base.astype(bf)], "ties",
                        {"weight": [0.5, 0.5], "density": 0.6}, base_index=2)
    assert out.dtype == np.dtype(bf) and out.shape == (3, 7)
    bits = [x.astype(bf).view(np.uint16) for x in (xs[0], xs[1], base)]
    np.testing.assert_array_equal(
        out.view(np.uint16),
        merge_tensors(bits, "ties", {"weight": [0.5, 0.5], "density": 0.6}, base_index=2),
    )
    # float32 out from ml_dtypes inputs is a plain float32 array
    out32 = merge_tensors([xs[0].astype(bf), base.astype(bf)], "ties", {"weight": 1.0}, base_index=1,
                          out_dtype=np.float32)
    assert out32.dtype == np.float32


def test_dtype_casts_inputs_and_sets_default_out_dtype():
    base, xs = family((50,), 2, seed=6)
    out = merge_tensors([*xs, base], "task_arithmetic", {"weight": 0.5}, base_index=2, dtype="bfloat16")
    assert out.dtype == np.uint16  # out_dtype defaults to dtype
    rounded = [codec.round_to(a, "bfloat16") for a in (*xs, base)]
    expected = task_arithmetic_ref.task_arithmetic(rounded[2], rounded[:2], [0.5, 0.5])
    assert_matches(codec.decode(out), expected, "bfloat16")
    out = merge_tensors([*xs, base], "task_arithmetic", {"weight": 0.5}, base_index=2, dtype="bf16",
                        out_dtype="float32")
    assert out.dtype == np.float32
    assert_matches(out, expected, "float32")
    out16 = merge_tensors([*xs, base], "task_arithmetic", {"weight": 0.5}, base_index=2, out_dtype=np.float16)
    assert out16.dtype == np.float16
    # mixed input dtypes: out_dtype follows the base
    out = merge_tensors([xs[0].astype(np.float16), xs[1], base.astype(np.float16)], "task_arithmetic",
                        {"weight": 0.5}, base_index=2)
    assert out.dtype == np.float16


def test_chunk_size_and_threads_do_not_change_bytes():
    base, xs = family((3001,), 3, seed=7)
    kw = dict(parameters={"weight": [0.3, -0.2, 0.9], "density": [0.2, 0.5, 0.9]}, base_index=3, seed=3, name="n")
    first = merge_tensors([*xs, base], "dare_ties", **kw)
    for chunk, threads in [(1, 2), (17, 3), (4096, 1), (None, 2)]:
        assert merge_tensors([*xs, base], "dare_ties", chunk_size=chunk, threads=threads, **kw).tobytes() == \
            first.tobytes()


def test_non_contiguous_input():
    base, xs = family((10, 12), 2, seed=8)
    ta = [x.T for x in xs] + [base.T]
    out = merge_tensors(ta, "ties", {"weight": [0.5, 0.5], "density": 0.5}, base_index=2)
    assert out.shape == (12, 10)
    expected = task_arithmetic_ref.ties(np.ascontiguousarray(base.T), [np.ascontiguousarray(x.T) for x in xs], [0.5, 0.5],
                        [0.5, 0.5])
    assert_matches(out, expected, "float32")


# ----------------------------------------------------------------------------------------------------------------
# validation
# ----------------------------------------------------------------------------------------------------------------


def test_unknown_parameter_lists_known_ones():
    base, xs = family()
    with pytest.raises(ParameterError) as e:
        merge_tensors([*xs, base], "ties", {"weight": 1.0, "densty": 0.5}, base_index=2)
    msg = str(e.value)
    assert "densty" in msg
    for known in ("density", "weight", "normalize", "lambda"):
        assert known in msg
    with pytest.raises(ParameterError):  # density is not a parameter of linear
        merge_tensors(xs, "linear", {"weight": 1.0, "density": 0.5})


@pytest.mark.parametrize(
    "params,match",
    [
        ({"weight": 1.0, "density": 0.0}, "density"),
        ({"weight": 1.0, "density": [0.5, 1.5]}, "density"),
        ({"weight": 1.0, "density": -0.1}, "density"),
        ({"density": 0.5}, "weight"),
        ({"weight": [0.5]}, "weight"),
        ({"weight": [0.5, 0.5, 0.5]}, "weight"),
        ({"weight": {0: 0.5}}, "weight"),
        ({"weight": "heavy"}, "weight"),
        ({"weight": float("nan")}, "weight"),
        ({"weight": 1.0, "normalize": "yes"}, "normalize"),
        ({"weight": 1.0, "lambda": [1.0, 2.0]}, "lambda"),
        ({"weight": 1.0, "rescale_mode": "l2"}, "rescale_mode"),
    ],
)
def test_parameter_errors(params, match):
    base, xs = family()
    with pytest.raises(ParameterError, match=match):
        merge_tensors([*xs, base], "ties", params, base_index=2)


def test_base_required_and_bad_method():
    base, xs = family()
    for method in ("ties", "task_arithmetic", "dare_ties", "dare_linear"):
        with pytest.raises(ParameterError, match="base"):
            merge_tensors([*xs, base], method, {"weight": 1.0})
    with pytest.raises(ParameterError):
        merge_tensors([*xs, base], "ties", {"weight": 1.0}, base_index=3)
    with pytest.raises(ParameterError, match="slerpy"):
        merge_tensors([*xs, base], "slerpy", {"weight": 1.0})
    with pytest.raises(ParameterError):  # zero weight sum with normalize
        merge_tensors(xs, "linear", {"weight": [1.0, -1.0]})


def test_input_errors():
    base, xs = family((4, 5))
    with pytest.raises(InputError, match="shape"):
        merge_tensors([xs[0], xs[1][:3], base], "ties", {"weight": 1.0}, base_index=2)
    with pytest.raises(InputError):
        merge_tensors([xs[0].astype(np.float64), base], "ties", {"weight": 1.0}, base_index=1)
    with pytest.raises(InputError):
        merge_tensors([[1.0, 2.0], [1.0, 2.0]], "linear", {"weight": 1.0})
    with pytest.raises(InputError):
        merge_tensors([], "linear", {"weight": 1.0})


# ----------------------------------------------------------------------------------------------------------------
# merge_state_dicts
# ----------------------------------------------------------------------------------------------------------------


def state_dicts(seed=0):
    rng = np.random.default_rng(seed)
    shapes = {"embed.weight": (16, 8), "layers.0.q.weight": (8, 8), "layers.0.norm.weight": (8,), "lm_head.weight": (16, 8)}
    base = {k: rng.normal(size=s).astype(np.float32) for k, s in shapes.items()}
    out = {"base": base}
    for m in ("a", "b", "c"):
        out[m] = {k: (v + rng.normal(0, 0.05, v.shape)).astype(np.float32) for k, v in base.items()}
    return out


def test_merge_state_dicts_ties_equals_per_tensor_merges():
    sds = state_dicts()
    params = {"weight": {"a": 0.5, "b": 0.3, "c": -0.2}, "density": [0.5, 0.7, 0.9], "lambda": 1.2}
    merged = merge_state_dicts(sds, "ties", base="base", parameters=params)
    assert list(merged) == list(sds["base"])
    for k, v in merged.items():
        assert v.shape == sds["base"][k].shape and v.dtype == np.float32
        expected = task_arithmetic_ref.ties(sds["base"][k], [sds[m][k] for m in "abc"], [0.5, 0.3, -0.2], [0.5, 0.7, 0.9], lam=1.2)
        assert_matches(v, expected, "float32", context=k)


def test_merge_state_dicts_dare_keys_rng_by_tensor_name_and_model_position():
    sds = state_dicts(1)
    params = {"weight": 1.0, "density": 0.5}
    merged = merge_state_dicts(sds, "dare_linear", base="base", parameters=params, seed=9)
    again = merge_state_dicts(sds, "dare_linear", base="base", parameters=params, seed=9, threads=2)
    for k in merged:
        assert merged[k].tobytes() == again[k].tobytes()
        nb = [sds[m][k] for m in ("a", "b", "c")]
        direct = merge_tensors([*nb, sds["base"][k]], "dare_linear", params, base_index=3, seed=9, name=k)
        np.testing.assert_array_equal(merged[k], direct)
    # the base's position in the mapping does not change model ids (position among non-base models)
    reordered = {"a": sds["a"], "base": sds["base"], "b": sds["b"], "c": sds["c"]}
    r = merge_state_dicts(reordered, "dare_linear", base="base", parameters=params, seed=9)
    for k in merged:
        np.testing.assert_array_equal(r[k], merged[k])
    # a different seed changes the result
    other = merge_state_dicts(sds, "dare_linear", base="base", parameters=params, seed=10)
    assert any(not np.array_equal(other[k], merged[k]) for k in merged)


def test_merge_state_dicts_linear_and_dtypes():
    sds = state_dicts(2)
    merged = merge_state_dicts(sds, "linear", parameters={"weight": {"base": 1.0, "a": 1.0, "b": 1.0, "c": 1.0}},
                               out_dtype="bfloat16")
    for k, v in merged.items():
        assert v.dtype == np.uint16
        expected = task_arithmetic_ref.linear([sds[m][k] for m in ("base", "a", "b", "c")], [1.0] * 4, True)
        assert_matches(codec.decode(v), expected, "bfloat16", context=k)


def test_merge_state_dicts_errors():
    sds = state_dicts(3)
    bad = {m: dict(sd) for m, sd in sds.items()}
    del bad["b"]["layers.0.q.weight"]
    with pytest.raises(InputError, match=r"'b'.*layers\.0\.q\.weight|layers\.0\.q\.weight.*'b'"):
        merge_state_dicts(bad, "ties", base="base", parameters={"weight": 1.0})
    bad = {m: dict(sd) for m, sd in sds.items()}
    bad["c"]["lm_head.weight"] = bad["c"]["lm_head.weight"][:, :4].copy()
    with pytest.raises(InputError, match=r"'c'.*lm_head\.weight|lm_head\.weight.*'c'"):
        merge_state_dicts(bad, "ties", base="base", parameters={"weight": 1.0})
    bad = {m: dict(sd) for m, sd in sds.items()}
    bad["a"]["extra"] = np.zeros(3, np.float32)
    with pytest.raises(InputError, match="extra"):
        merge_state_dicts(bad, "ties", base="base", parameters={"weight": 1.0})
    with pytest.raises(ParameterError, match="base"):
        merge_state_dicts(sds, "ties", parameters={"weight": 1.0})
    with pytest.raises(ParameterError):
        merge_state_dicts(sds, "ties", base="nobody", parameters={"weight": 1.0})
    with pytest.raises(ParameterError, match="weight"):
        merge_state_dicts(sds, "ties", base="base", parameters={"weight": {"a": 1.0, "b": 1.0}})
    with pytest.raises(ParameterError, match="zz"):
        merge_state_dicts(sds, "ties", base="base", parameters={"weight": {"a": 1.0, "b": 1.0, "c": 1.0, "zz": 1.0}})
    # a value for the base is ignored by non-base parameters (as in mergekit)
    with_base = merge_state_dicts(sds, "ties", base="base",
                                  parameters={"weight": {"a": 1.0, "b": 0.5, "c": 1.0, "base": 9.0}})
    without = merge_state_dicts(sds, "ties", base="base", parameters={"weight": [1.0, 0.5, 1.0]})
    for k in with_base:
        np.testing.assert_array_equal(with_base[k], without[k])


def test_merge_state_dicts_copies_identical_integer_buffers():
    sds = state_dicts(4)
    for sd in sds.values():
        sd["position_ids"] = np.arange(8, dtype=np.int64)
    merged = merge_state_dicts(sds, "task_arithmetic", base="base", parameters={"weight": 0.3})
    np.testing.assert_array_equal(merged["position_ids"], np.arange(8))
    sds["b"]["position_ids"] = np.arange(1, 9, dtype=np.int64)
    with pytest.raises(InputError, match="position_ids"):
        merge_state_dicts(sds, "task_arithmetic", base="base", parameters={"weight": 0.3})


# ----------------------------------------------------------------------------------------------------------------
# torch (optional)
# ----------------------------------------------------------------------------------------------------------------


def test_torch_not_imported_for_numpy_inputs():
    import subprocess
    import sys

    code = (
        "import sys, numpy as np\n"
        "from ferromerge.tensors import merge_tensors, merge_state_dicts\n"
        "a = np.ones(4, np.float32)\n"
        "merge_tensors([a, a, a], 'ties', {'weight': 1.0, 'density': 0.5}, base_index=2)\n"
        "merge_state_dicts({'x': {'t': a}, 'y': {'t': a}}, 'linear', parameters={'weight': 1.0})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.fixture
def torch():
    return pytest.importorskip("torch")


@pytest.mark.torch
@pytest.mark.parametrize("tdtype", ["float32", "float16", "bfloat16"])
def test_torch_round_trip(torch, tdtype):
    dt = getattr(torch, tdtype)
    base, xs = family((5, 6), 2, seed=9)
    tb, tx = torch.from_numpy(base).to(dt), [torch.from_numpy(x).to(dt) for x in xs]
    out = merge_tensors([*tx, tb], "ties", {"weight": [0.5, 0.5], "density": 0.5}, base_index=2)
    assert isinstance(out, torch.Tensor) and out.dtype == dt and tuple(out.shape) == (5, 6)
    as_np = [t.float().numpy() for t in (*tx, tb)]
    expected = task_arithmetic_ref.ties(as_np[2], as_np[:2], [0.5, 0.5], [0.5, 0.5])
    assert_matches(out.float().numpy(), expected, tdtype)
    # and out_dtype changes the torch dtype
    out32 = merge_tensors([*tx, tb], "ties", {"weight": [0.5, 0.5], "density": 0.5}, base_index=2,
                          out_dtype=torch.float32)
    assert out32.dtype == torch.float32


@pytest.mark.torch
def test_torch_zero_copy_inputs_and_state_dicts(torch):
    base = torch.randn(64)
    x = base + 0.1 * torch.randn(64)
    out = merge_tensors([x, base], "task_arithmetic", {"weight": 2.0}, base_index=1)
    torch.testing.assert_close(out, base + 2 * (x - base), rtol=1e-5, atol=1e-6)
    sds = {"base": {"w": base.reshape(8, 8)}, "a": {"w": x.reshape(8, 8)}}
    merged = merge_state_dicts(sds, "task_arithmetic", base="base", parameters={"weight": 1.0})
    assert isinstance(merged["w"], torch.Tensor) and merged["w"].shape == (8, 8)


@pytest.mark.torch
def test_torch_other_device_comes_back(torch):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    base = torch.randn(100, device="cuda", dtype=torch.bfloat16)
    x = base + 0.01
    out = merge_tensors([x, base], "ties", {"weight": 1.0, "density": 0.5}, base_index=1)
    assert out.device == base.device and out.dtype == torch.bfloat16
