"""Typed stubs for the Rust extension ``ferromerge._core`` (built from ``rust/py``).

Dtype names are mergekit's: ``"float32"``, ``"float16"``, ``"bfloat16"``. bfloat16 data crosses as ``uint16``
(or ``int16``) arrays of bit patterns, because NumPy has no bfloat16.
"""

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import numpy.typing as npt

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
    method: str,
    inputs: Sequence[npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16] | npt.NDArray[np.int16]],
    base: npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16] | npt.NDArray[np.int16] | None,
    weights: Sequence[float],
    densities: Sequence[float],
    *,
    out_dtype: str,
    normalize: bool,
    cast_dtype: str | None = None,
    lambda_: float = 1.0,
    rescale: str = "none",
    seed: int = 0,
    name: str = "",
    model_ids: Sequence[int] | None = None,
    threads: int | None = None,
    chunk_elems: int | None = None,
    shape: Sequence[int] | None = None,
    params: Mapping[str, float] | None = None,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
) -> npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16]:
    """Merge one tensor in memory with the engine's kernels; returns a flat array of ``out_dtype``.

    ``inputs`` are the non-base tensors (C-contiguous; float32, float16, or uint16/int16 holding bfloat16 bits),
    all with the same number of elements as ``base``. ``weights``/``densities`` have one entry per input.
    ``method`` is one of ``linear``, ``task_arithmetic``, ``ties``, ``dare_ties``, ``dare_linear``, ``slerp``,
    ``nuslerp``, ``multislerp``, ``karcher``, ``breadcrumbs``, ``breadcrumbs_ties``, ``della``, ``della_linear``,
    ``sce``, ``ram``, ``ramplus_tl``, ``model_stock``, ``nearswap``, ``arcee_fusion``. ``base`` is required except
    by ``linear`` and ``karcher`` (which take ``base=None``: a base model is one more input) and ``nuslerp`` /
    ``multislerp`` (optional). ``rescale`` is ``"none"``, ``"l1"`` or ``"inverse_density"``. ``seed``, ``name`` and
    ``model_ids`` (default ``0..len(inputs)``) key the random streams (DARE, DELLA; arcee_fusion's quantile sample
    of tensors over 1e6 elements). ``shape`` (default ``[numel]``) gives rows (last dim) to the row-wise methods.
    ``params`` holds method-wide numbers (booleans as 1.0/0.0): ``t`` (slerp, nearswap), ``nuslerp_row_wise``,
    ``nuslerp_flatten``, ``normalize_weights``, ``eps``, ``max_iter``, ``tol``, ``filter_wise``, ``select_topk``,
    ``epsilon``, ``r``, ``alpha``, ``per_row``; a key the method does not know, or a missing required one, is a
    ``ParameterError``. ``gammas`` (breadcrumbs, default 0.01) and ``epsilons`` (della, default 0.15) have one entry
    per input. The result does not depend on ``threads`` or ``chunk_elems``. The GIL is released while merging.
    """

def execute_plan(
    plan_json: str,
    out_dir: str,
    progress: Callable[[int, int, int, int], None] | None = None,
    threads: int | None = None,
    memory_limit: int | None = None,
    external: Callable[..., npt.NDArray[np.float32] | None] | None = None,
) -> dict[str, int]:
    """Write every output shard of a plan (see docs/architecture.md) into ``out_dir``.

    ``external(name, method, shape, params, seed, n_inputs, load)`` (the torch hand-off, ``torch_path.make_hook``)
    is asked first for every tensor: ``load(i)`` decodes input ``i`` (-1: the base) to a new float32 array; it
    returns the merged tensor (float32, ``shape``) or None for the kernels to merge it. An exception it raises is
    re-raised as itself.

    ``memory_limit`` (bytes, default ``default_memory_limit()``) bounds what the run keeps resident: chunking,
    read-ahead, and when input pages are released; it never changes the output.

    ``progress(tensors_done, tensors_total, bytes_done, bytes_total)`` is called from the calling thread after each
    tensor; an exception it raises (or Ctrl-C) aborts the run. Input files are validated before anything is
    written. Returns ``{"tensors": ..., "bytes_read": ..., "bytes_written": ...}``.
    """

def save_file(
    path: str,
    tensors: Mapping[str, tuple[npt.NDArray[np.float32] | npt.NDArray[np.float16] | npt.NDArray[np.uint16], str]],
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write a safetensors file from ``{name: (array, dtype)}`` (array shape is the tensor shape), atomically."""

def default_memory_limit() -> int:
    """The memory budget of a run when none is given: half of physical memory or of the cgroup limit, at most 8 GiB."""

def chunk_elems(memory_limit: int, threads: int, inputs: int) -> int:
    """Elements per chunk the engine uses for a budget, a worker count and the inputs of a tensor (base included)."""

def working_bytes(method: str, shape: Sequence[int], params: Mapping[str, float] | None = None) -> int:
    """Bytes a tensor's merge holds beyond the streaming buffers (spectral methods: 16 · m · n · 4; others 0)."""

def svd(
    a: npt.NDArray[np.float32],
    *,
    rank: int | None = None,
    fraction: float | None = None,
    energy: float | None = None,
    nuclear: float | None = None,
    exact: bool = False,
    oversample: int = 10,
    power_iters: int = 2,
    seed: int = 0,
    name: str = "",
    sv_epsilon: float = 0.0,
    threads: int | None = None,
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """``(U, S, Vt)`` of a C-contiguous float32 matrix, truncated by every rank rule given (docs/svd.md):
    randomized (seeded by ``seed`` and ``name``) unless ``exact`` or ``nuclear``. Same bytes at any thread count."""

def polar(a: npt.NDArray[np.float32], *, threads: int | None = None) -> npt.NDArray[np.float32]:
    """The nearest matrix with orthonormal columns (rows, for a wide matrix): ``U Vᵀ`` of the thin SVD."""
