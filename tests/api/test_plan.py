"""``ferromerge.plan``: the Python twin of ``ferromerge plan`` (prepare + estimate), writing nothing."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
from helpers.cli import ties_config

import ferromerge
from ferromerge.cli import main
from ferromerge.synth import Family


def test_plan_checks_and_estimates_without_writing(family_bf16: Family, tmp_path: Path) -> None:
    report = ferromerge.plan(ties_config(family_bf16), tmp_path / "merged", threads=1, seed=9, memory_limit="64MiB")
    assert report.plan.method == {"name": "ties", "seed": 9} and len(report.plan.tensors) == 21
    assert all(t.method["seed"] == 9 for t in report.plan.tensors)
    assert report.estimate.threads == 1 and report.estimate.memory_limit == 64 * 2**20
    assert report.estimate.bytes_out == report.plan.bytes_out and report.estimate.seconds > 0
    assert list(tmp_path.iterdir()) == []


def test_plan_is_what_the_cli_prints(family_bf16: Family, tmp_path: Path) -> None:
    config = tmp_path / "ties.yml"
    config.write_text(json.dumps(ties_config(family_bf16)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["plan", str(config), "--json", "--threads", "1"]) == 0
    printed = json.loads(out.getvalue())
    report = ferromerge.plan(config, threads=1)
    summary = report.summary()
    # the measured rates (and what they decide: which of the two bounds the run) and the free space differ between two
    # calls; everything else is the same
    for key in ("compute_rate", "read_rate", "bound_by", "read_cached", "seconds", "disk_free", "startup_seconds"):
        printed["summary"].pop(key), summary.pop(key)
    assert {**json.loads(report.plan.to_json()), "summary": summary} == printed


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"threads": 0}, "threads must be a positive integer, got 0"),
        ({"seed": -1}, r"seed must be an integer in \[0, 2\*\*64\), got -1"),
        ({"memory_limit": "1MiB"}, "too small: at least 64 MiB"),
    ],
)
def test_plan_rejects_what_run_rejects(family_bf16: Family, kwargs: dict, match: str) -> None:
    with pytest.raises(ferromerge.ParameterError, match=match):
        ferromerge.plan(ties_config(family_bf16), **kwargs)
