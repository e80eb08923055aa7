"""The habits in pyproject.toml ([tool.ruff], [tool.mypy]) hold for the package: ruff and mypy pass.

Skipped when a tool is not installed (both are in the ``test`` extra).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=600)


def test_ruff() -> None:
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    result = _run(ruff, "check", "--no-cache")
    assert result.returncode == 0, result.stdout + result.stderr


def test_mypy() -> None:
    pytest.importorskip("mypy")
    result = _run(sys.executable, "-m", "mypy")
    assert result.returncode == 0, result.stdout + result.stderr


#: std's transcendental methods, whose bits depend on the platform's C library and the CPU (rust/core/src/math.rs)
_STD_MATH = re.compile(r"\.(exp|exp2|exp_m1|ln|ln_1p|log|log2|log10|sin|cos|tan|sin_cos|asin|acos|atan|atan2|sinh|cosh"
                       r"|tanh|powf|powi|cbrt|hypot)\(")


def test_core_transcendentals_go_through_libm() -> None:
    """The core's kernels call rust/core/src/math.rs (the libm crate), never std's ``f64::exp`` and friends: the
    output must be the same bits on every CPU."""
    found = []
    for path in sorted((ROOT / "rust" / "core" / "src").rglob("*.rs")):
        if path.name == "math.rs":
            continue
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            code = line.split("//", 1)[0]
            if _STD_MATH.search(code):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert not found, "std transcendental calls in the core (use crate::math):\n" + "\n".join(found)
