"""What a run of a plan will need, predicted before anything is written: disk, peak memory and time.

* **Disk**: the output shards' bytes, against the free space of the filesystem the output goes to.
* **Peak memory**: a bound on what the engine keeps resident under its memory budget (``memory_limit``): the
  workers' chunk buffers (threads x (inputs + 5) f32 buffers of one chunk and a read buffer of it), a spectral
  method's whole-matrix working set and the two output staging buffers (each a window of the final pass: a few
  MiB, at most a sixteenth of the budget, whatever the tensors' sizes), capped by the budget itself. The inputs are streamed chunk by chunk, never
  held whole; the next tensor's inputs (when they fit a quarter of the budget) are read ahead into the OS page
  cache, which is not counted: the kernel reclaims it on demand.
* **Time**: calibrated on this machine in well under a second: the compute rate of the engine's kernel with the
  plan's method and parameters on synthetic data (same number of models and dtypes as the largest tensor), and
  the sequential read rate of the largest input file. A merge streams its inputs once, so it takes about
  input bytes / the slower of the two rates; a spectral method adds its factorizations (``spectral_seconds``:
  flop counts at a rate timed on a small matrix).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from .. import _engine, methods
from .._validate import format_bytes
from ..io.dtypes import MERGEABLE_DTYPES
from ..io.output_dir import SPACE_MARGIN, free_space
from .build import Plan, PlanTensor

#: elements per model of the compute calibration: large enough to amortise the per-call overhead, small enough
#: to stay in tens of milliseconds
CALIBRATION_ELEMS = 2_000_000
#: most bytes read, and most seconds spent reading, to measure the read rate (a slow disk stops at the time cap)
READ_BYTES = 256 * 2**20
READ_SECONDS = 0.25
#: faster than this, a "disk" read is served from memory (no SSD sustains it through a single sequential reader)
PAGE_CACHE_RATE = 4e9

#: elements of the warm-up call (it starts the thread pool)
_WARM_UP_ELEMS = 1 << 16


@dataclass(frozen=True)
class Estimate:
    """The predictions for one plan; ``to_dict`` is its JSON form, ``lines`` its human-readable one."""

    bytes_in: int
    bytes_out: int
    #: where the output goes, the existing directory whose filesystem holds it, and its free bytes
    out_dir: str
    disk_path: str
    disk_free: int
    threads: int
    memory_limit: int
    #: the bound on resident memory (see the module docstring) and its parts
    peak_memory: int
    largest_tensor: str
    largest_tensor_bytes: int
    read_ahead_bytes: int
    scratch_bytes: int
    #: the two buffers the output is staged in before it is written
    staging_bytes: int
    #: the largest whole-matrix working set of a spectral method (0 when none)
    working_bytes: int
    #: bytes of input merged per second by the kernel, and read per second from the largest input file
    compute_rate: float
    read_rate: float
    read_file: str
    read_cached: bool
    #: seconds of the whole-matrix factorizations of a spectral method (0 for others): counted apart from the
    #: streaming rate, from each matrix's flop count and a rate timed on a small matrix (``spectral_seconds``)
    factor_seconds: float
    #: the run's fixed cost that does not scale with bytes or flops: the interpreter's start-up, imports and
    #: planning, as the plan command itself spent them (CPU seconds; ``estimate``'s ``startup_seconds``)
    startup_seconds: float
    seconds: float

    @property
    def disk_ok(self) -> bool:
        """Whether ``run``'s free-space check (shards + ``SPACE_MARGIN``) passes."""
        return self.disk_free >= int(self.bytes_out * (1 + SPACE_MARGIN))

    @property
    def bound_by(self) -> str:
        return "compute" if self.compute_rate <= self.read_rate else "read"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "disk_ok": self.disk_ok, "bound_by": self.bound_by}

    def lines(self) -> list[str]:
        room = "enough" if self.disk_ok else "NOT ENOUGH"
        source = "page cache" if self.read_cached else "disk"
        return [
            f"disk needed: {format_bytes(self.bytes_out)} at {self.out_dir} "
            f"({format_bytes(self.disk_free)} free at {self.disk_path}: {room})",
            f"peak memory: at most {format_bytes(self.peak_memory)} resident (budget "
            f"{format_bytes(self.memory_limit)}; largest tensor {self.largest_tensor}: "
            f"{format_bytes(self.largest_tensor_bytes)} of inputs, streamed; read-ahead up to "
            f"{format_bytes(self.read_ahead_bytes)} in the page cache, "
            f"scratch {format_bytes(self.scratch_bytes)} for {self.threads} thread(s), output staging "
            f"{format_bytes(self.staging_bytes)}"
            + (f", spectral working set {format_bytes(self.working_bytes)}" if self.working_bytes else "")
            + "; page cache not counted)",
            f"predicted time: {self.seconds:.1f} s (compute {self.compute_rate / 1e9:.2f} GB/s, read "
            f"{self.read_rate / 1e9:.2f} GB/s from {source}: bounded by {self.bound_by}"
            + (f"; SVDs {self.factor_seconds:.1f} s" if self.factor_seconds else "")
            + (f"; start-up {self.startup_seconds:.1f} s" if self.startup_seconds else "") + ")",
        ]


