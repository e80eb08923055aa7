"""slices (stacking, duplicated layers, renaming, layer counts), passthrough, tied embeddings, and per-tensor
parameter resolution through the whole pipeline (config -> plan -> engine -> output)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ferromerge
from ferromerge import ConfigError, InputError
from ferromerge.models.index import read_tensors
from ferromerge._run import prepare
from ferromerge.synth import Family, make_family, save_model

from helpers.cli import read_model, run_cli, write_config

LAYERS = 4


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """float32, 4 layers, hidden 32 (read-only)."""
    return make_family(
        tmp_path_factory.mktemp("fam4"), layers=LAYERS, hidden=32, intermediate=48, vocab=64, dtype="float32", seed=5
    )


def tensors(model: Path) -> dict[str, np.ndarray]:
    return read_tensors(model / "model.safetensors")


def src(model: Path, start: int, end: int, **parameters: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": str(model), "layer_range": [start, end]}
    if parameters:
        out["parameters"] = parameters
    return out


def plan_json(config: dict[str, Any]) -> list[dict[str, Any]]:
    _, plan = prepare(config)
    return [t for s in json.loads(plan.to_json())["shards"] for t in s["tensors"]]


def layer_suffixes(model: Path) -> list[str]:
    return [n.split(".", 3)[3] for n in tensors(model) if n.startswith("model.layers.0.")]


# ---------------------------------------------------------------- passthrough, stacking, renaming


def test_passthrough_stacks_slices_and_renames_layers(fam: Family, tmp_path: Path) -> None:
    a, b = fam.finetunes[0], fam.finetunes[1]
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [src(a, 0, 2)]}, {"sources": [src(b, 1, 4)]}]}
    ferromerge.run(cfg, tmp_path / "out", quiet=True)
    out, ta, tb = read_model(tmp_path / "out"), tensors(a), tensors(b)
    mapping = {0: (ta, 0), 1: (ta, 1), 2: (tb, 1), 3: (tb, 2), 4: (tb, 3)}
    for j, (source, i) in mapping.items():
        for rest in layer_suffixes(a):
            dtype, values = out[f"model.layers.{j}.{rest}"]
            assert dtype == "F32"
            np.testing.assert_array_equal(values, source[f"model.layers.{i}.{rest}"])
    # embeddings from the first slice, final norm and lm_head from the last (mergekit's pre/post weights)
    np.testing.assert_array_equal(out["model.embed_tokens.weight"][1], ta["model.embed_tokens.weight"])
    np.testing.assert_array_equal(out["model.norm.weight"][1], tb["model.norm.weight"])
    np.testing.assert_array_equal(out["lm_head.weight"][1], tb["lm_head.weight"])
    assert len(out) == 3 + 5 * len(layer_suffixes(a))
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["num_hidden_layers"] == 5
    assert config == {**json.loads((a / "config.json").read_text()), "num_hidden_layers": 5}


def test_duplicated_layers_read_the_same_input_tensor_twice(fam: Family, tmp_path: Path) -> None:
    a = fam.finetunes[0]
    cfg = {"merge_method": "passthrough", "slices": [{"sources": [src(a, 0, 3)]}, {"sources": [src(a, 1, 4)]}]}
    planned = plan_json(cfg)
    feeds = [(t["name"], t["inputs"][0]["tensor"]) for t in planned if t["name"].endswith("o_proj.weight")]
    assert feeds == [(f"model.layers.{j}.self_attn.o_proj.weight", f"model.layers.{i}.self_attn.o_proj.weight")
                     for j, i in enumerate([0, 1, 2, 1, 2, 3])]
    ferromerge.run(cfg, tmp_path / "out", quiet=True)
    out, ta = read_model(tmp_path / "out"), tensors(a)
    for j, i in enumerate([0, 1, 2, 1, 2, 3]):
        np.testing.assert_array_equal(out[f"model.layers.{j}.mlp.down_proj.weight"][1],
                                      ta[f"model.layers.{i}.mlp.down_proj.weight"])
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_passthrough_scale_is_applied_per_filter_and_scale_one_is_an_exact_copy(tmp_path: Path) -> None:
    family = make_family(tmp_path / "bf", n_finetunes=1, layers=2, hidden=32, intermediate=48, vocab=64)
    a = family.finetunes[0]
    cfg = {"merge_method": "passthrough", "models": [
        {"model": str(a), "parameters": {"scale": [{"filter": "o_proj", "value": 0.5}, {"value": 1.0}]}}]}
    ferromerge.run(cfg, tmp_path / "out", quiet=True)
    out = read_model(tmp_path / "out")
    src_t = read_model(a)
    for name, (dtype, values) in out.items():
        assert dtype == "BF16"
        want = src_t[name][1] * (np.float32(0.5) if "o_proj" in name else np.float32(1))
        np.testing.assert_array_equal(values, want, err_msg=name)  # halving a bf16 value is exact
    assert out.keys() == src_t.keys()


def test_passthrough_rejects_two_inputs(fam: Family) -> None:
    a, b = fam.finetunes[0], fam.finetunes[1]
    with pytest.raises(ConfigError, match=r"slices\[0\]: passthrough takes exactly 1 model per output tensor, got 2"):
        prepare({"merge_method": "passthrough", "slices": [{"sources": [src(a, 0, 2), src(b, 0, 2)]}]})
    # models: with a base_model that it does not list: mergekit adds the base as a second input
    with pytest.raises(ConfigError, match=r"got 2 \(models\[0\] .*, base_model "):
        prepare({"merge_method": "passthrough", "base_model": str(fam.base), "models": [{"model": str(a)}]})


def test_passthrough_in_memory_scales_one_tensor_and_refuses_two() -> None:
    x = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    out = ferromerge.merge_tensors([x], "passthrough", {"scale": 0.5})
    np.testing.assert_array_equal(out, np.float32(0.5) * x)  # halving is exact in float32
    np.testing.assert_array_equal(ferromerge.merge_tensors([x], "passthrough"), x)  # scale defaults to 1
    sd = ferromerge.merge_state_dicts({"a": {"w": x}}, "passthrough", parameters={"scale": 2.0})
    np.testing.assert_array_equal(sd["w"], np.float32(2) * x)
    with pytest.raises(ferromerge.ParameterError, match=r"'passthrough' takes at most 1 input\(s\), got 2: "
                                                        r"tensors\[0\], tensors\[1\]"):
        ferromerge.merge_tensors([x, x], "passthrough", {"scale": 0.5})
    with pytest.raises(ferromerge.ParameterError, match=r"got 2: model 'a', model 'b'"):
        ferromerge.merge_state_dicts({"a": {"w": x}, "b": {"w": x}}, "passthrough")


def test_passthrough_keeps_the_sign_of_zero_in_memory() -> None:
    """mergekit's passthrough is ``tensor * scale`` (or the tensor itself): a −0.0 stays −0.0, scaled or not, where
    the linear kernel's sum from +0.0 used to turn it into +0.0."""
    x = np.array([[-0.0, 1.5], [0.0, -0.0]], np.float32)
    for params, k in (({}, 1.0), ({"scale": 2.0}, 2.0), ({"scale": -1.0}, -1.0)):
        out = ferromerge.merge_tensors([x], "passthrough", params)
        np.testing.assert_array_equal(out.view(np.uint32), (np.float32(k) * x).view(np.uint32))


