"""ferromerge vs the real mergekit (0.1.5, own virtualenv) on tiny random models of real transformers
architectures (``helpers.architectures``: Llama, Mistral, Mixtral, Qwen2, Qwen2-MoE, Qwen3, Gemma, Gemma 2,
Gemma 3 text, Phi-3, GPT-2, GPT-NeoX, Falcon, StableLM, Starcoder2, Cohere, OLMo 2, BERT, T5), each merged by
both tools with TIES, SLERP with a gradient (``t: [0, 0.5, 1]``) and a passthrough frankenmerge (layers [0, 3) of
``a`` then [1, 4) of ``b``; T5 under ``modules:``, encoder and decoder each sliced so).

Checked per case: the same tensor names, shapes and values (float32 on both sides: ``rtol=1e-6, atol=1e-7``;
frankenmerges bit for bit), the same config.json values (layer counts and per-layer lists included), and the
ferromerge output loads with transformers' ``from_pretrained`` with the same missing/unexpected keys as the base.

Departures, each asserted as such (docs/compat.md says why):
* MoE experts: mergekit 0.1.5 on transformers 5 writes them fused (``mlp.experts.gate_up_proj`` [E, 2I, H],
  ``mlp.experts.down_proj`` [E, H, I]) and merges the fused tensor, so TIES trims and SLERP measures angles over
  all experts at once; ferromerge keeps one tensor per expert as stored. Frankenmerges are compared per expert
  (equal bit for bit); TIES and SLERP experts against mergekit's own kernel (``merge_tensors``) run per expert.
* sliced Qwen2, Qwen3, Gemma 2 and Gemma 3: mergekit refuses (its output config keeps a 4-entry ``layer_types``
  for 6 layers, which transformers 5 rejects); ferromerge's output is checked against the inputs layer by layer.
* Qwen2-MoE frankenmerge: mergekit has no table for it, and its inferred architecture takes the final norm and
  lm_head from the first slice and leaves ``num_hidden_layers`` at 4; checked against the inputs instead.
* BERT: mergekit drops ``cls.predictions.transform.*`` and ``cls.seq_relationship.*`` (not in its table);
  ferromerge keeps every tensor.
* GPT-NeoX: mergekit casts the causal-mask buffer (bool) to the config's ``dtype``; ferromerge keeps it bool.

Cost: one mergekit-virtualenv interpreter builds all 57 models and runs all mergekit merges, another loads the
ferromerge outputs; ``-s`` prints the max differences per case.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import load_file

from helpers.architectures import (
    ARCHITECTURES,
    FRANKEN,
    FRANKEN_LAYERS,
    LAYERS,
    METHODS,
    build_and_merge,
    load_all,
)
from helpers.mergekit import dtypes_in_dir, max_diffs, report_diffs

pytestmark = pytest.mark.mergekit

CASES = [(arch, method) for arch in ARCHITECTURES for method in METHODS]

#: frankenmerges mergekit 0.1.5 refuses on transformers 5: its config keeps 4 layer_types for 6 layers
MERGEKIT_REFUSES = {("qwen2", "franken"), ("qwen3", "franken"), ("gemma2", "franken"), ("gemma3_text", "franken")}

#: frankenmerges whose mergekit output is wrong: Qwen2-MoE has no table in mergekit 0.1.5, and its inferred
#: architecture plans every non-layer tensor before the layers (final norm and lm_head from the first slice) and
#: names no layer-count key (config.json keeps num_hidden_layers: 4 for 6 layers of tensors)
MERGEKIT_WRONG = {("qwen2_moe", "franken")}

#: tensors ferromerge keeps and mergekit drops (not in its architecture table)
KEPT_HERE = {
    # its table lists cls.predictions.bias and the tied decoder only: the MLM head's transform is dropped too
    "bert": re.compile(r"^cls\.(seq_relationship|predictions\.transform)\."),
}

#: non-float buffers: carried from the base unchanged (mergekit casts them to the config's dtype)
BUFFER = re.compile(r"\.attention\.bias$")

EXPERT = re.compile(r"^(?P<layer>.+\.experts)\.(?P<e>\d+)\.(?P<proj>\w+?)(\.weight)?$")
#: per-expert projection -> (fused tensor, part): mergekit's gate_up_proj stacks gate then up along dim 1
FUSED = {"w1": ("gate_up_proj", 0), "gate_proj": ("gate_up_proj", 0), "w3": ("gate_up_proj", 1),
         "up_proj": ("gate_up_proj", 1), "w2": ("down_proj", None), "down_proj": ("down_proj", None)}


def read_dir(d: Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory (float32 and bool here: safetensors' numpy reader suffices)."""
    out: dict[str, np.ndarray] = {}
    for f in sorted(d.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def _expert_refs(root: Path) -> list[dict[str, Any]]:
    """mergekit's kernel per expert tensor, for the MoE TIES and SLERP cases (computed in the mergekit driver)."""
    out = []
    for arch, spec in ARCHITECTURES.items():
        if not spec.moe:
            continue
        out.append({"case": f"{arch}-ties", "root": str(root / arch), "method": "ties", "ids": ["base", "a", "b"],
                    "base": "base", "parameters": {"weight": {"a": 0.6, "b": 0.4}, "density": {"a": 0.5, "b": 0.7}}})
        out.append({"case": f"{arch}-slerp", "root": str(root / arch), "method": "slerp", "ids": ["a", "b"],
                    "base": "a", "gradient": [0, 0.5, 1], "layers": LAYERS})
    return out


@pytest.fixture(scope="session")
def arch_runs(mergekit_python_path, tmp_path_factory) -> dict[str, dict[str, Any]]:
    """``{case: {mk, fm, mk_error, fm_error, cfg, refs}}`` for every architecture and method."""
    import ferromerge

    root = tmp_path_factory.mktemp("mk-arch-models")
    work = tmp_path_factory.mktemp("mk-arch")
    mk = build_and_merge(mergekit_python_path, root, work, _expert_refs(root))
    runs: dict[str, dict[str, Any]] = {}
    for case, (cfg, mk_dir, mk_error) in mk.items():
        fm_dir = work / f"fm-{case}"
        fm_error = None
        try:
            ferromerge.run(cfg, fm_dir, quiet=True)
        except Exception as e:  # reported by the case's own test
            fm_error = f"{type(e).__name__}: {e}"
        runs[case] = {"mk": mk_dir, "fm": fm_dir, "mk_error": mk_error, "fm_error": fm_error, "cfg": cfg,
                      "root": root / case.split("-")[0], "refs": work / f"ref-{case}.safetensors"}
    loads = {f"{case}-out": (ARCHITECTURES[case.split("-")[0]].loader, r["fm"]) for case, r in runs.items()
             if r["fm_error"] is None}
    loads.update({f"{arch}-base": (spec.loader, root / arch / "base") for arch, spec in ARCHITECTURES.items()})
    loaded = load_all(mergekit_python_path, loads, work)
    for case, r in runs.items():
        r["load"] = loaded.get(f"{case}-out", "not loaded: ferromerge failed")
        r["base_load"] = loaded[f"{case.split('-')[0]}-base"]
    return runs


def _unfuse(mk: dict[str, np.ndarray], fm: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """mergekit's MoE tensors under ferromerge's names: the fused experts cut per expert, and Mixtral's
    ``block_sparse_moe`` found under transformers 5's ``mlp``, where mergekit writes it."""
    out = dict(mk)
    for name in fm:
        theirs = name.replace(".block_sparse_moe.", ".mlp.")
        m = EXPERT.match(theirs)
        if m is not None:
            fused, part = FUSED[m["proj"]]
            t = mk[f"{m['layer']}.{fused}"][int(m["e"])]
            if part is not None:
                half = t.shape[0] // 2
                t = t[part * half : (part + 1) * half]
            out[name] = t
        elif theirs != name and theirs in mk:
            out[name] = out.pop(theirs)
    return {k: v for k, v in out.items() if not re.search(r"\.experts\.(gate_up_proj|down_proj)$", k)}


def _config_diff(mk: dict[str, Any], fm: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """Keys whose values differ (keys only one side writes are transformers' defaults: not compared)."""
    skip = {"transformers_version", "torch_dtype", "dtype"}
    return {k: (mk[k], fm[k]) for k in mk.keys() & fm.keys() if k not in skip and mk[k] != fm[k]}


def _franken_reference(root: Path, fm: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The frankenmerge built by hand from the inputs: layer j of the output is a's layer j (j < 3), else b's
    layer j − 2; the embeddings come from a (first slice), the rest from b (last slice)."""
    a, b = read_dir(root / "a"), read_dir(root / "b")
    (a0, a1), (b0, _) = FRANKEN
    ref = {}
    for name in fm:
        m = re.match(r"^(.*?\.(?:layers|h|layer|block))\.(\d+)\.(.+)$", name)
        if m is None:
            ref[name] = a[name] if "embed" in name else b[name]
            continue
        j = int(m[2])
        src, i = (a, a0 + j) if j < a1 - a0 else (b, b0 + j - (a1 - a0))
        ref[name] = src[f"{m[1]}.{i}.{m[3]}"]
    return ref


@pytest.mark.parametrize(("arch", "method"), CASES, ids=[f"{a}-{m}" for a, m in CASES])
def test_architecture_merge_matches_mergekit(arch_runs, arch, method):
    case = f"{arch}-{method}"
    r = arch_runs[case]
    spec = ARCHITECTURES[arch]
    assert r["fm_error"] is None, f"{case}: ferromerge failed: {r['fm_error']}"
    fm = read_dir(r["fm"])
    fm_config = json.loads((r["fm"] / "config.json").read_text())

    if (arch, method) in MERGEKIT_REFUSES:
        assert r["mk_error"] is not None and "layer_types" in r["mk_error"], \
            f"{case}: mergekit was expected to refuse (layer_types); got {r['mk_error']!r}"
        mk = _franken_reference(r["root"], fm)
        mk_config = json.loads((r["root"] / "a" / "config.json").read_text())
    elif (arch, method) in MERGEKIT_WRONG:
        assert r["mk_error"] is None, f"{case}: mergekit failed:\n{r['mk_error']}"
        theirs = json.loads((r["mk"] / "config.json").read_text())
        assert theirs["num_hidden_layers"] == LAYERS, f"{case}: mergekit now sets the layer count: {theirs}"
        mk = _franken_reference(r["root"], fm)
        mk_config = json.loads((r["root"] / "a" / "config.json").read_text())
    else:
        assert r["mk_error"] is None, f"{case}: mergekit failed:\n{r['mk_error']}"
        mk = read_dir(r["mk"])
        mk_config = json.loads((r["mk"] / "config.json").read_text())
    if spec.moe and (arch, method) not in MERGEKIT_WRONG:
        mk = _unfuse(mk, fm)

    kept = KEPT_HERE.get(arch)
    only_fm = sorted(set(fm) - set(mk))
    only_mk = sorted(set(mk) - set(fm))
    assert not only_mk, f"{case}: tensors only mergekit writes: {only_mk}"
    assert all(kept is not None and kept.search(n) for n in only_fm), f"{case}: tensors only ferromerge writes: {only_fm}"

    refs = load_file(r["refs"]) if r["refs"].is_file() else {}
    exact = method == "franken"
    diffs = []
    for name in sorted(mk):
        want = refs.get(name, mk[name]).astype(np.float64)
        got = fm[name].astype(np.float64)
        assert got.shape == want.shape, f"{case}: {name}: shape {got.shape}, mergekit {want.shape}"
        if exact:
            np.testing.assert_array_equal(got, want, err_msg=f"{case}: {name}")
        else:
            np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=f"{case}: {name}")
        diffs.append(max_diffs(want.reshape(-1), got.reshape(-1), np.ones(want.size, dtype=bool)))
    report_diffs(case, diffs)
    if spec.moe and method != "franken":
        assert refs, f"{case}: no per-expert reference from mergekit's kernel"
    for name, dtype in dtypes_in_dir(r["fm"]).items():
        if BUFFER.search(name):
            assert dtype == "BOOL", f"{case}: {name} is {dtype}; a bool buffer is carried unchanged"

    if method == "franken":
        if (arch, method) in MERGEKIT_REFUSES | MERGEKIT_WRONG:
            for key in spec.layer_keys:
                mk_config[key] = FRANKEN_LAYERS
            for key, value in list(mk_config.items()):
                if isinstance(value, list) and len(value) == LAYERS:
                    mk_config[key] = value[:3] + value[1:4]
        for key in spec.layer_keys:
            assert fm_config[key] == FRANKEN_LAYERS, f"{case}: config.json {key} = {fm_config[key]}"
        for key, value in fm_config.items():
            if isinstance(value, list) and key != "architectures":
                assert len(value) != LAYERS, f"{case}: config.json {key} has {len(value)} entries for 6 layers"
    differ = _config_diff(mk_config, fm_config)
    assert not differ, f"{case}: config.json differs (mergekit, ferromerge): {differ}"

    assert r["load"] == r["base_load"], \
        f"{case}: transformers loads the output with {r['load']}, the base with {r['base_load']}"
