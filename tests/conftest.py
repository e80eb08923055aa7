"""Shared fixtures: tiny synthetic model families (helpers are in cli_helpers.py)."""

from __future__ import annotations

import pytest

from ferromerge.synth import Family, make_family


@pytest.fixture(scope="session")
def family_bf16(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 3 fine-tunes, bfloat16, hidden 64, 2 layers, vocab 256 (read-only: copy before damaging)."""
    return make_family(tmp_path_factory.mktemp("family_bf16"), dtype="bfloat16", seed=1)


@pytest.fixture(scope="session")
def family_f32(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 3 fine-tunes, float32 (read-only)."""
    return make_family(tmp_path_factory.mktemp("family_f32"), dtype="float32", seed=2)
