"""The Ray executor (issue 15) on a local Ray cluster of three 1-CPU nodes (``ray.cluster_utils.Cluster``, one per
module): merges through the cluster are byte-identical to the local run for TIES, DARE-TIES with a seed, SLERP, a
spectral method (tsv_m) and slices with a tokenizer union, whatever the number of tasks; a worker killed in the
middle of a shard, a node removed with tasks in flight, and a driver killed with ``kill -9`` then resumed with
``--resume`` all end in the same bytes. Skipped without Ray (``pip install 'ferromerge[ray]'``).

Faults are injected from the test side only (``helpers.ray_faults``, a worker setup hook of this module's Ray job).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster  # noqa: E402

import ferromerge  # noqa: E402
from ferromerge.synth import Family, Shape, bpe_tokenizer, llama_config, make_family, random_weights, save_model  # noqa: E402
from helpers.cli import ties_config, write_config  # noqa: E402

pytestmark = pytest.mark.ray

#: 22 output shards of 1-3 tensors each over the 4-layer family: many tasks, each tiny
SHARD = 20_000

TESTS = Path(__file__).resolve().parents[1]
OBJECT_STORE = 80 << 20


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[Cluster, list[Any], Path]]:
    """A head and two worker nodes of 1 CPU each, with this process connected; its Ray files under a short
    directory in /tmp (Unix socket paths), its token there too (never ~/.ray). Yields the cluster, the worker
    nodes and the fault directory's path (``helpers.ray_faults``: absent = no faults)."""
    temp = Path(tempfile.mkdtemp(prefix="fmt-ray-", dir="/tmp"))
    token = temp / "token"
    token.write_text("ferromerge-test-token-" + os.urandom(8).hex())
    mp = pytest.MonkeyPatch()
    mp.setenv("RAY_AUTH_TOKEN_PATH", str(token))
    mp.delenv("RAY_AUTH_MODE", raising=False)  # Ray sets it to "token" when it starts the head: undone after
    mp.setenv("RAY_USAGE_STATS_ENABLED", "0")
    mp.setenv("RAY_TMPDIR", str(temp))  # every file of the cluster's under temp/ray
    faults = temp / "faults"
    c = None
    try:
        c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "object_store_memory": OBJECT_STORE,
                                                          "include_dashboard": False})
        workers = [c.add_node(num_cpus=1, object_store_memory=OBJECT_STORE) for _ in range(2)]
        c.wait_for_nodes()
        path = os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])
        ray.init(address=c.address, logging_level="ERROR", log_to_driver=False, runtime_env={
            "worker_process_setup_hook": "helpers.ray_faults.install",
            "env_vars": {"PYTHONPATH": path, "FM_RAY_FAULTS": str(faults), "FM_RAY_HEAD": c.head_node.node_id},
        })
        yield c, workers, faults
    finally:
        ray.shutdown()
        if c is not None:
            c.shutdown()
        mp.undo()
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("ray_family"), layers=4, seed=5)


def same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def vocab_family(root: Path) -> tuple[Path, Path, Path]:
    """Three 2-layer models whose tokenizers differ (some tokens in one model only)."""
    words = {"base": (["the", "cat", "sat", "on"], None, []), "a": (["the", "dog", "sat", "mat", "on"], 1, ["<x>"]),
             "b": (["cat", "hat", "dog", "in"], 2, ["<y>", "<x>"])}
    out = []
    for i, (name, (w, seed, added)) in enumerate(words.items()):
        files = bpe_tokenizer(w, seed=seed, added=added)
        data = json.loads(files["tokenizer.json"])
        tokens = {**data["model"]["vocab"], **{e["content"]: e["id"] for e in data["added_tokens"]}}
        shape = Shape(hidden=16, intermediate=32, layers=2, vocab=len(tokens), heads=2, kv_heads=1)
        weights = random_weights(shape, np.random.default_rng(i))
        out.append(save_model(root / name, weights, dtype="bfloat16", config=llama_config(shape, "bfloat16"),
                              tokenizer=files))
    return out[0], out[1], out[2]


