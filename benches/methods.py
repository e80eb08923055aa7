"""Per-method benchmark: every merge method of mergekit 0.1.5's registry, run by ferromerge and by mergekit
(``mergekit-yaml`` in its own virtualenv) on one family (base + 3 fine-tunes), warm and cold page cache, next to the
floor of reading the method's inputs once.

    python benches/methods.py --family DIR [--methods ties linear ...] [--reps 1] [--threads 2] [--warm|--cold]
                              [--no-mergekit] [--rerun-mergekit] [--mergekit-cache FILE] [--out DIR]
    python benches/methods.py --make-family small|300m|1.1b DIR       # write a synthetic family first
    python benches/methods.py --kill [--out DIR]                       # stop a run's child (and its children)

Every run is a fresh process with the same config file (YAML, as users write them: ``configs()`` below), the
same thread count (ferromerge ``--threads N``; mergekit ``-j N``, which sets ``torch.set_num_threads`` and
``set_num_interop_threads``; both also get OMP/MKL/OpenBLAS/RAYON_NUM_THREADS=N and OMP_WAIT_POLICY=PASSIVE, see
benches/svd.py's ``thread_env``) and ``--quiet``. Warm: the inputs are read once just before the run. Cold:
``sync; echo 3 > /proc/sys/vm/drop_caches`` just before the run (root only; skipped otherwise). Peak RSS is the
child's own high-water mark: ``/usr/bin/time``'s ``%M`` (it forks the child from itself, a small process, so the
driver's own memory is not inherited into ``ru_maxrss`` as it would be with a direct fork). Each run records the
date, the load average (``/proc/loadavg``) before and after, and the git commit.

mergekit is a fixed peer (0.1.5) and slow (minutes per method on the 1.1B family), so its runs are cached in a JSON
file (``--mergekit-cache``, default ``OUT/mergekit-cache.json``) keyed by family, method, config, threads and cache
state, and reused across invocations unless ``--rerun-mergekit``; ferromerge always reruns. The table says the date
and load of every figure. Outputs are compared with mergekit's (max |difference|, decoded to float32): in full when
both ran in this invocation, otherwise on a stored sample of 4096 evenly spaced elements per tensor.

Writes ``OUT/methods.json`` (every run), ``OUT/methods.md`` (the table) and ``OUT/methods.svg`` (speed-up per
method; an SVG written by hand because no environment here has matplotlib). Interrupting the driver (Ctrl-C,
SIGTERM, SIGHUP) kills the running child's whole process group; ``--kill`` does the same from another shell using
``OUT/child.pgid``.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import datetime
import hashlib
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import MERGEKIT_PY, agreement, drop_caches, read_bandwidth  # noqa: E402
from svd import git_head, thread_env  # noqa: E402

# mergekit 0.1.5's registry (mergekit.merge_methods.registry.registered_methods()), in the order of issue 16's table
METHODS = [
    "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties", "della",
    "della_linear", "sce", "ram", "ramplus_tl", "model_stock", "karcher", "slerp", "nuslerp", "multislerp",
    "nearswap", "arcee_fusion", "passthrough",
]
# the methods whose output depends on a random mask: the two tools draw different masks, so their outputs differ by
# about one delta wherever one keeps an element the other drops
RANDOM = {"dare_ties", "dare_linear", "della", "della_linear"}
FAMILIES = {
    # reads.py / ab_speed.sh's family: 84M parameters, 168 MB a model in bf16
    "small": dict(hidden=1024, intermediate=2816, layers=6, vocab=8192, heads=16, kv_heads=4),
    # 336M parameters, 0.67 GB a model
    "300m": dict(hidden=1024, intermediate=2816, layers=24, vocab=32000, heads=16, kv_heads=4),
    # TinyLlama-1.1B (benches/compare.py's family)
    "1.1b": dict(hidden=2048, intermediate=5632, layers=22, vocab=32000, heads=32, kv_heads=4),
}


def configs(fam: Path) -> dict[str, dict[str, Any]]:
    """Method -> config, with parameters the way users write them (mostly the documented examples)."""
    b, f1, f2, f3 = (str(fam / n) for n in ("base", "ft1", "ft2", "ft3"))

    def ms(*entries: tuple[str, dict[str, Any] | None]) -> list[dict[str, Any]]:
        return [{"model": m, **({"parameters": p} if p else {})} for m, p in entries]

    three = ms((f1, None), (f2, None), (f3, None))
    wd = ms((f1, {"weight": 1.0, "density": 0.5}), (f2, {"weight": 0.5, "density": 0.5}),
            (f3, {"weight": 0.5, "density": 0.7}))
    c: dict[str, dict[str, Any]] = {
        "linear": {"models": ms((f1, {"weight": 1.0}), (f2, {"weight": 0.5}), (f3, {"weight": 0.5}))},
        "task_arithmetic": {"base_model": b, "models": ms((f1, {"weight": 1.0}), (f2, {"weight": 0.5}),
                                                          (f3, {"weight": 0.5}))},
        "ties": {"base_model": b, "models": wd, "parameters": {"normalize": True}},
        "dare_ties": {"base_model": b, "models": wd},
        "dare_linear": {"base_model": b, "models": wd},
        "breadcrumbs": {"base_model": b, "models": three, "parameters": {"weight": 1.0, "density": 0.9, "gamma": 0.01}},
        "breadcrumbs_ties": {"base_model": b, "models": three,
                             "parameters": {"weight": 1.0, "density": 0.9, "gamma": 0.01}},
        "della": {"base_model": b, "models": three,
                  "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1, "lambda": 1.0}},
        "della_linear": {"base_model": b, "models": three,
                         "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.1, "lambda": 1.0}},
        "sce": {"base_model": b, "models": three, "parameters": {"select_topk": 0.5}},
        "ram": {"base_model": b, "models": three},
        "ramplus_tl": {"base_model": b, "models": three},
        "model_stock": {"base_model": b, "models": three},
        "karcher": {"models": three},
        "slerp": {"base_model": b, "models": ms((f1, None)), "parameters": {"t": 0.5}},
        "nuslerp": {"models": ms((f1, {"weight": 1.0}), (f2, {"weight": 1.0}))},
        "multislerp": {"models": ms((f1, {"weight": 1.0}), (f2, {"weight": 1.0}), (f3, {"weight": 1.0}))},
        "nearswap": {"base_model": b, "models": ms((f1, None)), "parameters": {"t": 0.001}},
        "arcee_fusion": {"base_model": b, "models": ms((f1, None))},
        "passthrough": {"models": ms((f1, None))},
    }
    for name, cfg in c.items():
        cfg["merge_method"] = name
        cfg["dtype"] = "bfloat16"
    return c


def models_of(cfg: dict[str, Any]) -> list[str]:
    out = [m["model"] for m in cfg["models"]]
    return ([cfg["base_model"]] if "base_model" in cfg and cfg["base_model"] not in out else []) + out


def weight_files(model: str | Path) -> list[Path]:
    return sorted(Path(model).glob("*.safetensors"))


def family_id(fam: Path) -> str:
    """The family's path and its weight files' names, sizes and mtimes: a regenerated family is another key."""
    h = hashlib.sha256(str(fam.resolve()).encode())
    for m in ("base", "ft1", "ft2", "ft3"):
        for f in weight_files(fam / m):
            st = f.stat()
            h.update(f"{m}/{f.name}:{st.st_size}:{int(st.st_mtime)}".encode())
    return h.hexdigest()[:16]


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# ----------------------------------------------------------------------------------------------------------------
# children: one at a time, in their own process group, killed with the driver
# ----------------------------------------------------------------------------------------------------------------

_CHILD: dict[str, Any] = {"pgid": None, "file": None}


def _kill_child(*_: Any) -> None:
    pgid = _CHILD["pgid"]
    if pgid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        _CHILD["pgid"] = None
    if _CHILD["file"] is not None:
        Path(_CHILD["file"]).unlink(missing_ok=True)


def _on_signal(signum: int, _frame: Any) -> None:
    _kill_child()
    raise SystemExit(128 + signum)


def install_kill_switch(pgid_file: Path) -> None:
    """Record each child's process group in ``pgid_file`` and kill it when the driver exits or is signalled."""
    _CHILD["file"] = str(pgid_file)
    atexit.register(_kill_child)
    for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(s, _on_signal)


