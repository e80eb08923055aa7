"""The world of tests/compat/test_mergekit_corpus.py: tiny models under the names that real, published mergekit
configs reference (tests/compat/corpus/*.yml, kept verbatim; origins in corpus/sources.json), and the driver that
runs every config through mergekit 0.1.5 in one interpreter.

Where a name is looked up, both tools must find the same files:

* ``org/name[@rev]`` (the form of a Hub repository id, and not a directory under the working directory) goes to a
  temporary Hugging Face cache (``models--org--name/refs/<rev>`` → ``snapshots/<commit>/``), read offline: by
  ferromerge's ``models.refs`` through ``$HF_HUB_CACHE``, by mergekit through huggingface_hub's
  ``snapshot_download`` and transformers' ``AutoConfig`` with ``HF_HUB_OFFLINE=1``. mergekit first asks the Hub
  which files the repository has (``list_repo_files``, a network call even offline); the driver answers that from
  the cache, as the Hub would for a repository that holds exactly these files.
* anything else (``medalpaca-7b``, ``./Base_6_v2``, ``D:/Uni/...``, ``E:\\mergekit\\...``: the last two are relative
  paths on Linux) is a directory under the config's own working directory, which both tools resolve against the
  current directory. Absolute paths (``/home/alpha/...``) are not created: this harness writes only under its
  temporary directory, so such a config fails to find its models in both tools.
* ``model+lora``: the model as above, the adapter a PEFT LoRA (``adapter_config.json`` +
  ``adapter_model.safetensors``, rank 2 on q_proj and v_proj) at the adapter's name.

Every model is a tiny Llama (hidden 8, intermediate 16, 2 heads, vocabulary 32 with a word-level tokenizer, stored in
bfloat16), written as MistralForCausalLM (same tensors, Mistral's config.json) where a name says Mistral; other
architectures a name implies (Gemma, Qwen, Mixtral, Yi) are not imitated: layer layout is what the corpus
exercises, and tests/compat's architecture tests cover the rest. All models of one config have the same number of
layers, the largest ``layer_range`` end in it (4 when it has none); a Hub name shared by several configs ties them
together (one cache holds one copy), so layers and architecture are decided over every config connected that way
(``families``). Weights: one base draw plus a small per-model change (fine-tunes of one base, as merges assume),
from seeds derived from the names.
"""

from __future__ import annotations

import hashlib
import json
import re
import textwrap
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from safetensors.numpy import save_file

from ferromerge.synth import Shape, llama_config, random_weights, save_model

CORPUS = Path(__file__).resolve().parents[1] / "compat" / "corpus"
#: the Hub id form, as ferromerge's models/refs.py has it
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
HIDDEN, INTER, VOCAB, HEADS = 8, 16, 32, 2
DEFAULT_LAYERS = 4
DTYPE = "bfloat16"
LORA_TARGETS = ("q_proj", "v_proj")
LORA_RANK = 2
#: one base for every model (its first layers' draws are shared whatever the layer count)
BASE_SEED = 20261207


def corpus_files() -> list[Path]:
    return sorted(CORPUS.glob("*.yml"))


def sources() -> dict[str, dict[str, str]]:
    return json.loads((CORPUS / "sources.json").read_text(encoding="utf-8"))


@dataclass
class Refs:
    """The model names one config references, and the largest layer_range end in it."""

    models: set[str] = field(default_factory=set)  # model paths (no +lora, no @rev)
    revisions: dict[str, set[str]] = field(default_factory=dict)  # path -> revisions asked for
    loras: set[str] = field(default_factory=set)  # adapter paths
    max_layer: int = 0


