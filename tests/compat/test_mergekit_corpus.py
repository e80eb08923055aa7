"""Real mergekit configs that people published (tests/compat/corpus/*.yml, verbatim; origins in
corpus/sources.json): each runs through mergekit 0.1.5 (its own virtualenv, every config in one interpreter) and
through ferromerge, on tiny models made under the names it references (tests/helpers/corpus.py: a temporary
Hugging Face cache for Hub names, directories under the config's working directory for the rest).

* Every config mergekit merges, ferromerge merges: the same tensor names, shapes and dtypes (but arcee_fusion,
  where mergekit writes float32 whatever the config says: its issue #604, a documented departure), the same
  ``num_hidden_layers`` and ``vocab_size`` in config.json, the same tokenizer vocabulary, a chat template in both
  outputs or in neither (its text is test_mergekit_tokenizer.py's), and values within the bound of the method's
  class below. Where a config has a ``model+lora``, mergekit must have merged the adapter (its LoRA cache).
* Every config mergekit refuses, ferromerge refuses too (ConfigError, ParameterError or InputError), with one
  allowance: a file of several YAML documents (mergekit-multi's format, which mergekit-yaml refuses) may be run
  as mergekit-multi would.
* Misspelled and misplaced keys in configs mergekit merges draw a CompatWarning naming them (``WARNS``).

Values. Almost every published config says ``dtype: bfloat16`` (the tiny models are stored in bfloat16, so the
cast is exact). mergekit computes task-vector methods in bfloat16, rounding at every step; ferromerge in float32
with one rounding (docs/compat.md, "arithmetic precision"). The bound of an element is therefore in units of the
output dtype's ulp u(): ``|mk − fm| ≤ 2·u(max(|mk|, |fm|)) + 2·u(max |mk| over the tensor)`` (the second term
covers cancellation near zero, where mergekit's intermediate roundings are ulps of the inputs, not of the
output). By class:

* ROUNDING (linear, task_arithmetic, slerp, nuslerp, multislerp, nearswap, model_stock, passthrough, and
  dare_* whose every density is 1): every element within the bound. Measured: 0 elements outside; passthrough,
  linear and slerp byte-equal.
* SELECTION (ties, breadcrumbs, breadcrumbs_ties, sce, karcher; arcee_fusion): at most ``SELECTION_SHARE`` of the
  elements outside the bound. On bfloat16 grids equal magnitudes are common, so the top-k and variance
  thresholds fall on ties that the two tools break differently, and a bfloat16 sign/variance computed by mergekit
  moves elements across the threshold; karcher iterates in bfloat16 in mergekit (the float32 twin of
  absa-karcher-default agrees within 2e-7 of the tensor maximum). Measured maxima: ties 1.43%, breadcrumbs 1.18%,
  sce 1.01%, karcher 1.37%, arcee_fusion 12.1% (docs/compat.md: mergekit's bf16 importance is rounding noise).
* RANDOM (dare_ties, dare_linear, della, della_linear with a density below 1): mergekit draws its masks from
  torch's generator, ferromerge from its own, so elements cannot agree; the norm of the merged change
  ``‖out − base‖`` over the whole model agrees within ``RANDOM_NORM`` (measured 0.982–1.041), and the share of
  elements left exactly at the base (dropped everywhere) within 5σ of two binomial draws (measured ≤ 2.5σ);
  per-element checks of these methods are test_mergekit_methods.py's statistics.

Run with ``-s`` for one line per config (outcome, share outside the bound, warnings).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from helpers.corpus import DRIVER, World, build_world, corpus_files, mergekit_env, references, sources
from helpers.mergekit import dtypes_in_dir, read_safetensors_dir

pytestmark = pytest.mark.mergekit

FILES = {f.name: f for f in corpus_files()}
ROUNDING = {"linear", "task_arithmetic", "slerp", "nuslerp", "multislerp", "nearswap", "model_stock", "passthrough"}
SELECTION_SHARE = {"ties": 0.03, "breadcrumbs": 0.03, "breadcrumbs_ties": 0.03, "sce": 0.03, "karcher": 0.03,
                   "arcee_fusion": 0.15}
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
RANDOM_NORM = 0.10
#: mergekit writes arcee_fusion's output in float32 (its issue #604); ferromerge in the config's dtype
DTYPE_DEPARTURES = {"arcee_fusion"}
#: config -> the keys a CompatWarning must name (typos and misplaced keys mergekit silently ignores)
WARNS = {
    "card-genetic-lemonade-base.yml": ["dype", "select_topk"],
    "card-genetic-lemonade-final.yml": ["dype", "select_topk"],
    "card-verbamaxima-model-stock.yml": ["normalize"],
    "card-verbamaxima-task-arithmetic.yml": ["normalize"],
    "card-novaciano-sce-all-params.yml": ["parameters.rescale", "parameters.filter_wise", "models[0].parameters.density"],
    "guide-breadcrumbs-misplaced-weight.yml": ["models[0].weight"],
    "card-nous-hermes-2-sus-chat-34b-slerp.yml": ["t"],
    "card-hekate-model-stock-weights.yml": ["models[0].parameters.weight"],
    "repo-triage-dare-ties-flow.yml": ["out_path"],
    "blog-zh-slerp-weights.yml": ["models[0].parameters.weight"],
}
BITS = {"BF16": 8, "F16": 11, "F32": 24}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    return build_world(tmp_path_factory.mktemp("corpus"), list(FILES.values()))


@pytest.fixture(scope="module")
def mk_results(world: World, mergekit_python_path: Path) -> dict[str, str | None]:
    """{config: None if mergekit merged it, else its traceback}; every config in one mergekit interpreter."""
    jobs = [(name, str(f), str(world.root / "mk" / f.stem), str(world.cwd(name))) for name, f in FILES.items()]
    (world.root / "jobs.json").write_text(json.dumps(jobs), encoding="utf-8")
    (world.root / "driver.py").write_text(DRIVER, encoding="utf-8")
    proc = subprocess.run(
        [str(mergekit_python_path), str(world.root / "driver.py"), str(world.root / "jobs.json"),
         str(world.root / "results.json")],
        capture_output=True, text=True, env={**os.environ, **mergekit_env(world)}, timeout=1800,
    )
    assert proc.returncode == 0, f"mergekit driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return json.loads((world.root / "results.json").read_text(encoding="utf-8"))


def run_ferromerge(world: World, name: str, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Exception | None, list[str]]:
    import ferromerge

    monkeypatch.chdir(world.cwd(name))
    for key, value in mergekit_env(world).items():
        monkeypatch.setenv(key, value)
    out = world.root / "fm" / Path(name).stem
    error = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            ferromerge.run(FILES[name], out, quiet=True, seed=1234, lora_merge_cache=world.cwd(name) / ".fm-lora")
        except (ferromerge.errors.ParameterError, ferromerge.errors.InputError) as e:  # ConfigError included
            error = e
    compat = [str(w.message) for w in caught if issubclass(w.category, ferromerge.errors.CompatWarning)]
    return out, error, compat


def _documents(name: str) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(FILES[name].read_text(encoding="utf-8")) if d is not None]
    except yaml.YAMLError:
        return []


def _walk(node: Any):
    if isinstance(node, dict):
        for k, v in node.items():
            yield k, v
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def method_class(doc: dict[str, Any]) -> str:
    method = doc.get("merge_method")
    if method in RANDOM:
        densities = [v for k, v in _walk(doc) if k == "density"]
        if method.startswith("dare") and densities and all(v == 1 for v in densities):
            return "rounding"
        return "random"
    return "selection" if method in SELECTION_SHARE else "rounding"


def _ulp(x: np.ndarray, dtype: str) -> np.ndarray:
    m = np.maximum(np.abs(x), 2.0**-126)
    return 2.0 ** (np.floor(np.log2(m)) - (BITS[dtype] - 1))


def outside_bound(mk: np.ndarray, fm: np.ndarray, dtype: str) -> np.ndarray:
    a, b = mk.astype(np.float64), fm.astype(np.float64)
    bound = 2 * _ulp(np.maximum(np.abs(a), np.abs(b)), dtype) + 2 * _ulp(np.abs(a).max(initial=0.0), dtype)
    return np.abs(a - b) > bound


def _change_norm(out: dict[str, np.ndarray], base: dict[str, np.ndarray]) -> float:
    return float(np.sqrt(sum(((out[k].astype(np.float64) - base[k]) ** 2).sum() for k in out if k in base)))


def _vocab(d: Path) -> list[tuple[str, int]] | None:
    path = d / "tokenizer.json"
    if not path.exists():
        return None
    tok = json.loads(path.read_text(encoding="utf-8"))
    return sorted(tok["model"]["vocab"].items()) + sorted((t["content"], t["id"]) for t in tok["added_tokens"])


def _chat_template(d: Path) -> str | None:
    """The output's chat template: chat_template.jinja (mergekit on transformers 5) or tokenizer_config.json's."""
    if (d / "chat_template.jinja").exists():
        return (d / "chat_template.jinja").read_text(encoding="utf-8")
    path = d / "tokenizer_config.json"
    return json.loads(path.read_text(encoding="utf-8")).get("chat_template") if path.exists() else None


def test_every_config_has_a_source() -> None:
    src = sources()
    assert set(src) == set(FILES), f"sources.json and corpus/*.yml disagree: {sorted(set(src) ^ set(FILES))}"
    assert all(entry["url"].strip() for entry in src.values())
    assert 60 <= len(FILES) <= 120


@pytest.mark.parametrize("name", sorted(FILES))
def test_corpus_config(name: str, world: World, mk_results: dict[str, str | None],
                       monkeypatch: pytest.MonkeyPatch) -> None:
    mk_error = mk_results[name]
    out, fm_error, compat = run_ferromerge(world, name, monkeypatch)
    docs = _documents(name)
    for key in WARNS.get(name, []):
        assert any(key in w for w in compat), f"{name}: no CompatWarning names {key!r}; warnings: {compat}"

    if mk_error is not None:
        mk_last = mk_error.strip().splitlines()[-1]
        if fm_error is None:
            assert len(docs) > 1, f"{name}: mergekit refuses it ({mk_last}), ferromerge merged it"
            print(f"\n[corpus] {name}: mergekit-yaml refuses ({mk_last}); ferromerge ran it as mergekit-multi", end="")
        else:
            print(f"\n[corpus] {name}: both refuse; mergekit: {mk_last}; ferromerge: {fm_error}", end="")
        return

    assert fm_error is None, f"{name}: mergekit merges it, ferromerge refuses: {type(fm_error).__name__}: {fm_error}"
    if references(FILES[name].read_text(encoding="utf-8")).loras:
        # mergekit merged the adapter (so agreeing with it is not agreeing on ignoring it)
        assert any((world.cwd(name) / ".lora-cache").iterdir()), f"{name}: mergekit merged no LoRA"
    mk_dir = world.root / "mk" / Path(name).stem
    mk, fm = read_safetensors_dir(mk_dir), read_safetensors_dir(out)
    assert set(mk) == set(fm), \
        f"{name}: only mergekit {sorted(set(mk) - set(fm))[:8]}, only ferromerge {sorted(set(fm) - set(mk))[:8]}"
    doc = docs[0]
    method = doc["merge_method"]
    mk_dt, fm_dt = dtypes_in_dir(mk_dir), dtypes_in_dir(out)
    for t in sorted(mk):
        assert mk[t].shape == fm[t].shape, f"{name}: {t}: shape {mk[t].shape} vs {fm[t].shape}"
        if method not in DTYPE_DEPARTURES:
            assert mk_dt[t] == fm_dt[t], f"{name}: {t}: dtype {mk_dt[t]} vs {fm_dt[t]}"
    mk_cfg, fm_cfg = (json.loads((d / "config.json").read_text(encoding="utf-8")) for d in (mk_dir, out))
    for key in ("num_hidden_layers", "vocab_size"):
        assert mk_cfg.get(key) == fm_cfg.get(key), f"{name}: config.json {key}: {mk_cfg.get(key)} vs {fm_cfg.get(key)}"

    assert _vocab(mk_dir) == _vocab(out), f"{name}: the output tokenizers' vocabularies differ"
    assert (_chat_template(mk_dir) is None) == (_chat_template(out) is None), \
        f"{name}: a chat template in only one output (mergekit: {_chat_template(mk_dir) is not None})"

    kind = method_class(doc)
    outside = total = 0
    for t in mk:
        # the coarser of the two dtypes (arcee_fusion: mergekit's float32 against the config's dtype)
        dtype = min(mk_dt[t], fm_dt[t], key=BITS.__getitem__)
        outside += int(outside_bound(mk[t], fm[t], dtype).sum())
        total += mk[t].size
    share = outside / total
    line = f"\n[corpus] {name}: {method} ({kind}), {total} elements, {share:.2%} outside the rounding bound"
    if kind == "rounding":
        assert outside == 0, f"{name}: {outside} of {total} elements differ by more than rounding"
    elif kind == "selection":
        assert share <= SELECTION_SHARE[method], f"{name}: {share:.2%} of the elements differ (bound " \
                                                 f"{SELECTION_SHARE[method]:.0%} for {method})"
    else:
        from ferromerge.models.refs import resolve

        base_ref = doc.get("base_model")
        assert isinstance(base_ref, str) and "+" not in base_ref, f"{name}: random method without a plain base_model"
        base = read_safetensors_dir(resolve(base_ref))
        ratio = _change_norm(fm, base) / _change_norm(mk, base)
        line += f"; ‖out − base‖ ferromerge/mergekit {ratio:.3f}"
        assert abs(ratio - 1) <= RANDOM_NORM, f"{name}: ‖out − base‖ ratio {ratio:.3f} (bound ±{RANDOM_NORM})"
        # every mask element is an independent draw: the share left exactly at the base (dropped in every model,
        # or elected out) is a binomial share in each tool
        at_mk, at_fm = (sum(int((out[t] == base[t]).sum()) for t in out if t in base) / total for out in (mk, fm))
        p = (at_mk + at_fm) / 2
        sigma = math.sqrt(2 * p * (1 - p) / total)
        line += f"; left at the base {at_fm:.3f} vs {at_mk:.3f}"
        assert abs(at_fm - at_mk) <= 5 * sigma + 1 / total, \
            f"{name}: {at_fm:.3f} of the elements left at the base, mergekit {at_mk:.3f} (5σ = {5 * sigma:.3f})"
    if compat:
        line += f"; {len(compat)} CompatWarning(s): " + " | ".join(w.split(";")[0] for w in compat)
    print(line, end="")


def test_names_resolve_to_the_same_files_in_both_tools(tmp_path: Path, mergekit_python_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """The harness itself: a Hub name with and without a revision and a model+lora, resolved by ferromerge's
    models.refs and by huggingface_hub in mergekit's interpreter (offline), and a relative path."""
    from ferromerge.models.refs import resolve

    cfg = tmp_path / "names.yml"
    cfg.write_text("merge_method: linear\nmodels:\n  - model: org/a@v2\n  - model: org/a\n  - model: ./here/b\n"
                   "  - model: org/c+org/lora\n", encoding="utf-8")
    world = build_world(tmp_path / "w", [cfg])
    monkeypatch.chdir(world.cwd(cfg.name))
    for key, value in mergekit_env(world).items():
        monkeypatch.setenv(key, value)
    ours = {ref: str(resolve(ref)) for ref in ("org/a@v2", "org/a", "org/c", "org/lora")}
    assert ours["org/a@v2"] != ours["org/a"]
    probe = (
        "import json, sys, huggingface_hub as h\n"
        "print(json.dumps({r: h.snapshot_download(r.split('@')[0], revision=(r.split('@') + ['main'])[1],"
        " local_files_only=True) for r in sys.argv[1:]}))\n"
    )
    proc = subprocess.run([str(mergekit_python_path), "-c", probe, *ours], capture_output=True, text=True,
                          env={**os.environ, **mergekit_env(world)}, timeout=300, check=True)
    theirs = json.loads(proc.stdout)
    assert {r: str(Path(p).resolve()) for r, p in theirs.items()} == ours
    assert resolve("./here/b") == (world.cwd(cfg.name) / "here" / "b").resolve()
    assert (world.cwd(cfg.name) / "here" / "b" / "config.json").is_file()
