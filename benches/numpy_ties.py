"""The plain-NumPy peer of the benchmarks: a streaming TIES merge written the way a careful Python user would.

It memory-maps each input safetensors file with ``np.memmap``, merges one tensor at a time with mergekit's TIES
semantics (per-tensor top-k by ``np.argpartition``, sign of the weighted sum, weighted disjoint mean, f32 math),
and writes the output file header-first, tensor after tensor. Single process, NumPy's own threading only.

    python benches/numpy_ties.py CONFIG.json OUT_DIR
CONFIG.json: {"base": DIR, "models": [{"path": DIR, "weight": w, "density": d}, ...]}
Only what the benchmark needs: single-file or indexed bf16/f16/f32 models, output bf16 in one file.
"""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np

_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def _index(model: Path) -> dict[str, Path]:
    idx = model / "model.safetensors.index.json"
    if idx.exists():
        return {k: model / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
    return {k: model / "model.safetensors" for k in _header(model / "model.safetensors")[0] if k != "__metadata__"}


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


_MAPS: dict[Path, tuple[dict, np.memmap]] = {}


def _tensor(path: Path, name: str) -> np.ndarray:
    if path not in _MAPS:
        header, start = _header(path)
        _MAPS[path] = (header, np.memmap(path, dtype=np.uint8, mode="r", offset=start))
    header, data = _MAPS[path]
    info = header[name]
    a, b = info["data_offsets"]
    raw = data[a:b].view(_NP[info["dtype"]])
    if info["dtype"] == "BF16":
        return (raw.astype(np.uint32) << 16).view(np.float32)
    return raw.astype(np.float32)


def _to_bf16(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def ties(base: np.ndarray, xs: list[np.ndarray], weights: list[float], densities: list[float]) -> np.ndarray:
    deltas = []
    for x, w, d in zip(xs, weights, densities):
        delta = (x - base).ravel()
        if d < 1:
            k = max(1, int(d * delta.size))
            keep = np.argpartition(np.abs(delta), delta.size - k)[delta.size - k :]
            trimmed = np.zeros_like(delta)
            trimmed[keep] = delta[keep]
            delta = trimmed
        deltas.append(w * delta)
    stacked = np.stack(deltas)
    elected = np.where(stacked.sum(0) >= 0, 1.0, -1.0).astype(np.float32)
    agree = np.sign(stacked) == elected
    mixed = (stacked * agree).sum(0)
    divisor = (np.asarray(weights, np.float32)[:, None] * agree).sum(0)
    divisor[divisor == 0] = 1
    return base.ravel() + mixed / divisor


def main(config_path: str, out_dir: str) -> None:
    cfg = json.loads(Path(config_path).read_text())
    base_idx = _index(Path(cfg["base"]))
    model_idx = [_index(Path(m["path"])) for m in cfg["models"]]
    weights = [m["weight"] for m in cfg["models"]]
    densities = [m["density"] for m in cfg["models"]]
    names = list(base_idx)
    shapes = {n: _header(base_idx[n])[0][n]["shape"] for n in names}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    header, pos = {}, 0
    for n in names:
        size = int(np.prod(shapes[n])) * 2
        header[n] = {"dtype": "BF16", "shape": shapes[n], "data_offsets": [pos, pos + size]}
        pos += size
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    with open(out / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for n in names:
            merged = ties(_tensor(base_idx[n], n), [_tensor(m[n], n) for m in model_idx], weights, densities)
            f.write(_to_bf16(merged).tobytes())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
