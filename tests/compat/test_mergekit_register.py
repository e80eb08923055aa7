"""``ferromerge.compat.mergekit.register()``: mergekit's own pipeline (``mergekit-yaml``) on our kernels.

Every config runs through mergekit 0.1.5's ``mergekit-yaml`` in its virtualenv twice: with mergekit's methods, and
after ``register(seed=0)``; the interpreter imports this checkout's ``ferromerge`` (its package directory linked
onto ``PYTHONPATH``). The driver counts the kernel calls, so a comparison can never pass because nothing was
replaced. Family: test_mergekit_diff's tiny Llama (base + a, b, c), float32.

Expectations:

* deterministic methods, float32: equal to rounding (``rtol 1e-5`` of the larger of the two values plus ``atol``
  1e-6 of the tensor's largest magnitude; the iterative/spherical ones sum in a different order and in float64).
  Sign elections (ties, breadcrumbs_ties, sce) within float32 noise may differ: such elements are counted and
  must stay under 0.2%.
* DARE / DELLA: the masks cannot match torch's, so the registered run must equal ``ferromerge.run`` with the same
  seed exactly (same keying: seed, tensor name, model position); with ``register(seed=None)`` the seed comes from
  torch's global RNG, so the same ``--random-seed`` repeats the bytes and another one changes them.
* arcee_fusion: an element whose importance sits at the threshold may take the other model's value (counted).
* a group the kernels cannot take (density 0) falls back to mergekit's implementation: bit-identical.
* ``unregister()`` puts back the very objects mergekit had.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import ferromerge
import numpy as np
import pytest
import yaml
from helpers.mergekit import model_entries, read_safetensors_dir

pytestmark = pytest.mark.mergekit


def case_configs(root: Path) -> dict[str, dict]:
    base = str(root / "base")

    def gta(method, names, params, **kw):
        return {"merge_method": method, "base_model": base, "models": model_entries(root, names, params),
                "dtype": "float32", **kw}

    w = lambda *ws: [{"weight": x} for x in ws]  # noqa: E731
    return {
        "linear": {"merge_method": "linear", "models": model_entries(root, "abc", w(0.3, 0.5, 0.2)), "dtype": "float32"},
        "linear_neg_unnorm": {"merge_method": "linear", "models": model_entries(root, "ab", w(1.0, -0.5)),
                              "parameters": {"normalize": False}, "dtype": "float32"},
        "linear_bf16": {"merge_method": "linear", "models": model_entries(root, "ab", w(0.3, 0.7)), "dtype": "bfloat16"},
        "passthrough_scale": {"merge_method": "passthrough", "models": model_entries(root, "a", [{"scale": 0.5}]),
                              "dtype": "float32"},
        "task_arithmetic": gta("task_arithmetic", "abc", w(0.5, -0.3, 1.0), parameters={"lambda": 0.7}),
        "ties": gta("ties", "abc", [{"weight": 0.7, "density": 0.2}, {"weight": -0.4, "density": 0.6},
                                    {"weight": 1.1, "density": 0.9}]),
        "ties_rescale_out_bf16": gta("ties", "ab", [{"weight": 0.8, "density": 0.4}, {"weight": 0.4, "density": 0.7}],
                                     parameters={"rescale": True}, out_dtype="bfloat16"),
        "ties_density0_fallback": gta("ties", "ab", [{"weight": 0.5, "density": 0.0}, {"weight": 0.5, "density": 0.5}]),
        "breadcrumbs": gta("breadcrumbs", "ab", [{"weight": 0.6, "density": 0.5, "gamma": 0.05},
                                                 {"weight": 0.4, "density": 0.3}]),
        "breadcrumbs_ties": gta("breadcrumbs_ties", "abc", [{"weight": 0.5, "density": 0.6, "gamma": 0.02}] * 3),
        "dare_ties": gta("dare_ties", "ab", [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.5}]),
        "dare_linear": gta("dare_linear", "abc", [{"weight": 0.5, "density": 0.4}] * 3),
        "della": gta("della", "ab", [{"weight": 0.6, "density": 0.5, "epsilon": 0.1}, {"weight": 0.4, "density": 0.6}],
                     parameters={"lambda": 1.1}),
        "slerp": {"merge_method": "slerp", "base_model": base, "models": model_entries(root, "a", [{}]),
                  "parameters": {"t": 0.3}, "dtype": "float32"},
        "nuslerp_base": gta("nuslerp", "ab", w(0.4, 0.6)),
        "nuslerp_rows": {"merge_method": "nuslerp", "models": model_entries(root, "ab", w(0.3, 0.7)),
                         "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True}, "dtype": "float32"},
        "multislerp": gta("multislerp", "abc", w(0.2, 0.3, 0.5)),
        "karcher": {"merge_method": "karcher", "models": model_entries(root, "abc", [{}, {}, {}]), "dtype": "float32"},
        "model_stock": gta("model_stock", "abc", [{}, {}, {}]),
        "sce": gta("sce", "abc", [{}, {}, {}], parameters={"select_topk": 0.5}),
        "ram": gta("ram", "ab", [{}, {}]),
        "ramplus_tl": gta("ramplus_tl", "ab", [{}, {}], parameters={"r": 0.2, "alpha": 0.3}),
        "nearswap": gta("nearswap", "a", [{}], parameters={"t": 0.01}),
        "arcee_fusion": gta("arcee_fusion", "a", [{}]),
    }


RANDOM = ("dare_ties", "dare_linear", "della")

DRIVER = textwrap.dedent(
    """
    import json, sys, traceback, types
    from mergekit.scripts.run_yaml import main
    from mergekit.merge_methods import registry
    from ferromerge.compat import mergekit as fmk

    jobs = json.load(open(sys.argv[1]))
    before = dict(registry._METHODS)
    calls = {"n": 0}
    real = fmk._engine

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real.merge_arrays(*args, **kwargs)

    fmk._engine = types.SimpleNamespace(merge_arrays=counting, input_values=real.input_values)
    results = {}
    for name, cfg, out, seed, random_seed in jobs:
        if seed == "off":
            fmk.unregister()
        else:
            fmk.register(seed=None if seed == "none" else int(seed))
        calls["n"] = 0
        try:
            main([cfg, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--random-seed",
                  str(random_seed)], standalone_mode=False)
            results[name] = {"error": None, "kernel_calls": calls["n"]}
        except BaseException:
            results[name] = {"error": traceback.format_exc(), "kernel_calls": calls["n"]}
    registered = fmk.registered()
    fmk.unregister()
    results["__registry__"] = {
        "registered": registered,
        "restored": all(registry._METHODS[k] is v for k, v in before.items()) and set(registry._METHODS) == set(before),
    }
    json.dump(results, open(sys.argv[2], "w"))
    """
)


@pytest.fixture(scope="module")
def runs(family, mergekit_python_path, tmp_path_factory):
    work = tmp_path_factory.mktemp("mk-register")
    (work / "path").mkdir()
    (work / "path" / "ferromerge").symlink_to(Path(ferromerge.__file__).parent)
    configs = case_configs(family)
    jobs = []
    for name, cfg in configs.items():
        p = work / f"{name}.yml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        jobs.append((f"{name}/mk", str(p), str(work / f"mk-{name}"), "off", 1234))
        jobs.append((f"{name}/fm", str(p), str(work / f"fm-{name}"), "0", 1234))
        if name in RANDOM:
            jobs.append((f"{name}/torch_a", str(p), str(work / f"ta-{name}"), "none", 1234))
            jobs.append((f"{name}/torch_b", str(p), str(work / f"tb-{name}"), "none", 1234))
            jobs.append((f"{name}/torch_c", str(p), str(work / f"tc-{name}"), "none", 99))
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "driver.py").write_text(DRIVER)
    env = dict(os.environ, PYTHONPATH=str(work / "path"), PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([str(mergekit_python_path), str(work / "driver.py"), str(work / "jobs.json"),
                           str(work / "results.json")], capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, f"driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    results = json.loads((work / "results.json").read_text())
    return work, configs, results


def _out(runs, case, mode):
    work, _, results = runs
    r = results[f"{case}/{mode}"]
    assert r["error"] is None, f"{case} ({mode}) failed:\n{r['error']}"
    prefix = {"mk": "mk", "fm": "fm", "torch_a": "ta", "torch_b": "tb", "torch_c": "tc"}[mode]
    return read_safetensors_dir(work / f"{prefix}-{case}"), r["kernel_calls"]


DETERMINISTIC = [c for c in case_configs(Path("/x")) if c not in RANDOM and c != "ties_density0_fallback"]


@pytest.mark.parametrize("case", DETERMINISTIC)
def test_registered_equals_mergekit(runs, family, case):
    family_tensors = {m: read_safetensors_dir(family / m) for m in ("a", "base")}
    mk, calls_mk = _out(runs, case, "mk")
    fm, calls_fm = _out(runs, case, "fm")
    assert calls_mk == 0
    assert calls_fm >= len(mk), f"only {calls_fm} kernel calls for {len(mk)} tensors"
    assert set(mk) == set(fm)
    cfg = runs[1][case]
    consensus = cfg["merge_method"] in ("ties", "breadcrumbs_ties", "sce")
    low = cfg.get("out_dtype") == "bfloat16" or cfg.get("dtype") == "bfloat16"
    worst, excluded, total = 0.0, 0, 0
    for name in sorted(mk):
        a, b = mk[name].astype(np.float64).ravel(), fm[name].astype(np.float64).ravel()
        scale = max(np.abs(a).max(), 1e-30)
        if low:
            # one bf16 rounding of (nearly) the same float32 value: at most one bf16 ulp apart
            tol = np.maximum(np.abs(a), np.abs(b)) * 2.0**-7 + 1e-6 * scale
        else:
            tol = 1e-5 * np.maximum(np.abs(a), np.abs(b)) + 1e-6 * scale
        bad = np.abs(a - b) > tol
        if consensus:
            # a sign election within float32 noise may go the other way: only a handful of such elements
            excluded += int(bad.sum())
            bad[:] = False
        elif cfg["merge_method"] == "arcee_fusion":
            # an element takes the model's value or the base's, by importance (|δ| x the row's KL divergence) against
            # a quantile threshold; mergekit's float32 KL (a sum of cancelling terms) moves elements near the
            # threshold: a flip between the two values is allowed, anything else is not
            x, base = (family_tensors[m][name].astype(np.float64).ravel() for m in ("a", "base"))
            flip = bad & (np.isclose(a, x) | np.isclose(a, base)) & (np.isclose(b, x) | np.isclose(b, base))
            excluded += int(flip.sum())
            bad &= ~flip
        total += a.size
        assert not bad.any(), f"{case}: {name}: {bad.sum()} elements differ, worst {np.abs(a - b)[bad].max():.3e}"
        worst = max(worst, float(np.abs(a - b).max()))
    print(f"\n[register] {case}: max abs diff {worst:.3e}; {excluded} of {total} elements excluded", end="")
    assert excluded <= 0.002 * total


def test_fallback_group_is_mergekits_own(runs):
    mk, _ = _out(runs, "ties_density0_fallback", "mk")
    fm, calls = _out(runs, "ties_density0_fallback", "fm")
    assert calls == 0
    for name in mk:
        np.testing.assert_array_equal(fm[name], mk[name], err_msg=name)


@pytest.mark.parametrize("case", RANDOM)
def test_random_methods_match_ferromerge_run(runs, case, tmp_path):
    work, configs, _ = runs
    fm, calls = _out(runs, case, "fm")
    assert calls >= len(fm)
    try:
        ferromerge.run(str(work / f"{case}.yml"), str(tmp_path / "out"), quiet=True, seed=0)
    except ferromerge.ConfigError as e:
        if "merge_method" in str(e) or "method" in str(e):
            pytest.skip(f"ferromerge.run does not take {case} in this checkout: {e}")
        raise
    own = read_safetensors_dir(tmp_path / "out")
    assert set(own) == set(fm)
    for name in fm:
        np.testing.assert_array_equal(fm[name], own[name], err_msg=name)


@pytest.mark.parametrize("case", RANDOM)
def test_seed_none_follows_torch_random_seed(runs, case):
    a, _ = _out(runs, case, "torch_a")
    b, _ = _out(runs, case, "torch_b")
    c, _ = _out(runs, case, "torch_c")
    fixed, _ = _out(runs, case, "fm")
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=f"{name}: same --random-seed, different bytes")
    big = [n for n in a if a[n].size >= 1000]
    assert big and all(not np.array_equal(a[n], c[n]) for n in big), "another --random-seed changed nothing"
    assert all(not np.array_equal(a[n], fixed[n]) for n in big), "seed=None gave seed 0's masks"


def test_module_command_is_mergekit_yaml_with_the_kernels(runs, mergekit_python_path):
    """``python -m ferromerge.compat.mergekit`` (mergekit-yaml's options) writes what the registered run wrote."""
    work, _, _ = runs
    out = work / "cli-ties"
    env = dict(os.environ, PYTHONPATH=str(work / "path"), CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([str(mergekit_python_path), "-m", "ferromerge.compat.mergekit", str(work / "ties.yml"),
                           str(out), "--no-copy-tokenizer", "--no-write-model-card", "--quiet"],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cli = read_safetensors_dir(out)
    fm, _ = _out(runs, "ties", "fm")
    assert set(cli) == set(fm)
    for name in fm:
        np.testing.assert_array_equal(cli[name], fm[name], err_msg=name)


def test_unregister_restores_mergekits_methods(runs):
    _, _, results = runs
    reg = results["__registry__"]
    assert set(reg["registered"]) >= {"linear", "ties", "dare_ties", "slerp", "della", "arcee_fusion"}
    assert reg["restored"] is True
