"""``ferromerge plan``'s time estimate against the run, for the spectral methods (TSV-M, Iso-C, Iso-CTS, STAR) on
one decoder layer: the estimate (``ferromerge._plan.estimate.estimate``, as ``plan`` prints it; its SVD share
apart) next to ``ferromerge run`` of the same config in a fresh process, same threads.

    python benches/spectral_estimate.py [--methods tsv_m iso_c iso_cts star] [--threads 1] [--scale 4]
                                        [--dir DIR] [--json OUT]

The layer is benches/spectral.py's 8B-shaped one divided by ``--scale`` (4: hidden 1024, MLP 3584, 8 heads, 2 KV
heads of 128; 8: hidden 512, MLP 1792), base + 3 fine-tunes, bf16, made once under ``--dir``.

Clock: with ``--cpu-clock`` (the default) both sides are CPU time: the estimate's calibrations (the compute rate,
the read rate, the spectral factorizations' rate) are timed by this process's CPU time instead of the wall clock,
and the run by its child's user + system time. On a machine shared with other jobs the wall clock measures them
as much as the merge; at one thread the CPU time is the merge's own work. ``--wall-clock`` compares what ``plan``
itself prints (wall-clock calibration) with the run's wall time, which is right on an idle machine.

The start-up share of the estimate is what ``ferromerge plan`` measured of itself in a fresh process (its
interpreter start-up, imports and planning, CPU time). A control run (the same family, every tensor only averaged) gives the process's fixed cost (interpreter start-up,
imports, planning, streaming), which the estimate does not model: "SVD run s" is the run less the control, the
share the estimate's "SVD s" predicts.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import sys
import time
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from methods import loadavg, machine_line, timed  # noqa: E402
from spectral import SHAPE, family  # noqa: E402
from svd import git_head, thread_env  # noqa: E402


def scaled(scale: int) -> dict:
    """benches/spectral.py's layer with hidden, MLP and heads divided by ``scale`` (head dim 128 kept)."""
    return dict(SHAPE, hidden=SHAPE["hidden"] // scale, intermediate=SHAPE["intermediate"] // scale,
                heads=SHAPE["heads"] // scale, kv_heads=max(1, SHAPE["kv_heads"] // scale))


def predicted(cfg: Path, threads: int, cpu_clock: bool, env: dict[str, str]) -> dict:
    """``plan``'s estimate of ``cfg`` at ``threads``: total, SVD and start-up seconds. The start-up share is what the
    plan command itself measures in a fresh process (``ferromerge plan --json``); the rest is computed here, with
    the calibrations on this process's CPU clock when ``cpu_clock``."""
    import subprocess

    from ferromerge._plan import estimate as est
    from ferromerge._run import prepare

    printed = subprocess.run([sys.executable, "-m", "ferromerge.cli", "plan", str(cfg), "--json", "--threads",
                              str(threads)], env=env, capture_output=True, text=True, check=True)
    summary = json.loads(printed.stdout)["summary"]
    _, plan = prepare(cfg)
    if cpu_clock:
        # the estimate module's calibrations read time.perf_counter(): give them this process's CPU time
        saved = est.time
        est.time = types.SimpleNamespace(perf_counter=time.process_time)  # type: ignore[assignment]
    try:
        e = est.estimate(plan, cfg.parent / "out-estimate", threads=threads,
                         startup_seconds=summary["startup_seconds"])
    finally:
        if cpu_clock:
            est.time = saved
    return dict(seconds=e.seconds, factor_seconds=e.factor_seconds, startup_seconds=e.startup_seconds,
                printed_seconds=summary["seconds"], working_bytes=e.working_bytes)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["tsv_m", "iso_c", "iso_cts", "star"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--scale", type=int, default=4, help="divide the 8B layer's hidden/MLP/heads by this")
    ap.add_argument("--dir", type=Path, default=Path("/work/benchdata/layer8b"))
    ap.add_argument("--json", type=Path)
    clock = ap.add_mutually_exclusive_group()
    clock.add_argument("--cpu-clock", dest="cpu", action="store_true", default=True)
    clock.add_argument("--wall-clock", dest="cpu", action="store_false")
    a = ap.parse_args()
    shape = scaled(a.scale)
    root = a.dir.with_name(f"{a.dir.name}-div{a.scale}")
    base, fts = family(root, shape)
    work = root / "estimate"
    work.mkdir(exist_ok=True)
    env = thread_env(a.threads)
    res = dict(machine=machine_line(), git=git_head(), threads=a.threads, shape=shape, clock="cpu" if a.cpu else "wall",
               load_start=loadavg(), started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               methods={})
    def run(cfg: Path, tag: str) -> dict:
        out = work / f"out-{tag}"
        shutil.rmtree(out, ignore_errors=True)
        r = timed([sys.executable, "-m", "ferromerge.cli", "run", str(cfg), str(out), "--threads", str(a.threads),
                   "--quiet"], env, work / f"{tag}.log")
        shutil.rmtree(out, ignore_errors=True)
        r["actual"] = r["cpu"] if a.cpu else r["wall"]
        return r

    # the control: the same merge with every tensor only averaged (``exclude: "."``), i.e. the process's start-up,
    # planning and streaming without any factorization; run - control is the factorizations' share
    control_cfg = work / "control.yml"
    control_cfg.write_text(f"merge_method: tsv_m\nbase_model: {base}\nmodels:\n"
                           + "".join(f"  - model: {f}\n" for f in fts) + "dtype: bfloat16\nparameters:\n  exclude: \".\"\n")
    control = run(control_cfg, "control")
    res["control"] = control
    print(f"control (only averaged): {control['actual']:.2f} s", flush=True)
    print(f"{'method':8} {'plan s':>8} {'(SVD s)':>8} {'(start s)':>9} {'run s':>8} {'plan/run':>9} {'SVD run s':>10} {'SVD plan/run':>13}"
          "  load", flush=True)
    for method in a.methods:
        cfg = work / f"{method}.yml"
        cfg.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
                       + "".join(f"  - model: {f}\n" for f in fts) + "dtype: bfloat16\n")
        plan = predicted(cfg, a.threads, a.cpu, env)
        r = run(cfg, method)
        ratio = plan["seconds"] / r["actual"] if r["actual"] else float("nan")
        svd = r["actual"] - control["actual"]
        svd_ratio = plan["factor_seconds"] / svd if svd > 0 else float("nan")
        print(f"{method:8} {plan['seconds']:8.2f} {plan['factor_seconds']:8.2f} {plan['startup_seconds']:9.2f} "
              f"{r['actual']:8.2f} {ratio:9.2f} "
              f"{svd:10.2f} {svd_ratio:13.2f}  {r['load_before'][0]:.1f}->{r['load_after'][0]:.1f} (exit {r['rc']}, "
              f"wall {r['wall']:.1f} s)", flush=True)
        res["methods"][method] = dict(plan=plan, run=r, ratio=ratio, svd_ratio=svd_ratio)
    res["load_end"] = loadavg()
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
