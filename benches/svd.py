"""SVD benchmark: the Rust kernels (``_core.svd`` exact and randomized, ``_core.polar``) against NumPy/LAPACK and
torch on LLM matrix shapes, and an end-to-end TSV-M merge of the 1.1B family (benches/compare.py's) by ferromerge
(Rust kernels; torch on the CPU) and by a plain-torch full-SVD TSV-M written the way the reference code does it.

    python benches/svd.py [--quick] [--only kernels|e2e] [--repeats 3] [--e2e-layers N] [--dir DIR] [--json OUT]

Every measurement runs in a fresh process, so its peak RSS is its own (the child's ``VmHWM``); each is repeated
(``--repeats``, interleaved across tools so that background load hits everyone alike) and the median wall time is
reported. A case whose first run takes over ``--long`` seconds (default 300) is run once. Everyone gets the same
threads (``--threads``, default all cores): OMP/MKL/OpenBLAS env, ``torch.set_num_threads``, ``threads=`` for ours.

Kernel matrices: A = U0 diag(sigma) V0^T with Haar-random orthonormal U0, V0 and sigma_i = i^-0.5 (i = 1..min(m,n)),
the slow power-law decay of a fine-tuning task vector's spectrum with no clean gap (the hard case for a
randomized SVD); built in float64, stored float32. The exact singular values of the stored float32 matrix are
computed once in float64 (LAPACK) and the polar factor's reference is U0 V0^T.

End to end (``--e2e-layers N``, 0 = the whole model): a model of the family's first N layers plus the embeddings,
final norm and lm_head (the same tensors, bytes copied), merged with ``merge_method: tsv_m`` (base + 3, alpha 1).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from spectral_peer import merge as peer_merge  # noqa: E402  (a sibling script: the torch reference merges)
from spectral_peer import tensor_files as _files  # noqa: E402

HERE = Path(__file__).resolve().parent
LONG_S = 300.0

# ----------------------------------------------------------------------------------------------------------------
# process bookkeeping
# ----------------------------------------------------------------------------------------------------------------


def _status(field: str) -> int:
    """A ``/proc/self/status`` memory field in bytes (VmRSS, VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def thread_env(threads: int) -> dict[str, str]:
    """The environment that gives every library the same thread count (read when each library loads).

    OMP_WAIT_POLICY=PASSIVE: idle OpenMP threads (torch's MKL) sleep instead of spinning. On a machine shared
    with other work, spinning threads steal the cores their partners need, and torch's 2-thread SVD measured here
    ran 4-16x slower than its 1-thread one without it (1024x1024, loaded 2-core VM)."""
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        env[k] = str(threads)
    return env


def core_build() -> str:
    """A fingerprint of the ferromerge extension in use (its file's SHA-256, 12 hex digits): a rebuild during a
    run would mix two builds' timings, so each measurement records it and the driver checks they agree."""
    import hashlib
    import importlib.util

    spec = importlib.util.find_spec("ferromerge._core")
    if spec is None or spec.origin is None:
        return "none"
    return hashlib.sha256(Path(spec.origin).read_bytes()).hexdigest()[:12]


def git_head() -> str:
    p = subprocess.run(["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    return p.stdout.strip() or "unknown"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return f"{cpu}, {os.cpu_count()} cores, {ram:.0f} GiB RAM, {platform.system()} {platform.release()}"


# ----------------------------------------------------------------------------------------------------------------
# kernel cases (each runs in a child: python benches/svd.py --case JSON)
# ----------------------------------------------------------------------------------------------------------------


def make_matrix(m: int, n: int, path: Path) -> None:
    """A (float32), the float64 singular values of that float32 matrix, and U0, V0 (float32), in one .npz."""
    rng = np.random.default_rng([m, n])
    r = min(m, n)
    u0, _ = np.linalg.qr(rng.standard_normal((m, r)))
    v0, _ = np.linalg.qr(rng.standard_normal((n, r)))
    sigma = np.arange(1, r + 1, dtype=np.float64) ** -0.5
    a = ((u0 * sigma) @ v0.T).astype(np.float32)
    s = np.linalg.svd(a.astype(np.float64), compute_uv=False)
    np.savez(path.with_suffix(".tmp.npz"), a=a, s=s, u0=u0.astype(np.float32), v0=v0.astype(np.float32))
    path.with_suffix(".tmp.npz").rename(path)


def _ours(op: str, a: np.ndarray, k: int | None, threads: int, oversample: int, power_iters: int):
    from ferromerge import _engine

    if op == "polar":
        return _engine.polar(a, threads=threads)
    if op == "exact":
        return _engine.svd(a, exact=True, threads=threads)
    return _engine.svd(a, rank=k, oversample=oversample, power_iters=power_iters, seed=0, name="bench",
                     threads=threads)


def halko_numpy(a: np.ndarray, k: int, q: int, niter: int, seed: int = 0):
    """Halko et al. randomized SVD in plain NumPy (Gaussian sketch of q columns, niter power iterations with a QR
    after every product, as torch.svd_lowrank does), float32 throughout."""
    rng = np.random.default_rng(seed)
    omega = rng.standard_normal((a.shape[1], q), dtype=np.float32)
    basis, _ = np.linalg.qr(a @ omega)
    for _ in range(niter):
        z, _ = np.linalg.qr(a.T @ basis)
        basis, _ = np.linalg.qr(a @ z)
    ub, s, vt = np.linalg.svd(basis.T @ a, full_matrices=False)
    return (basis @ ub[:, :k]), s[:k], vt[:k]


def _numpy(op: str, a: np.ndarray, k: int | None, threads: int, oversample: int, power_iters: int):
    if op == "polar":
        u, _, vt = np.linalg.svd(a, full_matrices=False)
        return u @ vt
    if op == "exact":
        return np.linalg.svd(a, full_matrices=False)
    return halko_numpy(a, k, k + oversample, power_iters)


def _torch(op: str, a: np.ndarray, k: int | None, threads: int, oversample: int, power_iters: int):
    import torch

    t = torch.from_numpy(a)
    if op == "polar":
        u, _, vh = torch.linalg.svd(t, full_matrices=False)
        return (u @ vh).numpy()
    if op == "exact":
        u, s, vh = torch.linalg.svd(t, full_matrices=False)
        return u.numpy(), s.numpy(), vh.numpy()
    torch.manual_seed(0)
    u, s, v = torch.svd_lowrank(t, q=k + oversample, niter=power_iters)
    return u[:, :k].numpy(), s[:k].numpy(), v[:, :k].T.contiguous().numpy()


TOOLS = {"ferromerge": _ours, "numpy": _numpy, "torch": _torch}


def accuracy(op: str, a: np.ndarray, data, out) -> dict:
    """sv_err: max relative error of the returned singular values (top k, or all for exact) against the float64
    ones of A; resid: for top-k ||A - U S Vt||_F / ||A - A_k||_F (1 is optimal), for exact ||A - U S Vt||_F /
    ||A||_F; rank_k_err (top-k): ||U S Vt - A_k||_F / ||A_k||_F, how far the kept part is from the best rank-k
    approximation (the part TSV-M keeps); orth: max |Q^T Q - I| of U (of P for polar); polar_err:
    ||P - U0 V0^T||_F / ||U0 V0^T||_F.

    A_k and the polar factor are taken from the construction (U0, V0 in float32): the float32 rounding of A moves
    them by about 1e-6 relative, below every error reported."""
    s_ref, u0, v0 = data["s"], data["u0"], data["v0"]
    if op == "polar":
        polar_ref = u0 @ v0.T
        p = np.asarray(out, dtype=np.float32)
        g = p.T @ p
        g[np.diag_indices_from(g)] -= 1
        d = (p - polar_ref).astype(np.float64)
        return dict(orth=float(np.abs(g).max()),
                    polar_err=float(np.sqrt((d * d).sum()) / np.linalg.norm(polar_ref.astype(np.float64))))
    u, s, vt = (np.asarray(x, dtype=np.float32) for x in out)
    kk = s.size
    sv_err = float(np.max(np.abs(s.astype(np.float64) - s_ref[:kk]) / s_ref[:kk]))
    resid = a - (u * s) @ vt
    rn = float(np.sqrt((resid.astype(np.float64) ** 2).sum()))
    del resid
    denom = float(np.sqrt((s_ref[kk:] ** 2).sum())) if op == "topk" else float(np.sqrt((s_ref**2).sum()))
    g = u.T @ u
    g[np.diag_indices_from(g)] -= 1
    res = dict(sv_err=sv_err, resid=rn / denom, orth=float(np.abs(g).max()))
    if op == "topk":
        sigma = np.arange(1, kk + 1, dtype=np.float64) ** -0.5  # the construction's, exactly
        d = (u * s) @ vt - (u0[:, :kk] * sigma.astype(np.float32)) @ v0[:, :kk].T
        res["rank_k_err"] = float(np.sqrt((d.astype(np.float64) ** 2).sum()) / np.sqrt((sigma**2).sum()))
    return res


def run_case(spec: dict) -> dict:
    """One measurement, in this (fresh) process: load, time the op, read the high-water mark, then accuracy."""
    data = np.load(spec["matrix"])
    a = np.ascontiguousarray(data["a"])
    tool, op, k, threads = spec["tool"], spec["op"], spec["k"], spec["threads"]
    if tool == "torch":
        import torch

        torch.set_num_threads(threads)
    elif tool == "ferromerge":
        from ferromerge import _engine  # noqa: F401  (import cost outside the timed region)
    # a small call first: thread pools and lazily loaded kernels start outside the timed region
    TOOLS[tool](op, np.ascontiguousarray(a[:96, :64]), min(k or 8, 8), threads, 4, spec["power_iters"])
    rss0 = _status("VmRSS")
    c0, t0 = time.process_time(), time.perf_counter()
    out = TOOLS[tool](op, a, k, threads, spec["oversample"], spec["power_iters"])
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    res = dict(spec, wall=wall, cpu=cpu, rss_before=rss0, peak_rss=_status("VmHWM"), load=os.getloadavg()[0],
               build=core_build())
    if spec["accuracy"]:
        res.update(accuracy(op, a, data, out))
    return res


def kernel_cases(shapes: list[tuple[int, int]], ks: list[int | str]) -> list[dict]:
    cases = []
    for m, n in shapes:
        r = min(m, n)
        cases.append(dict(m=m, n=n, op="exact", k=None))
        for k in ks:
            kk = r // 3 if k == "r/3" else int(k)
            cases.append(dict(m=m, n=n, op="topk", k=kk, k_label=f"{k}" if k != "r/3" else f"r/3 = {kk}"))
        cases.append(dict(m=m, n=n, op="polar", k=None))
    return cases


def run_kernels(args: argparse.Namespace, work: Path) -> list[dict]:
    shapes = [(1024, 1024), (1536, 512)] if args.quick else [(4096, 4096), (14336, 4096)]
    ks: list[int | str] = [32, "r/3"] if args.quick else [128, "r/3"]
    mats = work / "matrices"
    mats.mkdir(parents=True, exist_ok=True)
    variants = [(tool, t) for t in args.kernel_threads for tool in TOOLS]
    results = []
    for case in kernel_cases(shapes, ks):
        if args.ops and case["op"] not in args.ops.split(","):
            continue
        if args.shapes and f"{case['m']}x{case['n']}" not in args.shapes.split(","):
            continue
        path = mats / f"a-{case['m']}x{case['n']}.npz"
        if not path.exists():
            print(f"building the {case['m']}x{case['n']} test matrix ...", flush=True)
            subprocess.run([sys.executable, __file__, "--make-matrix", str(case["m"]), str(case["n"]), str(path)],
                           check=True, env=thread_env(args.threads))
        label = f"{case['op']} {case['m']}x{case['n']}" + (f" k={case['k']}" if case["k"] else "")
        runs: dict[tuple[str, int], list[dict]] = {v: [] for v in variants}
        for rep in range(args.repeats):
            for tool, threads in variants:
                done = runs[tool, threads]
                if rep > 0 and (not done or done[0]["wall"] > args.long):
                    continue  # failed, or too slow to repeat
                if threads != args.kernel_threads[0] and rep >= args.control_repeats:
                    continue
                spec = dict(case, tool=tool, matrix=str(path), threads=threads, oversample=10, power_iters=2,
                            accuracy=rep == 0 and threads == args.kernel_threads[0])
                try:
                    p = subprocess.run([sys.executable, __file__, "--case", json.dumps(spec)], env=thread_env(threads),
                                       capture_output=True, text=True, timeout=args.case_timeout)
                except subprocess.TimeoutExpired:
                    print(f"  {label} {tool} ({threads} threads) ran past {args.case_timeout} s", file=sys.stderr)
                    continue
                if p.returncode != 0:
                    print(f"  {label} {tool} failed:\n{p.stderr[-2000:]}", file=sys.stderr)
                    continue
                res = json.loads(p.stdout.strip().splitlines()[-1])
                done.append(res)
                print(f"  {label} {tool} ({threads} threads) run {rep + 1}: {res['wall']:.2f} s, CPU {res['cpu']:.2f} s "
                      f"(load {res['load']:.1f})", flush=True)
        for (tool, _), rs in runs.items():
            if not rs:
                continue
            first = rs[0]
            results.append(dict(first, walls=[r["wall"] for r in rs], wall=statistics.median(r["wall"] for r in rs),
                                cpu=statistics.median(r["cpu"] for r in rs), peak_rss=max(r["peak_rss"] for r in rs),
                                extra_rss=max(r["peak_rss"] - r["rss_before"] for r in rs),
                                loads=[r["load"] for r in rs], builds=sorted({r["build"] for r in rs})))
    return results


def kernel_table(results: list[dict]) -> str:
    """Two Markdown tables: speed and memory (medians, ranges, the 1-thread control), then accuracy."""
    tools = list(TOOLS)
    main_t = max((r["threads"] for r in results), default=1)
    cases: dict[tuple, dict] = {}
    for r in results:
        cases.setdefault((r["m"], r["n"], r["op"], r["k"]), {})[r["tool"], r["threads"]] = r

    def label(r: dict) -> tuple[str, str]:
        return f"{r['m']}×{r['n']}", {"exact": "exact SVD", "polar": "polar", "topk": f"top-k, k = {r.get('k_label', r['k'])}"}[r["op"]]

    def cell(r: dict | None) -> str:
        if r is None:
            return "–"
        w = r["walls"]
        return f"{r['wall']:.2f} ({min(w):.1f}–{max(w):.1f})" if len(w) > 1 else f"{r['wall']:.2f} (1 run)"

    def ratio(ours: dict | None, peer: dict | None) -> str:
        return f"{peer['wall'] / ours['wall']:.2f}×" if ours and peer else "–"

    controls = sorted({t for (_, t) in (k for c in cases.values() for k in c) if t != main_t}, reverse=True)
    head = ("| shape | op | " + " | ".join(f"{t} s" for t in tools) + " | numpy ÷ ours | torch ÷ ours | "
            + " | ".join(f"{t} s, {c} thread{'s' * (c > 1)}" for c in controls for t in tools)
            + " | peak RSS GB (" + " / ".join(tools) + ") |")
    lines = [f"Wall seconds at {main_t} threads: median (range) of the runs; a ratio above 1 means ferromerge is faster.",
             "", head, "|" + "---|" * (head.count("|") - 1)]
    for key, c in cases.items():
        shape, op = label(next(iter(c.values())))
        m = [c.get((t, main_t)) for t in tools]
        ctl = [cell(c.get((t, th))).replace(" (1 run)", "") for th in controls for t in tools]
        rss = " / ".join(f"{x['peak_rss'] / 1e9:.2f}" if x else "–" for x in m)
        lines.append(f"| {shape} | {op} | " + " | ".join(cell(x) for x in m)
                     + f" | {ratio(m[0], m[1])} | {ratio(m[0], m[2])} | " + "".join(x + " | " for x in ctl) + rss + " |")
    fmt = lambda x: "–" if x is None else f"{x:.1e}"  # noqa: E731
    lines += ["", "| shape | op | tool | σ rel. err | residual | rank-k err | orth. err | polar err |",
              "|---|---|---|---|---|---|---|---|"]
    for c in cases.values():
        for t in tools:
            r = c.get((t, main_t))
            if r is None or "orth" not in r:
                continue
            shape, op = label(r)
            resid = r.get("resid")
            resid_s = "–" if resid is None else (f"{resid:.4f}" if r["op"] == "topk" else fmt(resid))
            lines.append(f"| {shape} | {op} | {t} | {fmt(r.get('sv_err'))} | {resid_s} | {fmt(r.get('rank_k_err'))} | "
                         f"{fmt(r.get('orth'))} | {fmt(r.get('polar_err'))} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------
# end to end: TSV-M on the 1.1B family
# ----------------------------------------------------------------------------------------------------------------


def _header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def subset_model(src: Path, dst: Path, layers: int) -> None:
    """A copy of ``src`` with only its first ``layers`` decoder layers (every other tensor kept), one file, the
    tensors' bytes copied unchanged; config.json's num_hidden_layers set to match."""
    dst.mkdir(parents=True, exist_ok=True)
    names = [k for k in _files(src)
             if not (k.startswith("model.layers.") and int(k.split(".")[2]) >= layers)]
    files = _files(src)
    header, blobs, offset = {}, [], 0
    for name in names:
        h, start = _header(files[name])
        meta = h[name]
        a, b = meta["data_offsets"]
        with open(files[name], "rb") as f:
            f.seek(start + a)
            blobs.append(f.read(b - a))
        header[name] = dict(dtype=meta["dtype"], shape=meta["shape"], data_offsets=[offset, offset + b - a])
        offset += b - a
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(dst / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for blob in blobs:
            f.write(blob)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] = layers
    (dst / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        if (src / extra).exists():
            shutil.copy(src / extra, dst / extra)


def _bf16(path: Path, name: str, cache: dict) -> np.ndarray:
    """One bf16 tensor of an output as float32, read through a memory map."""
    if path not in cache:
        h, start = _header(path)
        cache[path] = (h, start, np.memmap(path, np.uint8, "r"))
    h, start, mm = cache[path]
    a, b = h[name]["data_offsets"]
    assert h[name]["dtype"] == "BF16", (path, name, h[name]["dtype"])
    bits = np.frombuffer(mm[start + a:start + b], np.uint16)
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(h[name]["shape"])


def agreement(out_a: Path, out_b: Path, base: Path) -> dict:
    """How two merged outputs agree, per tensor: max |difference|, and the Frobenius norm of the difference over
    that of out_b's merged update (theta_b - theta_0), summarised over the 2-D (SVD) and the other tensors; and
    the share of elements bit-identical or within one bf16 step."""
    fa, fb, f0 = _files(out_a), _files(out_b), _files(base)
    assert fa.keys() == fb.keys(), sorted(set(fa) ^ set(fb))
    cache: dict = {}
    stats: dict[str, dict] = {"2-D": dict(rel=[], maxabs=0.0), "other": dict(rel=[], maxabs=0.0)}
    same = close = total = 0
    for name in sorted(fa):
        x, y, y0 = _bf16(fa[name], name, cache), _bf16(fb[name], name, cache), _bf16(f0[name], name, cache)
        d = np.abs(x - y)
        upd = np.linalg.norm((y - y0).astype(np.float64))
        group = stats["2-D" if x.ndim == 2 else "other"]
        group["maxabs"] = max(group["maxabs"], float(d.max()))
        group["rel"].append(float(np.linalg.norm(d.astype(np.float64)) / upd) if upd else 0.0)
        same += int((x == y).sum())
        close += int((d <= np.maximum(np.abs(x), np.abs(y)) * 2.0**-7).sum())
        total += x.size
    out = dict(identical=same / total, within_bf16_step=close / total)
    for g, s in stats.items():
        if s["rel"]:
            out[g] = dict(tensors=len(s["rel"]), max_abs=s["maxabs"], rel_median=float(np.median(s["rel"])),
                          rel_max=float(np.max(s["rel"])))
    return out


def run_e2e(args: argparse.Namespace, work: Path) -> dict:
    sys.path.insert(0, str(HERE))
    from compare import family, measured  # the TIES benchmark's family and its per-child wall/CPU/VmHWM

    from ferromerge.synth import make_family

    if args.quick:
        root = work / "family-quick"
        if not (root / "COMPLETE").exists():
            shutil.rmtree(root, ignore_errors=True)
            make_family(root, n_finetunes=3, dtype="bfloat16", seed=0, delta_scale=0.002, hidden=256,
                        intermediate=704, layers=2, vocab=1024, heads=8, kv_heads=2)
            (root / "COMPLETE").write_text("ok\n")
        base, fts = root / "base", [root / f"ft{i}" for i in (1, 2, 3)]
        what = "the quick family (hidden 256, intermediate 704, 2 layers, vocab 1024)"
    else:
        base, fts = family(args.dir.resolve() / "family-1.1b")
        if args.e2e_layers:
            sub = work / f"family-{args.e2e_layers}-layers"
            if not (sub / "COMPLETE").exists():
                for src in [base, *fts]:
                    subset_model(src, sub / src.name, args.e2e_layers)
                (sub / "COMPLETE").write_text("ok\n")
            base, fts = sub / base.name, [sub / f.name for f in fts]
            what = f"the 1.1B family's first {args.e2e_layers} layers + embeddings, final norm, lm_head"
        else:
            what = "the whole 1.1B family (22 layers)"
    runs_dir = work / "e2e"
    shutil.rmtree(runs_dir, ignore_errors=True)
    runs_dir.mkdir(parents=True)
    models = "".join(f"  - model: {f}\n" for f in fts)
    cfgs = {}
    for label, extra in (("randomized", ""), ("exact", "parameters:\n  exact_svd: true\n")):
        cfgs[label] = runs_dir / f"tsv_m-{label}.yml"
        cfgs[label].write_text(f"merge_method: tsv_m\nbase_model: {base}\nmodels:\n{models}{extra}")
    ferro = [sys.executable, "-m", "ferromerge.cli", "run"]
    thr = ["--threads", str(args.threads), "--quiet"]
    tools = {
        "ferromerge (Rust, randomized)": lambda out: [*ferro, str(cfgs["randomized"]), str(out), *thr],
        "ferromerge --device torch:cpu": lambda out: [*ferro, str(cfgs["randomized"]), str(out), *thr,
                                                      "--device", "torch:cpu"],
        "torch full-SVD TSV-M (peer)": lambda out: [sys.executable, __file__, "--peer", str(out), str(base),
                                                    *map(str, fts)],
    }
    if args.e2e_exact:
        tools["ferromerge (Rust, exact_svd)"] = lambda out: [*ferro, str(cfgs["exact"]), str(out), *thr]
    os.environ.update(thread_env(args.threads))  # inherited by every child that measured() starts
    runs: dict[str, list[dict]] = {t: [] for t in tools}
    outputs: dict[str, Path] = {}
    for rep in range(args.e2e_repeats):
        for tool, cmd in tools.items():
            if rep > 0 and (not runs[tool] or runs[tool][0]["wall"] > args.e2e_long):
                continue
            slug = "".join(c if c.isalnum() else "-" for c in tool).strip("-")
            out = runs_dir / f"out-{slug}-{rep}"
            shutil.rmtree(out, ignore_errors=True)
            print(f"running {tool} (run {rep + 1}) ...", flush=True)
            load = os.getloadavg()[0]
            wall, cpu, rss, rc = measured(cmd(out), log=runs_dir / f"{slug}-{rep}.log")
            print(f"  {wall:.1f} s wall, {cpu:.1f} s CPU, peak RSS {rss / 1e9:.2f} GB, exit {rc} (load {load:.1f})",
                  flush=True)
            if rc != 0:
                print(f"  {tool} failed; see the logs in {runs_dir}", file=sys.stderr)
                continue
            runs[tool].append(dict(wall=wall, cpu=cpu, peak_rss=rss, load=load))
            if tool not in outputs:
                outputs[tool] = out
            else:
                shutil.rmtree(out, ignore_errors=True)
    peer = "torch full-SVD TSV-M (peer)"
    checks = {}
    names = list(outputs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            # relative to the second's merged update: the peer's when it is one of the two
            x, y = (b, a) if a == peer else (a, b)
            checks[f"{x} vs {y}"] = agreement(outputs[x], outputs[y], base)
    summary = {}
    for tool, rs in runs.items():
        if rs:
            summary[tool] = dict(runs=len(rs), walls=[r["wall"] for r in rs],
                                 wall=statistics.median(r["wall"] for r in rs),
                                 cpu=statistics.median(r["cpu"] for r in rs), peak_rss=max(r["peak_rss"] for r in rs),
                                 loads=[r["load"] for r in rs])
    in_bytes = sum(p.stat().st_size for m in [base, *fts] for p in m.glob("*.safetensors"))
    return dict(what=what, input_bytes=in_bytes, runs=summary, checks=checks)


def e2e_table(e2e: dict) -> str:
    runs = e2e["runs"]
    peer = runs.get("torch full-SVD TSV-M (peer)")
    lines = [f"{e2e['what']}: {e2e['input_bytes'] / 1e9:.2f} GB in", "",
             "| tool | wall s | runs | CPU s | peak RSS GB | peer wall ÷ tool wall | load at start |",
             "|---|---|---|---|---|---|---|"]
    for tool, r in runs.items():
        ratio = f"{peer['wall'] / r['wall']:.2f}×" if peer and r is not peer else "–"
        loads = " / ".join(f"{x:.1f}" for x in r["loads"])
        lines.append(f"| {tool} | {r['wall']:.1f} | {r['runs']} | {r['cpu']:.1f} | {r['peak_rss'] / 1e9:.2f} | {ratio} | "
                     f"{loads} |")
    lines += ["", "| outputs | identical | within 1 bf16 step | 2-D: max abs | 2-D: rel. median / max | "
              "other: max abs | other: rel. max |", "|---|---|---|---|---|---|---|"]
    for pair, c in e2e["checks"].items():
        two, oth = c.get("2-D", {}), c.get("other", {})
        lines.append(
            f"| {pair} | {100 * c['identical']:.2f}% | {100 * c['within_bf16_step']:.2f}% | "
            f"{two.get('max_abs', 0):.1e} | {two.get('rel_median', 0):.1e} / {two.get('rel_max', 0):.1e} | "
            f"{oth.get('max_abs', 0):.1e} | {oth.get('rel_max', 0):.1e} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------------


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--case":
        print(json.dumps(run_case(json.loads(sys.argv[2]))))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--make-matrix":
        make_matrix(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
        return 0
    if len(sys.argv) > 1 and sys.argv[1] == "--peer":
        import torch

        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
        # TSV-M as the reference code computes it (Gargiulo et al.): benches/spectral_peer.py, the one torch loader
        peer_merge("tsv_m", Path(sys.argv[3]), [Path(p) for p in sys.argv[4:]], Path(sys.argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes and a small family, one run each (smoke test)")
    ap.add_argument("--only", choices=["kernels", "e2e"], default=None)
    ap.add_argument("--dir", type=Path, default=HERE.parent / ".bench", help="where the 1.1B family lives/is made")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads of every tool end to end")
    ap.add_argument("--kernel-threads", default=None,
                    help="comma-separated thread counts for the kernel cases (default: --threads, then 1)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per kernel case (median reported)")
    ap.add_argument("--ops", default=None, help="only these kernel ops (comma-separated: exact,topk,polar)")
    ap.add_argument("--shapes", default=None, help="only these kernel shapes (comma-separated, e.g. 4096x4096)")
    ap.add_argument("--control-repeats", type=int, default=1,
                    help="runs per kernel case at the thread counts after the first (a control)")
    ap.add_argument("--long", type=float, default=LONG_S, help="a kernel case slower than this (s) runs once")
    ap.add_argument("--case-timeout", type=float, default=3600)
    ap.add_argument("--e2e-layers", type=int, default=2, help="decoder layers in the end-to-end model (0: all 22)")
    ap.add_argument("--e2e-repeats", type=int, default=3)
    ap.add_argument("--e2e-long", type=float, default=1500, help="an end-to-end tool slower than this (s) runs once")
    ap.add_argument("--e2e-exact", action="store_true", help="also ferromerge with exact_svd: true")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.quick:
        args.repeats = args.e2e_repeats = 1
    args.kernel_threads = ([int(x) for x in args.kernel_threads.split(",")] if args.kernel_threads
                           else sorted({args.threads, 1}, reverse=True))
    work = args.dir.resolve() / "svd"
    work.mkdir(parents=True, exist_ok=True)
    build = core_build()
    result: dict = dict(machine=machine(), threads=args.threads, quick=args.quick, commit=git_head(), build=build)
    text = [f"Machine: {result['machine']}", ""]
    if args.only in (None, "kernels"):
        result["kernels"] = run_kernels(args, work)
        text += [kernel_table(result["kernels"]), ""]
    if args.only in (None, "e2e"):
        result["e2e"] = run_e2e(args, work)
        text += [e2e_table(result["e2e"]), ""]
    seen = {b for r in result.get("kernels", []) for b in r["builds"]} | {build, core_build()}
    if len(seen) > 1:
        text.append(f"WARNING: the ferromerge extension changed during the run (builds {sorted(seen)}): rerun")
    result["builds"] = sorted(seen)
    print("\n".join(text))
    if args.json:
        args.json.write_text(json.dumps(dict(result, table="\n".join(text)), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
