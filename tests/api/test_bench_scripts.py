"""The benchmark scripts' fixed inputs (no timing): benches/methods.py runs every mergekit method with a config
ferromerge accepts, and benches/shapes70b.py's family has Llama-3-70B's tensor shapes."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from ferromerge.config.resolve import load_config
from ferromerge import methods as registry

BENCHES = Path(__file__).resolve().parents[2] / "benches"


def _load(name: str) -> ModuleType:
    sys.path.insert(0, str(BENCHES))
    try:
        spec = importlib.util.spec_from_file_location(f"_bench_{name}", BENCHES / f"{name}.py")
        assert spec and spec.loader
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod
    finally:
        sys.path.remove(str(BENCHES))


def test_methods_bench_covers_mergekits_registry_with_valid_configs(tmp_path: Path) -> None:
    bench = _load("methods")
    ours = {"tsv_m", "iso_c", "iso_cts", "star", "consensus", "tall_masks"}
    assert set(bench.METHODS) == set(registry.REGISTRY) - ours
    cfgs = bench.configs(tmp_path)
    assert set(cfgs) == set(bench.METHODS)
    for name, cfg in cfgs.items():
        assert load_config(cfg).method.name == name


def test_70b_shapes_are_llama3_70b_layers() -> None:
    bench = _load("shapes70b")
    s = dict(bench.shapes(2))
    per_layer = sum(int(np.prod(v)) for k, v in s.items() if k.startswith("model.layers.0."))
    assert per_layer == 855_654_400  # Llama-3-70B: 68.45B parameters in 80 layers
    assert s["model.embed_tokens.weight"] == s["lm_head.weight"] == (128256, 8192)
    assert s["model.layers.1.self_attn.k_proj.weight"] == (1024, 8192)
    assert bench.config(2)["num_hidden_layers"] == 2


@pytest.mark.parametrize("x", [0.02, -0.02, 1.0, 3.0e-5])
def test_70b_generator_rounds_to_nearest_bf16(x: float) -> None:
    bench = _load("shapes70b")
    bits = bench.bf16_bits(np.array([x], np.float32))
    back = (bits.astype(np.uint32) << 16).view(np.float32)[0]
    assert abs(back - x) <= abs(x) * 2.0**-8
