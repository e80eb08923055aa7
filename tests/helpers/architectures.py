"""Tiny random models of real transformers architectures, for tests/compat/test_mergekit_architectures.py.

Every model is made offline by transformers itself (``Auto*.from_config``) in the mergekit virtualenv, so the
tensor names, the config.json keys and the file layout are the ones real checkpoints of that architecture have
(``save_pretrained`` of transformers 5 writes MoE experts one tensor per expert, as the Hub's checkpoints are).
Per architecture: ``base`` and two fine-tunes ``a`` and ``b`` (the base plus small Gaussian noise on every
parameter, tied ones stay tied), hidden 32, 4 layers, vocabulary 64, float32.

``DRIVER`` runs in ONE interpreter of the mergekit virtualenv: it builds every model, then runs every mergekit
merge through mergekit's Python API (``mergekit.merge.run_merge``), so torch, transformers and mergekit are
imported once. ``LOADER`` loads outputs with ``from_pretrained`` (one interpreter for all of them).
"""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from dataclasses import dataclass
from pathlib import Path
from typing import Any

LAYERS = 4
#: the passthrough frankenmerge: layers [0, 3) of a, then [1, 4) of b: 6 output layers
FRANKEN = ((0, 3), (1, 4))
FRANKEN_LAYERS = sum(end - start for start, end in FRANKEN)

_DECODER = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=64)


@dataclass(frozen=True)
class Arch:
    """One architecture: transformers' config class and keyword arguments, and the Auto class that builds it."""

    config_class: str
    kwargs: dict[str, Any]
    auto_class: str = "AutoModelForCausalLM"
    #: modules of a multi-stack model (T5: encoder and decoder blocks), each sliced on its own under modules:
    modules: tuple[str, ...] = ()
    #: modules without layers (T5's shared embedding): merged whole under modules:
    whole_modules: tuple[str, ...] = ()
    #: config.json keys that must hold the output's layer count after the frankenmerge
    layer_keys: tuple[str, ...] = ("num_hidden_layers",)
    #: mixture of experts: mergekit 0.1.5 fuses the per-expert tensors (see expert_views)
    moe: bool = False
    #: the Auto class that loads the checkpoint (when it differs from the one that builds it)
    load_class: str | None = None
    #: ``config.architectures`` as the Hub's checkpoints of this kind declare it (when it differs from the model's)
    architectures: tuple[str, ...] = ()
    #: buffers that older transformers saved and mergekit's table requires (GPT-NeoX's causal mask)
    buffers: bool = False

    @property
    def loader(self) -> str:
        return self.load_class or self.auto_class


ARCHITECTURES: dict[str, Arch] = {
    "llama": Arch("LlamaConfig", _DECODER),
    "mistral": Arch("MistralConfig", _DECODER),
    "mixtral": Arch("MixtralConfig", {**_DECODER, "num_local_experts": 4, "num_experts_per_tok": 2}, moe=True),
    "qwen2": Arch("Qwen2Config", _DECODER),
    "qwen2_moe": Arch("Qwen2MoeConfig", {**_DECODER, "num_experts": 4, "num_experts_per_tok": 2,
                                         "moe_intermediate_size": 24, "shared_expert_intermediate_size": 48},
                      moe=True),
    "qwen3": Arch("Qwen3Config", {**_DECODER, "head_dim": 8}),
    "gemma": Arch("GemmaConfig", {**_DECODER, "head_dim": 8}),
    "gemma2": Arch("Gemma2Config", {**_DECODER, "head_dim": 8}),
    "gemma3_text": Arch("Gemma3TextConfig", {**_DECODER, "head_dim": 8}),
    "phi3": Arch("Phi3Config", {**_DECODER, "pad_token_id": 0}),
    "gpt2": Arch("GPT2Config", dict(vocab_size=64, n_embd=32, n_layer=LAYERS, n_head=4, n_positions=64),
                 layer_keys=("n_layer",)),
    # Pythia's checkpoints carry each layer's causal mask (bool), masked_bias and rotary inv_freq, and mergekit's
    # table requires them
    "gpt_neox": Arch("GPTNeoXConfig", _DECODER, buffers=True),
    # mergekit's table is the new decoder architecture's (Falcon-40B/180B: ln_attn and ln_mlp)
    "falcon": Arch("FalconConfig", dict(vocab_size=64, hidden_size=32, num_hidden_layers=LAYERS,
                                        num_attention_heads=4, num_kv_heads=2, new_decoder_architecture=True,
                                        tie_word_embeddings=False)),
    "stablelm": Arch("StableLmConfig", _DECODER),
    "starcoder2": Arch("Starcoder2Config", _DECODER),
    # Command R+'s q/k norms: mergekit's table requires them
    "cohere": Arch("CohereConfig", {**_DECODER, "use_qk_norm": True}),
    "olmo2": Arch("Olmo2Config", _DECODER),
    # bert-base-uncased's layout: a pre-training checkpoint (pooler, seq_relationship) labelled BertForMaskedLM,
    # whose mergekit table requires the pooler
    "bert": Arch("BertConfig", dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=LAYERS,
                                    num_attention_heads=4, max_position_embeddings=64),
                 auto_class="AutoModelForPreTraining", load_class="AutoModelForMaskedLM",
                 architectures=("BertForMaskedLM",)),
    # flan-t5's gated feed-forward (wi_0/wi_1): mergekit's table has the gated one (transformers 5 always ties
    # T5's lm_head to shared, so the checkpoint has no lm_head)
    "t5": Arch("T5Config", dict(vocab_size=64, d_model=32, d_kv=8, d_ff=48, num_layers=LAYERS, num_heads=4,
                                feed_forward_proj="gated-gelu"),
               auto_class="AutoModelForSeq2SeqLM", modules=("encoder", "decoder"), whole_modules=("shared",),
               layer_keys=("num_layers", "num_decoder_layers")),
}

