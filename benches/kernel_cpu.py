"""CPU time of the TIES family's in-memory kernels, for comparing two builds on a shared (loaded) machine.

    python benches/kernel_cpu.py [DTYPE] [THREADS] [METHODS]      e.g. bfloat16 1 ties,dare_ties,breadcrumbs_ties

Same inputs as ``benches/test_kernel_throughput.py`` (base + 3 fine-tunes of 8M elements, N(0, 0.02) weights,
N(0, 5e-4) deltas). Prints, per method, the best of 5 wall times and of 5 process-CPU times around
``_engine.merge_arrays`` and a hash of the output: run it with ``PYTHONPATH`` pointing at each build in turn, in
one shell invocation; CPU time is what machine load distorts least. Never part of the test suite.
"""

from __future__ import annotations

import hashlib
import resource
import sys
import time

import numpy as np

from ferromerge import _engine

N = 8_000_000
METHODS = {
    "ties": dict(normalize=True),
    "dare_ties": dict(normalize=False, rescale="l1"),
    "breadcrumbs_ties": dict(normalize=True),
    "della": dict(normalize=True),
}


def _bf16(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def main() -> None:
    dtype = sys.argv[1] if len(sys.argv) > 1 else "bfloat16"
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 1
    methods = sys.argv[3].split(",") if len(sys.argv) > 3 else ["ties", "dare_ties"]
    rng = np.random.default_rng(0)
    base = rng.standard_normal(N, dtype=np.float32) * 0.02
    fts = [base + rng.standard_normal(N, dtype=np.float32) * 5e-4 for _ in range(3)]
    enc = {"bfloat16": _bf16, "float16": lambda x: x.astype(np.float16), "float32": lambda x: x}[dtype]
    base, fts = enc(base), [enc(x) for x in fts]
    in_bytes = sum(x.nbytes for x in fts) + base.nbytes
    for m in methods:
        def run(m: str = m) -> np.ndarray:
            return _engine.merge_arrays({"name": m, **METHODS[m]}, fts, base, _engine.input_values([0.5] * 3, [0.5] * 3),
                                        out_dtype=dtype, threads=threads, name="bench")
        out = run()
        walls, cpus = [], []
        for _ in range(5):
            c, t = _cpu(), time.perf_counter()
            run()
            walls.append(time.perf_counter() - t)
            cpus.append(_cpu() - c)
        print(f"{m} {dtype} threads={threads}: wall {min(walls) * 1e3:.1f} ms ({in_bytes / min(walls) / 1e9:.2f} GB/s), "
              f"cpu {min(cpus) * 1e3:.0f} ms, sha256 {hashlib.sha256(out.tobytes()).hexdigest()[:12]}", flush=True)


if __name__ == "__main__":
    main()
