"""TSV-M of one Llama-3-8B-shaped layer (hidden 4096, MLP 14336, 8 KV heads of 128; three tasks): ferromerge's
Rust kernel (``_engine.merge_arrays``, exact SVD) against the reference algorithm in torch (FusionBench's
``TSVM`` / the paper's ``compute_and_sum_svd_mem_reduction`` restated: a full ``torch.linalg.svd`` per task
vector, the top k = r/T triplets concatenated, U and V replaced by ``U_u V_u`` and ``U_v V_v`` of two more SVDs).

    python benches/tsv_m_layer.py [--scale 1] [--threads 2] [--torch-python PY] [--json OUT]

Each tool runs in a fresh process on the same matrices (written once as .npy), same threads (torch:
``set_num_threads``, ``OMP_WAIT_POLICY=PASSIVE``; ours: ``threads=``); wall, user+system CPU seconds and peak RSS
(the child's own ``VmHWM``) are reported with /proc/loadavg before and after, and the two merged updates are
compared (Frobenius distance relative to the torch update's norm). ``--scale 4`` divides every side by 4 (a quick
proxy: 1/64 of the flops). Task vectors have a decaying spectrum (X diag(i^-1) Y, Gaussian X, Y) so the top-k
subspaces are well defined and float32 implementations agree.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SHAPES = {  # Llama-3-8B, one layer (out, in)
    "q_proj": (4096, 4096), "k_proj": (1024, 4096), "v_proj": (1024, 4096), "o_proj": (4096, 4096),
    "gate_proj": (14336, 4096), "up_proj": (14336, 4096), "down_proj": (4096, 14336),
}
TORCH_PY = Path.home() / ".cache/ferromerge/mergekit-venv/bin/python"

CHILD = r'''
import json, os, resource, sys, time
import numpy as np
tool, d, threads = sys.argv[1], sys.argv[2], int(sys.argv[3])
names = json.loads(sys.argv[4])
start = time.perf_counter()
if tool == "torch":
    import torch
    torch.set_num_threads(threads)
    def tsvm(taus):  # FusionBench TSVM (compute_and_sum_svd_mem_reduction), float32, full SVDs
        k = int(min(taus[0].shape) * (1.0 / len(taus)))
        for i, t in enumerate(taus):
            u, s, v = torch.linalg.svd(t, full_matrices=False)
            if i == 0:
                su, ss, sv = torch.zeros_like(u), torch.zeros_like(s), torch.zeros_like(v)
            su[:, i * k:(i + 1) * k] = u[:, :k]; ss[i * k:(i + 1) * k] = s[:k]; sv[i * k:(i + 1) * k, :] = v[:k, :]
        uu, _, vu = torch.linalg.svd(su, full_matrices=False)
        uv, _, vv = torch.linalg.svd(sv, full_matrices=False)
        return torch.linalg.multi_dot((uu, vu, torch.diag(ss), uv, vv))
    with torch.inference_mode():
        for n in names:
            base = torch.from_numpy(np.load(f"{d}/{n}.base.npy"))
            taus = [torch.from_numpy(np.load(f"{d}/{n}.{i}.npy")) - base for i in range(3)]
            np.save(f"{d}/{n}.out.torch.npy", (base + tsvm(taus)).numpy())
else:
    from ferromerge import _engine
    for n in names:
        base = np.load(f"{d}/{n}.base.npy")
        xs = [np.load(f"{d}/{n}.{i}.npy") for i in range(3)]
        out = _engine.merge_arrays({"name": "tsv_m"}, [x.ravel() for x in xs], base.ravel(),
                                   _engine.input_values([1.0] * 3, [1.0] * 3, None, None),
                                   out_dtype="float32", name=n, shape=list(base.shape), threads=threads)
        np.save(f"{d}/{n}.out.ours.npy", np.asarray(out).reshape(base.shape))
wall = time.perf_counter() - start
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = [l for l in open("/proc/self/status") if l.startswith("VmHWM")][0].split()[1]
print(json.dumps({"wall": wall, "user": ru.ru_utime, "sys": ru.ru_stime, "rss_gb": int(hwm) * 1024 / 1e9}))
'''


def loadavg() -> str:
    return Path("/proc/loadavg").read_text().split(" ")[0]


def run(tool: str, python: str, d: str, threads: int, names: list[str]) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads),
               OPENBLAS_NUM_THREADS=str(threads))
    before = loadavg()
    r = subprocess.run([python, "-c", CHILD, tool, d, str(threads), json.dumps(names)], env=env, check=True,
                       capture_output=True, text=True)
    out = json.loads(r.stdout.strip().splitlines()[-1])
    return {**out, "load_before": before, "load_after": loadavg()}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--only", default="", help="comma-separated matrix names (default: the whole layer)")
    ap.add_argument("--torch-python", default=str(TORCH_PY))
    ap.add_argument("--json")
    a = ap.parse_args()
    names = a.only.split(",") if a.only else list(SHAPES)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory() as d:
        for n in names:
            m, k = (s // a.scale for s in SHAPES[n])
            r = min(m, k)
            base = rng.standard_normal((m, k), dtype=np.float32)
            np.save(f"{d}/{n}.base.npy", base)
            for i in range(3):
                x = rng.standard_normal((m, r), dtype=np.float32) / np.arange(1, r + 1, dtype=np.float32)
                tau = 0.01 * (x @ rng.standard_normal((r, k), dtype=np.float32)) / np.sqrt(r)
                np.save(f"{d}/{n}.{i}.npy", base + tau.astype(np.float32))
        res = {"torch": run("torch", a.torch_python, d, a.threads, names),
               "ferromerge": run("ours", sys.executable, d, a.threads, names)}
        worst = 0.0
        for n in names:
            base = np.load(f"{d}/{n}.base.npy").astype(np.float64)
            t = np.load(f"{d}/{n}.out.torch.npy") - base
            o = np.load(f"{d}/{n}.out.ours.npy") - base
            worst = max(worst, float(np.linalg.norm(o - t) / np.linalg.norm(t)))
        res["max_rel_diff_update"] = worst
    res.update(scale=a.scale, threads=a.threads, matrices=names, cpu=os.cpu_count())
    res["ratio_wall"] = res["torch"]["wall"] / res["ferromerge"]["wall"]
    res["ratio_cpu"] = ((res["torch"]["user"] + res["torch"]["sys"])
                        / (res["ferromerge"]["user"] + res["ferromerge"]["sys"]))
    print(json.dumps(res, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
