"""Micro-benchmarks of every kernel, in memory: input GB/s per method, dtype and thread count.

    python -m pytest benches/test_kernel_throughput.py --benchmark-enable [--benchmark-json out.json]

Inputs are a base and 3 fine-tunes of 8M elements with fine-tune-sized deltas (N(0, 0.02) weights, N(0, 5e-4)
deltas), the regime real merges run in; each case reports ``GB/s`` (input bytes over the mean time) in its
extra info. Not part of the test suite (``testpaths`` is ``tests``) and never timed against a threshold.
"""

from __future__ import annotations

import numpy as np
import pytest

from ferromerge import _engine

N = 8_000_000
METHODS = {
    "linear": dict(normalize=True),
    "task_arithmetic": dict(normalize=False),
    "ties": dict(normalize=True),
    "dare_ties": dict(normalize=False, rescale="l1"),
    "dare_linear": dict(normalize=False, rescale="inverse_density"),
}


def _bf16(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


@pytest.fixture(scope="module", params=["bfloat16", "float16", "float32"])
def family(request: pytest.FixtureRequest) -> tuple[str, np.ndarray, list[np.ndarray]]:
    rng = np.random.default_rng(0)
    base = rng.standard_normal(N, dtype=np.float32) * 0.02
    fts = [base + rng.standard_normal(N, dtype=np.float32) * 5e-4 for _ in range(3)]
    enc = {"bfloat16": _bf16, "float16": lambda x: x.astype(np.float16), "float32": lambda x: x}[request.param]
    return request.param, enc(base), [enc(x) for x in fts]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("method", list(METHODS))
def test_kernel(benchmark, family, method: str, threads: int) -> None:  # type: ignore[no-untyped-def]
    dtype, base, fts = family
    inputs, b = (fts + [base], None) if method == "linear" else (fts, base)
    n_in = len(inputs)

    def run() -> np.ndarray:
        return _engine.merge_arrays({"name": method, **METHODS[method]}, inputs, b,
                                    _engine.input_values([0.5] * n_in, [0.5] * n_in), out_dtype=dtype, threads=threads,
                                    name="bench")

    out = benchmark(run)
    assert out.size == N
    if benchmark.stats is not None:  # None under --benchmark-disable
        in_bytes = sum(x.nbytes for x in fts) + base.nbytes
        benchmark.extra_info["GB/s"] = round(in_bytes / benchmark.stats.stats.mean / 1e9, 2)
