"""Parameter settings: filters, gradients, fall-through and precedence (``ferromerge.params``), and layer-name parsing
(``ferromerge.layers``)."""

from __future__ import annotations

from typing import Any

import pytest

from ferromerge import ConfigError
from ferromerge.models.layers import LayerName, parse
from ferromerge.methods.registry import REGISTRY
from ferromerge.methods.spec import ParamSpec
from ferromerge.config.settings import (
    Const,
    Filtered,
    Gradient,
    Level,
    evaluate,
    layer_t,
    parse_setting,
    resolve,
    uniform,
)

FLOAT = ParamSpec(float, None)
BOOL = ParamSpec(bool, False)
DENSITY = REGISTRY["ties"].per_model["density"]

ATTN = "model.layers.3.self_attn.q_proj.weight"
MLP = "model.layers.3.mlp.up_proj.weight"
NORM = "model.layers.3.input_layernorm.weight"


def setting(raw: Any, spec: ParamSpec = FLOAT, name: str = "weight") -> Any:
    return parse_setting(raw, name, spec, "parameters.weight")


def test_first_matching_filter_wins_and_null_or_star_match_everything() -> None:
    s = setting([{"filter": "self_attn", "value": 1}, {"filter": "layers.3", "value": 2}, {"value": 3}])
    assert (evaluate(s, ATTN, 0.0), evaluate(s, MLP, 0.0), evaluate(s, "model.norm.weight", 0.0)) == (1.0, 2.0, 3.0)
    star = setting([{"filter": "mlp", "value": 1}, {"filter": "*", "value": 5}])
    assert evaluate(star, NORM, 0.0) == 5.0


def test_no_matching_filter_gives_nothing() -> None:
    s = setting([{"filter": "mlp", "value": 0.5}])
    assert evaluate(s, ATTN, 0.0) is None and evaluate(s, MLP, 0.0) == 0.5


def test_unfiltered_wrappers_are_plain_values() -> None:
    assert setting({"value": 0.25}) == Const(0.25)
    assert setting({"filter": "*", "value": [0, 1]}) == Gradient((0.0, 1.0), True)
    assert setting([{"filter": None, "value": 2}, {"filter": "mlp", "value": 3}]) == Const(2.0)
    assert setting([0.7]) == Const(0.7)


@pytest.mark.parametrize(
    ("t", "expected"),
    [(0.0, 1.0), (1.0, 0.1), (0.5, 0.7), (0.25, 0.85), (0.75, 0.4)],
)
def test_numeric_gradient_is_piecewise_linear(t: float, expected: float) -> None:
    assert evaluate(setting([1, 0.7, 0.1]), ATTN, t) == pytest.approx(expected, abs=1e-15)


def test_gradient_at_first_middle_and_last_layer_of_a_slice() -> None:
    s = setting([0.0, 1.0, 0.0])
    n = 5
    assert [evaluate(s, ATTN, layer_t(i, n)) for i in range(n)] == [0.0, 0.5, 1.0, 0.5, 0.0]


def test_one_layer_slice_takes_the_last_value_and_non_layer_tensors_the_first() -> None:
    assert layer_t(0, 1) == 1.0
    s = setting([0.2, 0.9])
    assert evaluate(s, ATTN, layer_t(0, 1)) == 0.9
    assert evaluate(s, "model.embed_tokens.weight", 0.0) == 0.2


def test_non_numeric_gradient_picks_the_anchor_at_int_t_times_n_minus_1() -> None:
    s = parse_setting([True, False, True], "normalize", BOOL, "parameters.normalize")
    assert s == Gradient((True, False, True), numeric=False)
    assert [evaluate(s, ATTN, t) for t in (0.0, 0.49, 0.5, 0.99, 1.0)] == [True, True, False, False, True]


def test_interpolated_density_never_leaves_its_anchors_by_rounding() -> None:
    s = parse_setting([1.0, 1.0, 0.5], "density", DENSITY, "x")
    for i in range(41):
        assert 0.5 <= evaluate(s, ATTN, i / 40) <= 1.0


def test_precedence_source_then_slice_then_global_with_fall_through() -> None:
    levels = (
        Level({"weight": setting([{"filter": "self_attn", "value": 1}])}, "slices[0].sources[1].parameters"),
        Level({"weight": setting([{"filter": "mlp", "value": 2}])}, "slices[0].parameters"),
        Level({"weight": setting(3)}, "parameters"),
    )
    assert resolve("weight", levels, ATTN, 0.0) == (1.0, "slices[0].sources[1].parameters.weight")
    assert resolve("weight", levels, MLP, 0.0) == (2.0, "slices[0].parameters.weight")
    assert resolve("weight", levels, NORM, 0.0) == (3.0, "parameters.weight")
    assert resolve("density", levels, NORM, 0.0) is None
    assert resolve("weight", levels[:2], NORM, 0.0) is None


def test_uniform_detects_values_that_can_vary() -> None:
    const = (Level({"weight": setting(0.5)}, "a"), Level({"weight": setting([0, 1])}, "b"))
    assert uniform("weight", const) == (True, 0.5)
    assert uniform("weight", const[1:]) == (False, None)
    assert uniform("density", const) == (True, None)


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"filter": "x", "value": []}, "an empty gradient"),
        ([1, {"filter": "x", "value": 1}], "a list mixing"),
        ({"filter": "x", "value": {"filter": "y", "value": 1}}, "cannot be nested"),
        ({"filter": "x", "valu": 1}, "expected a value or"),
    ],
)
def test_malformed_settings(raw: Any, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        setting(raw)


def test_an_empty_list_sets_nothing() -> None:
    # mergekit's evaluate_setting gives None for [] (resolution falls through to the next level)
    assert setting([]) is None


def test_filtered_setting_keeps_its_entries() -> None:
    s = setting([{"filter": "mlp", "value": [0, 1]}, {"filter": "attn", "value": 2}])
    assert s == Filtered((("mlp", Gradient((0.0, 1.0), True)), ("attn", Const(2.0))))


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("model.layers.12.self_attn.q_proj.weight", LayerName("model.layers", 12, "self_attn.q_proj.weight")),
        ("transformer.h.3.attn.c_attn.weight", LayerName("transformer.h", 3, "attn.c_attn.weight")),
        ("gpt_neox.layers.0.mlp.dense_h_to_4h.bias", LayerName("gpt_neox.layers", 0, "mlp.dense_h_to_4h.bias")),
        ("bert.encoder.layer.7.output.dense.weight", LayerName("bert.encoder.layer", 7, "output.dense.weight")),
        ("blocks.5.norm1.weight", LayerName("blocks", 5, "norm1.weight")),
        ("model.layers.3.mlp.experts.7.w1.weight", LayerName("model.layers", 3, "mlp.experts.7.w1.weight")),
        (
            "encoder.block.2.layer.1.DenseReluDense.wi.weight",
            LayerName("encoder.block", 2, "layer.1.DenseReluDense.wi.weight"),
        ),
        ("model.embed_tokens.weight", None),
        ("lm_head.weight", None),
        ("transformer.ln_f.weight", None),
        ("model.norm.weight", None),
    ],
)
def test_layer_names_are_parsed_generically(name: str, expected: LayerName | None) -> None:
    assert parse(name) == expected
    if expected is not None:
        assert expected.renamed(expected.index) == name
