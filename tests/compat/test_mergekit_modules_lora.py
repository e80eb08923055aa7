"""ferromerge vs the real mergekit (0.1.5, own virtualenv, with peft) on ``model+lora`` references and
``modules:`` configs.

* ``model+lora``: a tiny Llama (float32) with a PEFT adapter written here (q_proj, v_proj, down_proj and the
  token embedding; ``use_rslora``, a ``rank_pattern``); mergekit merges it with PEFT's ``merge_and_unload`` into
  ``--lora-merge-cache``, ferromerge with NumPy. float32 on both sides: ``assert_allclose(rtol=1e-5, atol=1e-6)``.
* ``modules:``: a tiny Mistral3-shaped VLM (text decoder, vision tower, projector) with module-level parameters,
  per-module weights and a sliced text decoder (passthrough must be bit-identical).

Run with ``-s`` to see the max differences per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from helpers.mergekit import LLAMA_CONFIG, llama_shapes, max_diffs, read_safetensors_dir, report_diffs
from helpers.vlm import make_vlms  # noqa: E402
from safetensors.numpy import save_file

pytestmark = pytest.mark.mergekit

DRIVER = textwrap.dedent(
    """
    import json, sys, traceback
    from mergekit.scripts.run_yaml import main
    jobs = json.load(open(sys.argv[1]))
    results = {}
    for name, cfg, out, extra in jobs:
        try:
            main([cfg, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet", *extra], standalone_mode=False)
            results[name] = None
        except BaseException:
            results[name] = traceback.format_exc()
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def run_mergekit(configs: dict[str, dict], extra: list[str], python: Path, work: Path) -> dict[str, Path]:
    jobs = []
    for name, cfg in configs.items():
        p = work / f"{name}.yml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        jobs.append((name, str(p), str(work / f"mk-{name}"), extra))
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "driver.py").write_text(DRIVER)
    env = dict(os.environ, PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run([str(python), str(work / "driver.py"), str(work / "jobs.json"), str(work / "results.json")],
                          capture_output=True, text=True, env=env, timeout=1800)
    assert proc.returncode == 0, f"mergekit driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    errors = json.loads((work / "results.json").read_text())
    for name, err in errors.items():
        assert err is None, f"mergekit failed on {name}:\n{err}"
    return {name: work / f"mk-{name}" for name in configs}


def write_llama(path: Path, tensors: dict[str, np.ndarray]) -> Path:
    path.mkdir(parents=True)
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    return path


def write_peft_adapter(path: Path, base: dict[str, np.ndarray], rng: np.random.Generator) -> Path:
    """A PEFT LoRA adapter for the tiny Llama, as PEFT saves one (keys, adapter_config.json)."""
    path.mkdir(parents=True)
    tensors = {}
    for name, shape in base.items():
        module = name.removesuffix(".weight")
        last = module.rsplit(".", 1)[-1]
        if last not in ("q_proj", "v_proj", "down_proj", "embed_tokens"):
            continue
        r = 2 if last == "down_proj" else 4
        out_dim, in_dim = shape.shape
        if last == "embed_tokens":
            tensors[f"base_model.model.{module}.lora_embedding_A"] = rng.normal(0, 0.3, (r, out_dim)).astype(np.float32)
            tensors[f"base_model.model.{module}.lora_embedding_B"] = rng.normal(0, 0.3, (in_dim, r)).astype(np.float32)
        else:
            tensors[f"base_model.model.{module}.lora_A.weight"] = rng.normal(0, 0.3, (r, in_dim)).astype(np.float32)
            tensors[f"base_model.model.{module}.lora_B.weight"] = rng.normal(0, 0.3, (out_dim, r)).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 6, "use_rslora": True,
              "rank_pattern": {"down_proj": 2}, "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none",
              "fan_in_fan_out": False, "target_modules": ["q_proj", "v_proj", "down_proj", "embed_tokens"],
              "base_model_name_or_path": None, "inference_mode": True, "use_dora": False}
    (path / "adapter_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def runs(mergekit_python_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path, dict]]:
    import ferromerge

    root = tmp_path_factory.mktemp("mk-lora-modules")
    rng = np.random.default_rng(20261123)
    base = {k: rng.normal(0.0, 0.02, s).astype(np.float32) for k, s in llama_shapes().items()}
    other = {k: (v + rng.normal(0.0, 0.005, v.shape)).astype(np.float32) for k, v in base.items()}
    base_dir, other_dir = write_llama(root / "base", base), write_llama(root / "a", other)
    adapter = write_peft_adapter(root / "adapter", base, rng)
    vlm = make_vlms(root / "vlm")
    lora_ref = f"{base_dir}+{adapter}"
    configs: dict[str, dict[str, Any]] = {
        "lora_linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": lora_ref, "parameters": {"weight": 0.6}}, {"model": str(other_dir), "parameters": {"weight": 0.4}}]},
        "lora_task_arithmetic": {"merge_method": "task_arithmetic", "base_model": str(base_dir), "dtype": "float32",
                                 "models": [{"model": lora_ref, "parameters": {"weight": 0.8}},
                                            {"model": str(other_dir), "parameters": {"weight": 0.5}}]},
        "modules_linear": {"merge_method": "linear", "dtype": "float32", "parameters": {"weight": 1.0},
                           "modules": {
                               "text_decoder": {"models": [{"model": str(vlm["a"]), "parameters": {"weight": 0.75}},
                                                           {"model": str(vlm["b"])}]},
                               "vision_tower": {"models": [{"model": str(vlm["a"])}, {"model": str(vlm["b"])}],
                                                "parameters": {"weight": [{"filter": "attention", "value": 0.2},
                                                                          {"value": 0.6}]}},
                               "multi_modal_projector": {"models": [{"model": str(vlm["a"])},
                                                                    {"model": str(vlm["b"]), "parameters": {"weight": 3.0}}]},
                           }},
        "modules_passthrough_slices": {"merge_method": "passthrough", "dtype": "float32", "modules": {
            "text_decoder": {"slices": [{"sources": [{"model": str(vlm["a"]), "layer_range": [0, 3]}]},
                                        {"sources": [{"model": str(vlm["b"]), "layer_range": [1, 4]}]}]},
            "vision_tower": {"models": [{"model": str(vlm["b"])}], "parameters": {"scale": 0.5}},
            "multi_modal_projector": {"models": [{"model": str(vlm["a"])}]},
        }},
    }
    work = root / "mk"
    work.mkdir()
    mk = run_mergekit(configs, ["--lora-merge-cache", str(root / "mk-lora-cache")], mergekit_python_path, work)
    out = {}
    for name, cfg in configs.items():
        fm_dir = root / f"fm-{name}"
        ferromerge.run(str(work / f"{name}.yml"), str(fm_dir), quiet=True)
        out[name] = (mk[name], fm_dir, cfg)
    return out


