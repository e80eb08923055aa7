"""The Python method registry (``ferromerge.methods``, what configs may say) against the engine's method table
(``_engine.methods()``, rust/core/src/merge/method.rs, what the kernels accept): one contract, checked, so the two
homes cannot drift apart. Each registry entry runs the kernel ``spec.kernel``; an entry whose kernel has another
name is a config-level alias (``passthrough``: ``linear`` over one input with weight = ``scale``).

The registry derives the engine's part of the contract from the table (``registry.derive``), so the row checks
below hold by construction; the last tests check that the derivation really happens and refuses a table it cannot
describe (a method or a parameter the registry knows nothing of).
"""

from __future__ import annotations

import copy

import pytest

from ferromerge import _engine
from ferromerge.methods import REGISTRY, MethodSpec, registry

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


def _table() -> list[dict]:
    return copy.deepcopy(_engine.methods())  # type: ignore[arg-type]


def test_registry_is_derived_from_the_engine_table() -> None:
    assert registry.derive(_engine.methods()) == REGISTRY
    table = _table()
    karcher = next(row for row in table if row["name"] == "karcher")
    karcher["params"]["tol"] = 0.5
    karcher["max_inputs"] = 3
    ties = next(row for row in table if row["name"] == "ties")
    ties["input_params"]["density"] = 0.25
    derived = registry.derive(table)
    assert derived["karcher"].shared["tol"].default == 0.5 and derived["karcher"].max_inputs == 3
    assert derived["ties"].per_model["density"].default == 0.25
    assert derived["karcher"].shared["tol"].doc == REGISTRY["karcher"].shared["tol"].doc


def test_an_engine_method_the_registry_does_not_know_is_refused() -> None:
    table = _table()
    table.append({**table[0], "name": "new_method"})
    with pytest.raises(RuntimeError, match="only in the engine: \\['new_method'\\]"):
        registry.derive(table)
    with pytest.raises(RuntimeError, match="only in the registry: \\['slerp'\\]"):
        registry.derive([row for row in _table() if row["name"] != "slerp"])


def test_an_engine_parameter_without_a_registry_type_is_refused() -> None:
    for scope, where in (("params", "method-wide"), ("input_params", "per-input")):
        table = _table()
        next(row for row in table if row["name"] == "sce")[scope]["new_param"] = 1.0
        with pytest.raises(RuntimeError, match=f"'sce' takes the {where} parameter 'new_param'"):
            registry.derive(table)


def test_an_engine_default_of_another_kind_is_refused() -> None:
    for param, default in (("select_topk", True), ("select_topk", 3)):
        table = _table()
        next(row for row in table if row["name"] == "sce")["params"][param] = default
        with pytest.raises(RuntimeError, match="does not fit the registry's type"):
            registry.derive(table)
