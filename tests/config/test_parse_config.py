"""Config parsing: the mergekit subset, parameter resolution, and that nothing is silently ignored."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from ferromerge import CompatWarning, ConfigError, ParameterError, methods
from ferromerge.config.resolve import load_config, parse_config
from ferromerge.config.settings import Const, Filtered, Gradient


def ties(**extra: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = {
        "merge_method": "ties",
        "base_model": "org/base",
        "models": [
            {"model": "org/a", "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": "org/b", "parameters": {"weight": 0.5}},
        ],
        "parameters": {"density": 0.7},
    }
    cfg.update(extra)
    return cfg


def test_dict_yaml_text_and_file_give_the_same_config(tmp_path: Path) -> None:
    text = yaml.safe_dump(ties())
    path = tmp_path / "c.yml"
    path.write_text(text)
    results = [load_config(ties()), load_config(text), load_config(path), load_config(str(path))]
    assert all(r.resolved() == results[0].resolved() for r in results)
    assert load_config(path).text == text


def test_per_model_parameters_override_global_ones_and_defaults_fill_in() -> None:
    cfg = load_config(ties())
    assert [(m.ref, m.weight, m.density) for m in cfg.inputs] == [("org/a", 1.0, 0.5), ("org/b", 0.5, 0.7)]
    assert cfg.shared == {"normalize": True, "lambda": 1.0, "int8_mask": False, "rescale": False, "rescale_mode": "l1"}
    assert cfg.base == "org/base" and cfg.reference == "org/base"


def test_method_defaults_follow_mergekit() -> None:
    dare = load_config(ties(merge_method="dare_ties"))
    assert dare.shared["rescale"] is True and dare.shared["normalize"] is False
    ta = load_config(
        ties(merge_method="task_arithmetic", models=[{"model": "org/a", "parameters": {"weight": 1}}], parameters={})
    )
    assert ta.shared == {"normalize": False, "lambda": 1.0, "int8_mask": False}


def test_a_parameter_the_method_does_not_take_is_reported_and_ignored_as_mergekit_ignores_it() -> None:
    # mergekit looks up only the parameters its method declares (tests/compat/test_mergekit_leniency.py: same merge)
    message = r"models\[0\]\.parameters\.density: task_arithmetic does not use 'density'; ignored, as mergekit ignores it"
    with pytest.warns(CompatWarning, match=message):
        cfg = load_config(ties(merge_method="task_arithmetic", parameters={}))
    clean = ties(merge_method="task_arithmetic", parameters={})
    del clean["models"][0]["parameters"]["density"]
    assert cfg.resolved() == load_config(clean).resolved()
    with pytest.raises(ConfigError, match=message + r" \(strict mode"):
        load_config(ties(merge_method="task_arithmetic", parameters={}), strict=True)


def test_base_listed_in_models_is_not_an_input_and_model_ids_count_non_base_models() -> None:
    cfg = load_config(
        ties(
            models=[
                {"model": "org/a", "parameters": {"weight": 1}},
                {"model": "org/base"},
                {"model": "org/b", "parameters": {"weight": 1}},
            ]
        )
    )
    assert [(m.ref, m.model_id) for m in cfg.inputs] == [("org/a", 0), ("org/b", 1)]
    assert cfg.model_refs() == ["org/base", "org/a", "org/b"]


def test_base_parameters_under_a_gta_method_are_reported_as_having_no_effect() -> None:
    cfg = load_config(
        ties(
            models=[{"model": "org/base", "parameters": {"weight": 1}}, {"model": "org/a", "parameters": {"weight": 1}}]
        )
    )
    assert len(cfg.notes) == 1 and "models[0].parameters (weight)" in cfg.notes[0]


def test_linear_appends_an_unlisted_base_model_as_an_input_like_mergekit() -> None:
    cfg = load_config(
        {
            "merge_method": "linear",
            "base_model": "org/base",
            "models": [{"model": "org/a"}],
            "parameters": {"weight": 0.5},
        }
    )
    assert cfg.base is None and cfg.reference == "org/base"
    assert [(m.ref, m.where, m.weight) for m in cfg.inputs] == [
        ("org/a", "models[0]", 0.5),
        ("org/base", "base_model", 0.5),
    ]


def test_linear_base_without_a_weight_is_an_error_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"Missing required parameter weight for org/base \(base_model\)"):
        load_config(
            {
                "merge_method": "linear",
                "base_model": "org/base",
                "models": [{"model": "org/a", "parameters": {"weight": 1}}],
            }
        )


def test_linear_base_listed_in_models_is_one_input() -> None:
    cfg = load_config(
        {
            "merge_method": "linear",
            "base_model": "org/a",
            "models": [
                {"model": "org/a", "parameters": {"weight": 1}},
                {"model": "org/b", "parameters": {"weight": 2}},
            ],
        }
    )
    assert [m.ref for m in cfg.inputs] == ["org/a", "org/b"]


def test_missing_weight_names_the_model() -> None:
    with pytest.raises(ConfigError, match=r"Missing required parameter weight for org/b \(models\[1\]\)"):
        load_config(ties(models=[{"model": "org/a", "parameters": {"weight": 1}}, {"model": "org/b"}]))


@pytest.mark.parametrize("density", [0, 1.5, -0.2])
def test_density_outside_0_1_is_rejected_with_its_place(density: float) -> None:
    cfg = ties()
    cfg["models"][1]["parameters"]["density"] = density
    with pytest.raises(ParameterError, match=r"models\[1\]\.parameters\.density: density must be in \(0, 1\]"):
        load_config(cfg)


def test_global_density_out_of_range_names_the_global_place() -> None:
    with pytest.raises(ParameterError, match=r"^parameters\.density: density must be in \(0, 1\]"):
        load_config(ties(parameters={"density": 2}))


def test_misspelled_parameter_is_reported_with_its_place_and_the_likely_name() -> None:
    cfg = ties()
    cfg["models"][1]["parameters"]["densty"] = 0.5
    with pytest.warns(CompatWarning) as record:
        parsed = load_config(cfg)
    assert [str(w.message) for w in record] == [
        "models[1].parameters.densty: ties has no parameter 'densty' (did you mean 'density'?); ignored, as mergekit "
        "ignores it"
    ]
    assert parsed.inputs[1].density == 0.7  # the global density, as if densty were not there


def test_unused_global_parameter() -> None:
    with pytest.warns(CompatWarning, match=r"^parameters\.t: ties does not use 't'; ignored, as mergekit ignores it$"):
        cfg = load_config(ties(parameters={"t": 0.5}))
    assert cfg.resolved() == load_config(ties(parameters={})).resolved()


def test_method_wide_parameter_given_per_model_is_reported_and_ignored() -> None:
    cfg = ties()
    cfg["models"][0]["parameters"]["normalize"] = False
    with pytest.warns(
        CompatWarning, match=r"models\[0\]\.parameters\.normalize: 'normalize' applies to the whole merge, not to one "
        r"model \(set it under the top-level or the slice's parameters\); ignored, as mergekit ignores it here"
    ):
        parsed = load_config(cfg)
    assert parsed.shared["normalize"] is True  # ties' default: mergekit reads normalize from the slice/top levels


def test_wrongly_typed_parameter() -> None:  # pydantic's lax float refuses "heavy" too
    cfg = ties()
    cfg["models"][0]["parameters"]["weight"] = "heavy"
    with pytest.raises(ParameterError, match=r"models\[0\]\.parameters\.weight: parameter 'weight' must be a number"):
        load_config(cfg)


@pytest.mark.parametrize(
    ("value", "setting"),
    [
        ([0.1, 0.5, 1.0], Gradient((0.1, 0.5, 1.0), numeric=True)),
        ({"filter": "mlp", "value": 0.5}, Filtered((("mlp", Const(0.5)),))),
        (
            [{"filter": "mlp", "value": [0.5, 1]}, {"value": 1}],
            Filtered((("mlp", Gradient((0.5, 1.0), True)), (None, Const(1.0)))),
        ),
    ],
)
def test_gradients_and_filters_are_parsed_and_vary_per_tensor(value: Any, setting: Any) -> None:
    cfg = ties()
    cfg["models"][0]["parameters"]["density"] = value
    model = load_config(cfg).inputs[0]
    assert model.levels[0].settings["density"] == setting and model.levels[0].place == "models[0].parameters"
    assert model.density is None and "density" in model.varying and model.weight == 1.0


@pytest.mark.parametrize(
    ("value", "match"),
    [
        ([0.5, 1.5], r"models\[0\]\.parameters\.density\[1\]: density must be in \(0, 1\]"),
        ([{"filter": "mlp", "value": 0.5}, 0.3], "a list mixing"),
        ({"filter": "mlp"}, r"expected a value or \{filter, value\}"),
        ([{"filter": 3, "value": 0.5}], r"density\[0\]\.filter: expected a string"),
        ({"filter": "mlp", "value": [0.5, "x"]}, r"density\.value\[1\]: parameter 'density' must be a number"),
    ],
)
def test_malformed_gradients_and_filters_name_their_place(value: Any, match: str) -> None:
    cfg = ties()
    cfg["models"][0]["parameters"]["density"] = value
    with pytest.raises(ParameterError, match=match):
        load_config(cfg)


def test_an_empty_list_sets_nothing_as_in_mergekit() -> None:
    # mergekit's evaluate_setting gives None for [], so the next level (here the global density 0.7) applies
    cfg = ties()
    cfg["models"][0]["parameters"]["density"] = []
    with pytest.warns(CompatWarning, match=r"^models\[0\]\.parameters\.density: an empty list sets nothing; ignored"):
        assert load_config(cfg).inputs[0].density == 0.7
    with pytest.raises(ConfigError, match="an empty list sets nothing"):
        load_config(cfg, strict=True)


def test_an_unfiltered_value_wrapper_is_a_plain_value() -> None:
    cfg = ties()
    cfg["models"][0]["parameters"]["density"] = {"filter": "*", "value": 0.25}
    assert load_config(cfg).inputs[0].density == 0.25


def test_unknown_top_level_key() -> None:
    with pytest.warns(
        CompatWarning, match=r"^merge_methd: unknown key \(did you mean 'merge_method'\?\); ignored, as mergekit ignores it$"
    ):
        cfg = load_config(ties(merge_methd="ties"))
    assert cfg.resolved() == load_config(ties()).resolved()


def test_name_is_accepted_without_effect() -> None:
    assert load_config(ties(name="my-merge")).resolved() == load_config(ties()).resolved()


def test_unknown_key_in_a_model_entry() -> None:
    cfg = ties()
    cfg["models"][1]["layer_range"] = [0, 2]
    with pytest.warns(
        CompatWarning, match=r"^models\[1\]\.layer_range: a models: entry takes every layer \(layer ranges need "
        r"slices:\); ignored, as mergekit ignores it$"
    ):
        parsed = load_config(cfg)
    assert parsed.resolved() == load_config(ties()).resolved() and parsed.inputs[1].layer_range is None


def test_unknown_method() -> None:
    with pytest.raises(ParameterError, match="unknown merge method 'tiez'"):
        load_config(ties(merge_method="tiez"))


def test_every_mergekit_method_is_registered() -> None:
    # mergekit 0.1.5's registry (merge_methods/registry.py), by name
    mergekit = {
        "linear", "slerp", "nuslerp", "multislerp", "karcher", "task_arithmetic", "ties", "dare_ties",
        "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della", "della_linear", "sce", "ram", "ramplus_tl",
        "model_stock", "nearswap", "arcee_fusion", "passthrough",
    }
    # ours beyond mergekit's: the singular-vector and TALL-mask methods of issue 5 (docs/svd.md)
    ours = {"tsv_m", "iso_c", "iso_cts", "star", "consensus", "tall_masks"}
    assert set(methods.REGISTRY) == mergekit | ours


def test_gta_method_needs_a_base_and_model_stock_a_non_base_model() -> None:
    cfg = ties()
    del cfg["base_model"]
    with pytest.raises(ConfigError, match="base_model: ties needs a base model"):
        load_config(cfg)
    with pytest.raises(ConfigError, match="needs at least one model besides the base"):
        load_config(ties(merge_method="model_stock", models=[{"model": "org/base"}], parameters={}))


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_ties", "della", "breadcrumbs", "sce", "ram"])
def test_a_task_vector_method_with_only_its_base_copies_the_base_as_mergekit_does(method: str) -> None:
    # mergekit's GeneralizedTaskArithmeticMerge (and sce, ram) return the base when a group has no other input
    config = ties(merge_method=method, models=[{"model": "org/base"}], parameters={"weight": 1})
    if method in ("sce", "ram"):  # methods without weights: the global weight is ignored, as mergekit ignores it
        with pytest.warns(CompatWarning, match=rf"parameters\.weight: {method} does not use 'weight'"):
            cfg = load_config(config)
    else:
        cfg = load_config(config)
    assert cfg.slices[0].inputs == () and cfg.slices[0].base is not None and cfg.slices[0].base.ref == "org/base"
    assert cfg.notes == (
        f"models: only the base model 'org/base': its tensors are copied as they are ({method} has no task vector "
        "to add, as in mergekit)",
    )


@pytest.mark.parametrize(("given", "expected"), [("float16", "float16"), ("torch.bfloat16", "bfloat16")])
def test_dtype_names(given: str, expected: str) -> None:
    cfg = load_config(ties(dtype=given, out_dtype=given))
    assert (cfg.dtype, cfg.out_dtype) == (expected, expected)


@pytest.mark.parametrize(
    ("given", "match"), [("bf16", "write bfloat16"), ("float64", "unsupported dtype"), ("fp32", "write float32")]
)
def test_dtype_names_mergekit_rejects_are_rejected(given: str, match: str) -> None:
    with pytest.raises(ConfigError, match=f"out_dtype: .*{match}"):
        load_config(ties(out_dtype=given))


def test_duplicate_model_and_lora_reference() -> None:
    with pytest.raises(ConfigError, match=r"models\[1\]\.model: 'org/a' is listed twice"):
        load_config(ties(models=[{"model": "org/a", "parameters": {"weight": 1}}] * 2))
    # model+lora is accepted (tests/models/test_lora.py); a reference with two '+' is not (mergekit: "Can't parse")
    assert load_config(ties(models=[{"model": "org/a+org/lora", "parameters": {"weight": 1}}])).inputs[0].ref == (
        "org/a+org/lora"
    )
    with pytest.raises(ConfigError, match=r"models\[0\]\.model: 'org/a\+b\+c': expected MODEL\+LORA"):
        load_config(ties(models=[{"model": "org/a+b+c", "parameters": {"weight": 1}}]))


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "the config is empty"),
        ("# only a comment\n", "the config is empty"),
        ("merge_method: ties\nmodels: [\n", r"YAML syntax error \(line 3, column 1\)"),
        ("merge_method: ties\n---\nmerge_method: linear\n", "2 YAML documents"),
        ("- a\n- b\n", "expected a mapping"),
        ("models:\n  - model: a\n", "merge_method: missing"),
        ("merge_method: ties\nmodels: []\n", "models: missing or empty"),
        ("merge_method: ties\nmodels: a\n", r"models: input should be a valid list"),
        ("merge_method: ties\nmodels:\n  - parameters: {weight: 1}\n", r"models\[0\]\.model: missing"),
    ],
)
def test_malformed_config_files(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "bad.yml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as e:
        load_config(path)
    assert str(path) in str(e.value)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=f"config file not found: {tmp_path / 'nope.yml'}"):
        load_config(tmp_path / "nope.yml")


def test_parse_config_rejects_non_mappings() -> None:
    with pytest.raises(ConfigError, match="expected a mapping"):
        parse_config(["merge_method", "ties"])