def configs(family: Family, vocab: tuple[Path, Path, Path]) -> dict[str, dict[str, Any]]:
    b = str(family.base)
    ft = [str(f) for f in family.finetunes]
    base, a, c = (str(p) for p in vocab)
    return {
        "ties": ties_config(family),
        "dare_ties": {**ties_config(family), "merge_method": "dare_ties"},
        "slerp": {"merge_method": "slerp", "base_model": b, "models": [{"model": ft[0]}], "parameters": {"t": 0.3}},
        "tsv_m": {"merge_method": "tsv_m", "base_model": b, "models": [{"model": m} for m in ft]},
        "slices_union": {
            "merge_method": "linear",
            "slices": [{"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": 1.0}},
                                    {"model": c, "layer_range": [0, 2], "parameters": {"weight": 2.0}}]},
                       {"sources": [{"model": base, "layer_range": [1, 2], "parameters": {"weight": 1.0}}]}],
            "base_model": base,
            "tokenizer_source": "union",
            "dtype": "float32",
        },
    }


@pytest.fixture(scope="module")
def all_configs(family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return configs(family, vocab_family(tmp_path_factory.mktemp("ray_vocab")))


@pytest.mark.parametrize(("method", "tasks"), [("ties", None), ("ties", 2), ("dare_ties", 5), ("slerp", None),
                                               ("tsv_m", 3), ("slices_union", None)])
def test_a_merge_through_the_cluster_is_byte_identical_to_the_local_run(
    cluster: Any, all_configs: dict[str, dict[str, Any]], tmp_path: Path, method: str, tasks: int | None
) -> None:
    seed = {"seed": 7} if method == "dare_ties" else {}
    config = all_configs[method]
    local, on_ray = tmp_path / "local" / "out", tmp_path / "ray" / "out"
    ferromerge.run(config, local, quiet=True, out_shard_size=SHARD, **seed)
    seen: list[tuple[int, int]] = []
    report = ferromerge.run(config, on_ray, quiet=True, out_shard_size=SHARD, executor="ray", ray_tasks=tasks,
                            on_progress=lambda d, t, b, bt: seen.append((d, t)), **seed)
    same_files(local, on_ray)
    assert report.tensors == seen[-1][0] == seen[-1][1]
    if tasks is not None:
        assert len(seen) == min(tasks, len(list(local.glob("*.safetensors"))))
    assert not list(on_ray.parent.glob(".out.ferromerge-*"))


def test_the_tokenizer_union_is_written_by_the_driver(all_configs: dict[str, dict[str, Any]], cluster: Any,
                                                     tmp_path: Path) -> None:
    on_ray = tmp_path / "out"
    ferromerge.run(all_configs["slices_union"], on_ray, quiet=True, executor="ray")
    assert (on_ray / "tokenizer.json").is_file() and "<y>" in (on_ray / "tokenizer.json").read_text()


def test_without_an_address_the_run_starts_and_removes_its_own_ray_instance(family: Family, tmp_path: Path) -> None:
    """No cluster, no $RAY_ADDRESS: ferromerge starts Ray on this machine with its files (and its token) in a new
    directory under $TMPDIR, removed at the end; nothing in $HOME; the same bytes (a process of its own: this
    module's session is open here)."""
    config = write_config(tmp_path / "ties.yml", ties_config(family))
    local = tmp_path / "local" / "out"
    ferromerge.run(config, local, quiet=True, out_shard_size=SHARD)
    home, temp = tmp_path / "home", Path(tempfile.mkdtemp(prefix="fmt-", dir="/tmp"))
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env.update(HOME=str(home), TMPDIR=str(temp))
    out = tmp_path / "ray" / "out"
    try:
        done = subprocess.run([sys.executable, "-m", "ferromerge.cli", "run", str(config), str(out), "--executor",
                               "ray", "--ray-tasks", "3", "--out-shard-size", str(SHARD)],
                              capture_output=True, text=True, timeout=300, env=env)
        assert done.returncode == 0, done.stderr
        assert f"started a Ray instance on this machine ({temp}/fm-ray-" in done.stderr
        assert list(temp.iterdir()) == [] and list(home.iterdir()) == []
    finally:
        shutil.rmtree(temp, ignore_errors=True)
    same_files(local, out)


def test_a_worker_killed_in_the_middle_of_a_shard_is_retried_to_identical_bytes(
    cluster: Any, family: Family, tmp_path: Path
) -> None:
    _, _, faults = cluster
    local = tmp_path / "local" / "out"
    ferromerge.run(ties_config(family), local, quiet=True, out_shard_size=SHARD)
    faults.mkdir()
    try:
        (faults / "die").touch()
        on_ray = tmp_path / "ray" / "out"
        ferromerge.run(ties_config(family), on_ray, quiet=True, out_shard_size=SHARD, executor="ray")
        assert (faults / "died").exists()
        starts = (faults / "starts").read_text().splitlines()
    finally:
        shutil.rmtree(faults)
    same_files(local, on_ray)
    shards = [line.split(" ", 1)[1] for line in starts]
    assert len(shards) == len(set(shards)) + 1  # the killed task ran again, once


def test_a_driver_killed_mid_run_resumes_with_resume_to_identical_bytes(
    cluster: Any, family: Family, tmp_path: Path
) -> None:
    c, _, _ = cluster
    config = write_config(tmp_path / "ties.yml", ties_config(family))
    local = tmp_path / "local" / "out"
    ferromerge.run(config, local, quiet=True, out_shard_size=SHARD)
    out = tmp_path / "ray" / "out"
    # a driver of its own that kill -9s itself once a few tasks are journaled, other tasks still queued or running
    script = textwrap.dedent(f"""
        import os, signal, ferromerge
        def stop(done, total, b, bt):
            if done >= 6:
                os.kill(os.getpid(), signal.SIGKILL)
        ferromerge.run({str(config)!r}, {str(out)!r}, quiet=True, out_shard_size={SHARD}, executor="ray",
                       ray_address={c.address!r}, resume=True, on_progress=stop)
    """)
    killed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=180)
    assert killed.returncode == -9, killed.stderr
    assert not out.exists()
    partial = list(out.parent.glob(".out.ferromerge-partial-*"))
    assert len(partial) == 1
    journaled = (partial[0] / ".ferromerge-journal.jsonl").read_text().splitlines()
    assert len(journaled) >= 2  # the identity, then at least one finished shard
    resumed = subprocess.run(
        [sys.executable, "-m", "ferromerge.cli", "run", str(config), str(out), "--resume", "--executor", "ray",
         "--address", c.address, "--out-shard-size", str(SHARD)],
        capture_output=True, text=True, timeout=180,
    )
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed:" in resumed.stdout and "Traceback" not in resumed.stderr
    same_files(local, out)
    assert not list(out.parent.glob(".out.ferromerge-*"))


