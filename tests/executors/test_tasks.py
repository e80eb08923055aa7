"""The cut of a plan into tasks for a distributed run (``executors.tasks``) and the executor options' checks
(``executors.check_executor``), without Ray: tasks are consecutive whole shards, every shard in exactly one, of
about equal input bytes, each asking for the engine's own memory figure; ``--executor ray`` without Ray says how to
get it (exit 2, no traceback)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from ferromerge import _engine
from ferromerge._plan.estimate import tensor_needs
from ferromerge._run import prepare
from ferromerge.errors import ParameterError
from ferromerge.executors import INSTALL_RAY, check_executor
from ferromerge.executors.tasks import cut
from ferromerge.synth import Family, make_family
from helpers.cli import ties_config, write_config

SHARD = 20_000


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("tasks_family"), layers=4, seed=5)


@pytest.mark.parametrize("count", [None, 1, 2, 3, 5, 21, 22, 23, 1000])
def test_tasks_are_consecutive_whole_shards_of_about_equal_bytes(family: Family, count: int | None) -> None:
    _, plan = prepare(ties_config(family), out_shard_size=SHARD)
    shards = json.loads(plan.to_json())["shards"]
    assert len(shards) == 22
    tasks = cut(plan, shards, count, threads=2, memory_limit=256 << 20)
    assert len(tasks) == (22 if count is None else min(count, 22))
    assert [f for t in tasks for f in t.files] == [s["file"] for s in shards]  # each once, in plan order
    assert sum(t.tensors for t in tasks) == len(plan.tensors)
    assert sum(t.input_bytes for t in tasks) == plan.bytes_in
    # about equal: no task holds more than its share plus one shard
    biggest_shard = max(sum(t.bytes_in for t in s.tensors) for s in plan.shards)
    assert max(t.input_bytes for t in tasks) <= plan.bytes_in / len(tasks) + biggest_shard
    for t in tasks:
        mine = [pt for s in plan.shards if s.file in t.files for pt in s.tensors]
        assert t.memory == _engine.memory_plan(256 << 20, 2, tensor_needs(mine))["peak"]
        assert t.plan({"metadata": {"format": "pt"}, "shards": shards})["shards"] == list(t.shards)


def test_a_resumed_plan_is_cut_from_the_shards_it_has_left(family: Family) -> None:
    _, plan = prepare(ties_config(family), out_shard_size=SHARD)
    shards = json.loads(plan.to_json())["shards"][5:]
    tasks = cut(plan, shards, 4, threads=1, memory_limit=256 << 20)
    assert [f for t in tasks for f in t.files] == [s["file"] for s in shards]
    assert cut(plan, [], 4, threads=1, memory_limit=256 << 20) == []


def test_executor_options_are_checked_before_any_work() -> None:
    assert check_executor("local", None, None) == "local"
    with pytest.raises(ParameterError, match="executor must be one of local, ray"):
        check_executor("dask", None, None)
    with pytest.raises(ParameterError, match=r"ray_address and ray_tasks need executor='ray'"):
        check_executor("local", "auto", 2)
    with pytest.raises(ParameterError, match="ray_tasks must be a positive integer"):
        check_executor("ray", None, 0)


def test_the_ray_executor_without_ray_says_how_to_get_it(family: Family, tmp_path: Path) -> None:
    config = write_config(tmp_path / "ties.yml", ties_config(family))
    # Ray hidden from this process, installed or not
    script = ("import sys; sys.modules['ray'] = None; from ferromerge.cli import main; "
              f"sys.exit(main(['run', {str(config)!r}, {str(tmp_path / 'out')!r}, '--executor', 'ray']))")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip() == f"ferromerge: error: the Ray executor needs Ray, which is not installed: {INSTALL_RAY}"
    assert not (tmp_path / "out").exists()


def test_ray_options_without_the_ray_executor_are_refused_by_the_cli(family: Family, tmp_path: Path) -> None:
    config = write_config(tmp_path / "ties.yml", ties_config(family))
    done = subprocess.run([sys.executable, "-m", "ferromerge.cli", "run", str(config), str(tmp_path / "out"),
                           "--ray-tasks", "3"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert "ray_tasks need executor='ray' (--executor ray)" in done.stderr and "Traceback" not in done.stderr
