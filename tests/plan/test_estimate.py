"""``ferromerge.estimate``: the calibration runs the plan's own kernel, and the memory bound follows the budget."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from ferromerge import _engine
from ferromerge._plan import estimate
from ferromerge._run import prepare
from ferromerge.synth import Family

from helpers.cli import ties_config


def test_compute_calibration_runs_the_largest_tensors_method_with_its_parameters_and_dtypes(
    family_bf16: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = ties_config(family_bf16, dtype="float32", parameters={"lambda": 0.8})
    _, plan = prepare(cfg, seed=5)
    largest = max(plan.tensors, key=lambda t: t.bytes_in)
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]] = []
    real = _engine.merge_arrays

    def merge_arrays(*args: Any, **kwargs: Any) -> Any:
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(_engine, "merge_arrays", merge_arrays)
    rate = estimate.compute_rate(plan, largest, threads=1)
    assert rate > 0 and len(calls) == 2  # a warm-up, then the timed call
    (method, inputs, base, values), kw = calls[1]
    weights, densities = [v["weight"] for v in values], [v["density"] for v in values]
    assert method["name"] == "ties" and weights == [1.0, 0.5, 0.5] and densities == [0.5, 0.5, 0.5]
    assert [(a.dtype, a.size) for a in [*inputs, base]] == [(np.uint16, estimate.CALIBRATION_ELEMS)] * 4
    assert kw["cast_dtype"] == "float32" and kw["out_dtype"] == largest.out_dtype and kw["threads"] == 1
    assert (method["normalize"], method["lambda"], method["seed"], kw["name"]) == (True, 0.8, 5, largest.name)


def test_peak_memory_is_capped_by_the_budget_and_shrinks_chunks_for_many_threads(family_bf16: Family) -> None:
    _, plan = prepare(ties_config(family_bf16))
    largest = max(t.bytes_in for t in plan.tensors)
    budget = 64 * 2**20
    peak, tensor, read_ahead, scratch, working, staging = estimate.peak_memory(plan, budget, threads=2)
    # per worker: 4 models + 5 f32 buffers of a 64 Ki-element chunk, and its read buffer (8 bytes an element)
    assert (tensor.bytes_in, read_ahead, scratch, working) == (largest, budget // 4, 2 * (9 * 4 + 8) * 65536, 0)
    # two output staging buffers, each at most a sixteenth of the budget (here the 8 MiB stretch does not fit it)
    assert staging == 2 * (budget // 16)
    # the inputs are streamed, not held: they are not part of the bound
    assert peak == scratch + staging < budget
    # 1000 workers: the engine shrinks chunks to 1024 elements; 4000: the bound stops at the budget
    peak, _, _, scratch, _, staging = estimate.peak_memory(plan, budget, threads=1000)
    assert scratch == 1000 * (9 * 4 + 8) * 1024 and peak == min(budget, scratch + staging)
    peak, *_ = estimate.peak_memory(plan, budget, threads=4000)
    assert peak == budget


def test_spectral_factorizations_are_counted_by_flops_at_a_calibrated_rate(family_bf16: Family) -> None:
    flops = estimate.factor_flops
    # transposing changes nothing; what is only averaged (1-D, too small for one direction per task) costs nothing
    assert flops("tsv_m", (14336, 4096), 3) == flops("tsv_m", (4096, 14336), 3) > 0
    assert flops("tsv_m", (4096,), 3) == flops("tsv_m", (2, 384), 3) == 0
    # O(M·N²): twice the long side, about twice the flops; the other methods take more SVDs with more tasks
    assert 1.5 < flops("tsv_m", (8192, 512), 3) / flops("tsv_m", (4096, 512), 3) < 2
    assert flops("iso_cts", (512, 256), 4) > flops("iso_cts", (512, 256), 2) > flops("iso_c", (512, 256), 2)
    cfg = {"merge_method": "tsv_m", "base_model": str(family_bf16.base),
           "models": [{"model": str(ft)} for ft in family_bf16.finetunes]}
    _, plan = prepare(cfg)
    seconds = estimate.spectral_seconds(plan, threads=1)
    assert seconds > 0
    excluded = prepare({**cfg, "parameters": {"exclude": "."}})[1]
    assert estimate.spectral_seconds(excluded, threads=1) == 0
