"""End to end: the 14 methods added for mergekit 0.1.5 parity through ``ferromerge run`` on a synthetic family.

Each run's output must equal, bit for bit, the in-memory API (same kernels) applied tensor by tensor with the
parameters the config gives that tensor, derived here independently of the planner (gradients by layer, filters
by name): so every model, base role, weight, per-model gamma/epsilon, method-wide parameter, row shape, model id
and seed reaches the engine as configured. Plus the plan JSON, the resolved config, and the configuration errors
(wrong model counts, a missing ``t``, a bad DELLA epsilon), which exit non-zero with one clear line and write
nothing."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import ferromerge
from ferromerge.cli import main
from ferromerge.synth import Family

from helpers.cli import read_model, run_cli, write_config

Params = Callable[[str], dict[str, Any]]

T_GRADIENT = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.3}]


def layer_t(name: str) -> float:
    """The position of a tensor's layer in the 2-layer family (0 or 1); non-layer tensors sit at 0."""
    match = re.search(r"\.layers\.(\d+)\.", name)
    return float(match.group(1)) if match else 0.0


def slerp_t(name: str) -> float:
    """T_GRADIENT for one tensor: self_attn rises 0 -> 1 over the layers, mlp falls 1 -> 0, the rest 0.3."""
    if "self_attn" in name:
        return layer_t(name)
    if "mlp" in name:
        return 1.0 - layer_t(name)
    return 0.3


def const(params: dict[str, Any]) -> Params:
    return lambda _name: params


