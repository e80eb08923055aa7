"""``ferromerge.compat.peft`` against PEFT's own ``peft.utils.merge_utils`` (and NumPy for the random parts).

PEFT needs torch and transformers, which the dev virtualenv does not have, so PEFT and our module run side by side
in a Python that has both: ``$FERROMERGE_PEFT_PYTHON``, else this interpreter when it can import torch and peft,
else the mergekit virtualenv (``scripts/setup-mergekit-venv.sh`` installs peft there). That interpreter imports this
checkout's ``ferromerge`` (package directory linked onto its path) and writes every result to an ``.npz``; the
assertions run here in NumPy. Without such an interpreter those tests are skipped.

Inputs have distinct magnitudes that are exact in bfloat16 and float16, so the magnitude trim keeps the same
entries whatever the tie rule, and the dtypes can be compared without input rounding.

Tolerances: both sides compute each product and sum in float32 when PEFT's promotion gives float32 (float32
weights), differing only in summation order: |a − b| ≤ 8·2⁻²⁴·Σ|terms|. Where PEFT computes in float16 (float16
weights) it rounds every step: ≤ 8·2⁻¹¹·Σ|terms| + one float16 ulp of the output. Sign elections whose score is
within rounding of 0 (|Σ| ≤ 2⁻⁶·Σ|·|) may go either way and are excluded (and counted: they must be rare).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import ferromerge
import numpy as np
import pytest

N_TASKS, SHAPE = 3, (48, 40)
DEFAULT_VENV_PY = Path.home() / ".cache" / "ferromerge" / "mergekit-venv" / "bin" / "python"


def _peft_python() -> str | None:
    env = os.environ.get("FERROMERGE_PEFT_PYTHON")
    if env:
        return env
    if importlib.util.find_spec("torch") and importlib.util.find_spec("peft"):
        return sys.executable
    if DEFAULT_VENV_PY.is_file():
        probe = subprocess.run([str(DEFAULT_VENV_PY), "-c", "import torch, peft.utils.merge_utils"],
                               capture_output=True, timeout=300)
        if probe.returncode == 0:
            return str(DEFAULT_VENV_PY)
    return None


def distinct_tasks(seed: int, n: int = N_TASKS, shape=SHAPE) -> np.ndarray:
    """[n, *shape] float32 values with distinct magnitudes per tensor, exact in bfloat16 and float16:
    magnitude (1 + m/128)·2^(e−8) for distinct (e, m), random signs."""
    rng = np.random.default_rng(seed)
    size = int(np.prod(shape))
    out = np.empty((n, size), np.float32)
    for i in range(n):
        k = rng.permutation(size)
        mag = (1 + (k % 128) / 128) * np.exp2(k // 128 - 8)
        out[i] = (mag * rng.choice([-1.0, 1.0], size)).astype(np.float32)
    return out.reshape((n, *shape))


# Each case: (function, dtype of the task tensors, weights, weights dtype, extra positional args).
CASES = {
    "ta_f32": ("task_arithmetic", "float32", [0.5, -0.3, 0.9], "float32", []),
    "ta_bf16_w32": ("task_arithmetic", "bfloat16", [0.5, -0.3, 0.9], "float32", []),
    "ta_f16_w16": ("task_arithmetic", "float16", [0.5, -0.25, 0.75], "float16", []),
    "ta_f32_w64": ("task_arithmetic", "float32", [0.5, -0.3, 0.9], "float64", []),
    "mp_f32": ("magnitude_prune", "float32", [0.5, -0.3, 0.9], "float32", [0.3]),
    "mp_bf16": ("magnitude_prune", "bfloat16", [0.6, 0.4, 1.2], "float32", [0.15]),
    "mp_k0": ("magnitude_prune", "float32", [0.5, 0.5, 0.5], "float32", [1e-4]),
    "ties_f32_uneven": ("ties", "float32", [0.7, -0.4, 1.1], "float32", [0.3]),
    "ties_f32_equal": ("ties", "float32", [0.8, 0.8, 0.8], "float32", [0.3]),
    "ties_f32_scalar_w": ("ties", "float32", 0.6, "float32", [0.5]),
    "ties_f32_freq": ("ties", "float32", [0.7, 0.4, 1.1], "float32", [0.4, "frequency"]),
    "ties_f32_freq_equal": ("ties", "float32", [1.0, 1.0, 1.0], "float32", [0.4, "frequency"]),
    "ties_bf16_equal": ("ties", "bfloat16", [0.5, 0.5, 0.5], "float32", [0.2]),
    "ties_bf16_uneven": ("ties", "bfloat16", [0.5, 0.25, 1.0], "bfloat16", [0.2]),
    "ties_f16_w16": ("ties", "float16", [0.5, 0.25, 1.0], "float16", [0.35]),
    "ties_density1": ("ties", "float32", [0.3, 0.3, 0.3], "float32", [1.0]),
    "ties_k0": ("ties", "float32", [0.3, 0.6, 0.3], "float32", [1e-4]),
}

# dare: run our functions only (PEFT's masks come from torch's RNG); checked structurally in NumPy
DRIVER = textwrap.dedent(
    """
    import json, sys, warnings
    import numpy as np, torch
    from peft.utils import merge_utils as P
    from ferromerge.compat import peft as F

    inp = np.load(sys.argv[1]); cases = json.loads(open(sys.argv[2]).read()); out_path = sys.argv[3]
    DT = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}
    res, meta = {}, {}

    def tasks(dtype, key="tasks"):
        return [torch.from_numpy(t.copy()).to(DT[dtype]) for t in inp[key]]

    def put(key, t):
        res[key] = t.detach().float().numpy() if t.dtype != torch.bool else t.numpy()
        meta[key] = str(t.dtype).replace("torch.", "")

    def both(name, fn_name, *args):
        for side, mod in (("peft", P), ("ours", F)):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                put(f"{name}/{side}", getattr(mod, fn_name)(*args))
            meta[f"{name}/{side}/warned"] = any("no pruning" in str(w.message) for w in caught)

    for name, (fn, dtype, weights, wdtype, extra) in cases.items():
        w = torch.tensor(weights, dtype=DT[wdtype])
        both(name, fn, tasks(dtype), w, *extra)

    # single-tensor pruning
    t = tasks("float32")[0]
    both("mbp_f32", "magnitude_based_pruning", t, 0.3)
    both("mbp_bf16", "magnitude_based_pruning", tasks("bfloat16")[1], 0.05)
    both("mbp_k0", "magnitude_based_pruning", t, 1e-4)
    both("prune_mag", "prune", t, 0.25, "magnitude")
    both("prune_d1", "prune", t, 1.5, "random")
    meta["prune_d1_is_input"] = [P.prune(t, 1.5, "random") is t, F.prune(t, 1.5, "random") is t]

    # sign mask and disjoint merge on pruned stacks (zeros included) plus columns whose score is exactly 0
    stack = torch.stack([P.magnitude_based_pruning(x, 0.5) for x in tasks("float32")])
    stack[:, 0, 0] = torch.tensor([1.0, -1.0, 0.0]); stack[:, 0, 1] = torch.tensor([2.0, -1.0, -1.0])
    stack[:, 0, 2] = 0.0
    for m in ("total", "frequency"):
        both(f"mask_{m}", "calculate_majority_sign_mask", stack, m)
        mask = P.calculate_majority_sign_mask(stack, m)
        both(f"disjoint_{m}", "disjoint_merge", stack * torch.tensor([0.3, 0.5, 0.9]).view(3, 1, 1), mask)
    meta["reshape"] = [list(P.reshape_weight_task_tensors(stack, torch.ones(3)).shape),
                       list(F.reshape_weight_task_tensors(stack, torch.ones(3)).shape)]

    # random pruning: ours only, several seeds / names / paths
    d = 0.4
    put("rp/a", F.random_pruning(t, d, True, seed=7))
    put("rp/a_again", F.random_pruning(t, d, True, seed=7))
    put("rp/b", F.random_pruning(t, d, True, seed=8))
    put("rp/name", F.random_pruning(t, d, True, seed=7, name="layer.1"))
    put("rp/norescale", F.random_pruning(t, d, False, seed=7))
    put("rp/bf16", F.random_pruning(tasks("bfloat16")[0], d, True, seed=7))
    put("rp/peft_dtype_bf16", P.random_pruning(tasks("bfloat16")[0], d, True))
    w = torch.tensor([0.6, -0.3, 0.9])
    put("dl/ours", F.dare_linear(tasks("float32"), w, d, seed=3))
    put("dl/peft_dtype", P.dare_linear(tasks("bfloat16"), w, d))
    put("dl/ours_bf16", F.dare_linear(tasks("bfloat16"), w, d, seed=3))
    put("dt/total_uneven", F.dare_ties(tasks("float32"), w, d, seed=3))
    put("dt/peft_dtype", P.dare_ties(tasks("bfloat16"), w, d))
    put("dt/ours_dtype", F.dare_ties(tasks("bfloat16"), w, d, seed=3))
    for key in ("single_total", "single_freq"):
        put(f"dt1/{key}", F.dare_ties([t], torch.tensor([0.5]), d, "total" if key == "single_total" else "frequency",
                                     seed=5))
    put("dt1/rp", F.random_pruning(t, d, True, seed=5))

    errors = {}
    for label, call in {
        "rp_zero_rescale": lambda: F.random_pruning(t, 0.0, True),
        "neg_density": lambda: F.ties(tasks("float32"), w, -0.1),
        "bad_weights": lambda: F.task_arithmetic(tasks("float32"), torch.ones(2)),
        "shape_mismatch": lambda: F.task_arithmetic([t, t[:3]], torch.ones(2)),
        "float64": lambda: F.task_arithmetic([t.double()], torch.ones(1)),
        "bad_sign_method": lambda: F.ties(tasks("float32"), w, 0.5, "median"),
    }.items():
        try:
            call()
            errors[label] = None
        except Exception as e:  # the test checks the type and message
            errors[label] = [type(e).__name__, str(e)]
    meta["errors"] = errors
    np.savez(out_path, **res)
    open(out_path + ".json", "w").write(json.dumps(meta))
    """
)


@pytest.fixture(scope="module")
def peft_run(tmp_path_factory):
    py = _peft_python()
    if py is None:
        pytest.skip("no Python with torch and peft (set FERROMERGE_PEFT_PYTHON or run scripts/setup-mergekit-venv.sh)")
    work = tmp_path_factory.mktemp("peft")
    # this checkout's package (and its built extension), whatever the interpreter
    (work / "path").mkdir()
    (work / "path" / "ferromerge").symlink_to(Path(ferromerge.__file__).parent)
    np.savez(work / "in.npz", tasks=distinct_tasks(1))
    (work / "cases.json").write_text(json.dumps(CASES))
    (work / "driver.py").write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(work / "path"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([py, str(work / "driver.py"), str(work / "in.npz"), str(work / "cases.json"),
                           str(work / "out.npz")], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    res = dict(np.load(work / "out.npz"))
    meta = json.loads((work / "out.npz.json").read_text())
    return res, meta


def _tasks_f32() -> np.ndarray:
    return distinct_tasks(1)


def _terms(case: str) -> np.ndarray:
    """Σ_i |w_i x_i| per element: the scale of the rounding differences."""
    _, _, weights, _, _ = CASES[case]
    w = np.broadcast_to(np.asarray(weights, np.float64), (N_TASKS,))
    return np.abs(w[:, None, None] * _tasks_f32()).sum(axis=0)


def _ambiguous_election(case: str) -> np.ndarray:
    """Elements whose TIES sign score is within rounding of zero (PEFT's pruned tensors, computed here in float64)."""
    fn, _, _, _, extra = CASES[case]
    if fn != "ties":
        return np.zeros(SHAPE, bool)
    x = _tasks_f32().astype(np.float64)
    d = min(extra[0], 1.0)
    pruned = np.stack([np.where(np.abs(t) >= np.sort(np.abs(t).ravel())[::-1][max(int(d * t.size), 1) - 1], t, 0)
                       for t in x])
    score = pruned.sum(axis=0)
    mass = np.abs(pruned).sum(axis=0)
    return (np.abs(score) <= 2.0**-6 * mass) & (mass > 0)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_peft(peft_run, case):
    res, meta = peft_run
    peft, ours = res[f"{case}/peft"], res[f"{case}/ours"]
    assert meta[f"{case}/ours"] == meta[f"{case}/peft"], "result dtype differs from PEFT's"
    assert meta[f"{case}/ours/warned"] == meta[f"{case}/peft/warned"]
    _, dtype, _, wdtype, _ = CASES[case]
    # PEFT multiplies in the promoted dtype of tensors and weights; a low-precision result adds one rounding
    compute = "float32" if "float32" in (dtype, wdtype) or "float64" in (dtype, wdtype) or dtype != wdtype else dtype
    u = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}[compute]
    out_u = {"float16": 2.0**-11, "bfloat16": 2.0**-8}.get(meta[f"{case}/peft"], 0.0)
    tol = 8 * u * _terms(case) + 2 * out_u * np.abs(peft) + 1e-30
    keep = ~_ambiguous_election(case)
    assert keep.mean() > 0.99, f"{(~keep).sum()} elements with an ambiguous sign election"
    bad = (np.abs(peft - ours) > tol) & keep
    assert not bad.any(), (
        f"{bad.sum()} elements differ; worst {np.abs(peft - ours)[bad].max():.3e} (tolerance there "
        f"{tol[bad][np.argmax(np.abs(peft - ours)[bad])]:.3e})"
    )