def kill_switch(out: Path) -> int:
    """``--kill``: stop the process group recorded by a running driver (its child and the child's children)."""
    f = out / "child.pgid"
    if not f.exists():
        print(f"no running child recorded in {f}")
        return 0
    pgid = int(f.read_text())
    try:
        os.killpg(pgid, signal.SIGKILL)
        print(f"killed process group {pgid}")
    except ProcessLookupError:
        print(f"process group {pgid} is gone")
    f.unlink(missing_ok=True)
    return 0


def timed(cmd: list[str], env: dict[str, str], log: Path, cgroup: Path | None = None,
          timeout: float | None = None) -> dict[str, Any]:
    """One child: wall, user+system CPU and peak RSS (``/usr/bin/time``'s ``%M``, KiB), load before and after.
    After ``timeout`` seconds the command (not ``/usr/bin/time``, which then still reports its peak RSS and CPU) is
    killed and ``timed_out`` set."""
    tfile = log.with_suffix(".time")
    tfile.unlink(missing_ok=True)
    full = ["/usr/bin/time", "-f", "%M %U %S", "-o", str(tfile), *cmd]

    def enter() -> None:
        if cgroup is not None:
            (cgroup / "cgroup.procs").write_text(f"{os.getpid()}\n")

    load0 = loadavg()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with open(log, "wb") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(full, stdout=err, stderr=subprocess.STDOUT, env=env, start_new_session=True,
                                preexec_fn=enter if cgroup is not None else None)
        _CHILD["pgid"] = proc.pid
        if _CHILD["file"] is not None:
            Path(_CHILD["file"]).write_text(f"{proc.pid}\n")
        timed_out = False
        try:
            rc = proc.wait(timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            for child in Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(child), signal.SIGKILL)
            rc = proc.wait()
        wall = time.perf_counter() - t0
    _CHILD["pgid"] = None
    rss = user = sys_ = 0.0
    try:
        # /usr/bin/time writes "Command exited with non-zero status N" first when the child failed
        rss_s, user_s, sys_s = tfile.read_text().split("\n")[-2].split()
        rss, user, sys_ = float(rss_s) * 1024, float(user_s), float(sys_s)
    except (OSError, ValueError, IndexError):
        pass
    return dict(wall=wall, cpu=user + sys_, user=user, sys=sys_, peak_rss=int(rss), rc=rc, date=date,
                load_before=load0, load_after=loadavg(), timed_out=timed_out)


