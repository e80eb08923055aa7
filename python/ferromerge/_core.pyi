"""Typed stubs for the Rust extension ``ferromerge._core`` (built from ``rust/py``).

Dtype names are mergekit's: ``"float32"``, ``"float16"``, ``"bfloat16"``. bfloat16 data crosses as ``uint16``
(or ``int16``) arrays of bit patterns, because NumPy has no bfloat16.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

__all__ = [
    "InputError",
    "MergeError",
    "OutputError",
    "ParameterError",
    "execute_plan",
    "memory_plan",
    "merge_arrays",
    "methods",
    "read_header",
    "read_metadata",
    "save_file",
    "decode",
    "disjoint_mean",
    "encode",
    "polar",
    "svd",
    "default_memory_limit",
    "MIN_MEMORY_LIMIT",
    "__version__",
]

__version__: str
#: The smallest memory budget a run accepts (64 MiB).
MIN_MEMORY_LIMIT: int

class MergeError(Exception):
    """Base class of every error raised by the engine."""

class InputError(MergeError):
    """A model file or tensor is missing, corrupt or incompatible; the message names the file and the tensor."""

class ParameterError(MergeError):
    """A method name or parameter value is invalid."""

class OutputError(MergeError):
    """The output could not be written."""

def read_header(path: str) -> dict[str, tuple[str, list[int]]]:
    """Parse and validate a safetensors file's header.

    Returns ``{tensor_name: (dtype, shape)}`` in data-offset order, with safetensors dtype names (``"F32"``, ``"F16"``, ``"BF16"``,
    ``"I64"``, ...). Raises ``InputError`` naming the file when it is missing, truncated, or its header is corrupt
    or inconsistent with the file size.
    """

def read_metadata(path: str) -> dict[str, str]:
    """The ``__metadata__`` map of a safetensors file (empty when absent)."""

def merge_arrays(
    method: Mapping[str, Any],
    inputs: Sequence[npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16] | npt.NDArray[np.int16]],
    base: npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16] | npt.NDArray[np.int16] | None,
    values: Sequence[Mapping[str, Any]],
    *,
    out_dtype: str,
    cast_dtype: str | None = None,
    name: str = "",
    shape: Sequence[int] | None = None,
    threads: int | None = None,
    chunk_elems: int | None = None,
    allow_nonfinite: bool = False,
) -> npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16]:
    """Merge one tensor in memory with the engine's kernels; returns a flat array of ``out_dtype``.

    ``method`` is the plan's ``method`` object (docs/architecture.md: ``name``, ``normalize``, ``lambda``,
    ``rescale``, ``seed``, ``params``), read by the same serde types as the plan, so an unknown key, method or
    parameter is a ``ParameterError``. ``values`` holds one plan-input object per input without ``file``/``tensor``
    (``weight``; ``density``, ``model_id``, ``gamma``, ``epsilon`` with the plan's defaults).
    ``inputs`` are the non-base tensors (C-contiguous; float32, float16, or uint16/int16 holding bfloat16 bits),
    all with the same number of elements as ``base``; ``base`` is None for the methods a base model joins as one
    more input (linear, karcher) and optional for nuslerp/multislerp. ``seed``, ``name`` and the model ids key the
    random streams (DARE, DELLA; arcee_fusion's quantile sample of tensors over 1e6 elements). ``shape`` (default
    ``[numel]``) gives rows (last dim) to the row-wise methods. The result does not depend on ``threads`` or
    ``chunk_elems``. The GIL is released while merging.

    A NaN or infinity in an input is an ``InputError`` naming it (``base`` or ``inputs[i]``) with its counts, unless
    ``allow_nonfinite``: then the values flow through the method's arithmetic as they are (docs/compat.md says what
    each method family makes of a NaN).
    """

def execute_plan(
    plan_json: str,
    out_dir: str,
    progress: Callable[[int, int, int, int], None] | None = None,
    threads: int | None = None,
    memory_limit: int | None = None,
    external: Callable[..., npt.NDArray[np.float32] | None] | None = None,
    on_shard_done: Callable[[str, int, int], None] | None = None,
) -> dict[str, int]:
    """Write every output shard of a plan (see docs/architecture.md) into ``out_dir``.

    ``external(name, method, shape, params, seed, n_inputs, load)`` (an external merge: the torch hand-off,
    ``torch_spectral``) is asked first for every tensor: ``load(i)`` decodes input ``i`` (-1: the base) to a new
    float32 array; it returns the merged tensor (float32, ``shape``) or None for the kernels to merge it. An
    exception it raises is re-raised as itself.

    ``memory_limit`` (bytes, default ``default_memory_limit()``) bounds what the run keeps resident: chunking,
    read-ahead and output staging (inputs are always streamed from their files); it never changes the output.

    ``progress(tensors_done, tensors_total, bytes_done, bytes_total)`` is called from the calling thread after each
    tensor; an exception it raises (or Ctrl-C) aborts the run and is re-raised as itself. Input files are validated
    before anything is written. Returns ``{"tensors": ..., "bytes_read": ..., "bytes_written": ...}``.

    ``on_shard_done(file_name, size, crc32)`` is called once per output shard, in plan order, after the shard is
    written whole and fsynced: ``crc32`` is ``zlib.crc32`` of the whole file, computed while writing it. An
    exception it raises aborts the run and is re-raised as itself.

    Inputs are read with positioned reads (no memory maps): a file truncated during the run is an ``InputError``
    naming the file and the tensor. Every input is checked unchanged (size, mtime, device, inode) when the run ends,
    before this returns, so the caller commits nothing read from a file that changed. A NaN or infinity in an input
    is an ``InputError`` naming the file, the tensor and the counts, unless the plan says ``"allow_nonfinite": true``.
    A non-float tensor (I64, BOOL, ...) is copied byte for byte by a passthrough of one input with ``out_dtype`` its
    own dtype; any other use of it is an ``InputError``.
    """

def methods() -> list[dict[str, Any]]:
    """The engine's method table (rust/core/src/merge/method.rs), one dict per method in table order: ``name``,
    ``family`` (its file under rust/core/src/merge/methods/), ``base`` (``required``, ``optional`` or ``joins``),
    ``min_inputs``, ``max_inputs`` (None: no limit), ``params`` and ``input_params`` (name -> default; None when
    required, bool for flags, int for whole numbers), ``sparsify`` (mergekit's sparsification method or None),
    ``consensus`` and ``spectral``."""

def memory_plan(
    memory_limit: int, threads: int, tensors: Sequence[Mapping[str, Any]], chunk_elems: int | None = None
) -> dict[str, int]:
    """The memory plan of a run (rust/core/src/exec/budget.rs). ``tensors``: one dict per output tensor with
    ``input_bytes`` (base included), ``inputs`` (non-base), its plan ``method`` object and ``shape``, and optionally
    ``output_bytes`` (absent: taken as ``input_bytes``). Returns ``budget``, ``chunk_elems``, ``read_ahead``,
    ``scratch``, ``working`` (the largest whole-matrix working set), ``staging`` (the two output staging buffers),
    ``largest`` (index of the tensor with the most input bytes), ``largest_input_bytes`` and ``peak`` (the bound on
    resident memory: min(budget, scratch + working + staging); the inputs are streamed, not held)."""

def encode(values: npt.NDArray[np.float32], dtype: str) -> npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16]:
    """C-contiguous float32 ``values`` rounded to ``dtype`` as the engine writes them (to nearest even), as the
    dtype's storage with the same shape (bfloat16 as uint16 bit patterns)."""

def decode(
    array: npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16] | npt.NDArray[np.int16], dtype: str
) -> npt.NDArray[np.float32]:
    """``dtype``'s storage (bfloat16 as uint16/int16 bits) decoded to float32, same shape; a storage type that
    does not hold ``dtype`` is a ``ParameterError``."""

