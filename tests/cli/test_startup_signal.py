"""Ctrl-C during a command's start-up (issue 13): while Python imports the package and the commands (NumPy, the
engine, the methods, the planner: most of a second), SIGINT prints one line and exits 130, with no traceback and
nothing written, from the ``ferromerge`` and ``ferromerge-yaml`` console scripts and ``python -m ferromerge.cli``.

When the signal lands is made certain, not guessed with a delay: the command runs under ``python -X importtime``,
which writes a line to stderr as each import finishes, and the test sends SIGINT as soon as it reads the line of a
chosen module, so the signal arrives after that import and before start-up ends (the modules chosen are followed by
tens of milliseconds of further imports, then the run itself, which Ctrl-C also stops with exit 130). A delay could
land in Python's own start-up (``site``), before any ferromerge code runs, where no program can catch it.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

import pytest

from ferromerge.synth import make_family
from helpers.cli import ties_config, write_config

#: what pip's console scripts run (``[project.scripts]`` in pyproject.toml)
_CONSOLE_SCRIPT = "import sys\nfrom {module} import main\nsys.exit(main())\n"

ENTRIES = {
    "ferromerge": ["-c", _CONSOLE_SCRIPT.format(module="ferromerge.cli"), "run"],
    "ferromerge-yaml": ["-c", _CONSOLE_SCRIPT.format(module="ferromerge.cli.mergekit_yaml")],
    "python -m ferromerge.cli": ["-m", "ferromerge.cli", "run"],
}


@pytest.fixture(scope="module")
def config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    family = make_family(tmp_path_factory.mktemp("startup_family"), layers=2, seed=5)
    return write_config(tmp_path_factory.mktemp("startup_config") / "merge.yml", ties_config(family))


def _imported(line: str) -> str:
    """The module an ``-X importtime`` line reports ("import time: self | cumulative | <indent>module"), else ''."""
    return line.rpartition("|")[2].strip() if line.startswith("import time:") else ""


@pytest.mark.parametrize(("entry", "after"), [
    ("ferromerge", "numpy._core.multiarray"),  # early: NumPy, for the engine
    ("ferromerge", "ferromerge.methods.spec"),  # the method table
    ("ferromerge", "ferromerge.cli.mergekit_options"),  # late: the commands' options
    ("ferromerge-yaml", "ferromerge._plan.build"),  # mergekit-yaml's options, before ``ferromerge run``'s
    ("python -m ferromerge.cli", "numpy._core.multiarray"),
])
def test_ctrl_c_during_start_up_prints_one_line_and_exits_130(
    config: Path, tmp_path: Path, entry: str, after: str
) -> None:
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, "-X", "importtime", *ENTRIES[entry], str(config), str(out), "--quiet"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        seen = []
        for line in proc.stderr:
            seen.append(line)
            if _imported(line) == after:
                proc.send_signal(signal.SIGINT)
                break
        else:
            pytest.fail(f"{after} was never imported:\n{''.join(seen)}")
        printed, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    said = [line for line in err.splitlines() if not _imported(line)]
    assert "Traceback" not in err, err
    assert said == ["ferromerge: interrupted; no output was written"], err
    assert proc.returncode == 130, err
    assert printed == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no output, no partial output, no lock
