"""Configs mergekit 0.1.5 accepts though a careful tool would question them (issue 12) merge to mergekit's tensors:
parameters the method does not use, values pydantic's lax mode converts (numbers written as YAML 1.1 strings,
booleans as numbers or words, integers as strings), misspelled and misplaced keys, an empty list, extra keys in a
filter entry. Each case runs through mergekit-yaml (one interpreter for all, ``helpers.mergekit.run_mergekit``)
and through ``ferromerge.run`` on the same YAML file; ferromerge must raise the expected compat warnings (each once)
and write mergekit's tensors.

The family is test_mergekit_diff.py's (``base``, ``a``, ``b``, ``c``: float32 Llama-shaped, 2 layers). Methods
with random masks (DARE, DELLA) are left out: their streams differ by design. Tolerances as in
test_mergekit_methods.py: float32 math on both sides, ``rtol 1e-6, atol 1e-7`` for element-wise methods,
``rtol 1e-5, atol 1e-7`` for those that go through norms and angles. TIES cases merge one model into the base, so
the sign election has one voter and nothing is decided by rounding."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from helpers.mergekit import max_diffs, read_safetensors_dir, report_diffs, run_mergekit

pytestmark = pytest.mark.mergekit

ELEMENTWISE = dict(rtol=1e-6, atol=1e-7)
SPHERICAL = dict(rtol=1e-5, atol=1e-7)
IGNORED = "; ignored, as mergekit ignores it"


def case_configs(root: Path) -> dict[str, tuple[dict[str, Any], list[str]]]:
    """{case: (config, the compat warnings ferromerge must raise, in order)}."""
    m = {name: str(root / name) for name in ("base", "a", "b", "c")}

    def cfg(method: str, models: list[dict[str, Any]], parameters: dict[str, Any] | None = None, base: bool = True,
            **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"merge_method": method, "models": models, "dtype": "float32"}
        if base:
            out["base_model"] = m["base"]
        if parameters is not None:
            out["parameters"] = parameters
        return {**out, **extra}

    def model(name: str, **parameters: Any) -> dict[str, Any]:
        return {"model": m[name], "parameters": parameters} if parameters else {"model": m[name]}

    return {
        # density and gamma left over from a ties config; normalize as a word
        "task_arithmetic_unused_density_gamma": (
            cfg("task_arithmetic", [model("a", weight=0.7, density=0.3, gamma=0.05), model("b", weight=0.6,
                                                                                           density=0.5)],
                {"lambda": 0.9, "gamma": 0.1, "normalize": "yes"}),
            [f"parameters.gamma: task_arithmetic does not use 'gamma'{IGNORED}",
             f"models[0].parameters.density: task_arithmetic does not use 'density'{IGNORED}",
             f"models[0].parameters.gamma: task_arithmetic does not use 'gamma'{IGNORED}",
             f"models[1].parameters.density: task_arithmetic does not use 'density'{IGNORED}"],
        ),
        # gamma in ties; t from a slerp config; numbers and booleans written as strings and integers
        "ties_unused_gamma_t_lax_values": (
            cfg("ties", [model("a", weight="0.8", density=".5", gamma=0.01)],
                {"rescale": "true", "lambda": "1.1", "t": 0.3, "int8_mask": 1}),
            [f"parameters.t: ties does not use 't'{IGNORED}",
             f"models[0].parameters.gamma: ties does not use 'gamma'{IGNORED}"],
        ),
        # a method-wide parameter written per model is not read there (mergekit: slice/module/top level only)
        "task_arithmetic_normalize_per_model": (
            cfg("task_arithmetic", [model("a", weight=0.5, normalize=True)]),
            ["models[0].parameters.normalize: 'normalize' applies to the whole merge, not to one model (set it under "
             f"the top-level or the slice's parameters){IGNORED} here"],
        ),
        "slerp_normalize_lambda_weight": (
            cfg("slerp", [model("b", weight=0.7)], {"t": "3e-1", "normalize": True, "lambda": 0.5}),
            [f"parameters.normalize: slerp does not use 'normalize'{IGNORED}",
             f"parameters.lambda: slerp does not use 'lambda'{IGNORED}",
             f"models[0].parameters.weight: slerp does not use 'weight'{IGNORED}"],
        ),
        "karcher_weight_and_string_numbers": (
            cfg("karcher", [model("a", weight=1), model("b", weight=2), model("c")],
                {"max_iter": "3", "tol": "1e-9", "weight": 1.0}, base=False),
            [f"parameters.weight: karcher does not use 'weight'{IGNORED}",
             f"models[0].parameters.weight: karcher does not use 'weight'{IGNORED}",
             f"models[1].parameters.weight: karcher does not use 'weight'{IGNORED}"],
        ),
        "linear_boolean_words_and_numbers": (
            cfg("linear", [model("a", weight="0.3"), model("b", weight=True)], {"normalize": 0.0}, base=False),
            ["models[1].parameters.weight: true read as the number 1.0, as mergekit reads it"],
        ),
        "sce_normalize_lambda": (
            cfg("sce", [model("a"), model("b")], {"select_topk": "1e0", "normalize": True, "lambda": 0.5}),
            [f"parameters.normalize: sce does not use 'normalize'{IGNORED}",
             f"parameters.lambda: sce does not use 'lambda'{IGNORED}"],
        ),
        "multislerp_normalize": (
            cfg("multislerp", [model("a", weight="0.5"), model("b", weight=1.5)],
                {"normalize": True, "eps": "1e-8"}, base=False),
            [f"parameters.normalize: multislerp has no parameter 'normalize' (did you mean 'normalize_weights'?)"
             f"{IGNORED}"],
        ),
        "nuslerp_normalize_flatten_word": (
            cfg("nuslerp", [model("a", weight=0.4), model("c", weight="1.2")],
                {"nuslerp_flatten": "false", "normalize": True}),
            [f"parameters.normalize: nuslerp does not use 'normalize'{IGNORED}"],
        ),
        "model_stock_filter_wise_int_and_weight": (
            cfg("model_stock", [model("a", weight=1.0), model("b")], {"filter_wise": 1}),
            [f"models[0].parameters.weight: model_stock does not use 'weight'{IGNORED}"],
        ),
        "breadcrumbs_epsilon_strings": (
            cfg("breadcrumbs", [model("a", weight=1, density="0.8", gamma="1e-2", epsilon=0.1)]),
            [f"models[0].parameters.epsilon: breadcrumbs does not use 'epsilon'{IGNORED}"],
        ),
        "nearswap_string_t_and_lambda": (
            cfg("nearswap", [model("c")], {"t": "1e-3", "lambda": 2}),
            [f"parameters.lambda: nearswap does not use 'lambda'{IGNORED}"],
        ),
        "ramplus_tl_string_r_and_lambda": (
            cfg("ramplus_tl", [model("a"), model("b"), model("c")], {"r": "1e-1", "alpha": ".3", "lambda": 0.5}),
            [f"parameters.lambda: ramplus_tl does not use 'lambda'{IGNORED}"],
        ),
        # a typo'd top-level key, a parameter at the top level, one beside parameters:, a layer range on a model
        "task_arithmetic_misplaced_keys": (
            {**cfg("task_arithmetic",
                   [{"model": m["a"], "weight": 5.0, "parameters": {"weight": 1.0}},
                    {"model": m["b"], "layer_range": [0, 1], "parameters": {"weight": 0.5}}]),
             "merge_methd": "linear", "lambda": 0.3},
            [f"merge_methd: unknown key (did you mean 'merge_method'?){IGNORED}",
             f"lambda: 'lambda' is a method parameter, which belongs under parameters (parameters.lambda){IGNORED}"
             " here",
             "models[0].weight: 'weight' is a method parameter, which belongs under models[0].parameters "
             f"(models[0].parameters.weight){IGNORED} here",
             f"models[1].layer_range: a models: entry takes every layer (layer ranges need slices:){IGNORED}"],
        ),
        # an unknown key in a slice and in a source; per-model weight on passthrough; scale as a string
        "passthrough_slices_unknown_keys": (
            {"merge_method": "passthrough", "dtype": "float32", "slices": [
                {"sources": [{"model": m["a"], "layer_range": [0, 1], "foo": 1,
                              "parameters": {"scale": "0.5", "weight": 2}}], "bar": 2},
                {"sources": [{"model": m["b"], "layer_range": [1, 2]}]},
            ]},
            [f"slices[0].bar: unknown key (known: base_model, parameters, residual_weight, sources){IGNORED}",
             f"slices[0].sources[0].foo: unknown key (known: layer_range, model, parameters){IGNORED}",
             f"slices[0].sources[0].parameters.weight: passthrough does not use 'weight'{IGNORED}"],
        ),
        # a task-vector method with only its base (mlabonne's lorablated recipe: base+LoRA merged on its own):
        # mergekit returns the base
        "task_arithmetic_base_only_slice": (
            {"merge_method": "task_arithmetic", "base_model": m["base"], "dtype": "float32",
             "slices": [{"sources": [{"model": m["base"], "layer_range": [0, 2], "parameters": {"weight": 1.0}}]}]},
            [],
        ),
        "ties_base_only_models": (cfg("ties", [model("base", weight=1.0)]), []),
        "sce_base_only_models": (cfg("sce", [model("base")]), []),
        # an empty list sets nothing (the default lambda); a filter entry's extra key is ignored
        "ties_empty_list_and_filter_extra": (
            cfg("ties", [model("a", weight=1.0)],
                {"lambda": [], "density": [{"filter": "mlp", "value": 0.5, "note": "x"}, {"value": 0.9}]}),
            [f"parameters.lambda: an empty list sets nothing{IGNORED}",
             f"parameters.density[0].note: unknown key (a filter entry has filter and value){IGNORED}"],
        ),
    }


def refused_configs(root: Path) -> dict[str, tuple[dict[str, Any], str, str]]:
    """{case: (a config mergekit refuses, a fragment of ferromerge's error, one of mergekit's)}: refused here too,
    for the same reason."""
    base, a, b = (str(root / n) for n in ("base", "a", "b"))
    slerp = {"merge_method": "slerp", "base_model": base, "models": [{"model": a}], "dtype": "float32"}
    ties = {"merge_method": "ties", "base_model": base, "dtype": "float32"}
    return {
        # the only t is misplaced (ignored), so t is missing
        "refused_slerp_t_at_top_level": ({**slerp, "t": 0.5}, "Missing required parameter t for slerp",
                                         "Missing required parameter t"),
        "refused_slerp_t_per_model": ({**slerp, "models": [{"model": a, "parameters": {"t": 0.5}}]},
                                      "Missing required parameter t for slerp",
                                         "Missing required parameter t"),
        "refused_missing_merge_method": ({"merge_methd": "ties", "base_model": base, "models": [{"model": a}]},
                                         "merge_method: missing", "merge_method\n  Field required"),
        "refused_null_parameter": ({**ties, "models": [{"model": a, "parameters": {"weight": 1, "density": None}}]},
                                   "models[0].parameters.density: no value (null)", "models.0.parameters.density"),
        "refused_filter_without_value": (
            {**ties, "models": [{"model": a, "parameters": {"weight": 1, "gamma": {"filter": "mlp"}}}]},
            "models[0].parameters.gamma: expected a value or {filter, value}",
            "models.0.parameters.gamma.ConditionalParameter.value\n  Field required"),
        "refused_float_string_as_bool": ({**ties, "models": [{"model": a, "parameters": {"weight": 1}}],
                                          "parameters": {"normalize": "1.0"}},
                                         "parameter 'normalize' must be true or false, got '1.0'", "bool_parsing"),
        "refused_exponent_as_int": ({"merge_method": "karcher", "models": [{"model": a}, {"model": b}],
                                     "parameters": {"max_iter": "1e3"}},
                                    "parameter 'max_iter' must be an integer, got '1e3'", "int_parsing"),
        "refused_hex_as_float": ({**ties, "models": [{"model": a, "parameters": {"weight": "0x1"}}]},
                                 "parameter 'weight' must be a number, got '0x1'", "float_parsing"),
    }


SPHERICAL_METHODS = {"slerp", "karcher", "multislerp", "nuslerp", "model_stock"}


@pytest.fixture(scope="module")
def runs(family, mergekit_python_path, tmp_path_factory):
    """{case: (mergekit_out, mergekit_error, ferromerge_out, ferromerge's compat warnings, config)}."""
    import ferromerge

    cases = case_configs(family)
    refused = refused_configs(family)
    work = tmp_path_factory.mktemp("mk-leniency")
    done = run_mergekit({**{k: c for k, (c, _) in cases.items()}, **{k: c for k, (c, *_) in refused.items()}},
                        mergekit_python_path, work)
    out = {}
    for name, (cfg_path, mk_dir, err) in done.items():
        if name in refused:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    ferromerge.run(str(cfg_path), str(work / f"fm-{name}"), quiet=True, seed=0)
                fm_error = None
            except ferromerge.ParameterError as e:  # ConfigError is one
                fm_error = str(e)
            out[name] = (err, fm_error, refused[name][1:], work / f"fm-{name}")
            continue
        fm_dir = work / f"fm-{name}"
        with warnings.catch_warnings(record=True) as record:
            warnings.simplefilter("always")
            ferromerge.run(str(cfg_path), str(fm_dir), quiet=True, seed=0)
        said = [str(w.message) for w in record if issubclass(w.category, ferromerge.CompatWarning)]
        out[name] = (mk_dir, err, fm_dir, said, cases[name])
    return out


CASES = list(case_configs(Path("/family")))


@pytest.mark.parametrize("case", CASES)
def test_lenient_config_merges_like_mergekit(runs, case):
    mk_dir, err, fm_dir, said, (cfg, expected_warnings) = runs[case]
    assert err is None, f"mergekit refused {case}:\n{err}"
    assert said == expected_warnings
    mk, fm = read_safetensors_dir(mk_dir), read_safetensors_dir(fm_dir)
    assert set(mk) == set(fm), f"only mergekit {sorted(set(mk) - set(fm))}, only ferromerge {sorted(set(fm) - set(mk))}"
    tol = SPHERICAL if cfg["merge_method"] in SPHERICAL_METHODS else ELEMENTWISE
    diffs = []
    for name in sorted(mk):
        a, b = mk[name].astype(np.float64), fm[name].astype(np.float64)
        np.testing.assert_allclose(b, a, **tol, err_msg=f"{case}: {name}")
        diffs.append(max_diffs(a.reshape(-1), b.reshape(-1), np.ones(a.size, dtype=bool)))
    report_diffs(case, diffs)


def test_ignored_parameters_change_nothing(runs, family):
    """The ignored parameter really is ignored: task arithmetic with a per-model ``normalize: true`` (not read)
    is base + 0.5 (a - base), not base + (a - base) as a normalized merge would give."""
    _, _, fm_dir, _, _ = runs["task_arithmetic_normalize_per_model"]
    fm = read_safetensors_dir(fm_dir)
    base, a = read_safetensors_dir(family / "base"), read_safetensors_dir(family / "a")
    name = "model.layers.1.mlp.up_proj.weight"
    want = base[name].astype(np.float64) + 0.5 * (a[name].astype(np.float64) - base[name])
    np.testing.assert_allclose(fm[name], want, rtol=1e-6, atol=1e-7)
    assert not np.allclose(fm[name], a[name], rtol=1e-3, atol=1e-5)


@pytest.mark.parametrize("case", list(refused_configs(Path("/family"))))
def test_what_mergekit_refuses_is_refused(runs, case):
    mk_error, fm_error, (fragment, mk_fragment), fm_dir = runs[case]
    assert mk_error is not None and mk_fragment in mk_error, f"mergekit on {case}: {mk_error}"
    assert fm_error is not None and fragment in fm_error, fm_error
    assert not fm_dir.exists()