def save_file(
    path: str,
    tensors: Mapping[str, tuple[npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16], str]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file from ``{name: (array, dtype)}`` (array shape is the tensor shape), atomically."""

def default_memory_limit() -> int:
    """The memory budget of a run when none is given: half of physical memory or of the cgroup limit, at most 8 GiB."""

def svd(
    a: npt.NDArray[np.float32],
    *,
    rank: int | None = None,
    fraction: float | None = None,
    energy: float | None = None,
    nuclear: float | None = None,
    exact: bool = False,
    oversample: int | None = None,
    power_iters: int | None = None,
    seed: int = 0,
    name: str = "",
    sv_epsilon: float = 0.0,
    threads: int | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``(U, S, Vt)`` of a C-contiguous float32 matrix, truncated by every rank rule given (docs/svd.md):
    randomized (seeded by ``seed`` and ``name``) unless ``exact`` or ``nuclear``, with tsv_m's sketch defaults
    (``oversample``, ``power_iters``) where they are None. Same bytes at any thread count. A signal handler's
    exception (Ctrl-C, SIGTERM) is raised within 50 ms, even inside the exact SVD, which is then left to end in the
    background (rust/py/src/linalg.rs: ``interruptible``)."""

def polar(a: npt.NDArray[np.float32], *, threads: int | None = None) -> npt.NDArray[np.float32]:
    """The nearest matrix with orthonormal columns (rows, for a wide matrix): ``U Vᵀ`` of the thin SVD; interrupted
    as ``svd`` is."""

def disjoint_mean(
    inputs: Sequence[npt.NDArray[np.float32]],
    weights: Sequence[float],
    majority_sign: str,
    *,
    threads: int | None = None,
) -> npt.NDArray[np.float32]:
    """PEFT's TIES sign election and disjoint mean (``peft.utils.merge_utils``) over C-contiguous float32 arrays of
    one size (rust/core/src/kernels/disjoint.rs); a flat float32 array. The sign is elected on the unweighted
    inputs (``"total"``: of Σ x_i, ``"frequency"``: of Σ sign(x_i); a score of 0 elects +); x_i agrees where its
    sign is the elected one (a zero never does); out = Σ over the agreeing inputs of x_i·float32(w_i), divided by
    how many agree (at least 1). Float32 throughout, in input order: the bytes do not depend on ``threads``. An
    unknown ``majority_sign``, a weight count unequal to the input count or arrays of other sizes are a
    ``ParameterError``. The GIL is released while merging.
    """