# ----------------------------------------------------------------------------------------------------------------
# outputs
# ----------------------------------------------------------------------------------------------------------------


def tensors(out: Path) -> dict[str, tuple[str, np.ndarray]]:
    """name -> (dtype, raw little-endian array) for every tensor of an output directory (memory-mapped)."""
    result: dict[str, tuple[str, np.ndarray]] = {}
    for f in sorted(out.glob("*.safetensors")):
        raw = np.memmap(f, np.uint8, "r")
        n = int.from_bytes(raw[:8].tobytes(), "little")
        meta = json.loads(raw[8: 8 + n].tobytes())
        for name, info in meta.items():
            if name == "__metadata__":
                continue
            a, b = info["data_offsets"]
            dt = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}[info["dtype"]]
            result[name] = (info["dtype"], raw[8 + n + a: 8 + n + b].view(dt))
    return result


def as_f32(dtype: str, a: np.ndarray) -> np.ndarray:
    if dtype == "BF16":
        return (a.astype(np.uint32) << 16).view(np.float32)
    return a.astype(np.float32)


SAMPLE = 4096


def sample(out: Path) -> dict[str, np.ndarray]:
    """4096 evenly spaced elements of every tensor, as float32 (what a later invocation compares against)."""
    result = {}
    for name, (dt, a) in tensors(out).items():
        idx = np.linspace(0, a.size - 1, min(SAMPLE, a.size)).astype(np.int64)
        result[name] = as_f32(dt, a[idx])
    return result


