"""Time to a durable output: each tool's run followed by ``sync``, warm inputs, one fresh process per run.

ferromerge writes its output with direct I/O and fsyncs every shard before it reports it done (the resume journal
relies on it); mergekit 0.1.5 leaves its output in the page cache for the kernel to write back later. For a merge
that computes little (passthrough, nearswap, the SLERP family) the disk write is most of ferromerge's time, and a
wall-clock ratio compares a durable write with one that has not happened yet. This script times both tools until
their output is on disk: the run, then ``sync`` (which returns once every dirty page is written), counted together.

    python benches/durable.py --family DIR [--methods passthrough nearswap ...] [--threads 2] [--out DIR]

Configs, thread settings and the way each tool is started are benches/methods.py's (same YAML, ``--threads N`` /
``-j N`` and the same thread environment), so the figures sit beside its table. Each method runs ferromerge, then
mergekit, in one invocation; the machine's load is recorded before and after each run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import methods  # noqa: E402  (the sibling benchmark: configs, warm-up, how each tool is run)


def sync_seconds() -> float:
    t = time.perf_counter()
    subprocess.run(["sync"], check=True)
    return time.perf_counter() - t


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", type=Path, required=True)
    ap.add_argument("--methods", nargs="+", default=["passthrough", "nearswap", "nuslerp", "slerp"],
                    choices=methods.METHODS)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=HERE.parent / ".bench" / "durable")
    a = ap.parse_args()
    out = a.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cfgs = methods.configs(a.family.resolve())
    rows = []
    print(f"{methods.machine_line()}; threads {a.threads}; started "
          f"{datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}", flush=True)
    print("| method | tool | run s | sync after s | to durable s | load before → after |")
    print("|---|---|---|---|---|---|")
    for method in a.methods:
        cfg = cfgs[method]
        cfg_path = out / f"{method}.yml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        for tool in ("ferromerge", "mergekit"):
            o = out / f"out-{tool}"
            shutil.rmtree(o, ignore_errors=True)
            methods.prepare("warm", cfg)
            sync_seconds()  # nothing of an earlier run left to write
            r = methods.run_tool(tool, cfg_path, o, a.threads, out / f"{method}-{tool}.log")
            s = sync_seconds()
            row = {"method": method, "tool": tool, "rc": r["rc"], "run": r["wall"], "sync": s,
                   "durable": r["wall"] + s, "load_before": r["load_before"], "load_after": r["load_after"]}
            rows.append(row)
            shutil.rmtree(o, ignore_errors=True)
            bad = "" if r["rc"] == 0 else f" (exit {r['rc']})"
            print(f"| {method} | {tool}{bad} | {r['wall']:.2f} | {s:.2f} | {r['wall'] + s:.2f} | "
                  f"{r['load_before'][0]:.2f} → {r['load_after'][0]:.2f} |", flush=True)
    (out / "durable.json").write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