def _documents(text: str) -> list[Any]:
    try:
        return [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError:
        return []  # both tools must refuse it; nothing to build


def _walk(node: Any) -> Iterator[tuple[str, Any, dict[str, Any]]]:
    if isinstance(node, dict):
        for k, v in node.items():
            yield str(k), v, node
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _add_ref(refs: Refs, value: str, outputs: set[str]) -> None:
    parts = value.split("+")
    if len(parts) > 2:
        return
    for i, part in enumerate(parts):
        path, _, rev = part.partition("@")
        if not path.strip() or path in outputs:
            continue
        if i == 0:
            refs.models.add(path)
        else:
            refs.loras.add(path)
        refs.revisions.setdefault(path, set()).add(rev or "main")


def references(text: str) -> Refs:
    """Every model name in a config: ``model``/``base_model`` values anywhere (models, slices, modules, tokenizer
    token sources), ``tokenizer_source`` and ``tokenizer.source`` naming a model; names that a multi-document file
    gives its own merges (``name:``) are outputs, not inputs."""
    refs = Refs()
    docs = _documents(text)
    outputs = {d["name"] for d in docs if isinstance(d, dict) and isinstance(d.get("name"), str)}
    for doc in docs:
        for key, value, parent in _walk(doc):
            names_model = key in ("model", "base_model") or (
                (key == "tokenizer_source" or (key == "source" and parent is not doc)) and value not in ("union", "base"))
            if names_model and isinstance(value, str):
                _add_ref(refs, value, outputs)
            elif key == "layer_range" and isinstance(value, list) and all(isinstance(x, int) for x in value):
                refs.max_layer = max(refs.max_layer, *value)
    return refs


def is_hub(path: str) -> bool:
    return HUB_ID.fullmatch(path) is not None


def _seed(*parts: str) -> int:
    return int.from_bytes(hashlib.sha256("\0".join(parts).encode()).digest()[:8], "little")


def commit_of(name: str, revision: str) -> str:
    return hashlib.sha1(f"{name}@{revision}".encode()).hexdigest()


@dataclass(frozen=True)
class Family:
    """What all models of a group of configs share: the layer count and the architecture."""

    layers: int
    mistral: bool  # MistralForCausalLM (same tensors as Llama, its own config.json) when a name says Mistral


def _says_mistral(path: str) -> bool:
    return "mistral" in path.lower() and "mixtral" not in path.lower()


def families(all_refs: dict[str, Refs]) -> dict[str, Family]:
    """The family of each config: configs that share a Hub name share its one copy in the cache, so they form a
    group; the group's layer count is its largest layer_range end, and it is Mistral-shaped when any of its names
    says Mistral (a config mixing both would need ``--allow-crimes`` in mergekit, which published ones do not)."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            parent[x] = parent[parent[x]]
            x = parent[x]
        return x

    for cfg, refs in all_refs.items():
        for path in refs.models | refs.loras:
            if is_hub(path):
                parent[find("cfg:" + cfg)] = find("hub:" + path)
    layers: dict[str, int] = {}
    mistral: dict[str, bool] = {}
    for cfg, refs in all_refs.items():
        root = find("cfg:" + cfg)
        layers[root] = max(layers.get(root, DEFAULT_LAYERS), refs.max_layer)
        mistral[root] = mistral.get(root, False) or any(_says_mistral(p) for p in refs.models)
    return {cfg: Family(layers[find("cfg:" + cfg)], mistral[find("cfg:" + cfg)]) for cfg in all_refs}


def _weights(layers: int, base_seed: int, name: str) -> dict[str, np.ndarray]:
    shape = Shape(hidden=HIDDEN, intermediate=INTER, layers=layers, vocab=VOCAB, heads=HEADS, kv_heads=HEADS)
    base = random_weights(shape, np.random.default_rng(base_seed))
    rng = np.random.default_rng(_seed(name))
    return {k: (v + rng.normal(0.0, 0.05, v.shape) * (np.abs(v) + 0.1)).astype(np.float32) for k, v in base.items()}


def write_model(path: Path, family: Family, base_seed: int, name: str) -> None:
    shape = Shape(hidden=HIDDEN, intermediate=INTER, layers=family.layers, vocab=VOCAB, heads=HEADS, kv_heads=HEADS)
    config = llama_config(shape, DTYPE)
    if family.mistral:
        del config["attention_bias"], config["mlp_bias"]
        config.update(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    save_model(path, _weights(family.layers, base_seed, name), dtype=DTYPE, config=config, vocab=VOCAB)


def write_lora(path: Path, layers: int, name: str) -> None:
    """A PEFT LoRA adapter as PEFT saves one (rank 2 on q_proj and v_proj of every layer)."""
    path.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(_seed("lora", name))
    tensors = {}
    for i in range(layers):
        for proj in LORA_TARGETS:
            module = f"base_model.model.model.layers.{i}.self_attn.{proj}"
            tensors[f"{module}.lora_A.weight"] = rng.normal(0, 0.3, (LORA_RANK, HIDDEN)).astype(np.float32)
            tensors[f"{module}.lora_B.weight"] = rng.normal(0, 0.3, (HIDDEN, LORA_RANK)).astype(np.float32)
    save_file(tensors, str(path / "adapter_model.safetensors"), metadata={"format": "pt"})
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": LORA_RANK, "lora_alpha": 4, "use_rslora": False,
              "rank_pattern": {}, "alpha_pattern": {}, "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False,
              "target_modules": list(LORA_TARGETS), "base_model_name_or_path": None, "inference_mode": True,
              "use_dora": False}
    (path / "adapter_config.json").write_text(json.dumps(config), encoding="utf-8")


@dataclass
class World:
    root: Path
    hf_cache: Path
    families: dict[str, Family]  # config file name -> the family of its models

    def cwd(self, config: str) -> Path:
        return self.root / "cwd" / Path(config).stem


def build_world(root: Path, files: list[Path]) -> World:
    """Tiny models for every name the ``files`` reference: Hub names in ``root/hf-cache``, the rest under
    ``root/cwd/<config stem>/`` (each config runs with that directory as its working directory)."""
    all_refs = {f.name: references(f.read_text(encoding="utf-8")) for f in files}
    fams = families(all_refs)
    world = World(root, root / "hf-cache", fams)
    written: set[Path] = set()
    for cfg, refs in all_refs.items():
        fam = fams[cfg]
        for path in sorted(refs.models | refs.loras):
            lora = path in refs.loras and path not in refs.models
            if is_hub(path):
                repo = world.hf_cache / ("models--" + path.replace("/", "--"))
                dirs = []
                for rev in sorted(refs.revisions[path]):
                    commit = commit_of(path, rev)
                    (repo / "refs").mkdir(parents=True, exist_ok=True)
                    (repo / "refs" / rev).write_text(commit, encoding="utf-8")
                    dirs.append(repo / "snapshots" / commit)
            elif Path(path).is_absolute():
                continue
            else:
                dirs = [world.cwd(cfg) / path]
            for d in dirs:
                if d in written:
                    continue
                written.add(d)
                if lora:
                    write_lora(d, fam.layers, path)
                else:
                    write_model(d, fam, BASE_SEED, path)
        world.cwd(cfg).mkdir(parents=True, exist_ok=True)
    return world


DRIVER = textwrap.dedent(
    """
    import json, os, sys, traceback
    import huggingface_hub

    def list_repo_files(repo_id, repo_type="model", revision=None, **kwargs):
        # the Hub's answer for a repository holding exactly the cached snapshot (offline mode refuses the call)
        snap = huggingface_hub.snapshot_download(repo_id, revision=revision, local_files_only=True)
        return sorted(os.path.relpath(os.path.join(d, f), snap) for d, _, fs in os.walk(snap) for f in fs)

    huggingface_hub.list_repo_files = list_repo_files
    from mergekit.architecture.auto import infer_architecture_info
    from mergekit.io.tasks import LoaderCache
    from mergekit.scripts.run_yaml import main

    jobs = json.load(open(sys.argv[1]))
    results = {}
    for name, cfg, out, cwd in jobs:
        os.chdir(cwd)
        # mergekit keeps loaders per process keyed by the name as written; the same relative name is another
        # directory in the next config's working directory
        LoaderCache.loaders.clear()
        infer_architecture_info.cache_clear()
        try:
            main([cfg, out, "--lora-merge-cache", os.path.join(cwd, ".lora-cache"), "--random-seed", "1234",
                  "--no-write-model-card", "--quiet"], standalone_mode=False)
            results[name] = None
        except BaseException:
            results[name] = traceback.format_exc()
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def mergekit_env(world: World) -> dict[str, str]:
    return {"HF_HUB_CACHE": str(world.hf_cache), "HF_HOME": str(world.root / "hf-home"), "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1", "PYTHONHASHSEED": "0",
            "CUDA_VISIBLE_DEVICES": ""}
