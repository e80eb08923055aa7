"""Reference torch implementations of the spectral merges (TSV-M, Iso-C, Iso-CTS, STAR), restated from the authors'
code (AntoAndGar/task_singular_vectors ``compute_and_sum_svd_mem_reduction``; danielm1405/iso-merging ``iso.py``;
IBM/STAR ``STAR.py``; as FusionBench ports them): float32 on torch, full thin ``torch.linalg.svd`` factorizations,
streamed tensor by tensor with ``safe_open``, the merged model written once with ``save_file`` as a user script
does. Non-2-D tensors: base + alpha * mean of the task vectors. Imports only torch and safetensors (run it with
the mergekit virtualenv's Python), and those only when it merges: benches/svd.py imports its loader
(``tensor_files``, ``merge``) for its own TSV-M peer.

    python benches/spectral_peer.py METHOD OUT BASE FT1 FT2 FT3 [--threads N]
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def tensor_files(model: Path) -> dict[str, Path]:
    """Tensor name -> shard of a model directory."""
    idx = model / "model.safetensors.index.json"
    if idx.exists():
        return {k: model / v for k, v in json.loads(idx.read_text())["weight_map"].items()}
    out = {}
    for f in sorted(model.glob("*.safetensors")):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            out.update({k: f for k in json.loads(fh.read(n)) if k != "__metadata__"})
    return out


def tsv_m(taus: list[torch.Tensor]) -> torch.Tensor:
    """TSV-M: each task's top k = int(r/T) triplets side by side, U and V replaced by their polar factors (from full
    SVDs, as the reference does), sigma kept."""
    import torch

    m, n = taus[0].shape
    r = min(m, n)
    k = int(r * (1.0 / len(taus)))
    sum_u, sum_s, sum_v = torch.zeros(m, r), torch.zeros(r), torch.zeros(r, n)
    for i, tau in enumerate(taus):
        u, s, vh = torch.linalg.svd(tau, full_matrices=False)
        sum_u[:, i * k:(i + 1) * k], sum_s[i * k:(i + 1) * k], sum_v[i * k:(i + 1) * k] = u[:, :k], s[:k], vh[:k]
        del u, s, vh
    u_u, _, v_u = torch.linalg.svd(sum_u, full_matrices=False)
    u_v, _, v_v = torch.linalg.svd(sum_v, full_matrices=False)
    return torch.linalg.multi_dot((u_u, v_u, torch.diag(sum_s), u_v, v_v))


def svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``torch.linalg.svd(x, full_matrices=False)`` as the reference code calls it, except that where LAPACK's
    float32 ``gesdd`` fails to converge (it does on Iso-CTS's projected residuals of the 8B-shaped layer: rank-
    deficient, many repeated zero singular values) the same SVD is retried in float64 and rounded back, with a line
    on stderr; the reference code itself would stop there with ``torch._C._LinAlgError``."""
    import torch

    try:
        return torch.linalg.svd(x, full_matrices=False)
    except torch._C._LinAlgError:
        print(f"spectral_peer: float32 SVD of a {tuple(x.shape)} matrix did not converge; retried in float64",
              file=sys.stderr)
        u, s, vh = torch.linalg.svd(x.double(), full_matrices=False)
        return u.float(), s.float(), vh.float()


def iso_c(taus: list[torch.Tensor]) -> torch.Tensor:
    """Iso-C: the sum's singular values all replaced by their mean."""

    u, s, vh = svd(sum(taus))
    return s.mean() * (u @ vh)


def iso_cts(taus: list[torch.Tensor], common_space_fraction: float = 0.8) -> torch.Tensor:
    """Iso-CTS: the sum's top common directions plus each task's top directions outside the common left subspace,
    polar factors of the concatenations, every singular value the mean."""
    import torch

    m, n = taus[0].shape
    r, t = min(m, n), len(taus)
    common = int(r * common_space_fraction)
    d = round((r - common) / t)
    common = r - d * t
    u, s, vh = svd(sum(taus))
    uc, sc, vc = u[:, :common], s[:common], vh[:common]
    cat_u, cat_s, cat_v = [], [], []
    for tau in taus:
        w = tau - uc @ (uc.T @ tau)
        ut, st, vt = svd(w)
        cat_u.append(ut[:, :d])
        cat_s.append(st[:d])
        cat_v.append(vt[:d])
    u_cat, s_cat, v_cat = torch.cat([*cat_u, uc], 1), torch.cat([*cat_s, sc]), torch.cat([*cat_v, vc], 0)
    pu, _, qu = svd(u_cat)
    pv, _, qv = svd(v_cat)
    return s_cat.mean() * ((pu @ qu) @ (pv @ qv))


def star(taus: list[torch.Tensor], eta: float = 40.0) -> torch.Tensor:
    """STAR: each task truncated to the rank that holds eta % of its nuclear norm, rescaled to keep the norm; mean."""
    import torch

    out = torch.zeros_like(taus[0])
    for tau in taus:
        u, s, vh = svd(tau)
        r = min(int(torch.searchsorted(torch.cumsum(s, 0), s.sum() * eta / 100.0)) + 1, s.numel())
        kept = s[:r] * (s.sum() / s[:r].sum())
        out += u[:, :r] @ (kept[:, None] * vh[:r])
    return out / len(taus)


METHODS = {"tsv_m": tsv_m, "iso_c": iso_c, "iso_cts": iso_cts, "star": star}


def merge(method: str, base: Path, finetunes: list[Path], out: Path, alpha: float = 1.0) -> None:
    """``method`` applied tensor by tensor as a user script does: every task vector of a tensor in float32, the 2-D
    ones merged by ``METHODS[method]``, the rest averaged; the merged model (bf16) written once."""
    import torch
    from safetensors import safe_open
    from safetensors.torch import save_file

    fn = METHODS[method]
    handles: dict[Path, object] = {}

    def get(name: str, files: dict[str, Path]) -> torch.Tensor:
        f = files[name]
        if f not in handles:
            handles[f] = safe_open(str(f), framework="pt")
        return handles[f].get_tensor(name).float()

    base_files = tensor_files(base)
    ft_files = [tensor_files(m) for m in finetunes]
    merged: dict[str, torch.Tensor] = {}
    with torch.inference_mode():
        for name in base_files:
            theta0 = get(name, base_files)
            taus = [get(name, ff) - theta0 for ff in ft_files]
            tau_m = fn(taus) if theta0.ndim == 2 else sum(taus) / len(taus)
            del taus
            merged[name] = (theta0 + alpha * tau_m).to(torch.bfloat16)
    out.mkdir(parents=True, exist_ok=True)
    save_file(merged, str(out / "model.safetensors"), metadata={"format": "pt"})


def main() -> int:
    import torch

    args = sys.argv[1:]
    threads = os.cpu_count() or 1
    if "--threads" in args:
        i = args.index("--threads")
        threads = int(args[i + 1])
        del args[i:i + 2]
    torch.set_num_threads(threads)
    method, out, base, *fts = args
    merge(method, Path(base), [Path(f) for f in fts], Path(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
