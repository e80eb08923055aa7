"""Who runs a plan's shards: the engine in this process (``local``, ``_engine.execute``), or Ray tasks on the nodes
of a cluster (``ray``, ``executors.ray``), each running the same engine on a part of the plan.

A part is a group of whole output shards (``executors.tasks``): the engine writes a shard's bytes from the shard's
tensors alone, so a shard written by any task on any node is the shard a local run writes, and the output is
byte-identical whatever the number of nodes, tasks, retries or the order they finish in. Everything else of a run
(config, plan, journal, side files, the atomic commit) is ``_run``'s, the same for both.
"""

from __future__ import annotations

from typing import Any

from .._validate import check_positive_int
from ..errors import ParameterError

#: the executors ``run(executor=...)`` and ``ferromerge run --executor`` take
EXECUTORS = ("local", "ray")

#: how to get Ray, in every message that needs it
INSTALL_RAY = "pip install 'ferromerge[ray]' (or pip install 'ray>=2.9')"


def ray_missing() -> str | None:
    """Why Ray cannot be used here (not installed, too old), or None when it can."""
    try:
        import ray
    except ImportError:
        return f"the Ray executor needs Ray, which is not installed: {INSTALL_RAY}"
    major, minor = (int(p) for p in ray.__version__.split(".")[:2])
    if (major, minor) < (2, 9):
        return f"the Ray executor needs Ray 2.9 or later, found {ray.__version__}: {INSTALL_RAY}"
    return None


def check_executor(executor: Any, ray_address: Any, ray_tasks: Any) -> str:
    """The executor's name, checked with its options (``ParameterError`` otherwise, before any work): Ray's
    options only with ``ray``, and Ray installed for it."""
    if executor not in EXECUTORS:
        raise ParameterError(f"executor must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if executor != "ray":
        given = [n for n, v in (("ray_address", ray_address), ("ray_tasks", ray_tasks)) if v is not None]
        if given:
            raise ParameterError(f"{' and '.join(given)} need executor='ray' (--executor ray)")
        return str(executor)
    if ray_address is not None and (not isinstance(ray_address, str) or not ray_address.strip()):
        raise ParameterError(f"ray_address must be a Ray cluster address such as 'auto' or 'HOST:6379', got "
                             f"{ray_address!r}")
    if ray_tasks is not None:
        check_positive_int(ray_tasks, "ray_tasks")
    why = ray_missing()
    if why is not None:
        raise ParameterError(why)
    return "ray"
