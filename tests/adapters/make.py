"""Small PEFT-format LoRA adapters written with NumPy (no torch), for the adapter tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from ferromerge import _engine

PREFIX = "base_model.model."
#: module -> ΔW shape (out, in) of a two-layer toy model
SHAPES = {
    **{f"model.layers.{i}.self_attn.q_proj": (24, 16) for i in range(2)},
    **{f"model.layers.{i}.self_attn.v_proj": (8, 16) for i in range(2)},
    **{f"model.layers.{i}.mlp.down_proj": (16, 40) for i in range(2)},
}


def write_adapter(path: Path, rank: int, *, seed: int, alpha: float = 16.0, modules=None, dtype: str = "F32",
                  rslora: bool = False, rank_pattern=None, embed=None, shapes=None
                  ) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """An adapter with random factors; returns {module: (A, B)} as float32 (after rounding to ``dtype``).
    ``shapes``: module -> ΔW shape instead of ``SHAPES``."""
    rng = np.random.default_rng(seed)
    shapes = SHAPES if shapes is None else shapes
    modules = list(shapes) if modules is None else modules
    rank_pattern = rank_pattern or {}
    tensors, out = {}, {}
    for m in modules:
        o, i = shapes[m] if embed is None or m not in embed else embed[m]
        r = rank_pattern.get(m, rank)
        a = (rng.standard_normal((r, i)) / np.sqrt(i)).astype(np.float32)
        b = (rng.standard_normal((o, r)) / np.sqrt(r)).astype(np.float32)
        a, b = _engine.decode(_engine.encode(a, dtype), dtype), _engine.decode(_engine.encode(b, dtype), dtype)
        if embed is not None and m in embed:
            tensors[f"{PREFIX}{m}.lora_embedding_A"] = (_engine.encode(a, dtype), dtype)
            tensors[f"{PREFIX}{m}.lora_embedding_B"] = (_engine.encode(b, dtype), dtype)
        else:
            tensors[f"{PREFIX}{m}.lora_A.weight"] = (_engine.encode(a, dtype), dtype)
            tensors[f"{PREFIX}{m}.lora_B.weight"] = (_engine.encode(b, dtype), dtype)
        out[m] = (a, b)
    path.mkdir(parents=True, exist_ok=True)
    _engine.save_file(str(path / "adapter_model.safetensors"), tensors, {"format": "pt"})
    config = {
        "peft_type": "LORA", "r": rank, "lora_alpha": alpha, "use_rslora": rslora, "task_type": "CAUSAL_LM",
        "target_modules": sorted({m.rpartition(".")[2] for m in modules}), "base_model_name_or_path": "toy/base",
        "rank_pattern": rank_pattern, "alpha_pattern": {}, "fan_in_fan_out": False, "lora_dropout": 0.0,
    }
    (path / "adapter_config.json").write_text(json.dumps(config))
    return out


def read_adapter(path: Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """(config, {module: (A, B)} float32) of an adapter directory."""
    config = json.loads((path / "adapter_config.json").read_text())
    f = path / "adapter_model.safetensors"
    header = _engine.read_header(str(f))
    raw = f.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    meta = json.loads(raw[8:8 + n])
    out: dict[str, list] = {}
    for key, (dtype, shape) in header.items():
        s, e = meta[key]["data_offsets"]
        np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[dtype]
        arr = _engine.decode(np.frombuffer(raw[8 + n + s: 8 + n + e], np_dtype).reshape(shape), dtype)
        name = key.removeprefix(PREFIX)
        for suffix, slot in ((".lora_A.weight", 0), (".lora_B.weight", 1), (".lora_embedding_A", 0),
                             (".lora_embedding_B", 1)):
            if name.endswith(suffix):
                out.setdefault(name.removesuffix(suffix), [None, None])[slot] = arr
    return config, {k: (v[0], v[1]) for k, v in out.items()}
