"""Helpers of the pipeline tests: config writing, a CLI runner, and an independent safetensors reader."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from ferromerge.synth import Family


def write_config(path: Path, config: dict[str, Any]) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def ties_config(family: Family, **extra: Any) -> dict[str, Any]:
    """A TIES config over a family (weights 1, 0.5, 0.5; density 0.5)."""
    return {
        "merge_method": "ties",
        "base_model": str(family.base),
        "models": [
            {"model": str(ft), "parameters": {"weight": w, "density": 0.5}}
            for ft, w in zip(family.finetunes, (1.0, 0.5, 0.5), strict=False)
        ],
        **extra,
    }


def run_cli(
    *args: str | os.PathLike[str], cwd: Path | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m ferromerge.cli ARGS`` in a subprocess; returns the completed process (text output)."""
    return subprocess.run(
        [sys.executable, "-m", "ferromerge.cli", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def read_safetensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    """``{name: (dtype, float32 values)}`` parsed from the bytes by the spec, independently of ferromerge."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    header.pop("__metadata__", None)
    data = raw[8 + n :]
    out = {}
    for name, info in header.items():
        a, b = info["data_offsets"]
        chunk = data[a:b]
        if info["dtype"] == "BF16":
            x = (np.frombuffer(chunk, "<u2").astype(np.uint32) << 16).view(np.float32)
        else:
            x = np.frombuffer(chunk, {"F32": "<f4", "F16": "<f2"}[info["dtype"]]).astype(np.float32)
        out[name] = (info["dtype"], x.reshape(info["shape"]))
    return out


def read_model(model_dir: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Every tensor of a model directory (single file or index + shards)."""
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        out = {}
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            out |= read_safetensors(model_dir / shard)
        return out
    return read_safetensors(model_dir / "model.safetensors")