@pytest.mark.parametrize("case", ["mbp_f32", "mbp_bf16", "mbp_k0", "prune_mag", "prune_d1"])
def test_pruning_matches_peft_exactly(peft_run, case):
    res, meta = peft_run
    assert meta[f"{case}/ours"] == meta[f"{case}/peft"]
    assert meta[f"{case}/ours/warned"] == meta[f"{case}/peft/warned"]
    np.testing.assert_array_equal(res[f"{case}/ours"], res[f"{case}/peft"])


def test_prune_full_density_returns_the_input(peft_run):
    _, meta = peft_run
    assert meta["prune_d1_is_input"] == [True, True]
    assert meta["prune_d1/ours/warned"] is True


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_sign_mask_and_disjoint_merge_match_peft(peft_run, method):
    res, meta = peft_run
    np.testing.assert_array_equal(res[f"mask_{method}/ours"], res[f"mask_{method}/peft"])
    assert meta[f"mask_{method}/ours"] == "bool"
    # the hand-made columns: score 0 elects +1; all-zero column matches nothing
    mask = res[f"mask_{method}/ours"]
    assert mask[:, 0, 0].tolist() == [True, False, False]
    assert mask[:, 0, 2].tolist() == [False, False, False]
    assert meta[f"disjoint_{method}/ours"] == meta[f"disjoint_{method}/peft"]
    np.testing.assert_allclose(res[f"disjoint_{method}/ours"], res[f"disjoint_{method}/peft"], rtol=1e-6, atol=0)


