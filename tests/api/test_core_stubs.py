"""The extension's stub file ``python/ferromerge/_core.pyi`` matches the built ``ferromerge._core``: every name,
signature (parameter names, kinds and defaults from the functions' text signatures) and constant, checked by mypy's
stubtest (pydantic-core runs the same check)."""

from __future__ import annotations

import subprocess
import sys

import pytest

pytest.importorskip("mypy.stubtest", reason="mypy is in the [test] extra")
pytest.importorskip("ferromerge._core")


def test_core_stub_matches_the_extension(tmp_path) -> None:
    # Run from an empty directory (stubtest writes its cache there) so the installed package is what is checked.
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "ferromerge._core"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