def models(fam: Family, idx: list[int], params: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    out = []
    for k, i in enumerate(idx):
        entry: dict[str, Any] = {"model": str(fam.finetunes[i])}
        if params is not None:
            entry["parameters"] = params[k]
        out.append(entry)
    return out


def case(fam: Family, method: str) -> tuple[dict[str, Any], list[int], bool, Params]:
    """(config, fine-tunes in config order, whether the base is the method's base, in-memory parameters by name).

    With ``base`` False and a base_model in the config, the base joins as the last input (karcher)."""
    b = str(fam.base)
    if method == "slerp":
        return ({"base_model": b, "models": models(fam, [0]), "parameters": {"t": T_GRADIENT}}, [0], True,
                lambda n: {"t": slerp_t(n)})
    if method == "nearswap":
        return {"base_model": b, "models": models(fam, [1]), "parameters": {"t": 0.005}}, [1], True, const({"t": 0.005})
    if method == "nuslerp":
        cfg = {"models": models(fam, [0, 1], [{"weight": 1.0}, {"weight": 3.0}])}
        return cfg, [0, 1], False, const({"weight": [1.0, 3.0]})
    if method == "nuslerp+base":
        p = {"nuslerp_flatten": False, "nuslerp_row_wise": True}
        cfg = {"base_model": b, "models": models(fam, [2, 0], [{"weight": 1.0}, {"weight": 2.0}]), "parameters": p}
        return cfg, [2, 0], True, const({"weight": [1.0, 2.0], **p})
    if method == "multislerp":
        cfg = {"models": models(fam, [0, 1, 2], [{"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}])}
        return cfg, [0, 1, 2], False, const({"weight": [1.0, 2.0, 3.0]})
    if method == "multislerp+base":
        p = {"normalize_weights": False, "eps": 1e-6}
        cfg = {"base_model": b, "models": models(fam, [0, 1], [{"weight": 0.25}, {"weight": 0.75}]), "parameters": p}
        return cfg, [0, 1], True, const({"weight": [0.25, 0.75], **p})
    if method == "karcher":
        p = {"max_iter": 5, "tol": 1e-6}
        return {"base_model": b, "models": models(fam, [0, 1, 2]), "parameters": p}, [0, 1, 2], False, const(p)
    if method == "breadcrumbs":
        per = [{"weight": 1.0, "density": 0.5, "gamma": 0.05}, {"weight": 0.5, "density": 0.7, "gamma": 0.1}]
        cfg = {"base_model": b, "models": models(fam, [0, 1], per), "parameters": {"per_row": True}}
        return cfg, [0, 1], True, const({"weight": [1.0, 0.5], "density": [0.5, 0.7], "gamma": [0.05, 0.1],
                                         "per_row": True})
    if method == "breadcrumbs_ties":
        cfg = {"base_model": b, "models": models(fam, [0, 1, 2]), "parameters": {"weight": 1.0, "density": [0.3, 0.9]}}
        # the gradient's linear interpolation, written as mergekit evaluates it: (1 - t) v0 + t v1
        return cfg, [0, 1, 2], True, lambda n: {"weight": 1.0, "density": (1 - layer_t(n)) * 0.3 + layer_t(n) * 0.9}
    if method == "della":
        per = [{"weight": 1.0, "epsilon": 0.1}, {"weight": 0.5, "epsilon": 0.2}, {"weight": 0.5}]
        cfg = {"base_model": b, "models": models(fam, [0, 1, 2], per), "parameters": {"density": 0.5, "lambda": 0.9}}
        return cfg, [0, 1, 2], True, const({"weight": [1.0, 0.5, 0.5], "epsilon": [0.1, 0.2, 0.15], "density": 0.5,
                                            "lambda": 0.9})
    if method == "della_linear":
        p = {"weight": 0.5, "density": 0.6, "rescale_mode": "inverse_density"}
        return {"base_model": b, "models": models(fam, [0, 1]), "parameters": p}, [0, 1], True, const(p)
    if method == "sce":
        p = {"select_topk": 0.6}
        return {"base_model": b, "models": models(fam, [0, 1, 2]), "parameters": p}, [0, 1, 2], True, const(p)
    if method == "ram":
        p = {"epsilon": 0.01}
        return {"base_model": b, "models": models(fam, [0, 1, 2]), "parameters": p}, [0, 1, 2], True, const(p)
    if method == "ramplus_tl":
        p = {"epsilon": 0.012, "r": 0.3, "alpha": 0.5}
        return {"base_model": b, "models": models(fam, [0, 1, 2]), "parameters": p}, [0, 1, 2], True, const(p)
    if method == "model_stock":
        p = {"filter_wise": True}
        return {"base_model": b, "models": models(fam, [0, 1, 2]), "parameters": p}, [0, 1, 2], True, const(p)
    if method == "arcee_fusion":
        return {"base_model": b, "models": models(fam, [2])}, [2], True, const({})
    raise AssertionError(method)


CASES = [
    "slerp", "nearswap", "nuslerp", "nuslerp+base", "multislerp", "multislerp+base", "karcher", "breadcrumbs",
    "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl", "model_stock", "arcee_fusion",
]


def expected(fam: Family, case_name: str, seed: int) -> dict[str, np.ndarray]:
    """The merge through ``merge_tensors``, tensor by tensor."""
    cfg, idx, base_role, params_for = case(fam, case_name)
    method = case_name.split("+")[0]
    fts = [read_model(fam.finetunes[i]) for i in idx]
    base = read_model(fam.base)
    out = {}
    for name, (_, b) in base.items():
        arrays = [m[name][1] for m in fts]
        if base_role:
            merged = ferromerge.merge_tensors([b, *arrays], method, params_for(name), base_index=0, seed=seed,
                                              name=name)
        elif "base_model" in cfg:  # the base joins as one more input, after the listed models (as mergekit adds it)
            merged = ferromerge.merge_tensors([*arrays, b], method, params_for(name), seed=seed, name=name)
        else:
            merged = ferromerge.merge_tensors(arrays, method, params_for(name), seed=seed, name=name)
        out[name] = merged
    return out


@pytest.mark.parametrize("case_name", CASES)
def test_run_merges_like_the_in_memory_api(family_f32: Family, tmp_path: Path, case_name: str) -> None:
    cfg, *_ = case(family_f32, case_name)
    config = write_config(tmp_path / "merge.yml", {"merge_method": case_name.split("+")[0], **cfg})
    assert main(["run", str(config), str(tmp_path / "out"), "--quiet", "--seed", "7"]) == 0
    merged = read_model(tmp_path / "out")
    want = expected(family_f32, case_name, seed=7)
    assert merged.keys() == want.keys()
    for name, (dtype, values) in merged.items():
        assert dtype == "F32"
        np.testing.assert_array_equal(values, want[name], err_msg=name)
    base = read_model(family_f32.base)
    assert any(not np.array_equal(merged[n][1], base[n][1]) for n in merged)


@pytest.mark.parametrize("case_name", CASES)
def test_plan_checks_and_predicts_every_method(
    family_f32: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str], case_name: str
) -> None:
    # the time prediction runs the method's kernel on synthetic data with the plan's parameters
    method = case_name.split("+")[0]
    cfg, *_ = case(family_f32, case_name)
    config = write_config(tmp_path / "merge.yml", {"merge_method": method, **cfg})
    capsys.readouterr()
    assert main(["plan", str(config), str(tmp_path / "out"), "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert f"method: {method} (seed 0)" in out and "tensors: 21" in out and "predicted time: " in out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merge.yml"]


def test_gradient_slerp_through_the_cli_process(family_f32: Family, tmp_path: Path) -> None:
    # mergekit's examples/gradient-slerp.yml shape: t per filter and layer; t = 0 is the base, t = 1 the other model
    cfg, *_ = case(family_f32, "slerp")
    config = write_config(tmp_path / "slerp.yml", {"merge_method": "slerp", **cfg, "dtype": "float32"})
    result = run_cli("run", config, tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    merged = read_model(tmp_path / "out")
    base, other = read_model(family_f32.base), read_model(family_f32.finetunes[0])
    attn0, attn1 = "model.layers.0.self_attn.q_proj.weight", "model.layers.1.self_attn.q_proj.weight"
    mlp0, mlp1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"
    np.testing.assert_array_equal(merged[attn0][1], base[attn0][1])
    np.testing.assert_array_equal(merged[attn1][1], other[attn1][1])
    np.testing.assert_array_equal(merged[mlp0][1], other[mlp0][1])
    np.testing.assert_array_equal(merged[mlp1][1], base[mlp1][1])
    resolved = yaml.safe_load((tmp_path / "out" / "ferromerge_config.yml").read_text())
    assert resolved["parameters"]["t"] == T_GRADIENT and resolved["base_model"] == str(family_f32.base)


def plan_json(capsys: pytest.CaptureFixture[str], config: Path) -> dict[str, Any]:
    capsys.readouterr()
    assert main(["plan", str(config), "--json"]) == 0
    return {t["name"]: t for s in json.loads(capsys.readouterr().out)["shards"] for t in s["tensors"]}


def test_plan_json_carries_params_gamma_and_epsilon(
    family_f32: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fam = family_f32
    cfg, *_ = case(fam, "slerp")
    tensors = plan_json(capsys, write_config(tmp_path / "s.yml", {"merge_method": "slerp", **cfg}))
    for name, t in tensors.items():
        assert t["method"]["name"] == "slerp" and t["method"]["params"] == {"t": slerp_t(name)}, name
        assert t["base"]["file"].startswith(str(fam.base.resolve())) and len(t["inputs"]) == 1
        assert "gamma" not in t["inputs"][0] and "epsilon" not in t["inputs"][0]

    cfg, *_ = case(fam, "breadcrumbs")
    t = plan_json(capsys, write_config(tmp_path / "b.yml", {"merge_method": "breadcrumbs", **cfg}))["lm_head.weight"]
    assert t["method"]["params"] == {"per_row": 1.0}
    assert [(i["weight"], i["density"], i["gamma"]) for i in t["inputs"]] == [(1.0, 0.5, 0.05), (0.5, 0.7, 0.1)]

    cfg, *_ = case(fam, "della")
    t = plan_json(capsys, write_config(tmp_path / "d.yml", {"merge_method": "della", **cfg}))["lm_head.weight"]
    assert "params" not in t["method"] and t["method"]["rescale"] == "l1" and t["method"]["normalize"] is True
    assert [i["epsilon"] for i in t["inputs"]] == [0.1, 0.2, 0.15] and [i["model_id"] for i in t["inputs"]] == [0, 1, 2]

    cfg, *_ = case(fam, "nuslerp+base")
    t = plan_json(capsys, write_config(tmp_path / "n.yml", {"merge_method": "nuslerp", **cfg}))["lm_head.weight"]
    assert t["method"]["params"] == {"nuslerp_row_wise": 1.0, "nuslerp_flatten": 0.0}
    assert t["base"] is not None and [i["weight"] for i in t["inputs"]] == [1.0, 2.0]

    cfg, *_ = case(fam, "karcher")
    t = plan_json(capsys, write_config(tmp_path / "k.yml", {"merge_method": "karcher", **cfg}))["lm_head.weight"]
    assert t["base"] is None and t["method"]["params"] == {"max_iter": 5.0, "tol": 1e-6}
    assert len(t["inputs"]) == 4 and t["inputs"][-1]["file"].startswith(str(fam.base.resolve()))


@pytest.mark.parametrize("method", ["nuslerp", "multislerp"])
def test_optional_base_with_slices(family_f32: Family, tmp_path: Path, method: str) -> None:
    fam = family_f32

    def src(path: Path, weight: float | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"model": str(path), "layer_range": [0, 2]}
        if weight is not None:
            out["parameters"] = {"weight": weight}
        return out

    weighted = [src(fam.finetunes[0], 1.0), src(fam.finetunes[1], 2.0)]
    without = {"merge_method": method, "slices": [{"sources": weighted}]}
    with_base = {"merge_method": method, "base_model": str(fam.base),
                 "slices": [{"sources": [src(fam.base), *weighted]}]}
    for label, cfg in [("without", without), ("with", with_base)]:
        config = write_config(tmp_path / f"{label}.yml", cfg)
        assert main(["run", str(config), str(tmp_path / label), "--quiet"]) == 0
    a, b = read_model(tmp_path / "without"), read_model(tmp_path / "with")
    base, x1, x2 = (read_model(p) for p in (fam.base, *fam.finetunes[:2]))
    name = "model.layers.1.mlp.down_proj.weight"
    np.testing.assert_array_equal(a[name][1], ferromerge.merge_tensors([x1[name][1], x2[name][1]], method,
                                                                       {"weight": [1.0, 2.0]}))
    np.testing.assert_array_equal(b[name][1], ferromerge.merge_tensors([base[name][1], x1[name][1], x2[name][1]],
                                                                       method, {"weight": [1.0, 2.0]}, base_index=0))
    assert not np.array_equal(a[name][1], b[name][1])


def config_fails(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, cfg: dict[str, Any], *fragments: str
) -> None:
    """``run`` and ``plan`` exit 2 with one ``ferromerge: error:`` line holding every fragment; nothing written."""
    config = write_config(tmp_path / "bad.yml", cfg)
    out = tmp_path / "out"
    for argv in (["run", str(config), str(out)], ["plan", str(config), str(out)]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ferromerge: error: "), lines
        for fragment in fragments:
            assert fragment in lines[0], (fragment, lines[0])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.yml"]


@pytest.mark.parametrize(
    ("method", "n", "with_base", "extra", "fragments"),
    [
        ("slerp", 2, True, {"t": 0.5}, ["models: slerp takes a base_model and exactly 1 other model, got 2 (models[0"]),
        ("nearswap", 3, True, {"t": 0.5}, ["nearswap takes a base_model and exactly 1 other model, got 3"]),
        ("arcee_fusion", 2, True, {}, ["arcee_fusion takes a base_model and exactly 1 other model, got 2"]),
        ("nuslerp", 3, False, {}, ["nuslerp takes exactly 2 models besides the base_model (which is optional), got 3"]),
        ("nuslerp", 1, True, {}, ["nuslerp takes exactly 2 models besides the base_model (which is optional), got 1"]),
        ("model_stock", 1, True, {}, ["model_stock takes a base_model and at least 2 other models, got 1"]),
        ("slerp", 1, False, {"t": 0.5}, ["base_model: slerp needs a base model"]),
        ("sce", 2, False, {}, ["base_model: sce needs a base model"]),
        ("slerp", 1, True, {}, ["Missing required parameter t for slerp"]),
        ("slerp", 1, True, {"t": [{"filter": "mlp", "value": 0.5}]},
         ["Missing required parameter t for slerp at tensor ", "no filter of parameters.t matches it"]),
        ("della", 2, True, {"weight": 1.0, "density": 0.9},
         ["models[0] (", "density 0.9 with epsilon 0.15", "density -/+ epsilon must lie in (0, 1)"]),
        ("della", 2, True, {"weight": 1.0, "density": [0.5, 0.9]},
         ["tensor model.layers.1.", "density 0.9 with epsilon 0.15"]),
        ("karcher", 2, False, {"max_iter": 0.5}, ["parameters.max_iter: parameter 'max_iter' must be an integer"]),
        ("breadcrumbs", 2, True, {"weight": 1.0, "gamma": -0.1}, ["parameters.gamma: gamma must be in [0, 1]"]),
        ("sce", 2, True, {"select_topk": 2}, ["parameters.select_topk: select_topk must be in [0, 1], got 2.0"]),
    ],
)
def test_configuration_errors_exit_2_and_write_nothing(
    family_f32: Family,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    method: str,
    n: int,
    with_base: bool,
    extra: dict[str, Any],
    fragments: list[str],
) -> None:
    weighted = method in ("nuslerp", "multislerp")
    cfg: dict[str, Any] = {
        "merge_method": method,
        "models": models(family_f32, list(range(n)), [{"weight": 1.0}] * n if weighted else None),
    }
    if with_base:
        cfg["base_model"] = str(family_f32.base)
    if extra:
        cfg["parameters"] = extra
    config_fails(capsys, tmp_path, cfg, *fragments)


def test_a_parameter_the_method_does_not_use_warns_and_merges_as_without_it(
    family_f32: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # was an error; mergekit 0.1.5 ignores it (same tensors as mergekit: tests/compat/test_mergekit_leniency.py,
    # karcher_weight_and_string_numbers), so ferromerge warns and merges as if it were not there
    cfg, *_ = case(family_f32, "karcher")
    cfg = {"merge_method": "karcher", **cfg, "parameters": {**cfg["parameters"], "weight": 1.0}}
    config = write_config(tmp_path / "k.yml", cfg)
    capsys.readouterr()
    assert main(["run", str(config), str(tmp_path / "out"), "--quiet", "--seed", "7"]) == 0
    assert capsys.readouterr().err.strip().splitlines() == [
        "ferromerge: warning: parameters.weight: karcher does not use 'weight'; ignored, as mergekit ignores it"
    ]
    merged, want = read_model(tmp_path / "out"), expected(family_f32, "karcher", seed=7)
    assert merged.keys() == want.keys()
    for name, (_, values) in merged.items():
        np.testing.assert_array_equal(values, want[name], err_msg=name)
    for command in ("run", "plan"):  # --strict: the warning is an error, nothing written
        assert main([command, str(config), str(tmp_path / "strict"), "--strict"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(
            "ferromerge: error: parameters.weight: karcher does not use 'weight'; ignored, as mergekit ignores it "
            "(strict mode"), lines
    assert not (tmp_path / "strict").exists()


def test_slice_without_its_base_is_an_error_for_optional_base_methods(
    family_f32: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fam = family_f32
    sources = [{"model": str(p), "layer_range": [0, 2], "parameters": {"weight": 1.0}} for p in fam.finetunes[:2]]
    cfg = {"merge_method": "multislerp", "base_model": str(fam.base), "slices": [{"sources": sources}]}
    config_fails(capsys, tmp_path, cfg, f"slices[0]: base model '{fam.base}' is not one of its sources")


def test_wrong_model_count_exits_non_zero_through_the_process(family_f32: Family, tmp_path: Path) -> None:
    cfg = {"merge_method": "nearswap", "base_model": str(family_f32.base),
           "models": models(family_f32, [0, 1]), "parameters": {"t": 0.1}}
    result = run_cli("run", write_config(tmp_path / "n.yml", cfg), tmp_path / "out")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"ferromerge: error: models: nearswap takes a base_model and exactly 1 other model, got 2 "
        f"(models[0] '{family_f32.finetunes[0]}', models[1] '{family_f32.finetunes[1]}')"
    )
    assert not (tmp_path / "out").exists()
