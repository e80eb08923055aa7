"""What mergekit 0.1.5 accepts is accepted, with mergekit's reading (issue 12): values as pydantic's lax mode reads
them for the types mergekit declares, parameters the method does not use and keys nobody declares ignored with one
``CompatWarning`` each naming the place (and the key probably meant), and ``strict`` turning each into a
``ConfigError``. The merged tensors equal mergekit's: tests/compat/test_mergekit_leniency.py.

The tables of accepted and refused values were read from mergekit's own virtualenv (pydantic 2.14, the
``TypeAdapter(float | int | bool)`` that mergekit's ``ParameterSpec.validate`` uses), not from ferromerge's."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import ferromerge
from ferromerge import CompatWarning, ConfigError, ParameterError
from ferromerge.cli import main
from ferromerge.config.resolve import load_config
from ferromerge.synth import Family

from helpers.cli import read_model, write_config

BASE = "org/base"


def gta(method: str = "ties", models: list[dict[str, Any]] | None = None, **extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "merge_method": method,
        "base_model": BASE,
        "models": models or [{"model": "org/a", "parameters": {"weight": 1.0}}],
    }
    return {**cfg, **extra}


def messages(cfg: dict[str, Any] | str) -> tuple[list[str], Any]:
    """The compat warnings of loading ``cfg`` (in order) and the loaded config."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        loaded = load_config(cfg)
    return [str(w.message) for w in record if issubclass(w.category, CompatWarning)], loaded


def quiet(cfg: dict[str, Any] | str) -> Any:
    """Load ``cfg``, asserting that it raises no compat warning."""
    found, loaded = messages(cfg)
    assert found == []
    return loaded