METHODS = ("ties", "slerp", "franken")


def merge_configs(root: Path, arch: str) -> dict[str, dict[str, Any]]:
    """``{method: mergekit config}`` of one architecture's family in ``root / arch``."""
    spec = ARCHITECTURES[arch]
    m = {name: str(root / arch / name) for name in ("base", "a", "b")}
    ties = {
        "merge_method": "ties",
        "base_model": m["base"],
        "models": [{"model": m["a"], "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": m["b"], "parameters": {"weight": 0.4, "density": 0.7}}],
        "dtype": "float32",
    }
    slerp = {
        "merge_method": "slerp",
        "base_model": m["a"],
        "models": [{"model": m["a"]}, {"model": m["b"]}],
        "parameters": {"t": [0, 0.5, 1]},
        "dtype": "float32",
    }
    slices = [{"sources": [{"model": m[name], "layer_range": list(r)}]} for name, r in zip("ab", FRANKEN)]
    franken: dict[str, Any] = {"merge_method": "passthrough", "dtype": "float32"}
    if spec.modules:
        modules: dict[str, Any] = {name: {"slices": slices} for name in spec.modules}
        modules.update({name: {"models": [{"model": m["a"]}]} for name in spec.whole_modules})
        franken["modules"] = modules
    else:
        franken["slices"] = slices
    return {"ties": ties, "slerp": slerp, "franken": franken}


DRIVER = textwrap.dedent(
    r"""
    import json, sys, traceback, warnings
    import torch, transformers, yaml
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    from safetensors.torch import load_file, save_file
    job = json.load(open(sys.argv[1]))

    def add_buffers(path, model):
        tensors = load_file(path)
        n = model.config.max_position_embeddings
        inv_freq = model.gpt_neox.rotary_emb.inv_freq.detach().clone().float()
        for i in range(model.config.num_hidden_layers):
            tensors[f"gpt_neox.layers.{i}.attention.rotary_emb.inv_freq"] = inv_freq.clone()
            tensors[f"gpt_neox.layers.{i}.attention.bias"] = torch.tril(torch.ones(n, n, dtype=torch.bool))[None, None]
            tensors[f"gpt_neox.layers.{i}.attention.masked_bias"] = torch.tensor(-1e9)
        save_file(tensors, path, metadata={"format": "pt"})

    for arch, spec in job["models"].items():
        torch.manual_seed(spec["seed"])
        config = getattr(transformers, spec["config_class"])(**spec["kwargs"])
        model = getattr(transformers, spec["auto_class"]).from_config(config)
        model.eval()
        if spec["architectures"]:
            model.config.architectures = spec["architectures"]
        root = spec["root"]
        base = {k: v.detach().clone() for k, v in model.state_dict().items()}
        for i, name in enumerate(("base", "a", "b")):
            with torch.no_grad():
                # parameters() yields a tied tensor once: ties survive the noise
                for p in model.parameters():
                    p.add_(torch.randn_like(p) * (0.0, 0.004, 0.006)[i])
            # save_pretrained would overwrite config.architectures with the class's name
            model.save_pretrained(root + "/" + name)
            if spec["architectures"]:
                path = root + "/" + name + "/config.json"
                c = json.load(open(path))
                c["architectures"] = spec["architectures"]
                json.dump(c, open(path, "w"), indent=2)
            if spec["buffers"]:
                add_buffers(root + "/" + name + "/model.safetensors", model)
            model.load_state_dict(base, strict=False)

    from mergekit.config import MergeConfiguration
    from mergekit.merge import MergeOptions, run_merge
    results = {}
    for name, cfg, out in job["merges"]:
        try:
            config = MergeConfiguration.model_validate(yaml.safe_load(open(cfg)))
            run_merge(config, out, MergeOptions(random_seed=1234, copy_tokenizer=False, write_model_card=False,
                                                quiet=True), config_source=open(cfg).read())
            results[name] = None
        except BaseException:
            results[name] = traceback.format_exc()

    # mergekit's own kernel on each per-expert tensor (its run_merge fuses the experts first)
    import re
    from mergekit.merge_methods import merge_tensors
    for ref in job["expert_refs"]:
        models = {m: load_file(ref["root"] + "/" + m + "/model.safetensors") for m in ("base", "a", "b")}
        out = {}
        for name in models["base"]:
            if not re.search(r"\.experts\.\d+\.", name):
                continue
            params = dict(ref.get("parameters", {}))
            if "gradient" in ref:
                # mergekit's gradient: piecewise linear over the anchors, at layer / (layers - 1)
                g = ref["gradient"]
                x = int(re.search(r"\.(\d+)\.", name).group(1)) / (ref["layers"] - 1) * (len(g) - 1)
                lo = min(int(x), len(g) - 2)
                params["t"] = g[lo] + (g[lo + 1] - g[lo]) * (x - lo)
            out[name] = merge_tensors([models[m][name] for m in ref["ids"]], ref["method"], parameters=params,
                                      ids=ref["ids"], base_index=ref["ids"].index(ref["base"]),
                                      dtype=torch.float32).contiguous()
        save_file(out, sys.argv[2].rsplit("/", 1)[0] + "/ref-" + ref["case"] + ".safetensors")
    json.dump(results, open(sys.argv[2], "w"))
    """
)


