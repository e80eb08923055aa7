"""Model cards (``ferromerge.model_card``): the README.md of a merge and of an extracted LoRA, its front matter against
mergekit 0.1.5's ``generate_card`` on the same configs (when mergekit's virtualenv is present), the switches."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import pytest
import yaml

import ferromerge
from ferromerge.config.resolve import parse_config
from ferromerge.methods.registry import REGISTRY
from ferromerge.model_card import PAPERS, front_matter, hub_id, lora_card, merge_card
from ferromerge.synth import Family

from helpers.cli import run_cli, ties_config, write_config

DEFAULT_VENV = Path.home() / ".cache" / "ferromerge" / "mergekit-venv"


def _mergekit_python() -> Path | None:
    """mergekit's interpreter, as tests/compat/conftest.py finds it (None without one)."""
    env = os.environ.get("FERROMERGE_MERGEKIT_PYTHON")
    p = Path(env) if env else DEFAULT_VENV / "bin" / "python"
    return p if p.is_file() and os.access(p, os.X_OK) else None


def test_every_method_has_a_paper_row():
    assert set(PAPERS) == set(REGISTRY), "model_card.PAPERS must have one row per registry method"
    for name, (title, url) in PAPERS.items():
        assert title and (url is None or url.startswith("https://")), name


def test_run_writes_a_card_with_mergekit_front_matter_method_models_and_config(family_f32: Family, tmp_path):
    config = write_config(tmp_path / "ties.yml", ties_config(family_f32))
    out = tmp_path / "merged"
    ferromerge.run(config, out, quiet=True)
    card = (out / "README.md").read_text(encoding="utf-8")
    meta = front_matter(card)
    # local directories are not Hub models: mergekit writes an empty list for them too
    assert meta == {"base_model": [], "library_name": "transformers", "tags": ["mergekit", "merge", "ferromerge"]}
    assert card.startswith("---\nbase_model: []\nlibrary_name: transformers\ntags:\n")
    assert "# merged\n" in card
    assert "[TIES](https://arxiv.org/abs/2306.01708)" in card
    assert f"base model `{family_f32.base}`" in card
    for ft in family_f32.finetunes:
        assert f"- `{ft}`" in card
    assert f"- `{family_f32.base}`" not in card  # the base is named once, as the base
    assert "```yaml\n" + config.read_text().rstrip() + "\n```" in card
    assert "seed" not in card.split("## Models")[0]  # TIES draws nothing at random


def test_random_methods_name_their_seed(family_f32: Family, tmp_path):
    cfg = ties_config(family_f32, merge_method="dare_ties")
    out = tmp_path / "dare"
    ferromerge.run(cfg, out, quiet=True, seed=17)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert "[DARE with TIES](https://arxiv.org/abs/2311.03099)" in card
    assert "seed 17" in card


@pytest.mark.parametrize("how", ["api", "cli"])
def test_no_write_model_card(family_f32: Family, tmp_path, how):
    config = write_config(tmp_path / "ties.yml", ties_config(family_f32))
    out = tmp_path / "merged"
    if how == "api":
        ferromerge.run(config, out, quiet=True, write_model_card=False)
    else:
        proc = run_cli("run", config, out, "--quiet", "--no-write-model-card")
        assert proc.returncode == 0, proc.stderr
    assert not (out / "README.md").exists()
    assert (out / "model.safetensors").exists() and (out / "mergekit_config.yml").exists()
    proc = run_cli("run", config, tmp_path / "again", "--quiet", "--no-write-model-card", "--write-model-card")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "again" / "README.md").exists()  # the last of --[no-]write-model-card wins, as in click


def test_hub_ids_lora_parts_revisions_and_local_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "local").mkdir(parents=True)  # exists here: a local directory, not a Hub id
    assert hub_id("org/model") == "org/model"
    assert hub_id("org/model@v2") == "org/model"
    assert hub_id("org/local") is None
    assert hub_id("/abs/org/model") is None and hub_id("./org/model") is None and hub_id("~/m") is None
    assert hub_id("a/b/c") is None and hub_id("plain") is None
    config = parse_config(yaml.safe_load(textwrap.dedent("""
        merge_method: ties
        base_model: org/base
        models:
          - model: org/ft+org/adapter
            parameters: {weight: 1.0, density: 0.5}
          - model: org/local
            parameters: {weight: 1.0, density: 0.5}
    """)))
    card = merge_card(config, "out")
    assert front_matter(card)["base_model"] == ["org/base", "org/ft", "org/adapter"]
    assert "[org/base](https://huggingface.co/org/base)" in card
    assert "- [org/ft](https://huggingface.co/org/ft) + [org/adapter](https://huggingface.co/org/adapter)" in card
    assert "- `org/local`" in card