def test_an_input_changed_between_two_tasks_fails_the_run_and_writes_nothing(
    cluster: Any, family: Family, tmp_path: Path
) -> None:
    """Each task's engine checks its inputs unchanged over its own reads only; a file touched once every task is
    done (so no engine can see it) is caught by the driver, which compares every input at the end of the run with
    the start."""
    copy = tmp_path / "family"
    shutil.copytree(family.base.parent, copy)
    moved = Family(copy / family.base.name, [copy / f.name for f in family.finetunes])
    victim = next(moved.finetunes[0].glob("*.safetensors"))

    def touch_once(done: int, total: int, *_: int) -> None:
        if done == total:
            os.utime(victim, ns=(time.time_ns(), time.time_ns() + 10**9))
            touched.append(victim)

    touched: list[Path] = []
    out = tmp_path / "out"
    with pytest.raises(ferromerge.InputError, match=rf"{victim}: changed while the merge was reading it"):
        ferromerge.run(ties_config(moved), out, quiet=True, out_shard_size=SHARD, executor="ray", ray_tasks=4,
                       on_progress=touch_once)
    assert touched and not out.exists() and not list(tmp_path.glob(".out.ferromerge-*"))


def test_a_node_removed_with_tasks_in_flight_still_gives_identical_bytes(
    cluster: Any, family: Family, tmp_path: Path
) -> None:
    """Last in the module: the cluster has one worker node less afterwards."""
    c, workers, faults = cluster
    local = tmp_path / "local" / "out"
    ferromerge.run(ties_config(family), local, quiet=True, out_shard_size=SHARD)
    victim = workers[0]
    removed = []

    def remove_the_node_once_it_merges(*_: int) -> None:
        """At the first finished task (the head's: worker nodes sleep first): remove a worker node whose task has
        started (it is sleeping, so it is in flight)."""
        if removed:
            return
        deadline = time.monotonic() + 30
        while victim.node_id not in (faults / "starts").read_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        c.remove_node(victim, allow_graceful=False)
        removed.append(victim)

    faults.mkdir()
    try:
        (faults / "slow").write_text("2")
        on_ray = tmp_path / "ray" / "out"
        ferromerge.run(ties_config(family), on_ray, quiet=True, out_shard_size=SHARD, executor="ray",
                       on_progress=remove_the_node_once_it_merges)
        starts = (faults / "starts").read_text().splitlines()
    finally:
        shutil.rmtree(faults)
    assert removed
    same_files(local, on_ray)
    shards = [line.split(" ", 1)[1] for line in starts]
    assert len(shards) > len(set(shards))  # the task that was on the removed node ran again elsewhere
