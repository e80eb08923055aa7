"""Faults injected into the Ray workers of tests/executors/test_ray.py, from the test side only.

``install`` is a Ray ``worker_process_setup_hook``: it runs in every worker process of the test's Ray job and wraps
``ferromerge._engine.execute`` (which ``executors.ray.merge_task`` calls), so that while files in the directory
``$FM_RAY_FAULTS`` say so, a task
* logs its start (node id, then its shards) to ``starts``, one line per attempt, so that a test can see a retry happen;
* with ``slow`` holding S: sleeps S seconds first, on every node but the head (``$FM_RAY_HEAD`` is its node id), so
  that worker nodes have tasks in flight when the head's tasks are done;
* with ``die``: kills its own worker process (SIGKILL) after its first tensor, once per test (``died`` is created
  exclusively), in the middle of writing a shard.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path
from typing import Any


def install() -> None:
    from ferromerge import _engine

    original = _engine.execute

    def execute(plan_json: str, out_dir: str, progress: Any = None, *args: Any, **kwargs: Any) -> Any:
        where = os.environ.get("FM_RAY_FAULTS")
        faults = Path(where) if where else None
        if faults is None or not faults.is_dir():
            return original(plan_json, out_dir, progress, *args, **kwargs)
        import ray

        files = [s["file"] for s in json.loads(plan_json)["shards"]]
        node = ray.get_runtime_context().get_node_id()
        with open(faults / "starts", "a", encoding="utf-8") as f:
            f.write(f"{node} {' '.join(files)}\n")
        slow = faults / "slow"
        if slow.exists() and node != os.environ.get("FM_RAY_HEAD"):
            time.sleep(float(slow.read_text()))
        if (faults / "die").exists():

            def die(done: int, *_: int) -> None:
                try:
                    fd = os.open(faults / "died", os.O_CREAT | os.O_EXCL | os.O_WRONLY)
                except FileExistsError:
                    return
                os.close(fd)
                os.kill(os.getpid(), signal.SIGKILL)

            progress = die
        return original(plan_json, out_dir, progress, *args, **kwargs)

    _engine.execute = execute
