"""Shared fixtures: tiny synthetic model families (shared builders are in tests/helpers/)."""

from __future__ import annotations

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


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 3 fine-tunes, bfloat16, hidden 64, 2 layers, vocab 256 (read-only: copy before damaging)."""
    return make_family(tmp_path_factory.mktemp("family_bf16"), dtype="bfloat16", seed=1)


@pytest.fixture(scope="session")
def family_f32(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 3 fine-tunes, float32 (read-only)."""
    return make_family(tmp_path_factory.mktemp("family_f32"), dtype="float32", seed=2)
