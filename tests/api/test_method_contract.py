"""The Python method registry (``ferromerge.methods``, what configs may say) against the engine's method table
(``_engine.methods()``, rust/core/src/merge/method.rs, what the kernels accept): one contract, checked, so the two
homes cannot drift apart. Each registry entry runs the kernel ``spec.kernel``; an entry whose kernel has another
name is a config-level alias (``passthrough``: ``linear`` over one input with weight = ``scale``).
"""

from __future__ import annotations

import pytest

from ferromerge import _engine
from ferromerge.methods import REGISTRY, MethodSpec

ENGINE = {row["name"]: row for row in _engine.methods()}
#: registry entries that run another method's kernel, and why their contract differs from it
ALIASES = {"passthrough": "linear"}
#: kernel parameters the planner sets per tensor (never written in a config)
PLANNER_PARAMS = {"mean_only"}


def _number(value: object) -> float | None:
    return None if value is None else float(value)  # type: ignore[arg-type]


def test_every_engine_method_is_configurable_and_every_kernel_exists() -> None:
    assert set(ENGINE) == {name for name in REGISTRY if name not in ALIASES}
    for name, kernel in ALIASES.items():
        assert REGISTRY[name].kernel == kernel
    assert all(spec.kernel in ENGINE for spec in REGISTRY.values())


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if n not in ALIASES))
def test_registry_row_matches_the_engine(name: str) -> None:
    spec: MethodSpec = REGISTRY[name]
    row = ENGINE[spec.kernel]
    assert spec.kernel == name
    assert spec.base == row["base"]
    assert (spec.min_inputs, spec.max_inputs) == (row["min_inputs"], row["max_inputs"])
    assert spec.gpu_bound == row["spectral"]
    # method-wide parameters: what the registry sends the kernel is what the kernel accepts, with the same defaults
    assert set(spec.kernel_params) == set(row["params"]) - PLANNER_PARAMS
    assert {p: _number(spec.shared[p].default) for p in spec.kernel_params} == {
        p: _number(row["params"][p]) for p in spec.kernel_params
    }
    # per-model parameters are the kernel's per-input values, with the same defaults
    assert set(spec.per_model) == set(row["input_params"])
    assert {p: _number(s.default) for p, s in spec.per_model.items()} == {
        p: _number(d) for p, d in row["input_params"].items()
    }


def test_passthrough_is_linear_over_one_input() -> None:
    spec, linear = REGISTRY["passthrough"], ENGINE["linear"]
    assert spec.base == linear["base"] and (spec.min_inputs, spec.max_inputs) == (1, 1)
    assert linear["min_inputs"] <= 1 and spec.weight_param == "scale" and spec.kernel_fixed == {"normalize": False}
