"""A plan cut into tasks for a distributed run: groups of whole output shards of about equal input bytes, each
with the resources it asks of the scheduler (CPUs, and the resident memory the engine plans for its tensors).

Whole shards, never a part of one: the engine lays a shard out from its own tensors (header, offsets), computes its
crc32 while writing it and reports it once fsynced, so a shard is the unit a task writes, reports and the resume
journal records; it is also the unit a retry redoes. The parallelism of a run is therefore at most its shard count
(``out_shard_size``: mergekit's 5B gives 162 shards for a 405B model in bf16, one for a 1B model).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .. import _engine
from .._plan.build import Plan
from .._plan.estimate import tensor_needs


@dataclass(frozen=True)
class Task:
    """One task: a plan restricted to some of its shards, and what it asks of the node that runs it."""

    #: the plan JSON's shard objects this task writes, in plan order
    shards: tuple[Mapping[str, Any], ...]
    tensors: int
    input_bytes: int
    #: the bound on the engine's resident memory for these tensors with the task's threads and budget
    #: (``_engine.memory_plan``'s peak: rust/core/src/exec/budget.rs), what the task asks Ray for
    memory: int

    @property
    def files(self) -> list[str]:
        return [str(s["file"]) for s in self.shards]

    def plan(self, plan_json: Mapping[str, Any]) -> dict[str, Any]:
        """The plan JSON (metadata, chunk size, ``allow_nonfinite``) with only this task's shards."""
        return {**plan_json, "shards": list(self.shards)}


def cut(
    plan: Plan, shards: Sequence[Mapping[str, Any]], count: int | None, *, threads: int, memory_limit: int
) -> list[Task]:
    """``shards`` (plan JSON shard objects of ``plan``: all of them, or those a resume left) in at most ``count``
    tasks (None: one per shard) of consecutive shards with about equal input bytes; each task's memory is the
    engine's plan for its tensors with ``threads`` workers under ``memory_limit``."""
    if not shards:
        return []
    by_file = {s.file: s for s in plan.shards}
    planned = [by_file[str(s["file"])] for s in shards]
    # +1: a shard of empty tensors still weighs something, so that groups stay non-empty
    weights = [sum(t.bytes_in for t in s.tensors) + 1 for s in planned]
    n = len(shards) if count is None else max(1, min(count, len(shards)))
    target = sum(weights) / n
    groups: list[list[int]] = [[]]
    acc = 0
    for i, w in enumerate(weights):
        groups[-1].append(i)
        acc += w
        # close the group once it reaches its share of the bytes (or when the shards left are just enough for the
        # groups still to come), leaving a shard for each of those
        left, to_come = len(shards) - 1 - i, n - len(groups)
        if to_come > 0 and left >= to_come and (acc >= target * len(groups) or left == to_come):
            groups.append([])
    if not groups[-1]:
        groups.pop()
    tasks = []
    for g in groups:
        tensors = [t for i in g for t in planned[i].tensors]
        memory = _engine.memory_plan(memory_limit, threads, tensor_needs(tensors))["peak"]
        tasks.append(Task(tuple(shards[i] for i in g), len(tensors), sum(weights[i] - 1 for i in g), memory))
    return tasks
