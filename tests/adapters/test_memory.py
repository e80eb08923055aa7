"""``merge_adapters(memory_limit=...)`` / ``merge-lora --memory-limit``: the merge holds one module at a time within the
budget (``adapters.memory``), under a real limit, with the bytes of an unlimited run; a module that cannot fit is
refused before anything is written.

The limited runs are child processes: each warms up (imports, thread pools, BLAS buffers: the interpreter's share,
outside the budget as for ``run``), then resets its peak RSS (``/proc/self/clear_refs``), joins a cgroup-v1 memory
cgroup of ``budget`` + 32 MiB (when this runs as root with the v1 controller; the kernel kills the child past it)
and merges. The child's peak RSS growth must stay within the budget, while all the modules' deltas together would
take several times it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

import ferromerge
from adapters.make import write_adapter
from helpers.cli import run_cli
from ferromerge.adapters import memory
from ferromerge.errors import ParameterError

MIB = 1 << 20
BUDGET = 64 * MIB
#: 8 modules of 1024 × 1536: one ΔW is 6 MiB; 3 adapters' deltas of all modules are 144 MiB (over twice the budget)
SHAPES = {f"model.layers.{i}.mlp.down_proj": (1024, 1536) for i in range(8)}

CHILD = r"""
import json, os, sys
from ferromerge.adapters import merge_adapters
spec = json.loads(sys.argv[1])

def status(key):
    return int(next(l.split()[1] for l in open("/proc/self/status") if l.startswith(key + ":"))) * 1024

# warm up: imports, the engine's pool, NumPy's BLAS buffers (the interpreter's share, outside the budget)
merge_adapters(spec["warm_out"], spec["warm"], **spec["kw"])
open("/proc/self/clear_refs", "w").write("5")
rss0 = status("VmRSS")
if spec["cgroup"]:
    with open(os.path.join(spec["cgroup"], "cgroup.procs"), "w") as f:
        f.write(str(os.getpid()))
merge_adapters(spec["out"], spec["adapters"], memory_limit=spec["limit"], **spec["kw"])
print(json.dumps({"growth": status("VmHWM") - rss0}))
"""


def _cgroup(limit: int) -> Path | None:
    """A fresh cgroup-v1 memory cgroup of ``limit`` bytes under this process's own, or None where there is none
    to make (not root, no v1 memory controller)."""
    if os.geteuid() != 0:
        return None
    own = next((line.split(":", 2)[2].strip() for line in Path("/proc/self/cgroup").read_text().splitlines()
                if line.split(":")[1] == "memory"), None)
    root = Path("/sys/fs/cgroup/memory")
    if own is None or not (root / own.lstrip("/") / "cgroup.procs").exists():
        return None
    path = root / own.lstrip("/") / f"ferromerge-test-{uuid.uuid4().hex[:8]}"
    try:
        path.mkdir()
        (path / "memory.limit_in_bytes").write_text(str(limit))
        (path / "memory.swappiness").write_text("0")
    except OSError:
        if path.exists():
            path.rmdir()
        return None
    return path


@pytest.fixture(scope="module")
def trio(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("memory")
    for i in range(3):
        write_adapter(tmp / f"a{i}", 4, seed=i, shapes=SHAPES)
    small = {"model.layers.0.self_attn.q_proj": (24, 16)}
    for i in range(3):
        write_adapter(tmp / f"w{i}", 4, seed=i, shapes=small)
    return tmp


@pytest.mark.parametrize("combination", ["ties_svd", "magnitude_prune_svd"])
def test_a_merge_stays_within_its_budget_under_a_real_limit(trio, combination):
    tmp = trio
    weights = [0.7, -0.4, 0.5]
    adapters = [(str(tmp / f"a{i}"), w) for i, w in enumerate(weights)]
    kw = dict(combination=combination, density=0.5, threads=2, seed=3, overwrite=True)
    needs = [memory.module_bytes(combination, shape, [4, 4, 4], 4) for shape in SHAPES.values()]
    assert max(needs) <= BUDGET < 3 * sum(4 * m * n for m, n in SHAPES.values()) / 2, "the case must need streaming"
    ferromerge.merge_adapters(tmp / f"free-{combination}", adapters, **kw)

    cgroup = _cgroup(BUDGET + 32 * MIB)
    spec = {"warm_out": str(tmp / "warm"), "warm": [(str(tmp / f"w{i}"), w) for i, w in enumerate(weights)],
            "out": str(tmp / f"limited-{combination}"), "adapters": adapters, "limit": BUDGET, "kw": kw,
            "cgroup": str(cgroup) if cgroup else None}
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1"), timeout=600)
    finally:
        if cgroup is not None:
            cgroup.rmdir()
    assert proc.returncode == 0, f"killed or failed under the limit ({proc.returncode}): {proc.stderr[-2000:]}"
    growth = json.loads(proc.stdout.strip().splitlines()[-1])["growth"]
    assert growth <= BUDGET, f"peak RSS grew by {growth / MIB:.1f} MiB, budget {BUDGET / MIB:.0f} MiB"
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        assert (tmp / f"limited-{combination}" / name).read_bytes() == (tmp / f"free-{combination}" / name).read_bytes()


def test_a_module_that_cannot_fit_is_refused_before_anything_is_written(tmp_path):
    shapes = {"model.layers.0.mlp.down_proj": (2048, 2560), "model.layers.0.self_attn.q_proj": (64, 64)}
    for i in range(2):
        write_adapter(tmp_path / f"a{i}", 4, seed=i, shapes=shapes)
    adapters = [(tmp_path / "a0", 1.0), (tmp_path / "a1", 0.5)]
    with pytest.raises(ParameterError, match=r"module model\.layers\.0\.mlp\.down_proj: combination 'ties_svd' "
                                             r"needs about .* more than the memory limit of 67\.1 MB \(asked\)"):
        ferromerge.merge_adapters(tmp_path / "out", adapters, combination="ties_svd", density=0.5,
                                  memory_limit="64MiB")
    assert not (tmp_path / "out").exists()
    # the factor-only types fit the same budget
    ferromerge.merge_adapters(tmp_path / "svd", adapters, combination="svd", memory_limit="64MiB")
    proc = run_cli("merge-lora", tmp_path / "cli", "--adapter", f"{tmp_path / 'a0'}", "--adapter",
                   f"{tmp_path / 'a1'}:0.5", "--combination", "ties_svd", "--density", "0.5", "--memory-limit",
                   "64MiB")
    assert proc.returncode == 2 and proc.stderr.startswith("ferromerge: error: module") and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and not (tmp_path / "cli").exists()
    bad = run_cli("merge-lora", tmp_path / "cli", "--adapter", f"{tmp_path / 'a0'}", "--memory-limit", "1MiB")
    assert bad.returncode == 2 and "at least 64 MiB" in bad.stderr


def test_the_yaml_route_passes_the_limit(tmp_path):
    shapes = {"model.layers.0.mlp.down_proj": (2048, 2560)}
    for i in range(2):
        write_adapter(tmp_path / f"a{i}", 4, seed=i, shapes=shapes)
    config = tmp_path / "merge.yml"
    config.write_text(f"merge_method: ties_svd\nadapters:\n  - adapter: {tmp_path / 'a0'}\n"
                      f"  - adapter: {tmp_path / 'a1'}\nparameters:\n  density: 0.5\n")
    with pytest.raises(ParameterError, match="more than the memory limit"):
        ferromerge.run(config, tmp_path / "out", memory_limit="64MiB")