def compare_sample(out: Path, ref: dict[str, np.ndarray]) -> str:
    mine = sample(out)
    if mine.keys() != ref.keys():
        return f"tensor names differ: {sorted(set(mine) ^ set(ref))[:5]}"
    worst = max(float(np.max(np.abs(mine[k] - ref[k]))) for k in ref)
    same = sum(int((mine[k] == ref[k]).sum()) for k in ref) / sum(ref[k].size for k in ref)
    return f"sampled {SAMPLE}/tensor: {100 * same:.2f}% identical, max |difference| {worst:.2e}"


def compare_full(a: Path, b: Path) -> str:
    ta, tb = tensors(a), tensors(b)
    if ta.keys() != tb.keys():
        return f"tensor names differ: {sorted(set(ta) ^ set(tb))[:5]}"
    if all(ta[k][0] == "BF16" and tb[k][0] == "BF16" for k in ta):
        return "full: " + agreement({k: np.asarray(v[1]) for k, v in ta.items()},
                                    {k: np.asarray(v[1]) for k, v in tb.items()})
    worst = max(float(np.max(np.abs(as_f32(*ta[k]) - as_f32(*tb[k])))) for k in ta)
    return f"full: max |difference| {worst:.2e} (dtypes {sorted({v[0] for v in ta.values()})})"


# ----------------------------------------------------------------------------------------------------------------
# the driver
# ----------------------------------------------------------------------------------------------------------------


def floors(fam: Path, states: list[str], root: bool) -> dict[str, dict[str, float]]:
    """Seconds to read each model's weight files once, sequentially (16 MiB reads), cold and/or warm."""
    result: dict[str, dict[str, float]] = {}
    names = ["base", "ft1", "ft2", "ft3"]
    if "cold" in states and root:
        drop_caches()
        result["cold"] = {n: read_bandwidth(weight_files(fam / n))[0] for n in names}
    for n in names:
        read_bandwidth(weight_files(fam / n))
    result["warm"] = {n: read_bandwidth(weight_files(fam / n))[0] for n in names}
    return result


def floor_of(fl: dict[str, float], cfg: dict[str, Any]) -> float:
    return sum(fl[Path(m).name] for m in models_of(cfg))


def prepare(state: str, cfg: dict[str, Any]) -> None:
    if state == "cold":
        drop_caches()
    else:
        for m in models_of(cfg):
            read_bandwidth(weight_files(m))


