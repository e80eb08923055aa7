"""The one gateway to the Rust engine, ``ferromerge._core`` (``errors`` is the only other module importing it).

Every call into the extension goes through here: running a plan (``execute``), merging one tensor in memory
(``merge_arrays``, with the same ``method`` object the plan carries), the engine's codec (``encode``/``decode``),
its method table (``methods``), its memory figure (``memory_plan``), safetensors reading and writing, the linear
algebra, and PEFT's TIES election for adapter merges (``disjoint_mean``). The signatures and their documentation
are in ``_core.pyi``; this module adds the typed objects that cross the boundary and fills the per-input defaults
the in-memory API has always had (model ids 0..n-1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypedDict

import numpy as np
import numpy.typing as npt

from . import _core

__all__ = [
    "MIN_MEMORY_LIMIT",
    "InputValues",
    "MemoryPlan",
    "MethodObject",
    "MethodRow",
    "TensorNeeds",
    "decode",
    "default_memory_limit",
    "disjoint_mean",
    "encode",
    "execute",
    "input_values",
    "memory_plan",
    "merge_arrays",
    "methods",
    "polar",
    "read_header",
    "read_metadata",
    "save_file",
    "svd",
    "version",
]

#: The smallest memory budget a run accepts (64 MiB).
MIN_MEMORY_LIMIT: int = _core.MIN_MEMORY_LIMIT

#: A NumPy array the engine reads: float32, float16, or uint16/int16 holding bfloat16 bits.
EngineArray = npt.NDArray[Any]


class _MethodObjectBase(TypedDict):
    name: str


# ``lambda`` is a keyword, so the optional keys are declared in the functional syntax. ``params``: method-wide
# numbers (booleans as 1.0/0.0), only the names the method accepts.
_MethodObjectOptional = TypedDict(
    "_MethodObjectOptional",
    {"normalize": bool, "lambda": float, "rescale": str, "seed": int, "params": dict[str, float]},
    total=False,
)


class MethodObject(_MethodObjectBase, _MethodObjectOptional):
    """The plan's ``method`` object (docs/architecture.md): what the engine runs for one tensor."""


class _InputValuesBase(TypedDict):
    weight: float


class InputValues(_InputValuesBase, total=False):
    """One input's values, as a plan input carries them (without ``file``/``tensor``)."""

    density: float
    model_id: int
    gamma: float
    epsilon: float


class MethodRow(TypedDict):
    """One row of the engine's method table (``rust/core/src/merge/method.rs``)."""

    name: str
    #: the file under ``rust/core/src/merge/methods/`` that implements it
    family: str
    #: "required", "optional" or "joins"
    base: str
    min_inputs: int
    max_inputs: int | None
    #: method-wide parameters and their defaults (None: required; bool for flags, int for whole numbers)
    params: dict[str, float | int | bool | None]
    #: per-input parameters the kernel reads and their defaults
    input_params: dict[str, float | int | bool | None]
    #: mergekit's sparsification method (task arithmetic family), None if the method does not sparsify
    sparsify: str | None
    consensus: bool
    spectral: bool


class TensorNeeds(TypedDict):
    """What one output tensor asks of memory (an entry of ``memory_plan``'s ``tensors``)."""

    #: bytes of all its stored inputs, base included
    input_bytes: int
    #: its non-base inputs
    inputs: int
    method: MethodObject
    shape: Sequence[int]


class MemoryPlan(TypedDict):
    """How a run uses its memory budget (``rust/core/src/exec/budget.rs``)."""

    budget: int
    chunk_elems: int
    read_ahead: int
    scratch: int
    working: int
    #: the two output staging buffers
    staging: int
    #: index of the tensor with the most input bytes (the first of equals) and those bytes
    largest: int
    largest_input_bytes: int
    #: the bound on resident memory
    peak: int


def version() -> str:
    """The engine's version (the package's)."""
    return str(_core.__version__)


def execute(
    plan_json: str,
    out_dir: str,
    progress: Callable[[int, int, int, int], None] | None = None,
    threads: int | None = None,
    memory_limit: int | None = None,
    external_merge: Callable[..., npt.NDArray[np.float32] | None] | None = None,
    on_shard_done: Callable[[str, int, int], None] | None = None,
) -> dict[str, int]:
    """Run a plan (its JSON) into ``out_dir``; ``external_merge`` is consulted first for every tensor (the torch
    hand-off, ``torch_spectral``). Returns ``{"tensors", "bytes_read", "bytes_written"}``.

    ``on_shard_done(file_name, size, crc32)`` is called once per output shard after it is written whole and fsynced
    (``crc32`` as ``zlib.crc32`` of the file computes it): a resume journal's entry. An input truncated or changed
    during the run, or holding NaN/Inf without the plan's ``allow_nonfinite``, is an ``InputError`` raised before
    this returns, so the caller commits nothing."""
    return _core.execute_plan(
        plan_json, out_dir, progress, threads, memory_limit, external_merge, on_shard_done=on_shard_done
    )


