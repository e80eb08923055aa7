"""ferromerge vs the real mergekit (0.1.5, own virtualenv) on mergekit's config features: parameter gradients and
filters, slices (multi-slice merges, frankenmerges with overlapping and duplicated layers), passthrough with
``scale``, and tied embeddings.

The family is Llama-shaped, float32, 6 layers (hidden 32, intermediate 48, vocab 64), written with the
``safetensors`` package: ``base``, ``a``, ``b``, ``c`` (untied lm_head) and ``ta``, ``tb`` (tied: no lm_head,
``tie_word_embeddings: true``). Both tools run the same YAML files; mergekit through ``mergekit-yaml`` in one
interpreter (``helpers.mergekit.run_mergekit``). float32 math on both sides: ``assert_allclose(rtol=1e-6,
atol=1e-7)``, and passthrough must be bit-identical. Run with ``-s`` to see the max differences per case.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.mergekit import (
    INTER,
    LLAMA_CONFIG,
    VOCAB,
    H,
    llama_shapes,
    max_diffs,
    read_safetensors_dir,
    report_diffs,
    run_mergekit,
)
from safetensors.numpy import save_file

pytestmark = pytest.mark.mergekit

#: more layers than test_mergekit_diff's family, for gradients and slices (same hidden/intermediate/vocab)
LAYERS = 6
UNTIED = ("base", "a", "b", "c")
TIED = ("ta", "tb")


def shapes(tied: bool) -> dict[str, tuple[int, ...]]:
    return llama_shapes(LAYERS, tied)


def layer_config(tied: bool) -> dict[str, Any]:
    return {**LLAMA_CONFIG, "hidden_size": H, "intermediate_size": INTER, "num_hidden_layers": LAYERS,
            "vocab_size": VOCAB, "tie_word_embeddings": tied}


def src(model: str, start: int, end: int, **parameters: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"model": model, "layer_range": [start, end]}
    if parameters:
        out["parameters"] = parameters
    return out


def case_configs(root: Path) -> dict[str, dict[str, Any]]:
    m = {name: str(root / name) for name in (*UNTIED, *TIED)}
    attn_up = [0, 0.5, 0.3, 0.7, 1]
    attn_down = [1, 0.5, 0.7, 0.3, 0]
    return {
        # per-model density gradient, filtered weight with a fallback
        "ties_gradient_filter": {
            "merge_method": "ties",
            "base_model": m["base"],
            "models": [
                {"model": m["a"], "parameters": {"density": [1, 0.7, 0.1], "weight": 0.5}},
                {"model": m["b"], "parameters": {"density": 0.5,
                                                 "weight": [{"filter": "mlp", "value": 0.5}, {"value": 0}]}},
                {"model": m["c"], "parameters": {"density": [0.2, 0.9], "weight": [{"filter": "self_attn",
                                                                                      "value": [1.0, 0.2]}]}},
            ],
            "parameters": {"normalize": True, "int8_mask": True, "weight": 0.3},
            "dtype": "float32",
        },
        # examples/gradient-slerp.yml's shape, with linear weights in place of slerp's t
        "linear_gradient_slices": {
            "merge_method": "linear",
            "base_model": m["a"],
            "slices": [{"sources": [
                src(m["a"], 0, LAYERS, weight=[{"filter": "self_attn", "value": attn_up},
                                              {"filter": "mlp", "value": attn_down}, {"value": 0.5}]),
                src(m["b"], 0, LAYERS, weight=[{"filter": "self_attn", "value": attn_down},
                                              {"filter": "mlp", "value": attn_up}, {"value": 0.5}]),
            ]}],
            "dtype": "float32",
        },
        # TIES over two slices: slice-level density gradient, global lambda gradient (a method-wide parameter)
        "ties_gradient_slices": {
            "merge_method": "ties",
            "base_model": m["base"],
            "slices": [
                {"sources": [src(m["base"], 0, 3), src(m["a"], 0, 3), src(m["b"], 0, 3, density=0.6)],
                 "parameters": {"density": [0.3, 0.9]}},
                {"sources": [src(m["base"], 3, 6), src(m["a"], 3, 6), src(m["c"], 3, 6, weight=[0.2, 1.0])]},
            ],
            "parameters": {"weight": 0.5, "density": 0.5, "lambda": [1.0, 0.6]},
            "dtype": "float32",
        },
        # examples/orcamini-platy-44layer.yml's shape: overlapping ranges of two models, 8 output layers
        "passthrough_franken": {
            "merge_method": "passthrough",
            "slices": [{"sources": [src(m["a"], 0, 4)]}, {"sources": [src(m["b"], 2, 6)]}],
            "dtype": "float32",
        },
        # duplicated layers of one model (layers 2 and 3 twice), with scale filtered on o_proj
        "passthrough_scale_dup": {
            "merge_method": "passthrough",
            "slices": [
                {"sources": [src(m["a"], 0, 4)]},
                {"sources": [src(m["a"], 2, 6, scale=[{"filter": "o_proj", "value": 0.5}, {"value": 1.0}])]},
                {"sources": [src(m["c"], 5, 6, scale=[{"filter": "down_proj", "value": [0.25, 0.75]}])]},
            ],
        },
        "linear_multi_slice": {
            "merge_method": "linear",
            "slices": [
                {"sources": [src(m["a"], 0, 3, weight=0.3), src(m["b"], 0, 3, weight=0.7)]},
                {"sources": [src(m["a"], 3, 5, weight=1.0), src(m["c"], 1, 3, weight=[0.2, 0.8])],
                 "parameters": {"normalize": False}},
                {"sources": [src(m["b"], 5, 6), src(m["c"], 5, 6)], "parameters": {"weight": [0.1, 0.9]}},
            ],
            "dtype": "float32",
        },
        # lm_head only in some inputs: the tied model feeds it from embed_tokens
        "linear_tied_some": {
            "merge_method": "linear",
            "models": [{"model": m["ta"], "parameters": {"weight": 0.4}},
                       {"model": m["a"], "parameters": {"weight": 0.6}}],
            "dtype": "float32",
        },
        # lm_head in no input: the output has none
        "ties_tied_all": {
            "merge_method": "ties",
            "base_model": m["ta"],
            "models": [{"model": m["tb"], "parameters": {"weight": 1.0, "density": 0.5}}],
            "dtype": "float32",
        },
    }


@pytest.fixture(scope="session")
def family6(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("mk-family6")
    rng = np.random.default_rng(20261123)
    base = {k: rng.normal(0.0, 0.02, s).astype(np.float32) for k, s in shapes(False).items()}
    for i, name in enumerate((*UNTIED, *TIED)):
        tied = name in TIED
        scale = (0.0, 0.004, 0.006, 0.003, 0.005, 0.004)[i]
        tensors = {k: (v + rng.normal(0.0, scale, v.shape)).astype(np.float32) if scale else v
                   for k, v in base.items() if k in shapes(tied)}
        (root / name).mkdir()
        save_file(tensors, str(root / name / "model.safetensors"), metadata={"format": "pt"})
        (root / name / "config.json").write_text(json.dumps(layer_config(tied)))
    return root


@pytest.fixture(scope="session")
def runs(family6, mergekit_python_path, tmp_path_factory) -> dict[str, tuple[Path, Path, dict[str, Any]]]:
    """{case: (mergekit_out, ferromerge_out, config)}; every case through mergekit-yaml, then ferromerge."""
    import ferromerge

    work = tmp_path_factory.mktemp("mk-features")
    configs = case_configs(family6)
    out = {}
    for name, (cfg_path, mk_dir, error) in run_mergekit(configs, mergekit_python_path, work).items():
        assert error is None, f"mergekit failed on {name}:\n{error}"
        fm_dir = work / f"fm-{name}"
        ferromerge.run(cfg_path, fm_dir, quiet=True)
        out[name] = (Path(mk_dir), fm_dir, configs[name])
    return out


def _compare(runs, case: str, *, exact: bool = False) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    mk_dir, fm_dir, _ = runs[case]
    mk, fm = read_safetensors_dir(mk_dir), read_safetensors_dir(fm_dir)
    assert set(mk) == set(fm), \
        f"{case}: only mergekit {sorted(set(mk) - set(fm))}, only ferromerge {sorted(set(fm) - set(mk))}"
    diffs = []
    for name in sorted(mk):
        a, b = mk[name].astype(np.float64), fm[name].astype(np.float64)
        assert a.shape == b.shape, f"{case}: {name}: shape {a.shape} vs {b.shape}"
        if exact:
            np.testing.assert_array_equal(b, a, err_msg=f"{case}: {name}")
        else:
            np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-7, err_msg=f"{case}: {name}")
        diffs.append(max_diffs(a.reshape(-1), b.reshape(-1), np.ones(a.size, dtype=bool)))
    report_diffs(case, diffs)
    return mk, fm


def _layers(mk_dir: Path, fm_dir: Path) -> tuple[int, int]:
    return tuple(json.loads((d / "config.json").read_text())["num_hidden_layers"] for d in (mk_dir, fm_dir))


@pytest.mark.parametrize("case", ["ties_gradient_filter", "linear_gradient_slices", "ties_gradient_slices",
                                  "linear_multi_slice"])
def test_gradients_filters_and_slices_equal_to_rounding(runs, family6, case):
    mk, fm = _compare(runs, case)
    mk_dir, fm_dir, cfg = runs[case]
    if "slices" in cfg:
        n = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in cfg["slices"])
        assert _layers(mk_dir, fm_dir) == (n, n)


@pytest.mark.parametrize(("case", "layers"), [("passthrough_franken", 8), ("passthrough_scale_dup", 9)])
def test_passthrough_frankenmerges_are_bit_identical(runs, family6, case, layers):
    mk, fm = _compare(runs, case, exact=True)
    assert _layers(*runs[case][:2]) == (layers, layers)
    assert len([n for n in fm if n.endswith("o_proj.weight")]) == layers
    if case == "passthrough_scale_dup":
        a = read_safetensors_dir(family6 / "a")
        # output layers 4 and 5 are a's layers 2 and 3 again, o_proj halved
        np.testing.assert_array_equal(fm["model.layers.4.self_attn.o_proj.weight"],
                                      a["model.layers.2.self_attn.o_proj.weight"] * np.float32(0.5))
        np.testing.assert_array_equal(fm["model.layers.5.mlp.up_proj.weight"], a["model.layers.3.mlp.up_proj.weight"])


def test_tied_lm_head_in_some_inputs_is_fed_from_embed_tokens(runs, family6):
    mk, fm = _compare(runs, "linear_tied_some")
    assert "lm_head.weight" in fm
    ta, a = read_safetensors_dir(family6 / "ta"), read_safetensors_dir(family6 / "a")
    want = (0.4 * ta["model.embed_tokens.weight"].astype(np.float64) + 0.6 * a["lm_head.weight"]) / 1.0
    np.testing.assert_allclose(fm["lm_head.weight"], want, rtol=1e-6, atol=1e-7)
    config = json.loads((runs["linear_tied_some"][1] / "config.json").read_text())
    assert config["tie_word_embeddings"] is False  # mergekit keeps ta's `true`, so transformers ignores the head


def test_lm_head_in_no_input_stays_tied(runs):
    mk, fm = _compare(runs, "ties_tied_all")
    assert "lm_head.weight" not in fm
    assert json.loads((runs["ties_tied_all"][1] / "config.json").read_text())["tie_word_embeddings"] is True


def test_gradient_values_by_hand(runs, family6):
    """Anchors computed by hand, so that agreeing with mergekit is not agreeing on nothing."""
    f = {m: read_safetensors_dir(family6 / m) for m in "abc"}
    fm = read_safetensors_dir(runs["linear_gradient_slices"][1])
    # layer 2 of 6: t = 0.4, 5 anchors -> between anchors 1 and 2 at 0.6: a 0.5·0.4 + 0.3·0.6, b 0.5·0.4 + 0.7·0.6
    name = "model.layers.2.self_attn.q_proj.weight"
    want = 0.38 * f["a"][name].astype(np.float64) + 0.62 * f["b"][name]
    np.testing.assert_allclose(fm[name], want, rtol=1e-6, atol=1e-7)
    name = "model.layers.2.input_layernorm.weight"  # neither filter: 0.5 / 0.5
    np.testing.assert_allclose(fm[name], 0.5 * f["a"][name].astype(np.float64) + 0.5 * f["b"][name], rtol=1e-6)
    # non-layer tensors take t = 0: the self_attn/mlp filters do not match, the fallback 0.5 applies
    np.testing.assert_allclose(fm["lm_head.weight"], 0.5 * f["a"]["lm_head.weight"].astype(np.float64)
                               + 0.5 * f["b"]["lm_head.weight"], rtol=1e-6, atol=1e-7)

    fm = read_safetensors_dir(runs["linear_multi_slice"][1])
    # slice 1 (normalize off): output layer 4 = a layer 4 ·1 + c layer 2 ·0.8 (gradient [0.2, 0.8] at t = 1)
    up = "mlp.up_proj.weight"
    want = f["a"][f"model.layers.4.{up}"].astype(np.float64) + 0.8 * f["c"][f"model.layers.2.{up}"]
    np.testing.assert_allclose(fm[f"model.layers.4.{up}"], want, rtol=1e-6, atol=1e-7)
    # slice 2 is one layer: t = 1, so weight 0.9 for both (normalized: the mean)
    want = 0.5 * f["b"][f"model.layers.5.{up}"].astype(np.float64) + 0.5 * f["c"][f"model.layers.5.{up}"]
    np.testing.assert_allclose(fm[f"model.layers.5.{up}"], want, rtol=1e-6, atol=1e-7)
    # embeddings come from the first slice (a 0.3, b 0.7), the final norm from the last (b, c: weight 0.1 each, t = 0)
    e = "model.embed_tokens.weight"
    np.testing.assert_allclose(fm[e], 0.3 * f["a"][e].astype(np.float64) + 0.7 * f["b"][e], rtol=1e-6, atol=1e-7)
    n = "model.norm.weight"
    np.testing.assert_allclose(fm[n], 0.5 * f["b"][n].astype(np.float64) + 0.5 * f["c"][n], rtol=1e-6, atol=1e-7)
