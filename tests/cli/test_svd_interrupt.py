"""A signal stops a command inside one long SVD (issue 13): ``_core.svd`` runs the factorization on a worker thread
and the signal handlers between its steps, so SIGTERM and SIGINT end ``extract-lora`` within seconds, not when the
SVD is done, with their exit status and nothing left behind."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ferromerge.synth import save_model

# One 8192 × 2048 module with 40 power iterations: ~160 products and QRs of an 8192 × 266 block, each well under
# a second on a loaded 2-core machine, together tens of seconds (several even on a fast machine).
ROWS, COLS, RANK, POWER_ITERS = 8192, 2048, 256, 40
STOP_WITHIN_S = 3.0  # the issue asks for about a second; the slack is for a loaded CI machine
SIGNAL_AFTER_S = 0.5  # into the SVD: the handler must run while the thread is inside Rust

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


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_extract_lora_inside_the_svd(pair: tuple[Path, Path], tmp_path: Path, signo: int) -> None:
    base, ft = pair
    out, mark = tmp_path / "adapter", tmp_path / "mark"
    proc = subprocess.Popen(
        [sys.executable, "-c", _MARKED, "extract-lora", base, ft, out, "--rank", str(RANK), "--power-iters",
         str(POWER_ITERS), "--threads", "2", "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "MARK": str(mark)},
    )
    try:
        deadline = time.monotonic() + 120
        while not Path(f"{mark}.started").exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the SVD never started"
            time.sleep(0.02)
        time.sleep(SIGNAL_AFTER_S)
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
