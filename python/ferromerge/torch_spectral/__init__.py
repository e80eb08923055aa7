"""The torch hand-off of the SVD-space methods (``tsv_m``, ``iso_c``, ``iso_cts``, ``star``), for ``--device cuda``.

The engine's *external merge* (``_engine.execute(..., external_merge=merge)``, ``rust/py/src/external_merge.rs``)
offers every tensor to ``merge(name, method, shape, params, seed, n_inputs, load)`` before its Rust kernel runs.
The one made here (``external_merge``) takes the 2-D tensors of those four methods and returns theta (base
included, float32, ``shape``); for anything else (and for matrices whose ``mean_only`` parameter is set: the
config's ``exclude``) it returns None and the Rust kernels run.
``load(i)`` decodes input i (0..n_inputs-1, ``-1`` the base) to a fresh float32 array, so the merge streams over
the tasks: the base is moved to the device once, then one task at a time is loaded, moved, turned into its task
vector and dropped. Host memory stays at about one task matrix; the device holds the base, one task vector and
the method's factors (for TSV-M the concatenated U and V: about one more matrix).

All math is float32 on the device. TSV-M's per-task top-k SVD is randomized (``torch.svd_lowrank``, Halko et
al.'s algorithm 5.1 with q = k + oversample columns and ``power_iters`` power iterations), exact
(``torch.linalg.svd``) when ``exact_svd`` is set or when q would reach min(m, n). The sketch is seeded from
(seed, tensor name) inside a forked RNG, so a run is reproducible and leaves the global RNG alone; torch's
sketch is not the Rust kernel's (different generators), so the two paths agree within the randomized error, and
exactly-specified (exact SVD) results within float32 rounding. Iso-C, Iso-CTS and STAR need the full spectrum and
always use the exact SVD. Polar factors are U·Vᵀ of a thin SVD.

torch is optional: nothing here imports it at module import time, and ``import ferromerge`` never imports this
module's dependencies. Device strings: ``cpu`` (the Rust kernels, no torch), ``cuda``, ``cuda:N`` and
``torch:cpu`` (the torch path on the CPU: tests, and machines where torch's LAPACK beats the Rust SVD); checking
them and whether torch can serve one is ``device``'s job. This module reads top-down: the building blocks (sketch
seeds, the task stream, polar factors, top-k SVDs), the four methods on one 2-D tensor (merged task vector, before
alpha), then the external merge that dispatches to them.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np

from .. import methods
from ..errors import ParameterError
from .device import TorchUnavailableWarning, check_device, torch_device, torch_unavailable_reason

__all__ = [
    "NULL_SV",
    "TORCH_METHODS",
    "ExternalMerge",
    "Load",
    "TorchUnavailableWarning",
    "check_device",
    "external_merge",
    "iso_c",
    "iso_cts",
    "merge_tensor",
    "sketch_seed",
    "star",
    "torch_device",
    "torch_unavailable_reason",
    "tsv_m",
]

if TYPE_CHECKING:  # pragma: no cover
    import torch


Load = Callable[[int], np.ndarray]
ExternalMerge = Callable[[str, str, tuple, dict, int, int, Load], "np.ndarray | None"]

# svd_lowrank draws its sketch from the global RNG; the fork/seed/draw sequence must not interleave between
# threads (torch releases the GIL inside its kernels)
_RNG_LOCK = threading.Lock()


def sketch_seed(seed: int, name: str) -> int:
    """A 63-bit seed from (seed, tensor name), the same in every process (Python's ``hash`` is salted)."""
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


@contextlib.contextmanager
def _seeded(torch: Any, device: "torch.device", seed: int) -> Iterator[None]:
    """Seed the default generator of ``device`` inside a forked RNG (the caller's RNG state is restored)."""
    with _RNG_LOCK:
        if device.type == "cuda":
            with torch.random.fork_rng(devices=[device.index]), torch.cuda.device(device):
                torch.cuda.manual_seed(seed)
                yield
        else:
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(seed)
                yield


class _Tasks:
    """Streams task vectors onto the device: the base stays there, tasks are loaded one at a time.

    ``load`` returns fresh arrays (the executor's contract), so on the CPU, where ``.to(device)`` does not copy,
    task vectors and theta are formed in place in that memory instead of in a second matrix."""

    def __init__(self, torch: Any, device: "torch.device", load: Load, n_inputs: int, shape: tuple[int, ...]):
        self.torch, self.device, self.load, self.n, self.shape = torch, device, load, n_inputs, shape
        self.base = self._to_device(-1)

    def _to_device(self, i: int) -> "torch.Tensor":
        a = np.asarray(self.load(i))
        if a.shape != self.shape:
            raise ValueError(f"load({i}) returned shape {a.shape}, expected {self.shape}")
        if a.dtype != np.float32 or not a.flags.c_contiguous or not a.flags.writeable:
            a = np.array(a, dtype=np.float32, order="C")
        return self.torch.from_numpy(a).to(self.device)

    def tau(self, i: int) -> "torch.Tensor":
        x = self._to_device(i)
        if x.data_ptr() == self.base.data_ptr():  # never subtract in place from the base itself
            x = x.clone()
        return x.sub_(self.base)

    def total(self) -> "torch.Tensor":
        acc = self.tau(0)
        for i in range(1, self.n):
            acc.add_(self.tau(i))
        return acc


def _polar(torch: Any, a: "torch.Tensor") -> "torch.Tensor":
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def _top_k(torch: Any, a: "torch.Tensor", k: int, *, exact: bool, oversample: int,
           power_iters: int) -> tuple["torch.Tensor", "torch.Tensor", "torch.Tensor"]:
    """(U_k, S_k, Vt_k) of ``a``: randomized unless ``exact`` or the sketch would be the whole space."""
    q = k + max(0, oversample)
    if exact or q >= min(a.shape):
        u, s, vh = torch.linalg.svd(a, full_matrices=False)
        return u[:, :k], s[:k], vh[:k, :]
    u, s, v = torch.svd_lowrank(a, q=q, niter=max(0, power_iters))
    return u[:, :k], s[:k], v[:, :k].mT


#: singular values at or below this share of a task's largest count as zero in TSV-M (rust: spectral::NULL_SV)
NULL_SV = 1e-6


def tsv_m(torch: Any, tasks: _Tasks, params: dict, seed: int) -> "torch.Tensor":
    """Each task's top k = floor(min(m, n)/T) triplets, concatenated; U and V replaced by their polar factors.

    Only the T·k filled slots are kept: leftover zero slots meet zero singular values, and the polar factor of
    the filled columns alone equals those columns of the full one (zero columns decouple)."""
    m, n = tasks.shape
    k = min(m, n) // tasks.n
    if k == 0:  # no direction per task: the mean task vector, as the Rust kernel (methods.too_small)
        return tasks.total().div_(tasks.n)
    width = tasks.n * k
    u_cat = torch.empty((m, width), dtype=torch.float32, device=tasks.device)
    s_cat = torch.empty(width, dtype=torch.float32, device=tasks.device)
    v_cat = torch.empty((width, n), dtype=torch.float32, device=tasks.device)
    opts = dict(exact=bool(params["exact_svd"]), oversample=int(params["oversample"]),
                power_iters=int(params["power_iters"]))
    with _seeded(torch, tasks.device, seed):
        for i in range(tasks.n):
            tau = tasks.tau(i)
            u, s, vt = _top_k(torch, tau, k, **opts)
            del tau
            # as the Rust kernel: singular vectors of (numerically) zero singular values are arbitrary and would
            # steer the polar factors of every other slot, so those slots stay zero
            null = s <= NULL_SV * s[0]
            u, s, vt = u.masked_fill(null[None, :], 0), s.masked_fill(null, 0), vt.masked_fill(null[:, None], 0)
            u_cat[:, i * k:(i + 1) * k], s_cat[i * k:(i + 1) * k], v_cat[i * k:(i + 1) * k, :] = u, s, vt
    return _polar(torch, u_cat) @ (s_cat[:, None] * _polar(torch, v_cat))


def iso_c(torch: Any, tasks: _Tasks, params: dict, seed: int) -> "torch.Tensor":
    """mean(S)·U·Vᵀ of M = Σ tau_t (full thin SVD)."""
    u, s, vh = torch.linalg.svd(tasks.total(), full_matrices=False)
    return s.mean() * (u @ vh)


def iso_cts(torch: Any, tasks: _Tasks, params: dict, seed: int) -> "torch.Tensor":
    """Common space from the SVD of Σ tau_t, task-specific blocks from each tau_t with the common left subspace
    projected out (a second pass over the tasks), polar factors, every singular value replaced by the mean."""
    m, n = tasks.shape
    r = min(m, n)
    t_count = tasks.n
    common = int(r * float(params["common_space_fraction"]))
    ts_total = round((r - common) / t_count) * t_count  # Python's round, half to even, as iso.py
    if ts_total > r:  # only for small fractions; the reference would slice with a negative index
        ts_total -= t_count
    common, d = r - ts_total, ts_total // t_count
    u, s, vh = torch.linalg.svd(tasks.total(), full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], vh[:common, :]
    del u, vh
    u_cat = torch.empty((m, r), dtype=torch.float32, device=tasks.device)
    v_cat = torch.empty((r, n), dtype=torch.float32, device=tasks.device)
    s_sum = sc.sum()
    for i in range(t_count if d > 0 else 0):
        tau = tasks.tau(i)
        tau.sub_(uc @ (uc.mT @ tau))
        ut, st, vht = torch.linalg.svd(tau, full_matrices=False)
        del tau
        u_cat[:, i * d:(i + 1) * d], v_cat[i * d:(i + 1) * d, :] = ut[:, :d], vht[:d, :]
        s_sum = s_sum + st[:d].sum()
    j = t_count * d
    u_cat[:, j:], v_cat[j:, :] = uc, vc
    return (s_sum / r) * (_polar(torch, u_cat) @ _polar(torch, v_cat))


def star(torch: Any, tasks: _Tasks, params: dict, seed: int) -> "torch.Tensor":
    """(1/T)·Σ_t STAR(tau_t): keep the smallest r with Σ_{i<r} S_i >= eta % of ΣS, rescaled to the full nuclear
    norm. The rank is chosen on float64 sums of the float32 singular values; a zero task vector adds zero."""
    eta = float(params["eta"])
    acc = torch.zeros(tasks.shape, dtype=torch.float32, device=tasks.device)
    for i in range(tasks.n):
        tau = tasks.tau(i)
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        del tau
        s64 = s.double().cpu().numpy()
        total = float(s64.sum())
        if total == 0.0:
            continue
        r = min(int(np.searchsorted(np.cumsum(s64), total * eta / 100.0, side="left")) + 1, s64.size)
        scale = total / float(s64[:r].sum())
        acc.add_(u[:, :r] @ ((s[:r] * scale)[:, None] * vh[:r, :]))
    return acc.div_(tasks.n)


_METHODS = {"tsv_m": tsv_m, "iso_c": iso_c, "iso_cts": iso_cts, "star": star}
#: the methods the external merge takes (2-D tensors only)
TORCH_METHODS = frozenset(_METHODS)


def merge_tensor(device: "torch.device", name: str, method: str, shape: tuple[int, ...], params: dict,
                 seed: int, n_inputs: int, load: Load) -> np.ndarray | None:
    """theta of one tensor on ``device`` (float32, ``shape``), or None when the torch path does not take it."""
    shape = tuple(int(d) for d in shape)
    if method not in TORCH_METHODS or len(shape) != 2 or min(shape) == 0 or n_inputs < 1:
        return None
    if float((params or {}).get("mean_only", 0.0)):  # an ``exclude``d matrix: the Rust kernel takes the mean
        return None
    import torch

    # the planner passes every parameter; the registry's defaults cover a direct call
    p = {**methods.get(method).kernel_param_defaults(), **{k: float(v) for k, v in (params or {}).items()}}
    with torch.inference_mode():
        tasks = _Tasks(torch, device, load, int(n_inputs), shape)
        tau = _METHODS[method](torch, tasks, p, sketch_seed(seed, name))
        alpha = 1.0 if method == "star" else p["alpha"]
        theta = tasks.base.add_(tau, alpha=alpha) if alpha != 1.0 else tasks.base.add_(tau)
        del tau
        out = theta.cpu().numpy()
    return np.ascontiguousarray(out, dtype=np.float32)


def external_merge(device: str) -> ExternalMerge:
    """The external merge (``_engine.execute(..., external_merge=)``) on ``device`` (``cuda``, ``cuda:N`` or
    ``torch:cpu``).

    Raises ``ParameterError`` when the device cannot run torch (``torch_device``/``torch_unavailable_reason``
    first, to fall back with a warning instead)."""
    dev = torch_device(device)
    if dev is None:
        raise ParameterError(f"device {device!r} cannot run the torch path: {torch_unavailable_reason(device)}")

    def merge(name: str, method: str, shape: tuple, params: dict, seed: int, n_inputs: int,
              load: Load) -> np.ndarray | None:
        return merge_tensor(dev, name, method, shape, params, seed, n_inputs, load)

    merge.device = dev  # type: ignore[attr-defined]
    return merge