# ---------------------------------------------------------------- merges over slices


def test_multi_slice_linear_uses_each_slices_sources_and_parameters(fam: Family, tmp_path: Path) -> None:
    a, b, c = fam.finetunes
    cfg = {
        "merge_method": "linear",
        "slices": [
            {"sources": [src(a, 0, 2, weight=1.0), src(b, 2, 4, weight=3.0)]},
            {"sources": [src(b, 0, 2), src(c, 0, 2)], "parameters": {"weight": [1.0, 3.0], "normalize": False}},
        ],
    }
    ferromerge.run(cfg, tmp_path / "out", quiet=True)
    out = read_model(tmp_path / "out")
    ta, tb, tc = tensors(a), tensors(b), tensors(c)
    rest = "mlp.up_proj.weight"
    np.testing.assert_allclose(out[f"model.layers.1.{rest}"][1],
                               (ta[f"model.layers.1.{rest}"] + 3 * tb[f"model.layers.3.{rest}"].astype(np.float64)) / 4,
                               rtol=1e-6, atol=1e-7)
    # slice 1, layer 0 of 2: t = 0 -> weight 1 for both, no normalization; layer 1: t = 1 -> weight 3
    np.testing.assert_allclose(out[f"model.layers.2.{rest}"][1],
                               tb[f"model.layers.0.{rest}"] + tc[f"model.layers.0.{rest}"].astype(np.float64),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out[f"model.layers.3.{rest}"][1],
                               3 * (tb[f"model.layers.1.{rest}"] + tc[f"model.layers.1.{rest}"].astype(np.float64)),
                               rtol=1e-6, atol=1e-7)
    # non-layer tensors take t = 0 of the last slice: weight 1, unnormalized
    np.testing.assert_allclose(out["lm_head.weight"][1], tb["lm_head.weight"] + tc["lm_head.weight"].astype(np.float64),
                               rtol=1e-6, atol=1e-7)