def default_threads() -> int:
    """The engine's default thread count: the cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def tensor_needs(tensors: Sequence[PlanTensor]) -> list[_engine.TensorNeeds]:
    """What each tensor asks of the engine's memory plan (``_engine.memory_plan``)."""
    return [
        {"input_bytes": t.bytes_in, "inputs": len(t.inputs), "method": t.method,  # type: ignore[typeddict-item]
         "shape": t.shape}
        for t in tensors
    ]


def peak_memory(plan: Plan, memory_limit: int, threads: int) -> tuple[int, PlanTensor, int, int, int, int]:
    """The resident-memory bound (module docstring) with the largest tensor, the read-ahead, scratch, working-set
    (the largest whole-matrix working set of a spectral method, 0 for others) and output staging bytes, as the
    engine plans them
    (``_engine.memory_plan``: rust/core/src/exec/budget.rs)."""
    memory = _engine.memory_plan(memory_limit, threads, tensor_needs(plan.tensors))
    return (memory["peak"], plan.tensors[memory["largest"]], memory["read_ahead"], memory["scratch"],
            memory["working"], memory["staging"])


def _synthetic(rng: np.random.Generator, n: int, dtype: str) -> npt.NDArray[Any]:
    x = rng.standard_normal(n, dtype=np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16)
    return (x.view(np.uint32) >> 16).astype(np.uint16)  # bfloat16 bit patterns (truncated: fine for timing)