LOADER = textwrap.dedent(
    """
    import json, sys, traceback, warnings
    import transformers
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    results = {}
    for name, auto, path in json.load(open(sys.argv[1])):
        try:
            model, info = getattr(transformers, auto).from_pretrained(path, output_loading_info=True)
            bad = {k: sorted(v) for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
            results[name] = json.dumps(bad) if bad else None
        except BaseException:
            results[name] = traceback.format_exc()
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def _run(python: Path, source: str, work: Path, job: Any, stem: str) -> dict[str, str | None]:
    (work / f"{stem}.py").write_text(source)
    (work / f"{stem}-job.json").write_text(json.dumps(job))
    env = dict(os.environ, PYTHONHASHSEED="0", HF_HUB_DISABLE_PROGRESS_BARS="1", CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [str(python), str(work / f"{stem}.py"), str(work / f"{stem}-job.json"), str(work / f"{stem}-out.json")],
        capture_output=True, text=True, env=env, timeout=1200,
    )
    assert proc.returncode == 0, f"{stem} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    result: dict[str, str | None] = json.loads((work / f"{stem}-out.json").read_text())
    return result


def build_and_merge(
    python: Path, root: Path, work: Path, expert_refs: list[dict[str, Any]]
) -> dict[str, tuple[Path, Path, str | None]]:
    """Build every architecture's family under ``root`` and run each merge through mergekit:
    ``{case: (config_path, mergekit_out, mergekit_error_or_None)}``, case = ``<arch>-<method>``. Each of
    ``expert_refs`` (``case``, ``root``, ``method``, ``ids``, ``base``, ``parameters`` or a t ``gradient`` over
    ``layers``) also runs mergekit's kernel (``merge_tensors``) on every per-expert tensor, into
    ``work/ref-<case>.safetensors``."""
    import yaml

    models = {
        arch: {"seed": 1000 + i, "config_class": spec.config_class, "kwargs": spec.kwargs,
               "auto_class": spec.auto_class, "root": str(root / arch),
               "architectures": list(spec.architectures), "buffers": spec.buffers}
        for i, (arch, spec) in enumerate(ARCHITECTURES.items())
    }
    merges = []
    for arch in ARCHITECTURES:
        for method, cfg in merge_configs(root, arch).items():
            case = f"{arch}-{method}"
            path = work / f"{case}.yml"
            path.write_text(yaml.safe_dump(cfg, sort_keys=False))
            merges.append((case, str(path), str(work / f"mk-{case}")))
    errors = _run(python, DRIVER, work, {"models": models, "merges": merges, "expert_refs": expert_refs}, "build-and-merge")
    return {case: (Path(cfg), Path(out), errors[case]) for case, cfg, out in merges}


def load_all(python: Path, outputs: dict[str, tuple[str, Path]], work: Path) -> dict[str, str | None]:
    """``from_pretrained`` of each ``{case: (auto class, directory)}``: ``{case: None, or what went wrong}``."""
    job = [(case, auto, str(path)) for case, (auto, path) in outputs.items()]
    return _run(python, LOADER, work, job, "load")
