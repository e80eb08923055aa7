"""``ferromerge demo``: make a small family of Llama-shaped models, TIES-merge them, and show what happened."""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from ._run import RunReport, run
from .errors import OutputError
from .models.index import read_tensors
from .synth import make_family

MARKER = ".ferromerge-demo"

FINETUNES = [(1.0, 0.5), (0.5, 0.5), (0.5, 0.7)]  # (weight, density) per fine-tune


@dataclass(frozen=True)
class TensorCheck:
    """Merged vs base for one tensor: L2 norm of the merged delta, mean norm of the fine-tunes' deltas, and whether
    every merged delta element lies within the fine-tunes' deltas (TIES's disjoint mean is a convex combination)."""

    name: str
    merged_delta: float
    finetune_delta: float
    bounded: bool


def _prepare(out: Path) -> None:
    if out.exists() and any(out.iterdir()) and not (out / MARKER).exists():
        raise OutputError(f"{out} exists and was not made by `ferromerge demo`; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).touch()
    shutil.rmtree(out / "models", ignore_errors=True)


def _config(base: Path, finetunes: list[Path]) -> dict[str, object]:
    return {
        "merge_method": "ties",
        "base_model": str(base),
        "models": [
            {"model": str(ft), "parameters": {"weight": w, "density": d}}
            for ft, (w, d) in zip(finetunes, FINETUNES, strict=False)
        ],
        "parameters": {"normalize": True},
    }


def check(base: Path, finetunes: list[Path], merged: Path) -> list[TensorCheck]:
    """Compare the merged model with the base and fine-tunes, tensor by tensor (small models only)."""
    b = read_tensors(base / "model.safetensors")
    fts = [read_tensors(f / "model.safetensors") for f in finetunes]
    m = read_tensors(merged / "model.safetensors")
    out = []
    for name, x in b.items():
        deltas = np.stack([ft[name] - x for ft in fts])
        merged_delta = m[name] - x
        # bf16 output: allow one rounding step (2**-8 relative) of the merged value
        slack = np.abs(m[name]) * 2.0**-8 + 1e-12
        bounded = bool(np.all(np.abs(merged_delta) <= np.abs(deltas).max(axis=0) + slack))
        out.append(
            TensorCheck(
                name,
                float(np.linalg.norm(merged_delta)),
                float(np.mean([np.linalg.norm(d) for d in deltas])),
                bounded and bool(np.all(np.isfinite(m[name]))),
            )
        )
    return out


def run_demo(out: str | Path = "ferromerge-demo", *, quiet: bool = False) -> tuple[RunReport, list[TensorCheck]]:
    """Generate the models into ``out/models``, write ``out/ties.yml``, merge into ``out/merged``; print a report."""
    out = Path(out).absolute()
    _prepare(out)
    # big enough to take a moment and show a rate, small enough for seconds on a laptop (~10 MB per model in bf16)
    family = make_family(
        out / "models",
        n_finetunes=len(FINETUNES),
        hidden=256,
        intermediate=688,
        layers=4,
        vocab=4096,
        heads=8,
        kv_heads=4,
    )
    config = _config(family.base, family.finetunes)
    config_path = out / "ties.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    report = run(config_path, out / "merged", overwrite=True, quiet=quiet)
    checks = check(family.base, family.finetunes, report.out_dir)
    if not quiet:
        _print(out, family.base, family.finetunes, config_path, report, checks)
    return report, checks


def _print(
    out: Path, base: Path, finetunes: list[Path], config_path: Path, report: RunReport, checks: list[TensorCheck]
) -> None:
    size = sum(f.stat().st_size for f in base.glob("*.safetensors"))
    print(f"models ({len(finetunes) + 1} Llama-shaped, bf16, {size / 1e6:.1f} MB each, in {out / 'models'}):")
    print(f"  base: {base}")
    for ft in finetunes:
        print(f"  fine-tune: {ft}  (base + N(0, 0.01^2) noise)")
    print(f"config ({config_path}):")
    print("  " + config_path.read_text(encoding="utf-8").rstrip().replace("\n", "\n  "))
    print(f"merged into {report.out_dir}:")
    print(
        f"  {report.tensors} tensors, read {report.bytes_read / 1e6:.1f} MB, wrote {report.bytes_written / 1e6:.1f} MB "
        f"in {report.seconds:.2f} s ({report.gb_per_s:.2f} GB/s read)"
    )
    print("sanity check (L2 norms of deltas from the base):")
    print(f"  {'tensor':<45} {'merged':>9} {'fine-tunes (mean)':>18}  within fine-tune deltas")
    shown = [c for c in checks if ".layers." not in c.name or ".layers.0." in c.name]
    for c in shown:
        print(f"  {c.name:<45} {c.merged_delta:>9.4f} {c.finetune_delta:>18.4f}  {'yes' if c.bounded else 'NO'}")
    if len(shown) < len(checks):
        print(f"  ... ({len(checks) - len(shown)} more tensors of layers 1+)")
    bad = [c.name for c in checks if not c.bounded]
    verdict = "all tensors finite and within the fine-tunes' deltas" if not bad else f"FAILED for: {', '.join(bad)}"
    print(f"  {verdict}")