def input_values(
    weights: Sequence[float],
    densities: Sequence[float] | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    model_ids: Sequence[int] | None = None,
) -> list[InputValues]:
    """Per-input value objects from parallel lists; a list left out keeps the engine's default for every input
    (density 1, gamma and epsilon from the method table, model ids 0..n-1)."""
    out: list[InputValues] = []
    for i, w in enumerate(weights):
        v: InputValues = {"weight": float(w), "model_id": i if model_ids is None else int(model_ids[i])}
        if densities is not None:
            v["density"] = float(densities[i])
        if gammas is not None:
            v["gamma"] = float(gammas[i])
        if epsilons is not None:
            v["epsilon"] = float(epsilons[i])
        out.append(v)
    return out


def merge_arrays(
    method: MethodObject | Mapping[str, Any],
    inputs: Sequence[EngineArray],
    base: EngineArray | None,
    values: Sequence[InputValues],
    *,
    out_dtype: str,
    cast_dtype: str | None = None,
    name: str = "",
    shape: Sequence[int] | None = None,
    threads: int | None = None,
    chunk_elems: int | None = None,
    allow_nonfinite: bool = False,
) -> EngineArray:
    """Merge one tensor in memory with the engine's kernels; a flat array of ``out_dtype``.

    ``method`` is the plan's method object, ``values`` one input-values object per input (``input_values``
    builds them; an input without ``model_id`` gets its index). The result does not depend on ``threads`` or
    ``chunk_elems``. ``allow_nonfinite``: NaN and infinite inputs are merged as they are, not refused."""
    values = [v if "model_id" in v else {**v, "model_id": i} for i, v in enumerate(values)]
    return _core.merge_arrays(
        dict(method), list(inputs), base, values, out_dtype=out_dtype, cast_dtype=cast_dtype, name=name,
        shape=None if shape is None else [int(d) for d in shape], threads=threads, chunk_elems=chunk_elems,
        allow_nonfinite=allow_nonfinite,
    )


def encode(values: npt.ArrayLike, dtype: str) -> EngineArray:
    """float32 ``values`` rounded to ``dtype`` (``float32``/``float16``/``bfloat16``, or the safetensors names) as
    the engine writes them (to nearest even), as storage of the same shape (bfloat16 as uint16 bits)."""
    return _core.encode(np.ascontiguousarray(values, dtype=np.float32), dtype)


def decode(array: EngineArray, dtype: str) -> npt.NDArray[np.float32]:
    """``dtype`` storage (bfloat16 as uint16/int16 bits) decoded to float32, same shape."""
    return _core.decode(np.ascontiguousarray(array), dtype)


def methods() -> list[MethodRow]:
    """The engine's method table, in its order."""
    return _core.methods()  # type: ignore[return-value]


def memory_plan(
    memory_limit: int, threads: int, tensors: Sequence[TensorNeeds], chunk_elems: int | None = None
) -> MemoryPlan:
    """The engine's memory plan of a run (read-ahead, scratch, working set, peak) for these tensors."""
    needs = [dict(t, method=dict(t["method"]), shape=[int(d) for d in t["shape"]]) for t in tensors]
    return _core.memory_plan(memory_limit, threads, needs, chunk_elems)  # type: ignore[return-value]


def default_memory_limit() -> int:
    """The memory budget of a run when none is given: half of physical memory or of the cgroup limit, at most 8 GiB."""
    return _core.default_memory_limit()


def read_header(path: str) -> dict[str, tuple[str, list[int]]]:
    """``{tensor: (safetensors dtype, shape)}`` in data-offset order; ``InputError`` naming a broken file."""
    return _core.read_header(path)


def read_metadata(path: str) -> dict[str, str]:
    """A safetensors file's ``__metadata__`` map (empty when absent)."""
    return _core.read_metadata(path)


def save_file(
    path: str, tensors: Mapping[str, tuple[EngineArray, str]], metadata: Mapping[str, str] | None = None
) -> None:
    """Write a safetensors file from ``{name: (array, dtype)}``, atomically."""
    _core.save_file(path, tensors, metadata)


svd = _core.svd
disjoint_mean = _core.disjoint_mean
polar = _core.polar