def test_filters_see_input_names_for_per_model_parameters_and_output_names_for_shared_ones(fam: Family) -> None:
    a, b = fam.finetunes[0], fam.finetunes[1]
    cfg = {
        "merge_method": "ties",
        "base_model": str(fam.base),
        "slices": [{"sources": [
            src(fam.base, 2, 4), src(a, 2, 4, weight=[{"filter": "layers.2.", "value": 0.25}, {"value": 1.0}]),
            src(b, 2, 4, weight=1.0)]}],
        "parameters": {"density": 0.5, "lambda": [{"filter": "layers.0.", "value": 0.5}, {"value": 2.0}]},
    }
    by_name = {t["name"]: t for t in plan_json(cfg)}
    first = by_name["model.layers.0.mlp.up_proj.weight"]  # fed by input layer 2
    assert first["inputs"][0]["tensor"] == "model.layers.2.mlp.up_proj.weight"
    assert first["inputs"][0]["weight"] == 0.25 and first["method"]["lambda"] == 0.5
    second = by_name["model.layers.1.mlp.up_proj.weight"]
    assert second["inputs"][0]["weight"] == 1.0 and second["method"]["lambda"] == 2.0
    assert second["base"]["tensor"] == "model.layers.3.mlp.up_proj.weight"
    assert [i["model_id"] for i in second["inputs"]] == [0, 1]


