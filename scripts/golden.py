#!/usr/bin/env python
"""Fingerprints of what ferromerge does on a fixed set of configs: the plan JSON and the bytes of every output file.

A refactor that claims "behaviour does not change" runs this before and after and compares the two files:

    python scripts/golden.py /tmp/golden-before.json      # with the old build installed
    python scripts/golden.py /tmp/golden-after.json       # with the new one
    python scripts/golden.py --compare /tmp/golden-before.json /tmp/golden-after.json

The family and every config are written under a fixed directory (``--work``, default /tmp/ferromerge-golden), so
the model paths are the same in both runs (they are also masked out of text outputs before hashing). Every method of the registry runs (with
parameters that exercise its options), plus slices (a frankenmerge), ``modules``-free per-layer gradients, a
vocabulary union, a dtype cast, several output shards and bf16/f16 families.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

T_GRADIENT = [{"filter": "self_attn", "value": [0, 1]}, {"filter": "mlp", "value": [1, 0]}, {"value": 0.3}]


def _models(fam: dict[str, Any], idx: list[int], params: list[dict[str, Any]] | None = None) -> list[dict[str, Any]]:
    out = []
    for k, i in enumerate(idx):
        entry: dict[str, Any] = {"model": fam["finetunes"][i]}
        if params is not None:
            entry["parameters"] = params[k]
        out.append(entry)
    return out


def configs(fam: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Config name -> mergekit config, over a family of a base and three fine-tunes."""
    b = fam["base"]
    three = _models(fam, [0, 1, 2])
    wd = [{"weight": 1.0, "density": 0.5}, {"weight": 0.5, "density": [0.3, 0.9]}, {"weight": 0.7, "density": 0.8}]
    c: dict[str, dict[str, Any]] = {
        "linear": {"models": _models(fam, [0, 1, 2], [{"weight": 1.0}, {"weight": 0.5}, {"weight": 0.25}])},
        "linear_nonorm": {
            "models": _models(fam, [0, 1], [{"weight": 0.6}, {"weight": 0.6}]),
            "parameters": {"normalize": False},
            "dtype": "float16",
        },
        "task_arithmetic": {
            "base_model": b,
            "models": _models(fam, [0, 1, 2], [{"weight": 1.0}, {"weight": [0.2, 0.9]}, {"weight": 0.7}]),
            "parameters": {"lambda": 0.8},
        },
        # an error is part of the behaviour too: its message must not change either
        "task_arithmetic_density": {"base_model": b, "models": _models(fam, [0, 1, 2], wd)},
        "ties": {"base_model": b, "models": _models(fam, [0, 1, 2], wd), "dtype": "bfloat16"},
        "ties_nonorm": {"base_model": b, "models": _models(fam, [0, 1], wd[:2]), "parameters": {"normalize": False}},
        "dare_ties": {"base_model": b, "models": _models(fam, [0, 1, 2], wd), "parameters": {"rescale": True}},
        "dare_linear": {"base_model": b, "models": _models(fam, [0, 1], wd[:2])},
        "breadcrumbs": {
            "base_model": b,
            "models": _models(fam, [0, 1], [{"weight": 1.0, "density": 0.5, "gamma": 0.05}, {"weight": 0.5, "density": 0.7}]),
            "parameters": {"per_row": True},
        },
        "breadcrumbs_ties": {"base_model": b, "models": three, "parameters": {"weight": 1.0, "density": [0.3, 0.9]}},
        "della": {
            "base_model": b,
            "models": _models(fam, [0, 1, 2], [{"weight": 1.0, "epsilon": 0.1}, {"weight": 0.5, "epsilon": 0.2}, {"weight": 0.5}]),
            "parameters": {"density": 0.5, "lambda": 0.9},
        },
        "della_linear": {
            "base_model": b,
            "models": _models(fam, [0, 1]),
            "parameters": {"weight": 0.5, "density": 0.6, "rescale_mode": "inverse_density"},
        },
        "slerp": {"base_model": b, "models": _models(fam, [0]), "parameters": {"t": T_GRADIENT}},
        "nearswap": {"base_model": b, "models": _models(fam, [1]), "parameters": {"t": 0.005}},
        "nuslerp": {"models": _models(fam, [0, 1], [{"weight": 1.0}, {"weight": 3.0}])},
        "nuslerp_base": {
            "base_model": b,
            "models": _models(fam, [2, 0], [{"weight": 1.0}, {"weight": 2.0}]),
            "parameters": {"nuslerp_flatten": False, "nuslerp_row_wise": True},
        },
        "multislerp": {"models": _models(fam, [0, 1, 2], [{"weight": 1.0}, {"weight": 2.0}, {"weight": 3.0}])},
        "multislerp_base": {
            "base_model": b,
            "models": _models(fam, [0, 1], [{"weight": 0.25}, {"weight": 0.75}]),
            "parameters": {"normalize_weights": False, "eps": 1e-6},
        },
        "karcher": {"base_model": b, "models": three, "parameters": {"max_iter": 5, "tol": 1e-6}},
        "model_stock": {"base_model": b, "models": three, "parameters": {"filter_wise": True}},
        "model_stock_plain": {"base_model": b, "models": three},
        "sce": {"base_model": b, "models": three, "parameters": {"select_topk": 0.6}},
        "ram": {"base_model": b, "models": three, "parameters": {"epsilon": 0.01}},
        "ramplus_tl": {"base_model": b, "models": three, "parameters": {"epsilon": 0.012, "r": 0.3, "alpha": 0.5}},
        "arcee_fusion": {"base_model": b, "models": _models(fam, [2])},
        "tsv_m": {"base_model": b, "models": three, "parameters": {"exact_svd": True}},
        "tsv_m_random": {"base_model": b, "models": three},
        "iso_c": {"base_model": b, "models": three},
        "iso_cts": {"base_model": b, "models": three, "parameters": {"common_space_fraction": 0.5}},
        "star": {"base_model": b, "models": three, "parameters": {"eta": 20}},
        "consensus": {"base_model": b, "models": three},
        "tall_masks": {"base_model": b, "models": three, "parameters": {"task": 1, "tall_mask_lambda": 0.6}},
        "tall_masks_no_task": {"base_model": b, "models": three},
        "passthrough_slices": {
            "slices": [
                {"sources": [{"model": fam["finetunes"][0], "layer_range": [0, 2]}]},
                {"sources": [{"model": fam["finetunes"][1], "layer_range": [1, 3]}]},
            ],
        },
        "ties_slices": {
            "base_model": b,
            "slices": [
                {"sources": [{"model": b, "layer_range": [0, 2]},
                             {"model": fam["finetunes"][0], "layer_range": [0, 2], "parameters": {"weight": 0.5, "density": 0.5}},
                             {"model": fam["finetunes"][1], "layer_range": [0, 2], "parameters": {"weight": 0.5, "density": 0.7}}]},
            ],
        },
        "linear_union_vocab": {
            "models": _models(fam, [0, 1], [{"weight": 1.0}, {"weight": 1.0}]),
            "tokenizer_source": "union",
        },
        "ties_base_vocab": {"base_model": b, "models": _models(fam, [0, 1], wd[:2]), "tokenizer_source": "base"},
    }
    method_of = {
        "linear_nonorm": "linear", "ties_nonorm": "ties", "nuslerp_base": "nuslerp", "multislerp_base": "multislerp",
        "model_stock_plain": "model_stock", "tsv_m_random": "tsv_m", "passthrough_slices": "passthrough",
        "ties_slices": "ties", "linear_union_vocab": "linear", "ties_base_vocab": "ties",
        "task_arithmetic_density": "task_arithmetic", "tall_masks_no_task": "tall_masks",
    }
    for name, cfg in c.items():
        cfg["merge_method"] = method_of.get(name, name)
    return c


