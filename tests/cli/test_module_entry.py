"""``python -m ferromerge`` is the ``ferromerge`` command, as ``python -m ferromerge.cli`` is."""

from __future__ import annotations

import subprocess
import sys


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=120)


def test_python_m_ferromerge_is_the_command() -> None:
    package, cli = _run("-m", "ferromerge", "--help"), _run("-m", "ferromerge.cli", "--help")
    assert package.returncode == 0, package.stderr
    assert "merge" in package.stdout and package.stdout == cli.stdout


def test_python_m_ferromerge_reports_a_bad_command_without_a_traceback() -> None:
    out = _run("-m", "ferromerge", "no-such-command")
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "no-such-command" in out.stderr
