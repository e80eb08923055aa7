"""The Ray executor's overhead (issue 15): a merge through local Ray clusters of 1, 2 and 3 nodes of 1 CPU each
(``ray.cluster_utils.Cluster``, every node on this machine), against the local run of the same config in the same
invocation (after a warm-up run), each output compared byte for byte with the local one. Also: the time to start
each cluster, the whole ``--executor ray`` run without a cluster (ferromerge starts and stops its own Ray
instance), and the cost of one task: a tiny family's 22 shards as 22 tasks against the same shards as one task, on
the 1-node cluster (best of 3 each), divided by the 21 extra tasks.

    python scripts/ray_bench.py CONFIG WORKDIR [SHARD_SIZE]     # e.g. /work/bench11/family/ties.yml bench 250MB

The nodes share this machine's cores, so the point is overhead, not speedup. /proc/loadavg is printed before and
after (a shared machine: figures taken under load say so).
"""

from __future__ import annotations

import filecmp
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
from ray.cluster_utils import Cluster

import ferromerge
from ferromerge.synth import make_family


def loadavg() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def timed(config: Any, out: Path, shard: str, **kw: Any) -> tuple[float, ferromerge.RunReport]:
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    report = ferromerge.run(config, out, quiet=True, out_shard_size=shard, **kw)
    return time.perf_counter() - start, report


def same(a: Path, b: Path) -> bool:
    names = sorted(p.name for p in a.iterdir() if p.name != "README.md")
    return names == sorted(p.name for p in b.iterdir() if p.name != "README.md") and all(
        filecmp.cmp(a / n, b / n, shallow=False) for n in names
    )


def main() -> None:
    config, work = Path(sys.argv[1]).absolute(), Path(sys.argv[2]).absolute()
    shard = sys.argv[3] if len(sys.argv) > 3 else "250MB"
    work.mkdir(parents=True, exist_ok=True)
    temp = Path(tempfile.mkdtemp(prefix="fmb-ray-", dir="/tmp"))
    os.environ.update(RAY_TMPDIR=str(temp), RAY_USAGE_STATS_ENABLED="0", RAY_AUTH_TOKEN_PATH=str(temp / "token"))
    (temp / "token").write_text(os.urandom(16).hex())
    tiny = make_family(work / "tiny", layers=4, seed=5)
    tiny_config = {"merge_method": "ties", "base_model": str(tiny.base),
                   "models": [{"model": str(f), "parameters": {"weight": 1.0, "density": 0.5}} for f in tiny.finetunes]}
    print("loadavg before:", loadavg())
    reference = work / "local"
    rows = []
    timed(str(config), reference, shard)  # warm-up: the inputs into the page cache
    for threads in (None, 1):
        seconds, report = timed(str(config), reference, shard, threads=threads)
        rows.append((f"local, threads {threads or 'all (2)'}", seconds, report.bytes_read, "-", "reference",
                     loadavg()))
    seconds, report = timed(str(config), work / "own", shard, executor="ray")
    rows.append(("ray, own instance (start+stop inside)", seconds, report.bytes_read, "-",
                 "identical" if same(reference, work / "own") else "DIFFERENT", loadavg()))
    shutil.rmtree(work / "own")
    # ray.init connected to the clusters below is not ferromerge's: its own instance must not see RAY_ADDRESS
    task_cost = None
    for n in (1, 2, 3):
        start = time.perf_counter()
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False,
                                                          "object_store_memory": 80 << 20})
        for _ in range(n - 1):
            c.add_node(num_cpus=1, object_store_memory=80 << 20)
        c.wait_for_nodes()
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False)
        started = time.perf_counter() - start
        try:
            seconds, report = timed(str(config), work / f"ray{n}", shard, executor="ray", threads=1)
            ok = "identical" if same(reference, work / f"ray{n}") else "DIFFERENT"
            rows.append((f"ray, {n} node(s) x 1 CPU, threads 1", seconds, report.bytes_read, f"{started:.1f}", ok,
                         loadavg()))
            if n == 1:
                # per-task cost: 22 one-shard tasks against one task of the same 22 shards (best of 3 each)
                many = min(timed(tiny_config, work / "tiny-ray", "20000", executor="ray")[0] for _ in range(3))
                one = min(timed(tiny_config, work / "tiny-ray", "20000", executor="ray", ray_tasks=1)[0]
                          for _ in range(3))
                task_cost = (many - one) / 21
                rows.append(("tiny family: 22 one-shard tasks / 1 task of 22 shards, 1 node", many, 0, "-",
                             f"1 task: {one:.2f} s", loadavg()))
        finally:
            ray.shutdown()
            c.shutdown()
            shutil.rmtree(work / f"ray{n}", ignore_errors=True)
    print("loadavg after:", loadavg())
    print("| run | seconds | GB/s read | cluster start s | bytes | loadavg after |")
    print("|---|---|---|---|---|---|")
    for name, seconds, read, started, ok, load in rows:
        print(f"| {name} | {seconds:.2f} | {read / seconds / 1e9:.2f} | {started} | {ok} | {load} |")
    if task_cost is not None:
        print(f"per-task cost (tiny family, 1 node): {task_cost * 1000:.1f} ms")
    shutil.rmtree(temp, ignore_errors=True)


if __name__ == "__main__":
    main()