# Text outputs (plan JSON, saved configs, the model card) carry the absolute paths of the models: those are
# replaced by a placeholder before hashing, so runs under different --work directories compare equal.
_TEXT = {".json", ".yml", ".yaml", ".md", ".txt", ".jinja"}


def _sha(data: bytes, work: Path) -> str:
    return hashlib.sha256(data.replace(str(work).encode(), b"<WORK>")).hexdigest()


# What `plan --json` measures on the machine at the time (free disk, probed read and compute rates, the time that
# follows from them, whether the file was cached) differs from run to run; everything else must not.
_MEASURED = ("disk_free", "compute_rate", "read_rate", "read_cached", "seconds", "bound_by")


def _stable_plan(stdout: str) -> str:
    plan = json.loads(stdout)
    for key in _MEASURED:
        plan.get("summary", {}).pop(key, None)
    return json.dumps(plan, sort_keys=True)


def fingerprint(work: Path, ferromerge: str) -> dict[str, Any]:
    from ferromerge.synth import make_family

    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    result: dict[str, Any] = {}
    for dtype in ("bfloat16", "float32"):
        fam_obj = make_family(work / f"family-{dtype}", n_finetunes=3, layers=3, dtype=dtype, seed=7,
                              shard_size=200_000 if dtype == "float32" else None)
        fam = {"base": str(fam_obj.base), "finetunes": [str(p) for p in fam_obj.finetunes]}
        for name, cfg in configs(fam).items():
            key = f"{dtype}/{name}"
            cfg_path = work / f"{dtype}-{name}.yml"
            cfg_path.write_text(yaml.safe_dump(cfg))
            out = work / f"out-{dtype}-{name}"
            args = ["--seed", "3", "--out-shard-size", "300K", "--threads", "2"]
            plan = subprocess.run([ferromerge, "plan", str(cfg_path), str(out), "--json", *args],
                                  capture_output=True, text=True)
            run = subprocess.run([ferromerge, "run", str(cfg_path), str(out), "--quiet", *args],
                                 capture_output=True, text=True)
            entry: dict[str, Any] = {"plan_rc": plan.returncode, "run_rc": run.returncode}
            if plan.returncode == 0:
                entry["plan"] = _sha(_stable_plan(plan.stdout).encode(), work)
                (work / f"plan-{dtype}-{name}.json").write_text(plan.stdout)
            else:
                entry["plan_err"] = [ln.replace(str(work), "<WORK>") for ln in plan.stderr.strip().splitlines()[-1:]]
            if run.returncode == 0:
                entry["files"] = {
                    p.name: _sha(p.read_bytes(), work) if p.suffix in _TEXT else _sha(p.read_bytes(), Path("/nonexistent"))
                    for p in sorted(out.iterdir()) if p.is_file()
                }
            else:
                entry["run_err"] = [ln.replace(str(work), "<WORK>") for ln in run.stderr.strip().splitlines()[-1:]]
            result[key] = entry
            print(key, entry["plan_rc"], entry["run_rc"], file=sys.stderr)
    return result


def compare(a: dict[str, Any], b: dict[str, Any]) -> int:
    bad = 0
    for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
            bad += 1
            print(f"DIFFERS {key}:\n  before {json.dumps(a.get(key))}\n  after  {json.dumps(b.get(key))}")
    ok = sum(1 for k in a if k in b and a[k] == b[k])
    print(f"{ok} identical, {bad} different")
    return 1 if bad else 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out", nargs="?", help="where to write the fingerprints (JSON)")
    ap.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--work", default="/tmp/ferromerge-golden")
    ap.add_argument("--ferromerge", default=shutil.which("ferromerge") or "ferromerge")
    args = ap.parse_args()
    if args.compare:
        return compare(*(json.loads(Path(p).read_text()) for p in args.compare))
    if not args.out:
        ap.error("give OUT or --compare BEFORE AFTER")
    Path(args.out).write_text(json.dumps(fingerprint(Path(args.work), args.ferromerge), indent=1, sort_keys=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
