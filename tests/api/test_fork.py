"""Fork safety: a process forked after the engine's thread pools ran (multiprocessing's ``fork`` start method,
common in ML data loaders) inherits pools without threads. The binding's ``pthread_atfork`` child handler turns
parallelism off there, so a merge in the child finishes, with the same bytes."""

from __future__ import annotations

import multiprocessing as mp
import sys

import numpy as np
import pytest

from ferromerge import _engine

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the fork start method is Linux's default")


def _inputs() -> tuple[list[np.ndarray], np.ndarray]:
    rng = np.random.default_rng(7)
    base = rng.standard_normal(300_000, dtype=np.float32)
    return [base + 0.1 * rng.standard_normal(base.size, dtype=np.float32) for _ in range(3)], base


def _ties() -> bytes:
    xs, base = _inputs()
    out = _engine.merge_arrays(
        {"name": "ties", "normalize": True}, xs, base, _engine.input_values([1.0, 0.5, 0.25], [0.4, 0.5, 0.6]),
        out_dtype="bfloat16", threads=2, chunk_elems=4096,
    )
    return out.tobytes()


def _child(queue: mp.Queue) -> None:
    queue.put(_ties())


def test_a_merge_in_a_forked_child_finishes_with_the_same_bytes() -> None:
    parent = _ties()  # the parent's 2-thread pool exists before the fork
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue,))
    proc.start()
    try:
        child = queue.get(timeout=120)  # a pool without threads would hang here
    finally:
        proc.join(timeout=30)
        if proc.is_alive():
            proc.kill()
    assert proc.exitcode == 0
    assert child == parent
