"""Differential tests against the real mergekit, which runs in its own virtualenv (never imported here).

The mergekit interpreter is ``$FERROMERGE_MERGEKIT_PYTHON`` or ``~/.cache/ferromerge/mergekit-venv/bin/python``
(create it with ``scripts/setup-mergekit-venv.sh``). Without one, every test in this directory is skipped.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

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
        if Path(str(item.fspath)).is_relative_to(here):
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
