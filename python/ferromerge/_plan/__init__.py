"""MergeConfig + model indexes -> the plan the engine executes: the tensor layout (``layout``, ``modules``), the
per-tensor parameters, vocabulary substitution and shards (``build``), and what a run will cost (``estimate``).

Private (``_plan``) because ``ferromerge.plan`` is the public function that prepares and estimates a merge."""

from .build import Plan, build_plan

__all__ = ["Plan", "build_plan"]
