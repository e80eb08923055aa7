"""Warm and cold A/B timing of two ferromerge installs on the read path (the synthetic family of
scripts/ab_speed.sh), alternating runs so drift in the machine's load hits both alike, with a byte comparison.

    python benches/reads.py OLD_FERROMERGE NEW_FERROMERGE [--methods linear ties] [--reps 3] [--threads 2]

Cold runs drop the page cache first (``sync; echo 3 > /proc/sys/vm/drop_caches``: needs root; skipped otherwise).
Prints one line per run (wall, user, system seconds of the child) and the median per method, side and cache state.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path


def _family(work: Path, python: str) -> None:
    if (work / "base").is_dir():
        return
    subprocess.run(
        [python, "-c", "from ferromerge.synth import make_family; import sys; make_family(sys.argv[1], n_finetunes=3, "
         "hidden=1024, intermediate=2816, layers=6, vocab=8192, dtype='bfloat16', seed=1)", str(work)],
        check=True,
    )


def _config(work: Path, method: str) -> Path:
    lines = [] if method == "linear" else [f"base_model: {work}/base"]
    lines += [f"merge_method: {method}", "models:"]
    for i in (1, 2, 3):
        params = "{weight: 1.0}" if method == "linear" else "{weight: 1.0, density: 0.5}"
        lines.append(f"  - {{model: {work}/ft{i}, parameters: {params}}}")
    path = work / f"{method}.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _drop_caches() -> bool:
    if os.geteuid() != 0:
        return False
    os.sync()
    Path("/proc/sys/vm/drop_caches").write_text("3\n")
    return True


def _run(exe: str, config: Path, out: Path, threads: int) -> tuple[float, float, float]:
    shutil.rmtree(out, ignore_errors=True)
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    subprocess.run([exe, "run", str(config), str(out), "--quiet", "--threads", str(threads)], check=True)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, after.ru_utime - before.ru_utime, after.ru_stime - before.ru_stime


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("old")
    ap.add_argument("new")
    ap.add_argument("--methods", nargs="+", default=["linear", "ties"])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default="/tmp/ferromerge-ab")
    a = ap.parse_args()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    _family(work, str(Path(a.new).parent / "python"))
    print(f"load average {os.getloadavg()}", flush=True)
    results: dict[tuple[str, str, str], list[float]] = {}
    for method in a.methods:
        config = _config(work, method)
        for state in ("warm", "cold"):
            for rep in range(a.reps):
                outs = {}
                for side, exe in (("old", a.old), ("new", a.new)):
                    if state == "cold" and not _drop_caches():
                        continue
                    if state == "warm":
                        _run(exe, config, work / f"out-{side}", a.threads)  # warm the page cache
                    wall, user, sys_ = _run(exe, config, work / f"out-{side}", a.threads)
                    results.setdefault((method, state, side), []).append(wall)
                    outs[side] = (work / f"out-{side}" / "model.safetensors").read_bytes()
                    print(f"{method:10} {state} {side} rep {rep + 1}: {wall:.2f} s wall, {user:.2f} user, {sys_:.2f} sys",
                          flush=True)
                if len(outs) == 2:
                    print("  same bytes" if outs["old"] == outs["new"] else "  BYTES DIFFER", flush=True)
    for (method, state, side), walls in sorted(results.items()):
        print(f"median {method:10} {state} {side}: {statistics.median(walls):.2f} s")
    print(f"load average {os.getloadavg()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
