"""Sizes, reconstruction errors, time and peak memory of ``ferromerge compress`` / ``decompress`` on a synthetic
Llama-shaped family (base + T fine-tunes, bfloat16), for each scheme and rank setting.

    python benches/compress_family.py [--dir DIR] [--hidden 512] [--intermediate 1408] [--layers 4]
                                      [--vocab 8192] [--models 4] [--deltas structured|noise] [--json OUT]

Task vectors: ``structured`` (default) = a rank-16 part plus iid noise at 10% of its norm per matrix, standing in
for real fine-tunes, whose task vectors have fast-decaying spectra; ``noise`` = iid Gaussian (make_family's), the
worst case for low rank. Every run is a fresh ``ferromerge`` subprocess, so its peak RSS is its own. Prints one
Markdown table: archive size, ratio to the fine-tunes' bytes, mean/max relative error over matrices (all models),
compress and decompress wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from ferromerge.synth import Shape, llama_config, random_weights, save_model

RUNS = [
    ("lowrank", "default r = min(m,n)/T", []),
    ("lowrank", "--rank 32", ["--rank", "32"]),
    ("lowrank", "--energy 0.95", ["--energy", "0.95"]),
    ("lowrank", "--rank 32 --dtype float32", ["--rank", "32", "--dtype", "float32"]),
    ("tall", "lambda 0.4", []),
    ("tall", "lambda 0.4 --dtype float32", ["--dtype", "float32"]),
]

_MEASURE = """
import json, sys, time
from ferromerge.cli import main
t = time.perf_counter()
rc = main(sys.argv[1:])
# VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork + exec
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"rc": rc, "seconds": time.perf_counter() - t, "peak_rss": hwm * 1024}))
"""


def make(root: Path, shape: Shape, n: int, deltas: str, seed: int = 0) -> tuple[Path, list[Path]]:
    rng = np.random.default_rng(seed)
    base = random_weights(shape, rng)
    config = llama_config(shape, "bfloat16")
    kw = {"dtype": "bfloat16", "config": config, "vocab": shape.vocab, "shard_size": 100_000_000}
    base_dir = save_model(root / "base", base, **kw)
    fts = []
    for t in range(n):
        tuned = {}
        for name, x in base.items():
            if x.ndim == 2 and deltas == "structured":
                m, k = x.shape
                low = (rng.standard_normal((m, 16), dtype=np.float32) @ rng.standard_normal((16, k), dtype=np.float32))
                low *= np.float32(0.05 / np.sqrt(k) / 4)  # elements ~ 5% of the base's (std 1/sqrt(fan_in))
                noise = rng.standard_normal(x.shape, dtype=np.float32)
                noise *= np.float32(0.1 * np.linalg.norm(low) / np.linalg.norm(noise))
                tuned[name] = x + low + noise
            else:
                tuned[name] = x + np.float32(0.002) * rng.standard_normal(x.shape, dtype=np.float32)
        fts.append(save_model(root / f"ft{t + 1}", tuned, **kw))
    return base_dir, fts


def measure(args: list[str]) -> dict:
    p = subprocess.run([sys.executable, "-c", _MEASURE, *args], capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"ferromerge {' '.join(args)} failed:\n{p.stderr}")
    lines = p.stdout.strip().splitlines()
    return {**json.loads(lines[-1]), "stdout": lines[:-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=None)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--intermediate", type=int, default=1408)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=8192)
    ap.add_argument("--models", type=int, default=4)
    ap.add_argument("--deltas", choices=("structured", "noise"), default="structured")
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    root = a.dir or Path(tempfile.mkdtemp(prefix="ferromerge-compress-"))
    shape = Shape(a.hidden, a.intermediate, a.layers, a.vocab, heads=8, kv_heads=2)
    base, fts = make(root / "family", shape, a.models, a.deltas)
    ft_bytes = sum(p.stat().st_size for f in fts for p in f.iterdir())
    print(f"family: {a.models} fine-tunes of {ft_bytes / a.models / 1e6:.1f} MB (bf16), hidden {a.hidden}, "
          f"intermediate {a.intermediate}, {a.layers} layers, vocab {a.vocab}, deltas {a.deltas}\n")
    rows = []
    for scheme, label, extra in RUNS:
        archive = root / "archive"
        c = measure(["compress", str(base), *map(str, fts), "--out", str(archive), "--scheme", scheme, "--overwrite",
                     *extra])
        manifest = json.loads((archive / "manifest.json").read_text())
        size = sum(p.stat().st_size for p in archive.rglob("*") if p.is_file())
        errors = [e["error"] for t in manifest["tensors"] if len(t["shape"]) == 2 for e in t["models"]
                  if e["kind"] != "base"]
        d = measure(["decompress", str(archive), str(root / "out"), "--model", "0", "--overwrite"])
        rows.append({"scheme": scheme, "setting": label, "archive_bytes": size, "ratio": size / ft_bytes,
                     "mean_error": float(np.mean(errors)), "max_error": float(np.max(errors)),
                     "compress_s": c["seconds"], "compress_rss": c["peak_rss"], "decompress_s": d["seconds"],
                     "decompress_rss": d["peak_rss"]})
    print("| scheme | setting | archive | ratio | mean err | max err | compress | peak RSS | decompress | peak RSS |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['scheme']} | {r['setting']} | {r['archive_bytes'] / 1e6:.1f} MB | {r['ratio']:.3f} | "
              f"{r['mean_error']:.4f} | {r['max_error']:.4f} | {r['compress_s']:.1f} s | "
              f"{r['compress_rss'] / 2**20:.0f} MiB | {r['decompress_s']:.1f} s | {r['decompress_rss'] / 2**20:.0f} MiB |")
    if a.json:
        a.json.write_text(json.dumps({"family": vars(a) | {"dir": str(root), "json": None}, "rows": rows}, indent=1))
    if a.dir is None:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