def test_reshape_weight_task_tensors(peft_run):
    _, meta = peft_run
    assert meta["reshape"] == [[3, 1, 1], [3, 1, 1]]


def _binomial_ok(kept: int, n: int, p: float, sigmas: float = 5.0) -> bool:
    return abs(kept - n * p) <= sigmas * np.sqrt(n * p * (1 - p))


def test_random_pruning_keeps_scaled_entries_reproducibly(peft_run):
    res, _ = peft_run
    x = _tasks_f32()[0]
    d = 0.4
    a = res["rp/a"]
    kept = a != 0
    assert _binomial_ok(int(kept.sum()), x.size, d)
    # kept entries are x / d rounded once to float32; the others are 0
    np.testing.assert_allclose(a[kept], x[kept].astype(np.float64) / d, rtol=2.0**-23, atol=0)
    np.testing.assert_array_equal(res["rp/a_again"], a)
    # a new seed or a new name gives a new mask; rescale off keeps the same mask unscaled
    for other in ("rp/b", "rp/name"):
        assert (res[other] != 0).tolist() != kept.tolist()
        assert _binomial_ok(int((res[other] != 0).sum()), x.size, d)
    np.testing.assert_array_equal(res["rp/norescale"], np.where(kept, x, 0))
    # bfloat16: same mask (it depends on seed, name and position only), one rounding of x/d
    bf = res["rp/bf16"]
    assert ((bf != 0) == kept).all()


