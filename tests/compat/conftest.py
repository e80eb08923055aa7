"""Differential tests against the real mergekit, which runs in its own virtualenv (never imported here).

The mergekit interpreter is ``$FERROMERGE_MERGEKIT_PYTHON`` or ``~/.cache/ferromerge/mergekit-venv/bin/python``
(create it with ``scripts/setup-mergekit-venv.sh``). Without one, every test in this directory is skipped.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from helpers.mergekit import LLAMA_CONFIG, MODELS, llama_shapes
from safetensors.numpy import save_file

DEFAULT_VENV = Path.home() / ".cache" / "ferromerge" / "mergekit-venv"


def mergekit_python() -> Path | None:
    env = os.environ.get("FERROMERGE_MERGEKIT_PYTHON")
    candidates = [Path(env)] if env else [DEFAULT_VENV / "bin" / "python"]
    for p in candidates:
        if p.is_file() and os.access(p, os.X_OK):
            try:
                subprocess.run([str(p), "-c", "import mergekit.scripts.run_yaml"], check=True, capture_output=True,
                               timeout=300)
            except (subprocess.SubprocessError, OSError):
                return None
            return p
    return None


_MK = mergekit_python()


def pytest_collection_modifyitems(config, items):
    here = Path(__file__).parent
    for item in items:
        path = Path(str(item.fspath))
        # test_peft.py runs PEFT in its own interpreter and skips by itself; the rest needs mergekit
        if path.is_relative_to(here) and path.name.startswith("test_mergekit_"):
            item.add_marker(pytest.mark.mergekit)
            if _MK is None:
                item.add_marker(pytest.mark.skip(
                    reason="mergekit virtualenv not found (set FERROMERGE_MERGEKIT_PYTHON or run "
                           "scripts/setup-mergekit-venv.sh)"))


@pytest.fixture(scope="session")
def mergekit_python_path() -> Path:
    if _MK is None:
        pytest.skip("mergekit virtualenv not found")
    return _MK


@pytest.fixture(scope="session")
def family(tmp_path_factory) -> Path:
    """The tiny Llama family of the differential tests (base + a, b, c; float32), written with ``safetensors``."""
    root = tmp_path_factory.mktemp("mk-family")
    rng = np.random.default_rng(20261122)
    shapes = llama_shapes()
    base = {k: rng.normal(0.0, 0.02, s).astype(np.float32) for k, s in shapes.items()}
    tensors = {"base": base}
    for i, m in enumerate(MODELS):
        scale = (0.004, 0.006, 0.003)[i]
        tensors[m] = {k: (v + rng.normal(0.0, scale, v.shape)).astype(np.float32) for k, v in base.items()}
    for m, t in tensors.items():
        (root / m).mkdir()
        save_file(t, str(root / m / "model.safetensors"), metadata={"format": "pt"})
        (root / m / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    return root