def compute_rate(plan: Plan, tensor: PlanTensor, threads: int | None, elems: int = CALIBRATION_ELEMS) -> float:
    """Input bytes per second that ``_engine.merge_arrays`` merges with ``tensor``'s method, parameters, model count
    and dtypes, timed on ``elems`` synthetic elements per model (a spectral method: its streaming part only)."""
    rng = np.random.default_rng(0)
    # a copied non-float tensor is timed as float32 (it is the passthrough's copy)
    dtypes = [MERGEABLE_DTYPES.get(i.info.dtype, "float32") for i in tensor.inputs]
    base_dtype = None if tensor.base is None else MERGEABLE_DTYPES[tensor.base.info.dtype]
    k = tensor.method
    spec = methods.get(k["name"])
    if spec.gpu_bound:
        # a spectral method's streaming part (decode, the final pass) is timed on the mean path; its
        # factorizations do not scale with bytes and are counted apart (``spectral_seconds``)
        k = {**k, "params": {**k.get("params", {}), "mean_only": 1.0}}
    # row-wise methods (della, model_stock filter_wise, ...) cost per row: keep the tensor's row length
    row = tensor.shape[-1] if len(tensor.shape) >= 2 and spec.row_wise and not spec.gpu_bound else None

    def merge(n: int) -> tuple[int, float]:
        shape = None
        if row is not None:
            shape = [max(1, n // row), row]
            n = shape[0] * row
        inputs = [_synthetic(rng, n, d) for d in dtypes]
        base = None if base_dtype is None else _synthetic(rng, n, base_dtype)
        start = time.perf_counter()
        extra = methods.kernel_kwargs(
            spec,
            shape=shape,
            params=k.get("params"),
            gammas=[i.gamma for i in tensor.inputs],
            epsilons=[i.epsilon for i in tensor.inputs],
        )
        method = {key: value for key, value in k.items() if key != "params"}
        if "params" in extra:
            method["params"] = extra["params"]
        _engine.merge_arrays(
            method,
            inputs,
            base,
            _engine.input_values(
                [i.weight for i in tensor.inputs], [i.density for i in tensor.inputs], extra.get("gammas"),
                extra.get("epsilons"),
            ),
            out_dtype=tensor.out_dtype,
            cast_dtype=plan.cast_dtype,
            name=tensor.name,
            shape=extra.get("shape"),
            threads=threads,
        )
        seconds = time.perf_counter() - start
        return sum(a.nbytes for a in inputs) + (0 if base is None else base.nbytes), seconds

    merge(_WARM_UP_ELEMS)  # warm-up: the first call starts the thread pool
    nbytes, seconds = merge(elems)
    return nbytes / max(seconds, 1e-9)


#: side of the calibration matrix of the spectral methods' factorizations (CALIB_SIDE·3 x CALIB_SIDE, tens of ms)
CALIB_SIDE = 384


def factor_flops(method: str, shape: Sequence[int], tasks: int) -> float:
    """Multiply-adds of a spectral method's factorizations of one M x N matrix (M >= N after transposing). All four
    run exactly through N x N Gram matrices (linalg/gram.rs): a Gram matrix costs M·N², a product with an N x k
    factor M·N·k, a symmetric eigenproblem with its eigenvectors ~(10/3)·N³, an N x N product N³.

    - TSV-M: T + 1 Gram matrices (tasks and U_cat), T products U = A V/σ (M·N in all), the final product, T + 2
      eigenproblems;
    - Iso-C: the sum's Gram matrix and eigenproblem, the N x N rescaling, the product S·M;
    - Iso-CTS: as Iso-C for the sum (its common block's U: M·N·c), per task two projections (4·M·N·c) and a Gram
      matrix, the tasks' U (M·N in all), then TSV-M's ending; T + 3 eigenproblems;
    - STAR: per task a Gram matrix, an eigenproblem, the projector and the product.

    0 for what is only averaged."""
    if len(shape) != 2 or min(shape) < tasks or min(shape) == 0:
        return 0.0
    big, n = float(max(shape)), float(min(shape))
    eig = (10 / 3) * n**3
    if method == "tsv_m":
        return (tasks + 2) * big * n * n + big * n * n + (tasks + 2) * eig
    if method == "iso_c":
        return 2 * big * n * n + eig + n**3
    if method == "iso_cts":
        common = 0.8 * n  # the default common_space_fraction (the calibration runs the plan's own parameters)
        return (4 + tasks) * big * n * n + 4 * tasks * big * n * common + (tasks + 3) * eig + 3 * n**3
    if method == "star":
        return tasks * (2 * big * n * n + eig + n**3)
    return 0.0


def spectral_seconds(plan: Plan, threads: int | None) -> float:
    """Seconds of the plan's whole-matrix factorizations: its matrices' ``factor_flops`` at the rate of one timed
    merge of a CALIB_SIDE·3 x CALIB_SIDE float32 matrix with the same method, parameters and task count (the
    calibration runs the engine's kernel itself, so the rate is this machine's and these threads')."""
    todo = [t for t in plan.tensors if methods.get(t.method["name"]).gpu_bound
            and not float(t.method.get("params", {}).get("mean_only", 0.0))]
    total = sum(factor_flops(t.method["name"], t.shape, len(t.inputs)) for t in todo)
    if not total:
        return 0.0
    t = max(todo, key=lambda t: factor_flops(t.method["name"], t.shape, len(t.inputs)))
    shape = [3 * CALIB_SIDE, CALIB_SIDE]
    rng = np.random.default_rng(0)
    base = rng.standard_normal(shape[0] * shape[1], dtype=np.float32)
    inputs = [base + 0.01 * rng.standard_normal(base.size, dtype=np.float32) for _ in t.inputs]
    values = _engine.input_values([1.0] * len(inputs), [1.0] * len(inputs), None, None)
    best = float("inf")
    for _ in range(2):  # the first call also starts the thread pool
        start = time.perf_counter()
        _engine.merge_arrays(t.method, inputs, base, values, out_dtype="float32", shape=shape, threads=threads)
        best = min(best, time.perf_counter() - start)
    return total * best / factor_flops(t.method["name"], shape, len(inputs))


def read_rate(path: Path, limit: int = READ_BYTES, max_seconds: float = READ_SECONDS) -> tuple[float, bool]:
    """Bytes per second of reading ``path`` sequentially (up to ``limit`` bytes or ``max_seconds``), and whether
    that was probably served by the page cache (faster than ``PAGE_CACHE_RATE``)."""
    buf = bytearray(8 * 2**20)
    view = memoryview(buf)
    done = 0
    start = time.perf_counter()
    with open(path, "rb", buffering=0) as f:
        while done < limit:
            n = f.readinto(view[: min(len(buf), limit - done)])
            if not n:
                break
            done += n
            if time.perf_counter() - start > max_seconds:
                break
    rate = done / max(time.perf_counter() - start, 1e-9)
    return rate, rate > PAGE_CACHE_RATE


def estimate(
    plan: Plan,
    out_dir: str | os.PathLike[str] | None = None,
    *,
    threads: int | None = None,
    memory_limit: int | None = None,
    startup_seconds: float = 0.0,
) -> Estimate:
    """Disk, peak memory and time of running ``plan`` into ``out_dir`` (None: some directory in the current one)
    with ``threads`` (None: all cores) and ``memory_limit`` bytes (None: ``_engine.default_memory_limit()``); reads
    at most ``READ_BYTES`` of one input file. ``startup_seconds``: the run's fixed cost (start-up, imports,
    planning) as the caller measured it, added to the time (on a small model it is most of a run: 0.6-0.8 CPU-s
    against 0.7-3.8 s of SVDs on a 1/8-scale 8B layer, docs/benchmarks.md)."""
    budget = _engine.default_memory_limit() if memory_limit is None else memory_limit
    workers = threads or default_threads()
    peak, largest, read_ahead, scratch, working, staging = peak_memory(plan, budget, workers)
    target = Path.cwd() if out_dir is None else Path(out_dir).expanduser().absolute()
    # a run builds its output beside the target, so the target's parent's filesystem must hold it
    where, free = free_space(target if out_dir is None else target.parent)
    files = {i.info.file for t in plan.tensors for i in t.inputs} | {
        t.base.info.file for t in plan.tensors if t.base is not None
    }
    # a model+lora's cache files exist only once a run has merged the adapter; the model's own shards always do
    # (a PyTorch-pickled model's copies only once a run has made them: then its pickles are read)
    files = {f for f in files if f.is_file()} or {f for m in plan.models for f in m.stored_files if f.is_file()}
    biggest_file = max(sorted(files), key=lambda f: f.stat().st_size)
    compute = compute_rate(plan, largest, threads)
    read, cached = read_rate(biggest_file)
    factor = spectral_seconds(plan, threads)
    return Estimate(
        bytes_in=plan.bytes_in,
        bytes_out=plan.bytes_out,
        out_dir=str(target),
        disk_path=str(where),
        disk_free=free,
        threads=workers,
        memory_limit=budget,
        peak_memory=peak,
        largest_tensor=largest.name,
        largest_tensor_bytes=largest.bytes_in,
        read_ahead_bytes=read_ahead,
        scratch_bytes=scratch,
        staging_bytes=staging,
        working_bytes=working,
        compute_rate=compute,
        read_rate=read,
        read_file=str(biggest_file),
        read_cached=cached,
        factor_seconds=factor,
        startup_seconds=startup_seconds,
        seconds=plan.bytes_in / min(compute, read) + factor + startup_seconds,
    )