def test_dare_linear_structure(peft_run):
    res, meta = peft_run
    x = _tasks_f32().astype(np.float64)
    w = np.array([0.6, -0.3, 0.9])
    d = 0.4
    out = res["dl/ours"]
    # every output is the sum over the models whose entry was kept of w_i·x_i/d
    subsets = np.stack([(m >> np.arange(N_TASKS)) & 1 for m in range(2**N_TASKS)])  # [8, 3]
    candidates = np.einsum("sk,kij->sij", subsets, w[:, None, None] * x / d)
    err = np.abs(candidates - out[None]).min(axis=0)
    assert (err <= 1e-6 * np.abs(w[:, None, None] * x / d).sum(axis=0)).all()
    # expected value Σ w_i x_i: the mean residual is within 5 standard errors
    resid = out - (w[:, None, None] * x).sum(axis=0)
    var = ((w[:, None, None] * x) ** 2 * (1 - d) / d).sum(axis=0)
    assert abs(resid.sum()) <= 5 * np.sqrt(var.sum())
    assert meta["dl/ours_bf16"] == meta["dl/peft_dtype"]


def test_dare_ties_paths_share_masks(peft_run):
    res, meta = peft_run
    # one tensor: "total" runs the single kernel pass, "frequency" prunes then merges in torch; both equal
    # weight · random_pruning(x) with the same seed, because masks are keyed by (seed, name, position)
    single = res["dt1/rp"] * np.float32(0.5)
    np.testing.assert_allclose(res["dt1/single_total"], single, rtol=2e-7, atol=0)
    np.testing.assert_allclose(res["dt1/single_freq"], single, rtol=2e-7, atol=0)
    assert meta["dt/ours_dtype"] == meta["dt/peft_dtype"]


