"""Shared fixtures: tiny synthetic model families (shared builders are in tests/helpers/)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path

import pytest

# The shared test code is imported as top-level packages, ``helpers`` (builders) and ``reference`` (the NumPy
# references): put tests/ on the path whatever pytest's import mode (its default "prepend" mode would add it for this
# rootdir conftest alone, "importlib" would not). Test modules never import each other; their basenames are unique
# across folders because the folders have no __init__.py.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from ferromerge.synth import Family, make_family

# A shell that starts a job in the background (`./.ci/run &`, nohup, some CI runners) starts it with SIGINT ignored,
# and an ignored signal stays ignored through exec: every CLI process the tests spawn would then ignore the Ctrl-C the
# signal tests send (ferromerge rightly keeps an inherited SIG_IGN, as Unix tools do). Python installs its
# KeyboardInterrupt handler only when SIGINT is not ignored at start-up, so install it here: exec resets a handled
# signal to its default in the children, and they meet SIGINT as they would from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 3 fine-tunes, bfloat16, hidden 64, 2 layers, vocab 256 (read-only: copy before damaging)."""
    return make_family(tmp_path_factory.mktemp("family_bf16"), dtype="bfloat16", seed=1)


@pytest.fixture(scope="session")
def family_f32(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 3 fine-tunes, float32 (read-only)."""
    return make_family(tmp_path_factory.mktemp("family_f32"), dtype="float32", seed=2)