@pytest.mark.parametrize("case", ["lora_linear", "lora_task_arithmetic", "modules_linear"])
def test_float32_agrees(runs, case: str) -> None:
    mk_dir, fm_dir, _ = runs[case]
    mk, fm = read_safetensors_dir(mk_dir), read_safetensors_dir(fm_dir)
    assert set(mk) == set(fm), f"only mergekit {sorted(set(mk) - set(fm))}, only ferromerge {sorted(set(fm) - set(mk))}"
    diffs = []
    for name in sorted(mk):
        np.testing.assert_allclose(fm[name], mk[name], rtol=1e-5, atol=1e-6, err_msg=f"{case}: {name}")
        diffs.append(max_diffs(mk[name], fm[name], np.ones(mk[name].shape, bool)))
    report_diffs(case, diffs)


def test_lora_changes_what_it_targets(runs) -> None:
    # guards the comparison above against both tools ignoring the adapter
    mk_dir, fm_dir, _ = runs["lora_linear"]
    fm = read_safetensors_dir(fm_dir)
    plain = read_safetensors_dir(runs["lora_linear"][0].parent.parent / "base")
    other = read_safetensors_dir(runs["lora_linear"][0].parent.parent / "a")
    q = "model.layers.0.self_attn.q_proj.weight"
    assert np.abs(fm[q] - (0.6 * plain[q] + 0.4 * other[q])).max() > 1e-3
    k = "model.layers.0.self_attn.k_proj.weight"
    np.testing.assert_allclose(fm[k], 0.6 * plain[k] + 0.4 * other[k], rtol=1e-6, atol=1e-7)


def test_modules_passthrough_slices_bit_identical(runs) -> None:
    mk_dir, fm_dir, _ = runs["modules_passthrough_slices"]
    mk, fm = read_safetensors_dir(mk_dir), read_safetensors_dir(fm_dir)
    assert set(mk) == set(fm), f"only mergekit {sorted(set(mk) - set(fm))}, only ferromerge {sorted(set(fm) - set(mk))}"
    for name in mk:
        assert mk[name].tobytes() == fm[name].tobytes(), name
    mk_cfg = json.loads((mk_dir / "config.json").read_text())
    fm_cfg = json.loads((fm_dir / "config.json").read_text())
    assert fm_cfg["text_config"]["num_hidden_layers"] == mk_cfg["text_config"]["num_hidden_layers"] == 6
    report_diffs("modules_passthrough_slices", [(0.0, 0.0)])
