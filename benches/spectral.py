"""Spectral merges of one 8B-shaped layer: ferromerge (``ferromerge run``, the defaults on the checked-out build)
against the reference torch implementations (benches/spectral_peer.py, run by the mergekit virtualenv's torch) on
the same CPU, same threads, fresh process each, reporting wall and CPU time, peak RSS and how far the outputs are
apart.

    python benches/spectral.py [--methods tsv_m iso_c iso_cts star] [--threads 2] [--reps 1] [--dir DIR]
                               [--json OUT]

The family (made once under ``--dir``, default /work/benchdata/layer8b): Llama-3-8B's layer shapes (hidden 4096,
MLP 14336, 32 heads, 8 KV heads of 128: q, o 4096x4096, k, v 1024x4096, gate, up 14336x4096, down 4096x14336), one
decoder layer, with a 1024-token vocabulary (embeddings and lm_head 1024x4096, small next to the layer), base + 3
fine-tunes (base + N(0, 0.002^2) per element), bf16, by ``ferromerge.synth.make_family``. Threads: ferromerge
``--threads N``; torch ``torch.set_num_threads(N)``; both get OMP/MKL/OpenBLAS/RAYON_NUM_THREADS=N and
OMP_WAIT_POLICY=PASSIVE (benches/svd.py's ``thread_env``). Peak RSS is the child's own (``/usr/bin/time``). Runs
are interleaved (ferromerge, peer, ferromerge, ...) so background load hits both alike; the table gives medians.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import MERGEKIT_PY  # noqa: E402
from methods import install_kill_switch, loadavg, machine_line, timed  # noqa: E402
from svd import agreement, git_head, thread_env  # noqa: E402

SHAPE = dict(hidden=4096, intermediate=14336, layers=1, vocab=1024, heads=32, kv_heads=8)
QUICK = dict(hidden=256, intermediate=896, layers=1, vocab=128, heads=8, kv_heads=2)  # --quick: a smoke run


def family(root: Path, shape: dict) -> tuple[Path, list[Path]]:
    if not (root / "COMPLETE").exists():
        from ferromerge.synth import make_family

        shutil.rmtree(root, ignore_errors=True)
        print(f"making the 8B-shaped layer family in {root} ...", flush=True)
        make_family(root, n_finetunes=3, dtype="bfloat16", seed=0, delta_scale=0.002, **shape)
        (root / "COMPLETE").write_text("ok\n")
    return root / "base", [root / f"ft{i}" for i in (1, 2, 3)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--methods", nargs="+", default=["tsv_m"], choices=["tsv_m", "iso_c", "iso_cts", "star"])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--dir", type=Path, default=Path("/work/benchdata/layer8b"))
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--quick", action="store_true", help="a small layer (hidden 256) in DIR-quick: a smoke run")
    ap.add_argument("--only", choices=["ferromerge", "torch reference"], default=None,
                    help="run one tool (no output comparison): to time a side whose other run was already taken")
    a = ap.parse_args()
    shape = QUICK if a.quick else SHAPE
    if a.quick:
        a.dir = a.dir.with_name(a.dir.name + "-quick")
    base, fts = family(a.dir, shape)
    work = a.dir / "runs"
    work.mkdir(exist_ok=True)
    install_kill_switch(work / "child.pgid")
    env = thread_env(a.threads)
    peer_env = {k: v for k, v in env.items() if k != "PYTHONPATH"}
    peer_py = str(MERGEKIT_PY) if MERGEKIT_PY.exists() else sys.executable
    res = dict(machine=machine_line(), git=git_head(), threads=a.threads, shape=shape, load_start=loadavg(),
               started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), methods={})
    for method in a.methods:
        cfg = work / f"{method}.yml"
        cfg.write_text(f"merge_method: {method}\nbase_model: {base}\nmodels:\n"
                       + "".join(f"  - model: {f}\n" for f in fts) + "dtype: bfloat16\n")
        tools = {
            "ferromerge": lambda out, cfg=cfg: ([sys.executable, "-m", "ferromerge.cli", "run", str(cfg), str(out),
                                                 "--threads", str(a.threads), "--quiet"], env),
            "torch reference": lambda out, method=method: ([peer_py, str(HERE / "spectral_peer.py"), method, str(out), str(base),
                                                           *map(str, fts), "--threads", str(a.threads)], peer_env),
        }
        if a.only:
            tools = {a.only: tools[a.only]}
        runs: dict[str, list[dict]] = {t: [] for t in tools}
        outs: dict[str, Path] = {}
        for rep in range(a.reps):
            for tool, make_cmd in tools.items():
                out = work / f"out-{method}-{tool.split()[0]}-{rep}"
                shutil.rmtree(out, ignore_errors=True)
                cmd, e = make_cmd(out)
                print(f"{method} {tool} run {rep + 1} ...", end=" ", flush=True)
                r = timed(cmd, e, work / f"{method}-{tool.split()[0]}-{rep}.log")
                print(f"{r['wall']:.1f} s, CPU {r['cpu']:.1f} s, {r['peak_rss'] / 1e9:.2f} GB, exit {r['rc']}, load "
                      f"{r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}", flush=True)
                runs[tool].append(r)
                if r["rc"] == 0 and tool not in outs:
                    outs[tool] = out
                elif out not in outs.values():
                    shutil.rmtree(out, ignore_errors=True)
        check = agreement(outs["ferromerge"], outs["torch reference"], base) if len(outs) == 2 else None
        for o in outs.values():
            shutil.rmtree(o, ignore_errors=True)
        res["methods"][method] = dict(runs=runs, check=check)
        res["load_end"] = loadavg()
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
    print(table(res))
    return 0


def table(res: dict) -> str:
    lines = [f"{res['machine']}; one layer of shape {res['shape']}, base + 3, bf16; "
             f"threads {res['threads']}; ferromerge at {res['git']}; {res['started']}; load {res['load_start']} -> "
             f"{res.get('load_end')}", "",
             "| method | tool | wall s (median) | runs | CPU s | peak RSS GB | reference ÷ ferromerge | "
             "max abs diff (2-D) | rel. diff of the update (2-D, median / max) | identical / within 1 bf16 step | "
             "load at starts |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for method, m in res["methods"].items():
        med = {t: statistics.median(r["wall"] for r in rs if r["rc"] == 0) for t, rs in m["runs"].items()
               if any(r["rc"] == 0 for r in rs)}
        c = m["check"] or {}
        two = c.get("2-D", {})
        for tool, rs in m["runs"].items():
            ok = [r for r in rs if r["rc"] == 0]
            if not ok:
                lines.append(f"| {method} | {tool} | failed (exit {rs[0]['rc']}) | | | | | | | | |")
                continue
            ratio = (f"{med['torch reference'] / med['ferromerge']:.2f}×" if tool == "ferromerge" and len(med) == 2
                     else "")
            diff = (f"{two.get('max_abs', 0):.1e} | {two.get('rel_median', 0):.1e} / {two.get('rel_max', 0):.1e} | "
                    f"{100 * c['identical']:.2f}% / {100 * c['within_bf16_step']:.2f}%") if tool == "ferromerge" and c \
                else " | | "
            lines.append(f"| {method} | {tool} | {med[tool]:.1f} | {len(ok)} | "
                         f"{statistics.median(r['cpu'] for r in ok):.1f} | {max(r['peak_rss'] for r in ok) / 1e9:.2f} | "
                         f"{ratio} | {diff} | " + " / ".join(f"{r['load_before'][0]:.1f}" for r in ok) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
