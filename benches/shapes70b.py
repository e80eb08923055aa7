"""70B shapes: a family of Llama-3-70B-shaped tensors (vocab 128256, hidden 8192, MLP 28672, 64 heads, 8 KV heads of
128; one or two layers; base + 3 fine-tunes; bf16; 3 GB safetensors shards with an index and a config.json), merged
by ferromerge with TIES, DARE-TIES and DELLA cold, unlimited and inside a 4 GiB cgroup-v1 memory cgroup (outputs
compared by SHA-256), next to the cold read floor; and by mergekit 0.1.5 on the same family.

    python benches/shapes70b.py make DIR [--layers 1]
    python benches/shapes70b.py run DIR [--methods ties dare_ties della] [--limit 4GiB] [--threads 2]
                                [--mergekit-methods ties] [--mergekit-cap 16GiB] [--no-mergekit] [--json OUT]

``run`` needs root (drop_caches before every run, the cgroups). Every run is cold (``sync; echo 3 >
/proc/sys/vm/drop_caches`` first): the family (5.9 GB a model with one layer) does not fit this machine's page
cache anyway. Outputs are hashed and deleted at once (disk). In cgroup v1 the page cache a process reads through
counts toward its cgroup's memory; at the limit the kernel reclaims cache before it kills anything, so a limit
that holds the cache as well is the realistic, stricter test. mergekit's "unlimited" run is inside a cap
(``--mergekit-cap``, default 16 GiB) so that an out-of-memory ends mergekit and not the other jobs of a shared
machine; it also tries the same merge inside ``--limit`` to see whether it survives.

Values: generating 12 billion normal draws costs tens of minutes on a 2-core machine, so every tensor's elements
come from fixed pools instead: the base's bf16 values are slices, at random offsets, of a pool of 2^26 draws of
N(0, 0.02²) (norm weights: 1.0); a fine-tune adds to each base element's bf16 bit pattern a slice of a pool of
small integers (round(N(0, 3²)), so the weight moves by about 3 bf16 steps, ~2% of its magnitude). Every tensor's
values are normally distributed and every fine-tune's deltas differ, but slices repeat across the pool: fine for
timing and memory, not a model.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import yaml

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from compare import MERGEKIT_PY, drop_caches, read_bandwidth  # noqa: E402
from methods import (  # noqa: E402
    configs,
    install_kill_switch,
    loadavg,
    machine_line,
    run_tool,
    sample,
    weight_files,
)
from svd import git_head  # noqa: E402

VOCAB, HIDDEN, MLP, HEADS, KV_HEADS, HEAD_DIM = 128256, 8192, 28672, 64, 8, 128
POOL = 1 << 26
CHUNK = 1 << 24  # elements written per slice
SHARD = 3 * 10**9
NAMES = ("base", "ft1", "ft2", "ft3")


def shapes(layers: int) -> list[tuple[str, tuple[int, ...]]]:
    s: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    kv = KV_HEADS * HEAD_DIM
    for i in range(layers):
        p = f"model.layers.{i}."
        s += [(p + "input_layernorm.weight", (HIDDEN,)),
              (p + "self_attn.q_proj.weight", (HEADS * HEAD_DIM, HIDDEN)),
              (p + "self_attn.k_proj.weight", (kv, HIDDEN)),
              (p + "self_attn.v_proj.weight", (kv, HIDDEN)),
              (p + "self_attn.o_proj.weight", (HIDDEN, HEADS * HEAD_DIM)),
              (p + "post_attention_layernorm.weight", (HIDDEN,)),
              (p + "mlp.gate_proj.weight", (MLP, HIDDEN)),
              (p + "mlp.up_proj.weight", (MLP, HIDDEN)),
              (p + "mlp.down_proj.weight", (HIDDEN, MLP))]
    s += [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]
    return s


def config(layers: int) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
        "intermediate_size": MLP, "num_hidden_layers": layers, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "vocab_size": VOCAB,
        "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "hidden_act": "silu",
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False, "bos_token_id": 128000,
        "eos_token_id": 128001, "torch_dtype": "bfloat16",
    }


def bf16_bits(x: np.ndarray) -> np.ndarray:
    u = x.astype(np.float32).view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def make(root: Path, layers: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base_pool = bf16_bits(rng.standard_normal(POOL, dtype=np.float32) * np.float32(0.02))
    # float32 draws include a few exact zeros; a fine-tune's bit offset would turn a ±0 into NaN bit patterns
    tiny = (base_pool & 0x7FFF) < 0x3000  # |x| < 2^-32
    base_pool[tiny] = bf16_bits(np.full(int(tiny.sum()), 0.02, np.float32))
    noise_pool = np.rint(rng.standard_normal(POOL, dtype=np.float32) * 3).astype(np.int16).view(np.uint16)
    one = bf16_bits(np.ones(1, np.float32))[0]
    # shards: tensors in order, a new file when the next would pass SHARD bytes
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes(layers):
        nbytes = 2 * int(np.prod(shape))
        if shards[-1] and size + nbytes > SHARD:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    files = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    for n in NAMES:
        d = root / n
        d.mkdir(parents=True, exist_ok=True)
        (d / "config.json").write_text(json.dumps(config(layers), indent=2) + "\n")
    weight_map, total = {}, 0
    for fname, tensors in zip(files, shards):
        header, off = {}, 0
        for name, shape in tensors:
            nbytes = 2 * int(np.prod(shape))
            header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + nbytes]}
            off += nbytes
            weight_map[name] = fname
        total += off
        hb = json.dumps(header, separators=(",", ":")).encode()
        hb += b" " * (-len(hb) % 8)
        outs = [open(root / n / fname, "wb") for n in NAMES]
        try:
            for f in outs:
                f.write(len(hb).to_bytes(8, "little") + hb)
            for _name, shape in tensors:
                n_el = int(np.prod(shape))
                for start in range(0, n_el, CHUNK):
                    m = min(CHUNK, n_el - start)
                    if len(shape) == 1:
                        base = np.full(m, one, np.uint16)
                    else:
                        o = int(rng.integers(0, POOL - m + 1))
                        base = base_pool[o: o + m]
                    outs[0].write(base.tobytes())
                    for f in outs[1:]:
                        o = int(rng.integers(0, POOL - m + 1))
                        f.write((base + noise_pool[o: o + m]).tobytes())  # uint16 wraps: a signed add of the bits
        finally:
            for f in outs:
                f.close()
        print(f"wrote {fname} ({off / 1e9:.2f} GB a model)", flush=True)
    for n in NAMES:
        (root / n / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1) + "\n")
    (root / "COMPLETE").write_text(f"layers {layers}\n")


def sha(out: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(out.glob("*.safetensors")):
        with open(f, "rb") as fh:
            while b := fh.read(64 << 20):
                h.update(b)
    return h.hexdigest()


def parse_size(s: str) -> int:
    from ferromerge._validate import parse_size as p

    return int(p(s))


class Cgroup:
    def __init__(self, name: str, limit: int) -> None:
        self.path = Path("/sys/fs/cgroup/memory") / name
        self.path.mkdir(exist_ok=True)
        (self.path / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (self.path / "memory.max_usage_in_bytes").write_text("0\n")  # reset the high-water mark

    def stats(self) -> dict[str, int]:
        return {"cgroup_max_usage": int((self.path / "memory.max_usage_in_bytes").read_text()),
                "cgroup_failcnt": int((self.path / "memory.failcnt").read_text())}

    def remove(self) -> None:
        for _ in range(50):
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def one_run(tool: str, cfg: Path, work: Path, threads: int, label: str, limit: int | None,
            timeout: float | None = None) -> dict[str, Any]:
    out = work / f"out-{tool}"
    drop_caches()
    cg = Cgroup(f"fm70b-{os.getpid()}-{label}", limit) if limit else None
    try:
        r = run_tool(tool, cfg, out, threads, work / f"{label}.log", cg.path if cg else None, timeout)
        if cg:
            r.update(cg.stats(), limit=limit)
    finally:
        if cg:
            cg.remove()
    r["label"] = label
    if r["rc"] == 0:
        r["sha256"] = sha(out)
        r["sample"] = sample(out)
    shutil.rmtree(out, ignore_errors=True)
    print(f"{label:34} {r['wall']:7.1f} s  CPU {r['cpu']:7.1f} s  peak RSS {r['peak_rss'] / 2**30:.2f} GiB  exit {r['rc']}"
          + (f"  cgroup peak {r['cgroup_max_usage'] / 2**30:.2f} GiB" if cg else "")
          + f"  load {r['load_before'][0]:.1f}->{r['load_after'][0]:.1f}", flush=True)
    return r


def run(a: argparse.Namespace) -> int:
    fam = a.dir.resolve()
    work = (a.work or fam / "runs").resolve()
    work.mkdir(exist_ok=True)
    install_kill_switch(work / "child.pgid")
    cfgs = configs(fam)
    files = [p for n in NAMES for p in weight_files(fam / n)]
    in_bytes = sum(p.stat().st_size for p in files)
    limit = parse_size(a.limit)
    res: dict[str, Any] = dict(family=str(fam), layers=json.loads((fam / "base/config.json").read_text())
                               ["num_hidden_layers"], input_bytes=in_bytes, threads=a.threads, git=git_head(),
                               machine=machine_line(), limit=limit, load_start=loadavg(),
                               started=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                               runs=[])
    drop_caches()
    l0 = loadavg()
    secs, _ = read_bandwidth(files)
    res["floor_cold"] = dict(wall=secs, load_before=l0, load_after=loadavg())
    print(f"cold read floor: {in_bytes / 1e9:.2f} GB in {secs:.1f} s ({in_bytes / secs / 1e9:.2f} GB/s)", flush=True)

    def save() -> None:
        res["load_end"] = loadavg()
        if a.json:
            a.json.write_text(json.dumps(res, indent=1, default=lambda o: None))

    refs: dict[str, dict[str, Any]] = {}
    for method in [] if a.no_ferromerge else a.methods:
        cfg = work / f"{method}.yml"
        cfg.write_text(yaml.safe_dump(cfgs[method], sort_keys=False))
        free = shutil.disk_usage(work).free
        if free < in_bytes // 4 + (2 << 30):
            print(f"only {free / 1e9:.1f} GB free: stopping before {method}", file=sys.stderr)
            break
        u = one_run("ferromerge", cfg, work, a.threads, f"{method} ferromerge unlimited", None)
        c = one_run("ferromerge", cfg, work, a.threads, f"{method} ferromerge {a.limit} cgroup", limit)
        c["byte_identical_to_unlimited"] = bool(u.get("sha256")) and u.get("sha256") == c.get("sha256")
        print(f"{method}: byte-identical inside {a.limit}: {c['byte_identical_to_unlimited']}", flush=True)
        refs[method] = u
        for r in (u, c):
            res["runs"].append({k: v for k, v in r.items() if k != "sample"} | {"method": method, "tool": "ferromerge"})
        save()
    if not a.no_mergekit and MERGEKIT_PY.exists():
        for method in a.mergekit_methods:
            cfg = work / f"{method}.yml"
            cfg.write_text(yaml.safe_dump(cfgs[method], sort_keys=False))
            for label, lim in ((f"{method} mergekit {a.limit} cgroup", limit),
                               (f"{method} mergekit (cap {a.mergekit_cap})", parse_size(a.mergekit_cap))):
                r = one_run("mergekit", cfg, work, a.threads, label, lim, a.mergekit_timeout)
                if r.get("sample") is not None and method in refs and refs[method].get("sample") is not None:
                    r["vs_ferromerge"] = compare_sample_dicts(refs[method]["sample"], r["sample"])
                    print(f"{label}: {r['vs_ferromerge']}", flush=True)
                res["runs"].append({k: v for k, v in r.items() if k != "sample"} | {"method": method, "tool": "mergekit"})
                save()
    save()
    print(table(res))
    return 0


def compare_sample_dicts(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> str:
    if a.keys() != b.keys():
        return "tensor names differ"
    worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a)
    same = sum(int((a[k] == b[k]).sum()) for k in a) / sum(a[k].size for k in a)
    return f"sampled 4096/tensor: {100 * same:.2f}% identical, max |difference| {worst:.2e}"


def table(res: dict[str, Any]) -> str:
    fl = res["floor_cold"]["wall"]
    lines = [f"{res['machine']}; {res['layers']}-layer 70B-shaped family, {res['input_bytes'] / 1e9:.2f} GB in "
             f"(base + 3, bf16); threads {res['threads']}; ferromerge at {res['git']}; {res['started']}; cold read "
             f"floor {fl:.1f} s ({res['input_bytes'] / fl / 1e9:.2f} GB/s); load {res['load_start']} -> "
             f"{res.get('load_end')}", "",
             "| method | tool | memory | wall s (cold) | ÷ cold floor | CPU s | peak RSS GiB | cgroup peak GiB | exit | "
             "output | load before → after |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["runs"]:
        mem = r["label"].split(r["tool"], 1)[1].strip()
        out = ("SHA-256 " + r["sha256"][:12] + ("…, identical to unlimited" if r.get("byte_identical_to_unlimited")
                                                else "…") if r.get("sha256") else "–")
        if r.get("vs_ferromerge"):
            out += f"; vs ferromerge: {r['vs_ferromerge']}"
        lines.append(
            f"| {r['method']} | {r['tool']} | {mem} | {r['wall']:.1f} | {r['wall'] / fl:.2f} | {r['cpu']:.1f} | "
            f"{r['peak_rss'] / 2**30:.2f} | " + (f"{r['cgroup_max_usage'] / 2**30:.2f}" if "cgroup_max_usage" in r else "–")
            + f" | {r['rc']}{' (stopped: time limit)' if r.get('timed_out') else ''} | {out} | {r['load_before'][0]:.1f} → {r['load_after'][0]:.1f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make")
    m.add_argument("dir", type=Path)
    m.add_argument("--layers", type=int, default=1)
    r = sub.add_parser("run")
    r.add_argument("dir", type=Path)
    r.add_argument("--methods", nargs="+", default=["ties", "dare_ties", "della"])
    r.add_argument("--mergekit-methods", nargs="+", default=["ties"])
    r.add_argument("--limit", default="4GiB")
    r.add_argument("--mergekit-cap", default="16GiB")
    r.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    r.add_argument("--no-mergekit", action="store_true")
    r.add_argument("--no-ferromerge", action="store_true", help="only the floor and mergekit's runs")
    r.add_argument("--mergekit-timeout", type=float, default=None,
                   help="stop a mergekit run after this many seconds (its peak RSS and CPU so far are kept)")
    r.add_argument("--work", type=Path, default=None)
    r.add_argument("--json", type=Path, default=None)
    t = sub.add_parser("table")
    t.add_argument("json", type=Path)
    a = ap.parse_args()
    if a.cmd == "make":
        t0 = time.perf_counter()
        make(a.dir, a.layers)
        print(f"made {a.dir} in {time.perf_counter() - t0:.0f} s")
        return 0
    if a.cmd == "table":
        print(table(json.loads(a.json.read_text())))
        return 0
    return run(a)


if __name__ == "__main__":
    sys.exit(main())