# ---------------------------------------------------------------------------------------------------------------
# values, as mergekit's pydantic reads them


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("1e-6", 1e-6), (".5", 0.5), ("1E3", 1000.0), ("+1e-9", 1e-9), (" 1.5 ", 1.5), ("1_000", 1000.0),
        ("1.", 1.0), ("+.5e-3", 0.0005), (2, 2.0), ("10", 10.0),
    ],
)
def test_numbers_written_as_strings_are_read_as_mergekit_reads_them(raw: Any, expected: float) -> None:
    cfg = quiet({"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"tol": raw}})
    assert cfg.shared["tol"] == expected and isinstance(cfg.shared["tol"], float)


@pytest.mark.parametrize("raw", ["0x10", "true", "abc", "", "1e", "1__0", "_1", "0b11", "١"])
def test_strings_pydantic_refuses_as_numbers_are_refused(raw: str) -> None:
    with pytest.raises(ParameterError, match=rf"^parameters\.tol: parameter 'tol' must be a number, got {raw!r}$"):
        load_config({"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"tol": raw}})


@pytest.mark.parametrize("raw", ["nan", "inf", "-infinity", "1e400"])
def test_non_finite_numbers_are_refused_though_pydantic_reads_them(raw: str) -> None:
    # a departure (docs/compat.md): mergekit would merge NaN/inf into every tensor
    with pytest.raises(ParameterError, match=r"parameters\.tol: parameter 'tol' must be finite"):
        load_config({"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}], "parameters": {"tol": raw}})


def test_yaml_1_1_floats_in_a_yaml_file(tmp_path: Path) -> None:
    # PyYAML (YAML 1.1, as mergekit's yaml.safe_load) reads 1e-6, 1E3 and +1e-9 as strings, .5 as a number
    text = (
        "merge_method: karcher\nmodels:\n  - model: a\n  - model: b\nparameters:\n  tol: 1e-6\n  max_iter: 1E3\n"
    )
    assert yaml.safe_load(text)["parameters"]["tol"] == "1e-6"
    with pytest.raises(ParameterError, match=r"parameters\.max_iter: parameter 'max_iter' must be an integer, got '1E3'"):
        load_config(text)  # pydantic's int refuses "1E3" (mergekit: max_iter is an int)
    path = tmp_path / "c.yml"
    path.write_text(text.replace("1E3", "'20'"))
    cfg = quiet(path)
    assert cfg.shared == {"max_iter": 20, "tol": 1e-6}
    text = "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n    parameters: {weight: +1e-1, density: .5}\n"
    model = quiet(text).inputs[0]
    assert (model.weight, model.density) == (0.1, 0.5)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [(1.0, True), (0.0, False), (1, True), (0, False), ("true", True), ("TRUE", True), ("yes", True), ("on", True),
     ("t", True), ("y", True), ("1", True), ("off", False), ("no", False), ("f", False), ("n", False), ("0", False),
     ("false", False)],
)
def test_booleans_written_otherwise_are_read_as_mergekit_reads_them(raw: Any, expected: bool) -> None:
    assert quiet(gta(parameters={"normalize": raw})).shared["normalize"] is expected


@pytest.mark.parametrize("raw", [2, -1, 0.5, "1.0", "10", "maybe", "", "1e3"])
def test_values_pydantic_refuses_as_booleans_are_refused(raw: Any) -> None:
    with pytest.raises(ParameterError, match=r"^parameters\.normalize: parameter 'normalize' must be true or false"):
        load_config(gta(parameters={"normalize": raw}))


@pytest.mark.parametrize(("raw", "expected"), [("5", 5), (5.0, 5), ("5.0", 5), ("1_0", 10), (" 5 ", 5), ("+5", 5)])
def test_integers_written_otherwise_are_read_as_mergekit_reads_them(raw: Any, expected: int) -> None:
    cfg = load_config({"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}],
                       "parameters": {"max_iter": raw}})
    assert cfg.shared["max_iter"] == expected and type(cfg.shared["max_iter"]) is int


@pytest.mark.parametrize("raw", ["1e3", 2.5, "5.5", "+.5", "five"])
def test_values_pydantic_refuses_as_integers_are_refused(raw: Any) -> None:
    with pytest.raises(ParameterError, match=r"parameters\.max_iter: parameter 'max_iter' must be (an integer|a number)"):
        load_config({"merge_method": "karcher", "models": [{"model": "a"}, {"model": "b"}],
                     "parameters": {"max_iter": raw}})


def test_gradients_and_filters_of_strings_are_numbers() -> None:
    cfg = quiet(gta(parameters={"density": ["0.2", ".6", "1e0"], "weight": {"filter": "mlp", "value": "5e-1"}}))
    setting = cfg.inputs[0].levels[-1].settings
    assert setting["density"].values == (0.2, 0.6, 1.0) and setting["density"].numeric
    assert setting["weight"].entries == (("mlp", ferromerge.config.settings.Const(0.5)),)


def test_a_boolean_read_as_a_number_is_a_compat_warning() -> None:
    found, cfg = messages(gta(models=[{"model": "org/a", "parameters": {"weight": True}}]))
    assert found == ["models[0].parameters.weight: true read as the number 1.0, as mergekit reads it"]
    assert cfg.inputs[0].weight == 1.0


def test_a_null_parameter_is_refused_as_mergekit_refuses_it() -> None:
    with pytest.raises(ConfigError, match=r"^models\[0\]\.parameters\.density: no value \(null\)"):
        load_config(yaml.safe_load("merge_method: ties\nbase_model: b\nmodels:\n  - model: a\n"
                                   "    parameters:\n      weight: 1\n      density:\n"))


def test_string_parameters_of_ferromerge_stay_strict() -> None:
    with pytest.raises(ParameterError, match=r"parameters\.rescale_mode: parameter 'rescale_mode' must be one of"):
        load_config(gta(parameters={"rescale_mode": 1}))


# ---------------------------------------------------------------------------------------------------------------
# parameters the method does not use: ignored, one warning each


@pytest.mark.parametrize(
    ("method", "level", "name", "message"),
    [
        ("task_arithmetic", "model", "density", "task_arithmetic does not use 'density'"),
        ("task_arithmetic", "model", "gamma", "task_arithmetic does not use 'gamma'"),
        ("ties", "model", "gamma", "ties does not use 'gamma'"),
        ("ties", "global", "epsilon", "ties does not use 'epsilon'"),
        ("slerp", "global", "normalize", "slerp does not use 'normalize'"),
        ("slerp", "global", "lambda", "slerp does not use 'lambda'"),
        ("slerp", "model", "weight", "slerp does not use 'weight'"),
        ("sce", "global", "normalize", "sce does not use 'normalize'"),
        ("multislerp", "global", "normalize",
         "multislerp has no parameter 'normalize' (did you mean 'normalize_weights'?)"),
        ("karcher", "model", "weight", "karcher does not use 'weight'"),
        ("nearswap", "global", "lambda", "nearswap does not use 'lambda'"),
        ("passthrough", "model", "weight", "passthrough does not use 'weight'"),
        ("ties", "model", "densty", "ties has no parameter 'densty' (did you mean 'density'?)"),
        ("task_arithmetic", "model", "densty",
         "task_arithmetic has no parameter 'densty' (a misspelling of 'density'? task_arithmetic does not use that "
         "either)"),
        ("ties", "global", "zzz", "ties has no parameter 'zzz' (known: density, int8_mask, lambda, normalize, "
                                  "rescale, rescale_mode, weight)"),
        # mergekit-evolve's genome option, no misspelling of multislerp's normalize_weights
        ("sce", "global", "allow_negative_weights", "sce has no parameter 'allow_negative_weights' (known: int8_mask, "
                                                    "select_topk)"),
    ],
)
def test_a_parameter_the_method_does_not_use_is_ignored_with_a_warning(
    method: str, level: str, name: str, message: str
) -> None:
    value = 0.5
    needs = {"slerp": {"t": 0.5}, "nearswap": {"t": 0.5}}.get(method, {})
    per_model = {"weight": 1.0} if method in ("task_arithmetic", "ties", "multislerp") else {}
    base = method not in ("karcher", "passthrough", "multislerp")
    models = [{"model": "org/a", "parameters": dict(per_model)}]
    if method in ("karcher", "multislerp"):
        models.append({"model": "org/b", "parameters": dict(per_model)})
    cfg: dict[str, Any] = {"merge_method": method, "models": models, "parameters": dict(needs)}
    if base:
        cfg["base_model"] = BASE
    clean = yaml.safe_load(yaml.safe_dump(cfg))
    if level == "model":
        cfg["models"][0]["parameters"][name] = value
        place = "models[0].parameters"
    else:
        cfg["parameters"][name] = value
        place = "parameters"
    found, loaded = messages(cfg)
    assert found == [f"{place}.{name}: {message}; ignored, as mergekit ignores it"]
    assert loaded.resolved() == load_config(clean).resolved()
    with pytest.raises(ConfigError, match="strict mode"):
        load_config(cfg, strict=True)


def test_one_warning_per_key_each_naming_its_place() -> None:
    models = [{"model": f"org/{m}", "parameters": {"weight": 1.0, "gamma": 0.1}} for m in "abc"]
    found, _ = messages(gta("task_arithmetic", models, parameters={"gamma": 0.2}))
    assert found == [
        "parameters.gamma: task_arithmetic does not use 'gamma'; ignored, as mergekit ignores it",
        *(f"models[{i}].parameters.gamma: task_arithmetic does not use 'gamma'; ignored, as mergekit ignores it"
          for i in range(3)),
    ]


def test_the_form_of_an_unused_parameter_is_still_checked() -> None:
    # mergekit's pydantic refuses a malformed setting before any method looks at it
    with pytest.raises(ConfigError, match=r"^models\[0\]\.parameters\.gamma: expected a value or \{filter, value\}"):
        load_config(gta("task_arithmetic", [{"model": "a", "parameters": {"weight": 1, "gamma": {"filter": "mlp"}}}]))
    with pytest.raises(ConfigError, match=r"parameters\.gamma\[0\]: expected a number, true/false or a string"):
        load_config(gta("task_arithmetic", parameters={"gamma": [[0.1]]}))
    with pytest.raises(ConfigError, match=r"parameters\.gamma: no value \(null\)"):
        load_config(gta("task_arithmetic", parameters={"gamma": None}))


def test_extra_keys_of_a_filter_entry_are_ignored() -> None:
    found, cfg = messages(gta(parameters={"density": [{"filter": "mlp", "value": 0.5, "comment": "x"}, {"valeu": 1,
                                                                                                         "value": 1}]}))
    assert found == [
        "parameters.density[0].comment: unknown key (a filter entry has filter and value); ignored, as mergekit "
        "ignores it",
        "parameters.density[1].valeu: unknown key (did you mean 'value'?); ignored, as mergekit ignores it",
    ]
    assert cfg.resolved() == load_config(gta(parameters={"density": [{"filter": "mlp", "value": 0.5},
                                                                     {"value": 1}]})).resolved()


def test_ferromerge_extensions_are_accepted_without_a_word() -> None:
    quiet(gta(parameters={"rescale_mode": "inverse_density"}, name="stage-1", device="cpu"))
    quiet(gta("breadcrumbs", parameters={"per_row": True}))


# ---------------------------------------------------------------------------------------------------------------
# misspelled and misplaced keys: ignored, one warning each with the key probably meant


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (gta(merge_methd="ties"), "merge_methd: unknown key (did you mean 'merge_method'?)"),
        (gta(dtpye="float32"), "dtype"),
        (gta(t=0.5), "t: 't' is a method parameter, which belongs under parameters (parameters.t)"),
        (gta(paramters={"density": 0.5}), "paramters: unknown key (did you mean 'parameters'?)"),
        (gta(models=[{"model": "org/a", "weight": 2.0, "parameters": {"weight": 1.0}}]),
         "models[0].weight: 'weight' is a method parameter, which belongs under models[0].parameters "
         "(models[0].parameters.weight)"),
        (gta(models=[{"model": "org/a", "layer_range": [0, 2], "parameters": {"weight": 1.0}}]),
         "models[0].layer_range: a models: entry takes every layer (layer ranges need slices:)"),
        (gta(models=[{"model": "org/a", "parameter": {"weight": 1.0}}], parameters={"weight": 1.0}),
         "models[0].parameter: unknown key (did you mean 'parameters'?)"),
        (gta(tokenizer={"source": "base", "pad_to": 8}),
         "tokenizer.pad_to: unknown key (known: pad_to_multiple_of, source, tokens)"),
        (gta(tokenizer={"source": "union", "tokens": {"<x>": {"source": {"kind": "zero", "why": 1}, "forse": True}}}),
         "tokenizer.tokens['<x>'].forse: unknown key (did you mean 'force'?)"),
        (gta(wieght=1), "wieght: unknown key (did you mean the parameter parameters.weight?)"),
        (gta(zzz_qq=1), "zzz_qq: unknown key (known: base_model, chat_template, device, dtype, merge_method, models, "
                        "modules, name, out_dtype, parameters, slices, tokenizer, tokenizer_source)"),
    ],
)
def test_unknown_keys_are_ignored_with_a_warning_naming_the_likely_key(cfg: dict[str, Any], message: str) -> None:
    found, _ = messages(cfg)
    assert found and message in found[0] and found[0].endswith("; ignored, as mergekit ignores it" + (
        " here" if "method parameter" in message else "")), found
    with pytest.raises(ConfigError, match="strict mode"):
        load_config(cfg, strict=True)


def test_tokens_zero_source_extras_are_ignored() -> None:
    found, cfg = messages(gta(tokenizer={"tokens": {"<x>": {"source": {"kind": "zero", "why": 1}}}}))
    assert found == ["tokenizer.tokens['<x>'].source.why: unknown key (known: kind); ignored, as mergekit ignores it"]
    assert cfg.tokenizer is not None and cfg.tokenizer.tokens["<x>"].source.kind == "zero"


def test_unknown_keys_in_slices_sources_and_modules() -> None:
    src = {"model": "org/a", "layer_range": [0, 2], "foo": 1, "parameters": {"scale": 1.0}}
    found, cfg = messages({"merge_method": "passthrough", "slices": [{"sources": [src], "bogus": 2}]})
    assert found == [
        "slices[0].bogus: unknown key (known: base_model, parameters, residual_weight, sources); ignored, as mergekit "
        "ignores it",
        "slices[0].sources[0].foo: unknown key (known: layer_range, model, parameters); ignored, as mergekit "
        "ignores it",
    ]
    assert cfg.slices[0].inputs[0].layer_range == (0, 2)
    found, _ = messages({"merge_method": "linear", "parameters": {"weight": 1.0},
                         "modules": {"text": {"models": [{"model": "a"}], "modles": []}}})
    assert found == ["modules.text.modles: unknown key (did you mean 'models'?); ignored, as mergekit ignores it"]


def test_a_misspelled_required_key_warns_then_fails_as_mergekit_does() -> None:
    # mergekit ignores `merge_methd` and then refuses the config for its missing merge_method
    with pytest.warns(CompatWarning, match="did you mean 'merge_method'"):
        with pytest.raises(ConfigError, match="merge_method: missing"):
            load_config({"merge_methd": "ties", "models": [{"model": "a"}]})
    with pytest.warns(CompatWarning, match=r"parameters\.t\)"):
        with pytest.raises(ConfigError, match="Missing required parameter t for slerp"):
            load_config({"merge_method": "slerp", "base_model": "b", "models": [{"model": "a"}], "t": 0.5})


# ---------------------------------------------------------------------------------------------------------------
# strict mode and the CLI


LENIENT = {
    "unused parameter": lambda cfg: cfg["models"][1]["parameters"].__setitem__("gamma", 0.1),
    "misspelled top-level key": lambda cfg: cfg.__setitem__("merge_methd", "ties"),
    "misplaced parameter": lambda cfg: cfg["models"][0].__setitem__("density", 0.5),
    "boolean as a number": lambda cfg: cfg["models"][0]["parameters"].__setitem__("weight", True),
    "empty list": lambda cfg: cfg["models"][0]["parameters"].__setitem__("density", []),
    "filter entry key": lambda cfg: cfg["models"][0]["parameters"].__setitem__(
        "density", {"filter": "mlp", "value": 0.5, "note": 1}),
}


def lenient_config(family: Family, kind: str) -> dict[str, Any]:
    from helpers.cli import ties_config

    cfg = ties_config(family)
    LENIENT[kind](cfg)
    return cfg


@pytest.mark.parametrize("kind", LENIENT)
def test_strict_makes_each_class_an_error_in_the_api_and_the_cli(
    family_f32: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str], kind: str
) -> None:
    cfg = lenient_config(family_f32, kind)
    with pytest.raises(ConfigError, match=r"\(strict mode: mergekit accepts this"):
        ferromerge.plan(cfg, strict=True)
    with pytest.raises(ConfigError, match=r"\(strict mode: mergekit accepts this"):
        ferromerge.run(cfg, tmp_path / "api", strict=True, quiet=True)
    assert not (tmp_path / "api").exists()
    config = write_config(tmp_path / "lenient.yml", cfg)
    for command in ("run", "plan"):
        capsys.readouterr()
        assert main([command, str(config), str(tmp_path / "out"), "--strict"]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("ferromerge: error: ") and "strict mode" in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lenient.yml"]


def test_the_cli_prints_each_warning_once_as_a_line_and_merges(
    family_f32: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = lenient_config(family_f32, "unused parameter")
    cfg["merge_methd"] = "ties"
    config = write_config(tmp_path / "lenient.yml", cfg)
    clean = lenient_config(family_f32, "unused parameter")
    del clean["models"][1]["parameters"]["gamma"]
    capsys.readouterr()
    assert main(["run", str(config), str(tmp_path / "out"), "--quiet"]) == 0
    assert main(["run", str(write_config(tmp_path / "clean.yml", clean)), str(tmp_path / "clean"), "--quiet"]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        "ferromerge: warning: merge_methd: unknown key (did you mean 'merge_method'?); ignored, as mergekit ignores it",
        "ferromerge: warning: models[1].parameters.gamma: ties does not use 'gamma'; ignored, as mergekit ignores it",
    ]
    got, want = read_model(tmp_path / "out"), read_model(tmp_path / "clean")
    assert got.keys() == want.keys()
    for name in got:
        np.testing.assert_array_equal(got[name][1], want[name][1], err_msg=name)
    # plan says the same, every time it runs in one process
    for _ in range(2):
        assert main(["plan", str(config)]) == 0
        assert [line for line in capsys.readouterr().err.splitlines() if "warning" in line] == err


def test_malformed_entries_are_left_for_the_schema_to_refuse() -> None:
    # the walk over unknown keys skips what is not a mapping (or a token source of an unknown kind): pydantic, like
    # mergekit's, refuses it with its place
    with pytest.raises(ConfigError, match=r"tokenizer\.tokens\.x\.source"):
        load_config(gta(tokenizer={"tokens": {"x": {"source": {"kind": [1]}}}}))
    with pytest.raises(ConfigError, match=r"models\[0\]: input should be a valid dictionary"):
        load_config(gta(models=["org/a"]))
