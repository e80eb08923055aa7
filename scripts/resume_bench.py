"""Resume after kill -9 (issue 13): the time of ``ferromerge run --resume`` after a kill at 10%, 50% and 90% of a
run, against full runs, on a synthetic family of about 1.2 GB of inputs (base + 3 fine-tunes, bf16, 154M
parameters each), TIES, 20 MB output shards. Each resumed output is compared byte for byte with the full run's.

    python scripts/resume_bench.py [WORKDIR]   # default ./resume-bench; makes the family on first use (~1 min)
    python scripts/resume_bench.py WORKDIR --tinyllama   # the 1.1B family of benches/compare.py (8.8 GB in),
                                                         # 200 MB output shards

The kill is sent from outside (SIGKILL) once the run's journal lists the wanted share of the shards.
"""

from __future__ import annotations

import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from ferromerge.io import journal
from ferromerge.synth import make_family

SHARD = "20MB"


def run(out: str, *extra: str) -> tuple[float, str]:
    start = time.perf_counter()
    r = subprocess.run(["ferromerge", "run", "ties.yml", out, "--out-shard-size", SHARD, *extra], capture_output=True,
                       text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr)
    return time.perf_counter() - start, r.stdout.strip().splitlines()[-1]


def clean(out: str) -> None:
    shutil.rmtree(out, ignore_errors=True)
    for p in Path(".").glob(f".{out}.ferromerge-*"):
        shutil.rmtree(p) if p.is_dir() else p.unlink()


def killed_then_resumed(fraction: float, shards: int, full: float) -> None:
    out = f"r{round(fraction * 100)}"
    clean(out)
    want = max(1, round(shards * fraction))
    start = time.perf_counter()
    proc = subprocess.Popen(["ferromerge", "run", "ties.yml", out, "--quiet", "--out-shard-size", SHARD])
    while True:
        found = list(Path(".").glob(f".{out}.ferromerge-partial-*"))
        if found and len(journal.read(found[0])[1]) >= want:
            break
        if proc.poll() is not None:
            raise SystemExit("the run finished before the kill")
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    killed = time.perf_counter() - start
    proc.wait()
    kept = len(journal.read(found[0])[1])
    seconds, summary = run(out, "--resume")
    same = all(filecmp.cmp(f"full/{f}", f"{out}/{f}", shallow=False) for f in os.listdir("full") if f != "README.md")
    print(f"kill -9 at {fraction:.0%} ({kept}/{shards} shards journaled, {killed:.2f} s in)"
          f": resumed run {seconds:.2f} s = {seconds / full:.0%} of a full run; identical bytes: {same}; {summary}",
          flush=True)
    clean(out)


def main() -> None:
    global SHARD
    args = [a for a in sys.argv[1:] if a != "--tinyllama"]
    tinyllama = "--tinyllama" in sys.argv[1:]
    work = Path(args[0] if args else "resume-bench")
    work.mkdir(exist_ok=True)
    os.chdir(work)
    if tinyllama:
        SHARD = "200MB"
    if not Path("family/ft3").is_dir():
        if tinyllama:  # benches/compare.py's family: TinyLlama-1.1B's shape
            make_family("family", n_finetunes=3, dtype="bfloat16", seed=0, shard_size=2 * 10**9, delta_scale=0.002,
                        hidden=2048, intermediate=5632, layers=22, vocab=32000, heads=32, kv_heads=4)
        else:
            make_family("family", vocab=32000, hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=8)
    config = {"merge_method": "ties", "base_model": "family/base",
              "models": [{"model": f"family/ft{i}", "parameters": {"weight": w, "density": 0.5}}
                         for i, w in ((1, 1.0), (2, 0.5), (3, 0.5))]}
    Path("ties.yml").write_text(yaml.safe_dump(config))
    clean("full")
    run("full")  # warms the page cache
    fulls = []
    for _ in range(2):
        clean("full")
        seconds, summary = run("full")
        fulls.append(seconds)
        print(f"full run {seconds:.2f} s; {summary}", flush=True)
    shards = len(set(json.loads(Path("full/model.safetensors.index.json").read_text())["weight_map"].values()))
    for fraction in (0.1, 0.5, 0.9):
        killed_then_resumed(fraction, shards, sum(fulls) / len(fulls))


if __name__ == "__main__":
    main()