def test_density_gradient_per_layer_and_first_value_for_non_layer_tensors(fam: Family) -> None:
    cfg = {
        "merge_method": "ties",
        "base_model": str(fam.base),
        "models": [{"model": str(fam.finetunes[0]), "parameters": {"weight": 1.0, "density": [1.0, 0.7, 0.1]}}],
    }
    by_name = {t["name"]: t["inputs"][0]["density"] for t in plan_json(cfg)}
    got = [by_name[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(LAYERS)]
    assert got == pytest.approx([1.0, 0.8, 0.5, 0.1], abs=1e-12)
    assert by_name["model.embed_tokens.weight"] == 1.0 and by_name["lm_head.weight"] == 1.0


def test_a_required_parameter_that_no_filter_gives_names_the_model_and_tensor(fam: Family) -> None:
    cfg = {"merge_method": "linear", "models": [
        {"model": str(fam.finetunes[0]), "parameters": {"weight": [{"filter": "mlp", "value": 1.0}]}},
        {"model": str(fam.finetunes[1]), "parameters": {"weight": 1.0}}]}
    with pytest.raises(ConfigError, match=r"Missing required parameter weight for .*ft1 \(models\[0\]\) at tensor "
                                          r"lm_head\.weight: no filter of models\[0\]\.parameters\.weight"):
        prepare(cfg)


# ---------------------------------------------------------------- errors


def test_sources_of_a_slice_must_span_the_same_number_of_layers(fam: Family) -> None:
    a, b = fam.finetunes[0], fam.finetunes[1]
    with pytest.raises(ConfigError, match=r"slices\[0\]: every source of a slice must span the same number of layers; "
                                          r"got sources\[0\] .* 2, sources\[1\] .* 3"):
        prepare({"merge_method": "linear", "parameters": {"weight": 1},
                 "slices": [{"sources": [src(a, 0, 2), src(b, 0, 3)]}]})


def test_layer_range_beyond_the_model_names_the_model(fam: Family) -> None:
    b = fam.finetunes[1]
    with pytest.raises(InputError, match=rf"slices\[1\]\.sources\[0\]\.layer_range: \[2, 6\] is out of bounds for "
                                         rf"model '{b}' .* which has 4 layers"):
        prepare({"merge_method": "passthrough",
                 "slices": [{"sources": [src(fam.finetunes[0], 0, 2)]}, {"sources": [src(b, 2, 6)]}]})


@pytest.mark.parametrize(
    ("slices", "match"),
    [
        ([{"sources": []}], r"slices\[0\]\.sources: empty"),
        ([{"sources": [{"model": "x", "layer_range": [3, 3]}]}], r"layer_range: \[3, 3\] is empty"),
        ([{"sources": [{"model": "x", "layer_range": [0, 2]}, {"model": "x", "layer_range": [2, 4]}]}],
         r"slices\[0\]\.sources\[1\]\.model: 'x' is listed twice in slices\[0\]"),
        ([{"sources": [{"model": "x"}]}], r"slices\[0\]\.sources\[0\]\.layer_range: missing"),
    ],
)
def test_malformed_slices(slices: list[dict[str, Any]], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        ferromerge.config.load_config({"merge_method": "passthrough", "slices": slices})


@pytest.mark.parametrize(
    ("slices", "match"),
    [
        ([{"sources": [{"model": "x", "layer_range": [0, 1], "weight": 1}]}],
         r"slices\[0\]\.sources\[0\]\.weight: 'weight' is a method parameter, which belongs under "
         r"slices\[0\]\.sources\[0\]\.parameters"),
        ([{"sources": [{"model": "x", "layer_range": [0, 1]}], "bogus": 1}],
         r"slices\[0\]\.bogus: unknown key \(known: base_model, parameters, residual_weight, sources\)"),
    ],
)
def test_unknown_keys_in_slices_are_ignored_as_mergekit_ignores_them(slices: list[dict[str, Any]], match: str) -> None:
    # mergekit's pydantic models ignore undeclared keys: a compat warning, an error only in strict mode
    with pytest.warns(ferromerge.CompatWarning, match=match):
        ferromerge.config.load_config({"merge_method": "passthrough", "slices": slices})
    with pytest.raises(ConfigError, match=match):
        ferromerge.config.load_config({"merge_method": "passthrough", "slices": slices}, strict=True)


def test_models_and_slices_together_are_an_error() -> None:
    with pytest.raises(ConfigError, match="models and slices: give one of them"):
        ferromerge.config.load_config({"merge_method": "linear", "models": [{"model": "x"}],
                                       "slices": [{"sources": [{"model": "x", "layer_range": [0, 1]}]}]})


def test_gta_slices_must_list_the_base(fam: Family) -> None:
    with pytest.raises(ConfigError, match=r"slices\[0\]: base model '.*base' is not one of its sources"):
        ferromerge.config.load_config({"merge_method": "ties", "base_model": str(fam.base), "parameters": {"weight": 1},
                                       "slices": [{"sources": [src(fam.finetunes[0], 0, 2)]}]})


def test_a_slice_base_model_overrides_the_global_one(fam: Family) -> None:
    a, b = fam.finetunes[0], fam.finetunes[1]
    cfg = ferromerge.config.load_config({
        "merge_method": "task_arithmetic", "base_model": str(fam.base), "parameters": {"weight": 1},
        "slices": [{"sources": [src(fam.base, 0, 2), src(a, 0, 2)]},
                   {"sources": [src(a, 2, 4), src(b, 2, 4)], "base_model": str(a)}]})
    assert [s.base.ref for s in cfg.slices if s.base] == [str(fam.base), str(a)]
    assert [[m.ref for m in s.inputs] for s in cfg.slices] == [[str(a)], [str(b)]]


def test_a_layer_gap_or_a_wrong_config_layer_count_is_an_input_error(fam: Family, tmp_path: Path) -> None:
    model = tmp_path / "gap"
    shutil.copytree(fam.finetunes[0], model)
    t = tensors(model)
    for name in [n for n in t if n.startswith("model.layers.1.")]:
        del t[name]
    (model / "model.safetensors").unlink()
    save_model(model, t, dtype="float32")
    with pytest.raises(InputError, match=r"has tensors of model\.layers\.3 but none of layer\(s\) model\.layers\.1"):
        prepare({"merge_method": "passthrough", "slices": [{"sources": [src(model, 0, 1)]}]})
    model = tmp_path / "short"
    shutil.copytree(fam.finetunes[0], model)
    config = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 6}))
    with pytest.raises(InputError, match=r"config\.json says num_hidden_layers: 6, but its tensors have 4 layers"):
        prepare({"merge_method": "passthrough", "slices": [{"sources": [src(model, 0, 1)]}]})


