"""A signal stops a command inside one long SVD (issue 13): ``_core.svd`` runs the factorization on a worker thread
while the calling thread runs the signal handlers, and returns a handler's exception at once (the randomized
solver stops at its next step; faer's exact SVD, one call that cannot be stopped, is abandoned to the exiting
process), so SIGTERM and SIGINT end ``extract-lora`` within seconds, not when the SVD is done, with their exit
status and nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ferromerge import _engine
from ferromerge.synth import save_model

# One 8192 × 2048 module. Randomized, with 40 power iterations: ~160 products and QRs of an 8192 × 266 block, each
# well under a second on a loaded 2-core machine, together tens of seconds (several even on a fast machine).
# Exact (--exact): one faer SVD of the whole matrix in f64, about 15 s on a quiet 2-core machine (over a minute
# under load), which the old code waited for.
ROWS, COLS, RANK, POWER_ITERS = 8192, 2048, 256, 40
SOLVERS = {"randomized": ["--power-iters", str(POWER_ITERS)], "exact": ["--exact"]}
STOP_WITHIN_S = 3.0  # the issue asks for about a second; the slack is for a loaded CI machine
# into the SVD: the handler must run while the thread is inside Rust (for the exact SVD, inside faer's one call,
# past the f64 copy made before it, after which the old code checked for a stop)
SIGNAL_AFTER_S = {"randomized": 0.5, "exact": 2.0}

# extract-lora with `_engine.svd` wrapped to mark (in files) when the SVD starts and whether it returned
_MARKED = """
import os, sys
from pathlib import Path
from ferromerge import _engine
real = _engine.svd
def svd(*args, **kw):
    Path(os.environ["MARK"] + ".started").touch()
    out = real(*args, **kw)
    Path(os.environ["MARK"] + ".returned").touch()
    return out
_engine.svd = svd
from ferromerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("svd_interrupt")
    rng = np.random.default_rng(0)
    name = "model.layers.0.mlp.down_proj.weight"
    w = rng.standard_normal((ROWS, COLS), dtype=np.float32)
    base = save_model(root / "base", {name: w}, dtype="float32")
    ft = save_model(root / "ft", {name: w + rng.standard_normal((ROWS, COLS), dtype=np.float32)}, dtype="float32")
    return base, ft


@pytest.mark.parametrize("solver", SOLVERS)
@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_extract_lora_inside_the_svd(
    pair: tuple[Path, Path], tmp_path: Path, signo: int, solver: str
) -> None:
    base, ft = pair
    out, mark = tmp_path / "adapter", tmp_path / "mark"
    proc = subprocess.Popen(
        [sys.executable, "-c", _MARKED, "extract-lora", base, ft, out, "--rank", str(RANK), *SOLVERS[solver],
         "--threads", "2", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "MARK": str(mark)},
    )
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{mark}.started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the SVD never started"
            time.sleep(0.02)
        time.sleep(SIGNAL_AFTER_S[solver])
        sent = time.monotonic()
        proc.send_signal(signo)
        try:
            _, err = proc.communicate(timeout=STOP_WITHIN_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"{signal.Signals(signo).name} did not stop extract-lora within {STOP_WITHIN_S} s")
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 128 + signo, err
    # the SVD was stopped, not waited for
    assert not Path(f"{mark}.returned").exists(), f"the SVD finished before the signal (stop took {took:.2f} s)"
    assert "Traceback" not in err and "panic" not in err, err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir() if ".ferromerge-" in p.name) == []


@pytest.mark.parametrize("call", ["svd", "polar"])
def test_in_process_an_interrupted_exact_factorization_raises_and_the_next_call_is_unchanged(call: str) -> None:
    """The exception of a signal handler comes out of the exact SVD (the worker is abandoned, keeping its own
    reference to the matrix), and later calls, on the same thread pool, give the same bytes as before."""
    rng = np.random.default_rng(1)
    big = rng.standard_normal((1536, 1024), dtype=np.float32)  # an exact SVD of well over 50 ms anywhere
    small = rng.standard_normal((64, 32), dtype=np.float32)

    def factor(a: np.ndarray) -> tuple[np.ndarray, ...]:
        return tuple(_engine.svd(a, exact=True, threads=1)) if call == "svd" else (_engine.polar(a, threads=1),)

    def interrupt(*_: object) -> None:
        raise KeyboardInterrupt

    before = factor(small)
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        with pytest.raises(KeyboardInterrupt):
            factor(big)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    del big
    after = factor(small)
    assert all(np.array_equal(x, y) for x, y in zip(before, after, strict=True))