def run_tool(tool: str, cfg_path: Path, out: Path, threads: int, log: Path, cgroup: Path | None = None,
             timeout: float | None = None) -> dict:
    env = thread_env(threads)
    if tool == "ferromerge":
        cmd = [sys.executable, "-m", "ferromerge.cli", "run", str(cfg_path), str(out), "--threads", str(threads),
               "--quiet"]
    else:
        cmd = [str(MERGEKIT_PY.parent / "mergekit-yaml"), str(cfg_path), str(out), "-j", str(threads), "--quiet"]
        env.pop("PYTHONPATH", None)
    shutil.rmtree(out, ignore_errors=True)
    return timed(cmd, env, log, cgroup, timeout)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--family", type=Path, help="a directory holding base, ft1, ft2, ft3")
    ap.add_argument("--make-family", nargs=2, metavar=("PRESET", "DIR"), help=f"write a family: {', '.join(FAMILIES)}")
    ap.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    ap.add_argument("--reps", type=int, default=1, help="runs per tool, method and cache state (median reported)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    g = ap.add_mutually_exclusive_group()
    g.add_argument("--warm", action="store_true", help="warm runs only")
    g.add_argument("--cold", action="store_true", help="cold runs only")
    ap.add_argument("--no-mergekit", action="store_true", help="ferromerge only (cached mergekit runs still shown)")
    ap.add_argument("--no-ferromerge", action="store_true", help="mergekit only (fill the cache)")
    ap.add_argument("--rerun-mergekit", action="store_true", help="rerun mergekit even where the cache has it")
    ap.add_argument("--no-compare", action="store_true", help="skip the output comparison")
    ap.add_argument("--mergekit-cache", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=HERE.parent / ".bench" / "methods")
    ap.add_argument("--kill", action="store_true", help="kill the child of a running driver that writes to --out")
    ap.add_argument("--table-only", action="store_true",
                    help="rewrite OUT's table and plot from OUT/methods.json and the mergekit cache as they are now")
    a = ap.parse_args()

    out = a.out.resolve()
    if a.kill:
        return kill_switch(out)
    if a.table_only:
        results = json.loads((out / "methods.json").read_text())
        cache_path = (a.mergekit_cache or out / "mergekit-cache.json").resolve()
        cache = json.loads(cache_path.read_text()) if cache_path.exists() else {}
        table = render(results, cache, configs(Path(results["family"])))
        (out / "methods.md").write_text(table + "\n")
        svg(out / "methods.svg", results, cache)
        print(table)
        return 0
    if a.make_family:
        from ferromerge.synth import make_family

        preset, d = a.make_family
        make_family(d, n_finetunes=3, dtype="bfloat16", seed=0, shard_size=2 * 10**9, delta_scale=0.002,
                    **FAMILIES[preset])
        print(f"wrote {d}")
        if a.family is None:
            return 0
    if a.family is None:
        ap.error("--family is required")
    fam = a.family.resolve()
    out.mkdir(parents=True, exist_ok=True)
    install_kill_switch(out / "child.pgid")

    root = os.geteuid() == 0
    states = ["warm"] if a.warm or not root else ["cold"] if a.cold else ["warm", "cold"]
    tools = ([] if a.no_ferromerge else ["ferromerge"]) + ([] if a.no_mergekit or not MERGEKIT_PY.exists() else ["mergekit"])
    cache_path = (a.mergekit_cache or out / "mergekit-cache.json").resolve()
    cache: dict[str, Any] = json.loads(cache_path.read_text()) if cache_path.exists() else {}
    samples = cache_path.with_suffix(".samples")
    samples.mkdir(exist_ok=True)
    fid = family_id(fam)
    cfgs = configs(fam)
    head = git_head()
    print(f"family {fam} ({fid}); states {states}; tools {tools}; threads {a.threads}; load {loadavg()}", flush=True)

    fl = floors(fam, states, root)
    results: dict[str, Any] = dict(
        family=str(fam), family_id=fid, threads=a.threads, git=head, machine=machine_line(),
        input_bytes={n: sum(p.stat().st_size for p in weight_files(fam / n)) for n in ("base", "ft1", "ft2", "ft3")},
        floors=fl, started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        load_start=loadavg(), methods={},
    )
    res_path = out / "methods.json"

    def save() -> None:
        results["load_end"] = loadavg()
        res_path.write_text(json.dumps(results, indent=1))
        cache_path.write_text(json.dumps(cache, indent=1))

    for method in a.methods:
        cfg = cfgs[method]
        text = yaml.safe_dump(cfg, sort_keys=False)
        cfg_path = out / f"{method}.yml"
        cfg_path.write_text(text)
        key = f"{fid}:{method}:{hashlib.sha256(text.encode()).hexdigest()[:12]}:t{a.threads}"
        entry = results["methods"].setdefault(method, {"config": text, "mergekit_key": key, "runs": {}, "checks": {}})
        kept: dict[str, Path] = {}
        for state in states:
            for tool in tools:
                if tool == "mergekit" and not a.rerun_mergekit and len(cache.get(key, {}).get(state, [])) >= a.reps:
                    continue
                runs = []
                for rep in range(a.reps):
                    o = out / f"out-{tool}"
                    prepare(state, cfg)
                    print(f"{method:16} {tool:10} {state} rep {rep + 1} ...", end=" ", flush=True)
                    r = run_tool(tool, cfg_path, o, a.threads, out / f"{method}-{tool}-{state}.log")
                    r["git"] = head if tool == "ferromerge" else "mergekit 0.1.5"
                    print(f"{r['wall']:.2f} s, {r['peak_rss'] / 1e9:.2f} GB, exit {r['rc']}, load "
                          f"{r['load_before'][0]:.2f}->{r['load_after'][0]:.2f}", flush=True)
                    runs.append(r)
                    if r["rc"] == 0 and tool not in kept and not a.no_compare:
                        keep = out / f"keep-{tool}"
                        shutil.rmtree(keep, ignore_errors=True)
                        o.rename(keep)
                        kept[tool] = keep
                    shutil.rmtree(o, ignore_errors=True)
                if tool == "mergekit":
                    cache.setdefault(key, {})[state] = runs
                else:
                    entry["runs"][state] = runs
                save()
        # outputs: in full when both ran now; else ferromerge against mergekit's stored sample
        if "mergekit" in kept:
            np.savez(samples / f"{key.replace(':', '_')}.npz", **sample(kept["mergekit"]))
        if "ferromerge" in kept:
            if "mergekit" in kept:
                entry["checks"]["vs mergekit"] = compare_full(kept["ferromerge"], kept["mergekit"])
            elif (samples / f"{key.replace(':', '_')}.npz").exists():
                ref = dict(np.load(samples / f"{key.replace(':', '_')}.npz"))
                entry["checks"]["vs mergekit"] = compare_sample(kept["ferromerge"], ref)
        for k in kept.values():
            shutil.rmtree(k, ignore_errors=True)
        if entry["checks"]:
            print(f"{method:16} {entry['checks']['vs mergekit']}", flush=True)
        save()

    table = render(results, cache, cfgs)
    (out / "methods.md").write_text(table + "\n")
    svg(out / "methods.svg", results, cache)
    print(table)
    return 0


def machine_line() -> str:
    cpu = platform.processor() or platform.machine()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB"


def median_run(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if r["rc"] == 0]
    if not ok:
        return None
    wall = statistics.median(r["wall"] for r in ok)
    best = min(ok, key=lambda r: abs(r["wall"] - wall))
    return dict(best, wall=wall, peak_rss=max(r["peak_rss"] for r in ok))


def render(results: dict, cache: dict, cfgs: dict) -> str:
    fl = results["floors"]
    lines = [
        f"Machine: {results['machine']}; family {results['family']} "
        f"({sum(results['input_bytes'].values()) / 1e9:.2f} GB in base + 3); threads {results['threads']} each; "
        f"ferromerge at {results['git']}; started {results['started']}, load {results['load_start']} -> "
        f"{results.get('load_end')}.",
        "Read floors (base + 3): " + ", ".join(f"{s} {sum(v.values()):.2f} s" for s, v in fl.items()) + ".",
        "",
        "| method | ferromerge warm s | ferromerge cold s | mergekit warm s | mergekit cold s | × mergekit warm | "
        "× mergekit cold | ÷ floor warm | ÷ floor cold | peak RSS GB (ferromerge / mergekit) | mergekit measured "
        "(date, load) | outputs vs mergekit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for method, e in results["methods"].items():
        mk = cache.get(e["mergekit_key"], {})
        row = [method]
        fm = {s: median_run(e["runs"].get(s, [])) for s in ("warm", "cold")}
        mg = {s: median_run(mk.get(s, [])) for s in ("warm", "cold")}
        for d in (fm, mg):
            for s in ("warm", "cold"):
                row.append(f"{d[s]['wall']:.2f}" if d[s] else "–")
        for s in ("warm", "cold"):
            row.append(f"{mg[s]['wall'] / fm[s]['wall']:.1f}×" if fm[s] and mg[s] else "–")
        for s in ("warm", "cold"):
            row.append(f"{fm[s]['wall'] / floor_of(fl[s], cfgs[method]):.1f}" if fm[s] and s in fl else "–")
        rss = lambda d: max((d[s]["peak_rss"] for s in d if d[s]), default=0) / 1e9  # noqa: E731
        row.append(f"{rss(fm):.2f} / {rss(mg):.2f}" if any(mg.values()) else f"{rss(fm):.2f} / –")
        when = [r for s in ("warm", "cold") for r in mk.get(s, [])]
        row.append("; ".join(f"{r['date'][:16]} load {r['load_before'][0]:.1f}–{r['load_after'][0]:.1f}"
                             for r in when[:2]) or "–")
        chk = e["checks"].get("vs mergekit", "–")
        row.append(chk + (" (random masks: different draws)" if method in RANDOM and chk != "–" else ""))
        lines.append("| " + " | ".join(row) + " |")
    fm_loads = [r["load_before"][0] for e in results["methods"].values() for rs in e["runs"].values() for r in rs]
    if fm_loads:
        lines += ["", f"ferromerge runs: load average (1 min) {min(fm_loads):.2f}–{max(fm_loads):.2f} at their starts."]
    return "\n".join(lines)


def svg(path: Path, results: dict, cache: dict) -> None:
    """Horizontal bars: mergekit's time over ferromerge's per method, warm and cold, on a log axis."""
    rows = []
    for method, e in results["methods"].items():
        mk = cache.get(e["mergekit_key"], {})
        for s in ("warm", "cold"):
            f, m = median_run(e["runs"].get(s, [])), median_run(mk.get(s, []))
            if f and m:
                rows.append((f"{method} ({s})", m["wall"] / f["wall"], s))
    if not rows:
        return
    import math

    w, bar, left = 760, 16, 170
    top = 40
    hi = max(100.0, max(r[1] for r in rows))
    x = lambda v: left + (w - left - 60) * math.log10(max(v, 1.0)) / math.log10(hi)  # noqa: E731
    h = top + bar * len(rows) + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" '
             'font-size="11">',
             f'<text x="{left}" y="16" font-size="13">mergekit time ÷ ferromerge time (log scale; higher is better)'
             '</text>']
    for t in (1, 2, 5, 10, 20, 50, 100, 200, 500):
        if t <= hi:
            parts.append(f'<line x1="{x(t):.1f}" y1="{top - 6}" x2="{x(t):.1f}" y2="{h - 24}" stroke="#ccc"/>'
                         f'<text x="{x(t):.1f}" y="{h - 10}" text-anchor="middle">{t}×</text>')
    for i, (label, v, s) in enumerate(rows):
        y = top + i * bar
        color = "#c0392b" if s == "warm" else "#2c3e50"
        parts.append(f'<text x="{left - 6}" y="{y + 11}" text-anchor="end">{label}</text>'
                     f'<rect x="{left}" y="{y + 2}" width="{x(v) - left:.1f}" height="{bar - 4}" fill="{color}"/>'
                     f'<text x="{x(v) + 4:.1f}" y="{y + 11}">{v:.1f}×</text>')
    parts.append(f'<line x1="{x(10):.1f}" y1="{top - 6}" x2="{x(10):.1f}" y2="{h - 24}" stroke="#27ae60" '
                 'stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    path.write_text("\n".join(parts) + "\n")


if __name__ == "__main__":
    sys.exit(main())