def test_config_with_backticks_keeps_its_fence(tmp_path):
    text = "merge_method: linear\nmodels:\n  - model: org/a\n    parameters: {weight: 1.0}\n# ```not a fence```\n"
    card = merge_card(parse_config(yaml.safe_load(text), text=text), "x")
    assert "````yaml\n" + text.rstrip() + "\n````" in card


def test_extract_lora_card_is_a_peft_adapter_card(family_f32: Family, tmp_path):
    out = tmp_path / "adapter"
    summary = ferromerge.extract_lora(family_f32.base, family_f32.finetunes[0], out, rank=4)
    card = (out / "README.md").read_text(encoding="utf-8")
    assert front_matter(card) == {"base_model": [], "library_name": "peft", "tags": ["peft", "lora", "ferromerge"]}
    assert f"rank r = {summary['r']}" in card
    assert not (tmp_path / "bare").exists()
    ferromerge.extract_lora(family_f32.base, family_f32.finetunes[0], tmp_path / "bare", rank=4,
                            write_model_card=False)
    assert not (tmp_path / "bare" / "README.md").exists()
    hub = lora_card("org/base@main", "org/ft", "a", {**summary, "notes": []}, {"rank": 4})
    assert front_matter(hub)["base_model"] == ["org/base"]  # the adapter's base only (PEFT's meaning)


CARD_DRIVER = textwrap.dedent(
    """
    import json, sys, yaml
    from mergekit.card import generate_card
    from mergekit.config import MergeConfiguration
    out = {}
    for name, text in json.load(open(sys.argv[1])).items():
        card = generate_card(MergeConfiguration.model_validate(yaml.safe_load(text)), text, name=name)
        out[name] = yaml.safe_load(card.split("---")[1])
    json.dump(out, open(sys.argv[2], "w"))
    """
)

CARD_CONFIGS = {
    "ties_hub": """
        merge_method: ties
        base_model: org/base
        models:
          - {model: org/ft1, parameters: {weight: 1.0, density: 0.5}}
          - {model: org/ft2+org/lora2, parameters: {weight: 0.5, density: 0.5}}
    """,
    "slerp_hub": """
        merge_method: slerp
        base_model: org/base
        models: [{model: org/base}, {model: org/other}]
        parameters: {t: 0.5}
    """,
    "linear_local": """
        merge_method: linear
        models:
          - {model: /abs/a, parameters: {weight: 1.0}}
          - {model: org/b, parameters: {weight: 1.0}}
    """,
    "slices_hub": """
        merge_method: passthrough
        slices:
          - sources: [{model: org/a, layer_range: [0, 2]}]
          - sources: [{model: org/b, layer_range: [1, 2]}]
    """,
}


@pytest.mark.mergekit
def test_front_matter_matches_mergekit_generate_card(tmp_path, monkeypatch):
    """mergekit's ``generate_card`` on the same configs: the same base_model set and library_name, and mergekit's
    tags (ours add ``ferromerge``). Hub ids that exist nowhere: mergekit's is_hf calls them Hub models without asking
    the network, ours because they are not local directories."""
    python = _mergekit_python()
    if python is None:
        pytest.skip("mergekit virtualenv not found")
    monkeypatch.chdir(tmp_path)
    texts = {name: textwrap.dedent(text) for name, text in CARD_CONFIGS.items()}
    (tmp_path / "in.json").write_text(json.dumps(texts))
    (tmp_path / "driver.py").write_text(CARD_DRIVER)
    proc = subprocess.run([str(python), "driver.py", "in.json", "out.json"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    theirs = json.loads((tmp_path / "out.json").read_text())
    for name, text in texts.items():
        ours = front_matter(merge_card(parse_config(yaml.safe_load(text), text=text), name))
        assert sorted(ours["base_model"]) == sorted(theirs[name]["base_model"]), name
        assert ours["library_name"] == theirs[name]["library_name"], name
        assert [t for t in ours["tags"] if t != "ferromerge"] == theirs[name]["tags"], name
        assert set(ours) == set(theirs[name]), name
