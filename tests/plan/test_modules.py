"""``modules:`` configs: tensors assigned to modules by name (``ferromerge.modules``), module-level parameters
between slice and top-level ones, per-module layouts (own layer stacks, slices per module, config.json layer
counts under sub-config keys), and the errors: a tensor of an unlisted module, a module without tensors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.cli import read_model, run_cli, write_config
from helpers.vlm import TEXT_LAYERS, VISION_LAYERS, make_vlms, vlm_config, vlm_shapes

from ferromerge._plan import modules
from ferromerge.config.resolve import parse_config
from ferromerge.errors import CompatWarning, ConfigError, InputError

@pytest.fixture(scope="module")
def vlms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return make_vlms(tmp_path_factory.mktemp("vlms"))


def three_modules(m: dict[str, Path], **text: Any) -> dict[str, Any]:
    return {
        "text_decoder": {"models": [{"model": str(m["a"]), "parameters": {"weight": 0.75}},
                                    {"model": str(m["b"]), "parameters": {"weight": 0.25}}], **text},
        "vision_tower": {"models": [{"model": str(m["a"]), "parameters": {"weight": 0.5}},
                                    {"model": str(m["b"]), "parameters": {"weight": 0.5}}]},
        "multi_modal_projector": {"models": [{"model": str(m["b"]), "parameters": {"weight": 1.0}}]},
    }


# --- which module a tensor belongs to -----------------------------------------------------------------------


def test_assign_mistral3_names_by_container() -> None:
    owner = modules.assign(vlm_shapes(), ["text_decoder", "vision_tower", "multi_modal_projector"])
    for name, module in owner.items():
        expected = {"language_model": "text_decoder", "vision_tower": "vision_tower",
                    "multi_modal_projector": "multi_modal_projector"}[name.split(".")[0]]
        assert module == expected, name


def test_assign_qwen2_vl_names_longest_marker_and_remainder() -> None:
    names = ["model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight", "lm_head.weight",
             "visual.patch_embed.proj.weight", "visual.blocks.0.norm1.weight", "visual.merger.ln_q.weight",
             "visual.merger.mlp.0.weight", "model.visual.deepstack_merger_list.1.norm.weight"]
    owner = modules.assign(names, ["text_decoder", "vision_tower", "multi_modal_projector"])
    assert owner == {
        "model.embed_tokens.weight": "text_decoder", "model.layers.0.mlp.up_proj.weight": "text_decoder",
        "lm_head.weight": "text_decoder", "visual.patch_embed.proj.weight": "vision_tower",
        "visual.blocks.0.norm1.weight": "vision_tower", "visual.merger.ln_q.weight": "multi_modal_projector",
        "visual.merger.mlp.0.weight": "multi_modal_projector",
        "model.visual.deepstack_merger_list.1.norm.weight": "multi_modal_projector",
    }


def test_assign_markers_are_whole_components() -> None:
    # "visual" inside "visualizer" or "vision_tower" inside "vision_tower_x" names no module
    names = ["model.visualizer.weight", "model.layers.0.mlp.vision_tower_x.weight", "visual.blocks.0.w",
             "mm_projector.0.weight"]
    owner = modules.assign(names, ["vision_tower", "multi_modal_projector"])
    assert owner == {"model.visualizer.weight": None, "model.layers.0.mlp.vision_tower_x.weight": None,
                     "visual.blocks.0.w": "vision_tower", "mm_projector.0.weight": "multi_modal_projector"}


def test_assign_unlisted_module_is_named_not_given_to_the_remainder() -> None:
    owner = modules.assign(vlm_shapes(), ["text_decoder"])
    assert owner["multi_modal_projector.linear_1.weight"] == "multi_modal_projector"
    assert owner["vision_tower.ln_pre.weight"] == "vision_tower"


def test_layer_key_in_sub_configs() -> None:
    cfg = vlm_config()
    assert modules.layer_key(cfg, "text_decoder", TEXT_LAYERS) == "text_config.num_hidden_layers"
    assert modules.layer_key(cfg, "vision_tower", VISION_LAYERS) == "vision_config.num_hidden_layers"
    same = {**cfg, "vision_config": {**cfg["vision_config"], "num_hidden_layers": TEXT_LAYERS}}
    assert modules.layer_key(same, "vision_tower", TEXT_LAYERS) == "vision_config.num_hidden_layers"
    assert modules.layer_key(same, "text_decoder", TEXT_LAYERS) == "text_config.num_hidden_layers"
    qwen = {"num_hidden_layers": 3, "vision_config": {"depth": 5}}
    assert modules.layer_key(qwen, "vision_tower", 5) == "vision_config.depth"
    assert modules.layer_key(qwen, "text_decoder", 3) == "num_hidden_layers"
    assert modules.layer_key(qwen, "text_decoder", 7) is None


# --- config ---------------------------------------------------------------------------------------------------


def test_config_module_parameters_rank_between_slice_and_global() -> None:
    config = parse_config({
        "merge_method": "ties", "base_model": "base",
        "parameters": {"weight": 1.0, "density": 0.9, "lambda": 0.5},
        "modules": {
            "text_decoder": {"slices": [{"sources": [{"model": "a", "layer_range": [0, 2], "parameters": {"weight": 0.3}},
                                                     {"model": "base", "layer_range": [0, 2]}],
                                         "parameters": {"density": 0.4}}],
                             "parameters": {"density": 0.6, "lambda": 0.7}},
            "vision_tower": {"models": [{"model": "a"}], "parameters": {"density": 0.2}},
        },
    })
    text, vision = config.modules
    (s,) = text.slices
    assert [lv.place for lv in s.inputs[0].levels] == [
        "modules.text_decoder.slices[0].sources[0].parameters", "modules.text_decoder.slices[0].parameters",
        "modules.text_decoder.parameters", "parameters"]
    assert s.inputs[0].values == {"weight": 0.3, "density": 0.4}
    assert vision.slices[0].inputs[0].values == {"weight": 1.0, "density": 0.2}
    assert [lv.place for lv in s.shared_levels] == [
        "modules.text_decoder.slices[0].parameters", "modules.text_decoder.parameters", "parameters"]
    assert config.model_refs() == ["base", "a"]
    resolved = config.resolved()
    assert set(resolved["modules"]) == {"text_decoder", "vision_tower"}
    assert resolved["modules"]["text_decoder"]["parameters"] == {"density": 0.6, "lambda": 0.7}


@pytest.mark.parametrize(("data", "match"), [
    ({"models": [{"model": "a"}], "modules": {"x": {"models": [{"model": "a"}]}}}, "models and modules"),
    ({"modules": {"x": {"models": [{"model": "a"}], "slices": [{"sources": [{"model": "a", "layer_range": [0, 1]}]}]}}},
     r"modules\.x: give models: or slices:"),
    ({"modules": {"x": {}}}, r"modules\.x: give models: or slices:"),
])
def test_config_errors(data: dict[str, Any], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        parse_config({"merge_method": "linear", "parameters": {"weight": 1.0}, **data})


@pytest.mark.parametrize(("data", "match"), [
    ({"modules": {"x": {"modles": [], "models": [{"model": "a"}]}}},
     r"modules\.x\.modles: unknown key \(did you mean 'models'\?\)"),
    ({"modules": {"x": {"models": [{"model": "a", "parameters": {"wieght": 1}}]}}},
     r"modules\.x\.models\[0\]\.parameters\.wieght: linear has no parameter 'wieght' \(did you mean 'weight'\?\)"),
])
def test_unknown_keys_and_parameters_are_ignored_as_mergekit_ignores_them(data: dict[str, Any], match: str) -> None:
    # mergekit ignores both: a compat warning, an error only in strict mode
    with pytest.warns(CompatWarning, match=match):
        parse_config({"merge_method": "linear", "parameters": {"weight": 1.0}, **data})
    with pytest.raises(ConfigError, match=match):
        parse_config({"merge_method": "linear", "parameters": {"weight": 1.0}, **data}, strict=True)


# --- the pipeline ---------------------------------------------------------------------------------------------


def test_run_linear_per_module_weights_match_numpy(vlms: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yml", {"merge_method": "linear", "modules": three_modules(vlms),
                                               "dtype": "float32"})
    res = run_cli("run", config, tmp_path / "out", "--quiet")
    assert res.returncode == 0, res.stderr
    out = read_model(tmp_path / "out")
    a, b = read_model(vlms["a"]), read_model(vlms["b"])
    assert set(out) == set(a)
    for name, (_, got) in out.items():
        wa, wb = {"language_model": (0.75, 0.25), "vision_tower": (0.5, 0.5),
                  "multi_modal_projector": (0.0, 1.0)}[name.split(".")[0]]
        expected = (wa * a[name][1].astype(np.float64) + wb * b[name][1]) / (wa + wb)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7, err_msg=name)
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["text_config"]["num_hidden_layers"] == TEXT_LAYERS


def test_run_sliced_text_decoder_beside_whole_vision_tower(vlms: dict[str, Path], tmp_path: Path) -> None:
    m = vlms
    config = write_config(tmp_path / "c.yml", {
        "merge_method": "passthrough",
        "modules": {
            "text_decoder": {"slices": [{"sources": [{"model": str(m["a"]), "layer_range": [0, 3]}]},
                                        {"sources": [{"model": str(m["b"]), "layer_range": [1, 4],
                                                      "parameters": {"scale": 0.5}}]}],
                             "parameters": {"scale": 2.0}},
            "vision_tower": {"models": [{"model": str(m["b"])}]},
            "multi_modal_projector": {"models": [{"model": str(m["a"])}]},
        },
    })
    res = run_cli("run", config, tmp_path / "out", "--quiet")
    assert res.returncode == 0, res.stderr
    out = {n: x for n, (_, x) in read_model(tmp_path / "out").items()}
    a = {n: x for n, (_, x) in read_model(m["a"]).items()}
    b = {n: x for n, (_, x) in read_model(m["b"]).items()}
    p = "language_model.model.layers."
    for j, (src, k, scale) in enumerate([(a, 0, 2.0), (a, 1, 2.0), (a, 2, 2.0), (b, 1, 0.5), (b, 2, 0.5), (b, 3, 0.5)]):
        np.testing.assert_array_equal(out[f"{p}{j}.mlp.up_proj.weight"],
                                      (src[f"{p}{k}.mlp.up_proj.weight"] * np.float32(scale)))
    assert f"{p}6.mlp.up_proj.weight" not in out
    # non-layer text tensors: embeddings from the first slice (module scale), the rest from the last (its source's)
    np.testing.assert_array_equal(out["language_model.model.embed_tokens.weight"],
                                  a["language_model.model.embed_tokens.weight"] * np.float32(2.0))
    np.testing.assert_array_equal(out["language_model.lm_head.weight"], b["language_model.lm_head.weight"] * np.float32(0.5))
    for name in b:
        if name.startswith("vision_tower."):
            np.testing.assert_array_equal(out[name], b[name])
        if name.startswith("multi_modal_projector."):
            np.testing.assert_array_equal(out[name], a[name])
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["text_config"]["num_hidden_layers"] == 6
    assert saved["vision_config"]["num_hidden_layers"] == VISION_LAYERS


def test_unlisted_module_is_an_error(vlms: dict[str, Path], tmp_path: Path) -> None:
    mods = three_modules(vlms)
    del mods["multi_modal_projector"]
    config = write_config(tmp_path / "c.yml", {"merge_method": "linear", "modules": mods})
    res = run_cli("plan", config)
    assert res.returncode == 1
    assert "multi_modal_projector" in res.stderr and "do not list" in res.stderr and "model.safetensors" in res.stderr


def test_module_without_tensors_is_an_error(vlms: dict[str, Path], tmp_path: Path) -> None:
    mods = three_modules(vlms)
    mods["audio_tower"] = {"models": [{"model": str(vlms["a"]), "parameters": {"weight": 1.0}}]}
    config = write_config(tmp_path / "c.yml", {"merge_method": "linear", "modules": mods})
    res = run_cli("plan", config)
    assert res.returncode == 2 and "modules.audio_tower" in res.stderr and "no tensor of module" in res.stderr


def test_slices_outside_modules_over_a_vlm_point_to_modules(vlms: dict[str, Path], tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.yml", {"merge_method": "passthrough",
                                               "slices": [{"sources": [{"model": str(vlms["a"]), "layer_range": [0, 2]}]}]})
    res = run_cli("plan", config)
    assert res.returncode == 1 and "modules:" in res.stderr