def test_dare_ties_against_numpy_reference(peft_run):
    """Uneven weights (pruning in the kernel, election and disjoint merge in torch): every output is 0 or the
    mean over a non-empty subset of the models of w_i·x_i/d (PEFT divides by the agreeing count)."""
    res, _ = peft_run
    x = _tasks_f32().astype(np.float64)
    w = np.array([0.6, -0.3, 0.9])
    d = 0.4
    out = res["dt/total_uneven"]
    subsets = np.stack([(m >> np.arange(N_TASKS)) & 1 for m in range(1, 2**N_TASKS)])
    sums = np.einsum("sk,kij->sij", subsets, w[:, None, None] * x / d) / subsets.sum(axis=1)[:, None, None]
    candidates = np.concatenate([np.zeros((1, *SHAPE)), sums])
    err = np.abs(candidates - out[None]).min(axis=0)
    assert (err <= 1e-6 * np.abs(w[:, None, None] * x / d).sum(axis=0)).all()


@pytest.mark.parametrize(
    "label, kind, words",
    [
        ("rp_zero_rescale", "ValueError", "density 0"),
        ("neg_density", "ValueError", ">= 0"),
        ("bad_weights", "ValueError", "one weight per task tensor"),
        ("shape_mismatch", "ValueError", "task_tensors[1]"),
        ("float64", "TypeError", "float64"),
        ("bad_sign_method", "RuntimeError", "median"),
    ],
)
def test_bad_input_errors(peft_run, label, kind, words):
    _, meta = peft_run
    err = meta["errors"][label]
    assert err is not None, f"{label}: no error raised"
    assert err[0] == kind and words in err[1], err


def test_import_without_torch_then_clear_error():
    """The module imports without torch; calling a function then raises ImportError naming torch."""
    code = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # as if torch were not installed
        from ferromerge.compat import peft
        try:
            peft.task_arithmetic([0.0], [1.0])
        except ImportError as e:
            assert "torch" in str(e), e
            print("ImportError OK")
        """
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "ImportError OK"