# ---------------------------------------------------------------- tied embeddings


def tied_copy(model: Path, dest: Path) -> Path:
    t = tensors(model)
    del t["lm_head.weight"]
    config = {**json.loads((model / "config.json").read_text()), "tie_word_embeddings": True}
    return save_model(dest, t, dtype="float32", config=config)


def test_lm_head_absent_from_every_input_stays_absent(fam: Family, tmp_path: Path) -> None:
    a = tied_copy(fam.finetunes[0], tmp_path / "ta")
    b = tied_copy(fam.finetunes[1], tmp_path / "tb")
    cfg = {"merge_method": "linear", "models": [{"model": str(a), "parameters": {"weight": 1}},
                                                {"model": str(b), "parameters": {"weight": 1}}]}
    ferromerge.run(cfg, tmp_path / "out", quiet=True)
    assert "lm_head.weight" not in read_model(tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is True


@pytest.mark.parametrize("tied_first", [True, False])
def test_lm_head_absent_from_some_inputs_is_fed_from_their_embeddings(
    fam: Family, tmp_path: Path, tied_first: bool
) -> None:
    tied = tied_copy(fam.finetunes[0], tmp_path / "ta")
    untied = fam.finetunes[1]
    order = [(tied, 1.0), (untied, 3.0)] if tied_first else [(untied, 3.0), (tied, 1.0)]
    cfg = {"merge_method": "linear", "models": [{"model": str(m), "parameters": {"weight": w}} for m, w in order]}
    planned = {t["name"]: t for t in plan_json(cfg)}
    assert sorted(i["tensor"] for i in planned["lm_head.weight"]["inputs"]) == ["lm_head.weight",
                                                                                 "model.embed_tokens.weight"]
    ferromerge.run(cfg, tmp_path / "out", quiet=True)
    out = read_model(tmp_path / "out")
    want = (tensors(tied)["model.embed_tokens.weight"] + 3 * tensors(untied)["lm_head.weight"].astype(np.float64)) / 4
    np.testing.assert_allclose(out["lm_head.weight"][1], want, rtol=1e-6, atol=1e-7)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False


# ---------------------------------------------------------------- CLI


def test_cli_plan_reports_the_layer_count_of_a_frankenmerge(fam: Family, tmp_path: Path) -> None:
    a = fam.finetunes[0]
    config = write_config(tmp_path / "franken.yml", {
        "merge_method": "passthrough", "slices": [{"sources": [src(a, 0, 3)]}, {"sources": [src(a, 1, 4)]}]})
    result = run_cli("plan", config)
    assert result.returncode == 0, result.stderr
    assert "method: passthrough (seed 0)" in result.stdout and "in 6 layers" in result.stdout
    result = run_cli("run", config, tmp_path / "out", "--quiet")
    assert result.returncode == 0, result.stderr
    assert json.loads((tmp_path / "out" / "config.json").read_text())["num_hidden_layers"] == 6


def test_sources_whose_layers_hold_different_tensors_are_named(fam: Family, tmp_path: Path) -> None:
    b = tmp_path / "b"
    shutil.copytree(fam.finetunes[1], b)
    t = tensors(b)
    del t["model.layers.2.mlp.up_proj.weight"]
    t["model.layers.1.extra.weight"] = t["model.norm.weight"]
    (b / "model.safetensors").unlink()
    save_model(b, t, dtype="float32")

    def cfg(a_range: list[int], b_range: list[int]) -> dict[str, Any]:
        return {"merge_method": "linear", "parameters": {"weight": 1},
                "slices": [{"sources": [src(fam.finetunes[0], *a_range), src(b, *b_range)]}]}

    with pytest.raises(InputError, match=rf"model '{b}' .*slices\[0\]\.sources\[1\]\) has no tensor "
                                         r"model\.layers\.2\.mlp\.up_proj\.weight, which .* has as model\.layers\.1\."):
        prepare(cfg([1, 2], [2, 3]))
    with pytest.raises(InputError, match=r"tensor model\.layers\.1\.extra\.weight of model .* has no counterpart"):
        prepare(cfg([0, 1], [1, 2]))
