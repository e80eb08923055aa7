"""Shared builders of the mergekit differential tests (tests/compat/test_mergekit_*.py): the tiny Llama-shaped
family's shapes and config.json, a hand-written safetensors reader (not ferromerge's), the ``mergekit-yaml`` driver
that runs every config in one subprocess of the mergekit virtualenv, and the max-difference report."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import yaml
from reference import codec

H, INTER, LAYERS, VOCAB, HEADS = 32, 48, 2, 64, 4
MODELS = ("a", "b", "c")


def llama_shapes(layers: int = LAYERS, tied: bool = False) -> dict[str, tuple[int, ...]]:
    """Tensor shapes of a tiny Llama (hidden H, intermediate INTER, vocabulary VOCAB); no lm_head when tied."""
    s: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,)}
    if not tied:
        s["lm_head.weight"] = (VOCAB, H)
    for i in range(layers):
        p = f"model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            s[p + f"self_attn.{proj}_proj.weight"] = (H, H)
        s[p + "mlp.gate_proj.weight"] = (INTER, H)
        s[p + "mlp.up_proj.weight"] = (INTER, H)
        s[p + "mlp.down_proj.weight"] = (H, INTER)
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "post_attention_layernorm.weight"] = (H,)
    return s


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": H,
    "intermediate_size": INTER,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": HEADS,
    "num_key_value_heads": HEADS,
    "vocab_size": VOCAB,
    "max_position_embeddings": 128,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "torch_dtype": "float32",
}


def read_safetensors_dir(d: Path) -> dict[str, np.ndarray]:
    """All tensors of every *.safetensors file in ``d`` as float32 (bf16/f16 decoded), parsed by hand."""
    out: dict[str, np.ndarray] = {}
    files = sorted(d.glob("*.safetensors"))
    assert files, f"no safetensors in {d}"
    for f in files:
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        data = raw[8 + n :]
        for name, info in header.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            buf = data[a:b]
            dt = info["dtype"]
            if dt == "F32":
                arr = np.frombuffer(buf, "<f4").astype(np.float32)
            elif dt == "F16":
                arr = np.frombuffer(buf, "<f2").astype(np.float32)
            elif dt == "BF16":
                arr = codec.bf16_decode(np.frombuffer(buf, "<u2"))
            else:
                raise AssertionError(f"{f.name}:{name}: unexpected dtype {dt}")
            assert name not in out, f"tensor {name} appears twice"
            out[name] = arr.reshape(info["shape"])
    return out


def dtypes_in_dir(d: Path) -> dict[str, str]:
    res = {}
    for f in sorted(d.glob("*.safetensors")):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        for name, info in json.loads(raw[8 : 8 + n]).items():
            if name != "__metadata__":
                res[name] = info["dtype"]
    return res


def model_entries(root: Path, names, params):
    return [{"model": str(root / m), "parameters": p} for m, p in zip(names, params)]


DRIVER = textwrap.dedent(
    """
    import json, sys, traceback
    from mergekit.scripts.run_yaml import main
    jobs = json.load(open(sys.argv[1]))
    results = {}
    for name, cfg, out in jobs:
        try:
            main([cfg, out, "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--random-seed", "1234"],
                 standalone_mode=False)
            results[name] = None
        except BaseException:
            results[name] = traceback.format_exc()
    json.dump(results, open(sys.argv[2], "w"))
    """
)


def run_mergekit(configs: dict[str, dict], mergekit_python: Path, work: Path) -> dict[str, tuple[Path, Path, str | None]]:
    """Write each config as YAML in ``work`` and run them all through mergekit-yaml in one subprocess of the
    mergekit virtualenv: ``{case: (config_path, mergekit_out_dir, mergekit_error_or_None)}``."""
    jobs = []
    for name, cfg in configs.items():
        p = work / f"{name}.yml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        jobs.append((name, str(p), str(work / f"mk-{name}")))
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "driver.py").write_text(DRIVER)
    env = dict(os.environ, PYTHONHASHSEED="0", CUDA_VISIBLE_DEVICES="")
    proc = subprocess.run(
        [str(mergekit_python), str(work / "driver.py"), str(work / "jobs.json"), str(work / "results.json")],
        capture_output=True, text=True, env=env, timeout=1800,
    )
    assert proc.returncode == 0, f"mergekit driver failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    errors = json.loads((work / "results.json").read_text())
    return {name: (Path(cfg), Path(out), errors[name]) for name, cfg, out in jobs}


def max_diffs(a, b, keep):
    """(max |a−b|, max |a−b|/|a| over elements with |a| ≥ 1e-4: relative error of near-zero outputs means nothing)."""
    diff = np.abs(a - b)[keep]
    big = np.abs(a[keep]) >= 1e-4
    rel = diff[big] / np.abs(a[keep][big])
    return float(diff.max(initial=0)), float(rel.max(initial=0))


def report_diffs(case, diffs):
    abs_max = max(d[0] for d in diffs) if diffs else 0.0
    rel_max = max(d[1] for d in diffs) if diffs else 0.0
    print(f"\n[mergekit-diff] {case}: max abs diff {abs_max:.3e}, max rel diff {rel_max:.3e} (|out| >= 1e-4)", end="")
    return abs_max, rel_max
