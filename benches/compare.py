"""End-to-end benchmark: TIES on a 1.1B Llama-shaped family (base + 3 fine-tunes, bf16, 8.8 GB in), ferromerge
against mergekit (its own virtualenv, CPU) and a plain-NumPy streaming TIES, cold and warm page cache, next to the
floors this machine sets: reading the inputs once sequentially (cold: from disk; warm: from the page cache).

    python benches/compare.py [--dir DIR] [--skip-mergekit] [--skip-cold] [--cgroup-limit 1GiB] [--json OUT]
                              [--plot docs/benchmarks.png]

Prints one Markdown table (wall, CPU, peak RSS, GB/s, ratios to each peer and to the floors) and checks that the
three outputs agree. With --cgroup-limit, also merges inside a cgroup-v1 memory cgroup of that size and checks the
output is byte-identical to the unlimited run. Cold runs and the cgroup need root (drop_caches, cgroup files).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ferromerge import _engine
from ferromerge.synth import make_family

HERE = Path(__file__).resolve().parent
# TinyLlama-1.1B's shape
SHAPE = dict(hidden=2048, intermediate=5632, layers=22, vocab=32000, heads=32, kv_heads=4)
MODELS = [("ft1", 1.0, 0.5), ("ft2", 0.5, 0.5), ("ft3", 0.5, 0.7)]
MERGEKIT_PY = Path(os.environ.get("FERROMERGE_MERGEKIT_PYTHON", Path.home() / ".cache/ferromerge/mergekit-venv/bin/python"))


@dataclass
class Run:
    tool: str
    cache: str
    wall: float
    cpu: float
    peak_rss: int
    rc: int
    note: str = ""


def family(root: Path) -> tuple[Path, list[Path]]:
    done = root / "COMPLETE"
    if not done.exists():
        shutil.rmtree(root, ignore_errors=True)
        print(f"generating the 1.1B family in {root} ...", flush=True)
        make_family(root, n_finetunes=3, dtype="bfloat16", seed=0, shard_size=2 * 10**9, delta_scale=0.002, **SHAPE)
        done.write_text("ok\n")
    return root / "base", [root / n for n, _, _ in MODELS]


def input_files(models: list[Path]) -> list[Path]:
    return sorted(p for m in models for p in m.glob("*.safetensors"))


def drop_caches() -> None:
    subprocess.run(["sync"], check=True)
    Path("/proc/sys/vm/drop_caches").write_text("3\n")


def read_bandwidth(files: list[Path]) -> tuple[float, int]:
    """Seconds to read every file once, sequentially, 16 MiB at a time; and the bytes read."""
    total, t0 = 0, time.perf_counter()
    buf = bytearray(16 << 20)
    for p in files:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(buf):
                total += n
    return time.perf_counter() - t0, total


def measured(cmd: list[str], *, cgroup: Path | None = None, log: Path) -> tuple[float, float, int, int]:
    """(wall s, CPU s, peak RSS bytes, exit code) of one child process.

    CPU comes from wait4's rusage. Peak RSS does not: Linux carries the forked child's pre-exec high-water mark
    (a copy of this driver) into ru_maxrss. It is the child's own VmHWM instead, read from /proc every 20 ms
    (a high-water mark, reset at exec, so polling only misses growth in the last 20 ms of a run).
    """

    def enter() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")

    def hwm(pid: int) -> int:
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        except OSError:
            pass
        return 0

    with open(log, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=err, stderr=subprocess.STDOUT, preexec_fn=enter)
        peak = 0
        while True:
            pid, status, ru = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            peak = max(peak, hwm(proc.pid))
            time.sleep(0.02)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return wall, ru.ru_utime + ru.ru_stime, peak, proc.returncode


def read_output(out: Path) -> dict[str, np.ndarray]:
    """Every tensor of an output dir as raw uint16 (bf16 bits)."""
    result = {}
    for f in sorted(out.glob("*.safetensors")):
        header = _engine.read_header(str(f))
        raw = f.read_bytes()
        n = int.from_bytes(raw[:8], "little")
        meta = json.loads(raw[8 : 8 + n])
        for name, (dtype, _shape) in header.items():
            a, b = meta[name]["data_offsets"]
            assert dtype == "BF16", (f, name, dtype)
            result[name] = np.frombuffer(raw, np.uint16, (b - a) // 2, 8 + n + a)
    return result


def agreement(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> str:
    """How two bf16 outputs agree: identical elements, elements within one bf16 step, the largest difference."""
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))
    same = close = total = 0
    worst = 0.0
    for k in a:
        x = (a[k].astype(np.uint32) << 16).view(np.float32)
        y = (b[k].astype(np.uint32) << 16).view(np.float32)
        d = np.abs(x - y)
        same += int((a[k] == b[k]).sum())
        # one bf16 step (2^-7 relative) of the larger magnitude
        close += int((d <= np.maximum(np.abs(x), np.abs(y)) * 2.0**-7).sum())
        total += x.size
        worst = max(worst, float(d.max()))
    return (f"{100 * same / total:.2f}% identical, {100 * close / total:.2f}% within one bf16 step, "
            f"max |difference| {worst:.2e}")


def sha(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        h.update(f.read_bytes())
    return h.hexdigest()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", type=Path, default=HERE.parent / ".bench")
    ap.add_argument("--skip-mergekit", action="store_true")
    ap.add_argument("--skip-numpy", action="store_true")
    ap.add_argument("--skip-cold", action="store_true")
    ap.add_argument("--cgroup-limit", default=None, help="e.g. 1GiB: also merge inside a memory cgroup of that size")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--plot", type=Path, default=None)
    args = ap.parse_args()

    root = args.dir.resolve()
    base, fts = family(root / "family-1.1b")
    files = input_files([base, *fts])
    in_bytes = sum(p.stat().st_size for p in files)
    work = root / "runs"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    cfg = work / "ties.yml"
    cfg.write_text(
        "merge_method: ties\n"
        f"base_model: {base}\n"
        "models:\n"
        + "".join(f"  - model: {root / 'family-1.1b' / n}\n    parameters: {{weight: {w}, density: {d}}}\n" for n, w, d in MODELS)
        + "parameters:\n  normalize: true\n"
    )
    np_cfg = work / "numpy.json"
    np_cfg.write_text(json.dumps({"base": str(base), "models": [
        {"path": str(root / "family-1.1b" / n), "weight": w, "density": d} for n, w, d in MODELS]}))

    root_user = os.geteuid() == 0
    caches = ["warm"] if (args.skip_cold or not root_user) else ["cold", "warm"]
    floors = {}
    if "cold" in caches:
        drop_caches()
        secs, _ = read_bandwidth(files)
        floors["cold"] = secs
    read_bandwidth(files)  # warm the cache
    floors["warm"] = read_bandwidth(files)[0]

    ferro = [sys.executable, "-m", "ferromerge.cli", "run", str(cfg)]
    tools: dict[str, list[str]] = {"ferromerge": ferro}
    if not args.skip_numpy:
        tools["numpy"] = [sys.executable, str(HERE / "numpy_ties.py"), str(np_cfg)]
    if not args.skip_mergekit:
        if MERGEKIT_PY.exists():
            tools["mergekit"] = [str(MERGEKIT_PY.parent / "mergekit-yaml"), str(cfg)]
        else:
            print(f"mergekit not found at {MERGEKIT_PY}: skipped (scripts/setup-mergekit-venv.sh)", file=sys.stderr)

    runs: list[Run] = []
    outputs: dict[str, Path] = {}
    for tool, cmd in tools.items():
        for cache in caches:
            out = work / f"out-{tool}-{cache}"
            if cache == "cold":
                drop_caches()
            else:
                read_bandwidth(files)
            extra = ["--quiet"] if tool == "ferromerge" else []
            print(f"running {tool} ({cache}) ...", flush=True)
            wall, cpu, rss, rc = measured([*cmd, str(out), *extra], log=work / f"{tool}-{cache}.log")
            runs.append(Run(tool, cache, wall, cpu, rss, rc))
            if rc != 0:
                print(f"{tool} failed (exit {rc}); see {work / f'{tool}-{cache}.log'}", file=sys.stderr)
            else:
                outputs.setdefault(tool, out)

    # Where the warm time goes: the same merge writing to tmpfs (no disk writes) separates output I/O from the rest.
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 4 * in_bytes // 10:
        out = Path(tempfile.mkdtemp(dir=shm)) / "out"
        read_bandwidth(files)
        print("running ferromerge (warm, output on tmpfs) ...", flush=True)
        wall, cpu, rss, rc = measured([*ferro, str(out), "--quiet"], log=work / "ferromerge-tmpfs.log")
        runs.append(Run("ferromerge", "warm, output on tmpfs", wall, cpu, rss, rc))
        shutil.rmtree(out.parent, ignore_errors=True)

    checks = {}
    ref = read_output(outputs["ferromerge"]) if "ferromerge" in outputs else None
    for tool, out in outputs.items():
        if tool != "ferromerge" and ref is not None:
            checks[f"ferromerge vs {tool}"] = agreement(ref, read_output(out))

    cgroup_result = None
    if args.cgroup_limit and root_user:
        from ferromerge._validate import parse_size

        limit = parse_size(args.cgroup_limit)
        cg = Path("/sys/fs/cgroup/memory") / f"ferromerge-bench-{os.getpid()}"
        cg.mkdir()
        try:
            (cg / "memory.limit_in_bytes").write_text(f"{limit}\n")
            drop_caches()
            out = work / "out-ferromerge-cgroup"
            wall, cpu, rss, rc = measured([*ferro, str(out), "--quiet"], cgroup=cg, log=work / "cgroup.log")
            max_usage = int((cg / "memory.max_usage_in_bytes").read_text())
            failcnt = int((cg / "memory.failcnt").read_text())
            identical = rc == 0 and "ferromerge" in outputs and sha(out) == sha(outputs["ferromerge"])
            cgroup_result = dict(limit=limit, wall=wall, cpu=cpu, peak_rss=rss, rc=rc, cgroup_max_usage=max_usage,
                                 failcnt=failcnt, byte_identical=identical)
            runs.append(Run("ferromerge", f"cold, {args.cgroup_limit} cgroup", wall, cpu, rss, rc))
        finally:
            cg.rmdir()

    def secs(tool: str, cache: str) -> float | None:
        r = [x for x in runs if x.tool == tool and x.cache == cache and x.rc == 0]
        return r[0].wall if r else None

    gb = in_bytes / 1e9
    lines = [
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; input {gb:.2f} GB "
        f"({len(files)} files); floors: " + ", ".join(f"{c} read {gb / s:.2f} GB/s = {s:.1f} s" for c, s in floors.items()),
        "",
        "| tool | cache | wall s | CPU s | peak RSS GB | GB/s in | vs mergekit | vs numpy | vs floor |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in runs:
        cache = r.cache.split(",")[0]
        mk, npy, fl = secs("mergekit", cache), secs("numpy", cache), floors.get(cache)
        ratio = lambda peer: f"{peer / r.wall:.1f}× faster" if peer and r.rc == 0 else "–"  # noqa: E731
        lines.append(
            f"| {r.tool} | {r.cache} | {r.wall:.1f} | {r.cpu:.1f} | {r.peak_rss / 1e9:.2f} | "
            f"{gb / r.wall:.2f} | {ratio(mk)} | {ratio(npy)} | {f'{r.wall / fl:.2f}× floor' if fl else '–'} |"
            + ("" if r.rc == 0 else f" (exit {r.rc})")
        )
    lines.append("")
    lines += [f"- {k}: {v}" for k, v in checks.items()]
    if cgroup_result:
        c = cgroup_result
        lines.append(
            f"- cgroup proof: limit {c['limit'] / 2**30:.2f} GiB, exit {c['rc']}, cgroup peak usage "
            f"{c['cgroup_max_usage'] / 2**30:.2f} GiB (page cache included; the kernel reclaims it at the limit, "
            f"{c['failcnt']} times), process peak RSS "
            f"{c['peak_rss'] / 2**30:.2f} GiB, byte-identical to the unlimited run: {c['byte_identical']}"
        )
    table = "\n".join(lines)
    print(table)
    if args.json:
        args.json.write_text(json.dumps(dict(input_bytes=in_bytes, floors=floors, runs=[asdict(r) for r in runs],
                                             checks=checks, cgroup=cgroup_result, table=table), indent=1))
    if args.plot:
        plot(args.plot, runs, floors, gb)
    return 0 if all(r.rc == 0 for r in runs) and (not cgroup_result or cgroup_result["byte_identical"]) else 1


def plot(path: Path, runs: list[Run], floors: dict[str, float], gb: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(10, 4.5))
    ok = [r for r in runs if r.rc == 0]
    labels = [f"{r.tool}\n" + r.cache.replace(", ", "\n") for r in ok]
    ax.bar(labels, [gb / r.wall for r in ok], color=["#c0392b" if r.tool == "ferromerge" else "#7f8c8d" for r in ok])
    for cache, s in floors.items():
        ax.axhline(gb / s, linestyle="--", color="#2c3e50" if cache == "cold" else "#2980b9")
        ax.text(len(ok) - 0.5, gb / s, f" {cache} read floor", va="bottom", ha="right", fontsize=8)
    ax.set_ylabel("input GB/s (higher is better)")
    ax.set_yscale("log")
    ax.set_title(f"TIES, 1.1B family (base + 3, bf16, {gb:.1f} GB in)")
    ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
