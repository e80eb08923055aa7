"""The Ray executor: a plan's shards merged by Ray tasks on the nodes of a cluster (``run(executor="ray")``,
``ferromerge run --executor ray``).

Tensor bytes never travel through Ray. A task receives its part of the plan (``executors.tasks``: file paths and
tensor names), runs the engine on it, reading the inputs itself from storage every node sees (a shared filesystem,
the Hugging Face cache on it) and writing whole shards into the run's hidden partial output directory (on that
storage too); it returns only each shard's name, size and crc32. The driver journals each shard as its task's
result arrives (``io.journal``: one writer, and only after the engine fsynced the shard, so a driver killed at any
moment leaves a journal that ``--resume`` can trust), then ``_run`` writes the side files and commits as a local
run does.

Resources: a task asks Ray for its CPUs (``threads``, default 1: Ray then runs one task per core of the cluster)
and for the memory the engine plans for its tensors under the run's budget (``memory=``), and runs the engine with
exactly those threads and that budget, so Ray never packs more onto a node than it holds. Tasks are spread over the
nodes (a merge is bound by reading, and each node brings its own read bandwidth).

Faults: a task whose worker or node dies is run again elsewhere (Ray's ``max_retries``), as is one that failed on
an I/O error (writing the output, or an input read the operating system failed: ``ReadFault``); a retry rewrites
its shards whole, with the same bytes. An error of the inputs themselves (NaN, a changed file) is not retried: it
stops the run, as locally. Interrupting the driver cancels the tasks still running (their workers are killed)
before the partial output is removed or kept for ``--resume``.

Without an address (and without ``$RAY_ADDRESS``) the run starts a Ray instance on this machine for its own use,
with its temporary files in a new directory under ``$TMPDIR`` (or ``/tmp`` when that path is too long for Ray's
Unix sockets), removed at the end, and Ray's usage statistics off unless ``$RAY_USAGE_STATS_ENABLED`` says
otherwise. A Ray session the caller already started (``ray.init``) is used as it is and left running.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .. import _engine
from .._plan.build import Plan
from .._validate import format_bytes
from ..errors import InputError, MergeError, OutputError, ParameterError
from ..io import journal
from .tasks import Task, cut

#: runs of a task after its first: for a dead worker or node, and for the I/O errors listed in ``RETRIED``
MAX_RETRIES = 3

#: Ray's object store of a Ray instance started by the run: only the tasks' small results go through it
OBJECT_STORE_BYTES = 128 << 20

#: Ray puts its Unix sockets at <temp>/session_<date>_<time>_<us>_<pid>/sockets/plasma_store, and a socket path has
#: at most 107 bytes: a temporary directory longer than this leaves too little for the rest
TEMP_PATH_MAX = 40

#: seconds between the driver's looks at its tasks (signals such as Ctrl-C are handled between them)
POLL_S = 0.5

#: seconds to wait for cancelled tasks' workers to be gone before the partial output is touched
CANCEL_WAIT_S = 10.0

Progress = Callable[[int, int, int, int], None]


class ReadFault(InputError):
    """An input read that the operating system failed (EIO, ESTALE on a network filesystem, a mount gone for a
    moment): worth another try, unlike an input that is wrong."""


#: the errors a task is retried on (besides its worker's or node's death)
RETRIED = (OutputError, OSError, ReadFault)


def merge_task(plan_json: str, out_dir: str, threads: int, memory_limit: int) -> dict[str, Any]:
    """Run on a Ray worker: the engine over ``plan_json`` (some whole shards) into ``out_dir`` with ``threads``
    workers and ``memory_limit`` bytes. Returns the finished shards ``[(file, size, crc32)]``, the engine's counts,
    the node and the engine's version."""
    import ray

    finished: list[tuple[str, int, int]] = []
    start = time.perf_counter()
    node = ray.get_runtime_context().get_node_id()
    if not Path(out_dir).is_dir():
        raise OutputError(f"{out_dir} does not exist on Ray node {node}: the output directory must be on storage "
                          "every node shares (the same path on every node)")
    try:
        stats = _engine.execute(
            plan_json, out_dir, None, threads, memory_limit, None,
            on_shard_done=lambda f, size, crc: finished.append((f, size, crc)),
        )
    except InputError as e:
        # Rust's io::Error prints "(os error N)": the system failed the read, the file itself may be fine
        if "(os error " in str(e) and "changed while" not in str(e):
            raise ReadFault(str(e)) from None
        raise
    return {
        "shards": finished,
        **stats,
        "seconds": time.perf_counter() - start,
        "node": node,
        "version": _engine.version(),
    }


def _temp_dir() -> Path:
    """A new directory for a Ray instance's files: under ``$TMPDIR`` (``tempfile``'s choice), or ``/tmp`` when that
    path would make Ray's socket paths too long."""
    base = tempfile.gettempdir()
    if len(base) > TEMP_PATH_MAX - len("/fm-ray-XXXXXXXX"):
        base = "/tmp"
    return Path(tempfile.mkdtemp(prefix="fm-ray-", dir=base))


@contextmanager
def session(address: str | None, log: Callable[[str], None]) -> Iterator[None]:
    """Ray, connected for the run: the caller's session if one is open; else the cluster at ``address`` (or
    ``$RAY_ADDRESS``); else a Ray instance on this machine started for the run. What the run opened it closes."""
    import ray

    if ray.is_initialized():
        yield
        return
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    temp = None
    # Ray sets RAY_AUTH_MODE in this process when it starts an instance: restored too, so that the next run's
    # instance gets its token the same way
    saved = {k: os.environ.get(k) for k in (_TOKEN_PATH, _USAGE_STATS, "RAY_AUTH_MODE", "RAY_TMPDIR")}
    try:
        if address is None and not os.environ.get("RAY_ADDRESS"):
            temp = _temp_dir()
            os.environ.setdefault(_USAGE_STATS, "0")
            # what Ray writes to its default place (the address of the "current cluster") goes there too
            os.environ["RAY_TMPDIR"] = str(temp)
            _token_outside_home(temp)
            ray.init(_temp_dir=str(temp), object_store_memory=OBJECT_STORE_BYTES, include_dashboard=False, **quiet)
            log(f"note: started a Ray instance on this machine ({temp}); --address joins a cluster instead")
        else:
            ray.init(address=address, **quiet)
    except (ConnectionError, RuntimeError, ValueError) as e:
        _restore(saved, temp)
        where = address or os.environ.get("RAY_ADDRESS") or "this machine"
        raise ParameterError(f"cannot start or reach Ray at {where}: {e}") from None
    try:
        yield
    finally:
        ray.shutdown()
        _restore(saved, temp)


_TOKEN_PATH = "RAY_AUTH_TOKEN_PATH"
_USAGE_STATS = "RAY_USAGE_STATS_ENABLED"

#: the token of the Ray instances this process starts (one per process: Ray caches the token it loaded)
_token: str | None = None


def _token_outside_home(temp: Path) -> None:
    """Ray (2.5x and later) starts a local instance with token authentication and, when the user has no token,
    writes a new one to ~/.ray/auth_token. Unless the user configured authentication, the run's instance gets its
    token from a file in its own temporary directory instead (``$RAY_AUTH_TOKEN_PATH``): authenticated, and
    nothing left in the home directory."""
    global _token
    configured = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", _TOKEN_PATH)
    if any(os.environ.get(k) for k in configured) or (Path.home() / ".ray" / "auth_token").exists():
        return
    if _token is None:
        _token = secrets.token_hex(32)
    path = temp / "auth_token"
    path.touch(mode=0o600)
    path.write_text(_token, encoding="ascii")
    os.environ[_TOKEN_PATH] = str(path)


def _restore(saved: Mapping[str, str | None], temp: Path | None) -> None:
    """The environment as it was before ``session`` (what it set for its own instance), and its files removed."""
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    if temp is not None:
        shutil.rmtree(temp, ignore_errors=True)


def _check_fits(tasks: list[Task], cpus: int) -> None:
    """Refuse tasks that no node of the cluster could ever run (Ray would wait for such a node forever)."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    most_cpus = max((r.get("CPU", 0) for r in nodes), default=0)
    most_memory = max((r.get("memory", 0) for r in nodes), default=0)
    need = max(t.memory for t in tasks)
    if cpus > most_cpus:
        raise ParameterError(f"each Ray task asks for {cpus} CPUs (threads) but the largest node of the cluster has "
                             f"{most_cpus:g}; give fewer threads")
    if need > most_memory:
        raise ParameterError(
            f"a Ray task needs {format_bytes(need)} of memory for its tensors but the largest node of the cluster "
            f"offers {format_bytes(int(most_memory))}; give a smaller --memory-limit (each task's budget)"
        )


def _outcome(ray: Any, ref: Any, task: Task) -> dict[str, Any]:
    """A finished task's result; its error as ferromerge's own (the engine's, unwrapped from Ray's) or, when Ray
    itself gave up (a worker or node lost more often than ``MAX_RETRIES``), a ``MergeError`` naming the shards."""
    try:
        result: dict[str, Any] = ray.get(ref)
        return result
    except ray.exceptions.RayTaskError as e:
        cause = getattr(e, "cause", None)
        if isinstance(cause, (MergeError, OSError)):
            raise cause from None
        raise MergeError(f"the Ray task writing {', '.join(task.files)} failed: {cause or e}") from None
    except ray.exceptions.RayError as e:
        raise MergeError(
            f"the Ray task writing {', '.join(task.files)} was lost after {MAX_RETRIES} retries: "
            f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        ) from None


def _cancel(ray: Any, pending: Mapping[Any, Task]) -> None:
    """Stop the tasks still running (their workers are killed, so nothing more is written) and wait for them."""
    refs = list(pending)
    for ref in refs:
        with contextlib.suppress(Exception):  # already finished or lost: nothing left to stop
            ray.cancel(ref, force=True)
    with contextlib.suppress(Exception):  # the wait is a courtesy: the kill was sent
        ray.wait(refs, num_returns=len(refs), timeout=CANCEL_WAIT_S)


def execute(
    plan: Plan,
    plan_json: Mapping[str, Any],
    out_dir: Path,
    *,
    threads: int | None,
    memory_limit: int | None,
    address: str | None,
    tasks: int | None,
    progress: Progress | None,
    on_shard_done: Callable[[str, int, int], None],
    status: Callable[[str], None] | None = None,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, int]:
    """Run ``plan_json`` (``plan``'s JSON, or what a resume left of it) on Ray into ``out_dir``, which every node
    must see; the engine's counts ``{"tensors", "bytes_read", "bytes_written"}`` summed over the tasks, as
    ``_engine.execute`` returns them.

    ``threads``: CPUs of each task (None: 1); ``memory_limit``: each task's engine budget (None: the engine's
    default on this machine); ``address``: the cluster (``session``); ``tasks``: how many tasks to cut the shards
    into (None: one per shard). ``progress(tensors_done, tensors_total, bytes_done, bytes_total)`` is called as
    tasks finish (the bytes summed over all nodes, so a rate from them is the cluster's); ``status`` gets a line
    of tasks and nodes; ``on_shard_done(file, size, crc32)`` once per shard, as its task's result arrives."""
    cpus = threads or 1
    budget = memory_limit if memory_limit is not None else _engine.default_memory_limit()
    work = cut(plan, plan_json["shards"], tasks, threads=cpus, memory_limit=budget)
    totals = {"tensors": 0, "bytes_read": 0, "bytes_written": 0}
    if not work:
        return totals
    # the engine checks its inputs unchanged over each task's own reads; tasks run at different times, so the
    # whole run's window is checked here: the same files at the end as at the start
    inputs = journal.plan_inputs(plan_json)
    before = journal.fingerprints(inputs, out_dir)
    tensors_total = sum(t.tensors for t in work)
    bytes_total = sum(t.input_bytes for t in work)
    with session(address, log):
        import ray

        _check_fits(work, cpus)
        # (retry_exceptions takes a list of exception types, which Ray's type stubs do not say)
        options: dict[str, Any] = {"num_cpus": cpus, "max_retries": MAX_RETRIES, "retry_exceptions": list(RETRIED),
                                   "scheduling_strategy": "SPREAD"}
        remote = ray.remote(**options)(merge_task)
        pending: dict[Any, Task] = {}
        for t in work:
            ref = remote.options(memory=t.memory, name=f"ferromerge {t.files[0]}").remote(
                json.dumps(t.plan(plan_json)), str(out_dir), cpus, budget
            )
            pending[ref] = t
        nodes: set[str] = set()
        written: dict[str, int] = {}
        done = tensors_done = bytes_done = 0
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=1, timeout=POLL_S)
                for ref in ready:
                    task = pending.pop(ref)
                    result = _outcome(ray, ref, task)
                    if result["version"] != _engine.version():
                        raise MergeError(
                            f"node {result['node']} runs ferromerge {result['version']}, this driver "
                            f"{_engine.version()}: install the same version on every node"
                        )
                    for name, size, crc in result["shards"]:
                        written[name] = size
                        on_shard_done(name, size, crc)
                    for key in totals:
                        totals[key] += int(result[key])
                    nodes.add(result["node"])
                    done += 1
                    tensors_done += task.tensors
                    bytes_done += task.input_bytes
                    if status is not None:
                        status(f"{done}/{len(work)} tasks, {len(nodes)} node(s)")
                    if progress is not None:
                        progress(tensors_done, tensors_total, bytes_done, bytes_total)
        finally:
            if pending:
                _cancel(ray, pending)
    _check_unchanged(before, journal.fingerprints(inputs, out_dir))
    _check_written(out_dir, written)
    return totals


def _check_unchanged(before: Mapping[str, list[int]], after: Mapping[str, list[int]]) -> None:
    for f in sorted(set(before) | set(after)):
        if before.get(f) != after.get(f):
            raise InputError(f"{f}: changed while the merge was reading it (size, modification time or inode); "
                             "the output is not written")


def _check_written(out_dir: Path, written: Mapping[str, int]) -> None:
    """Every shard a task reported is in the driver's view of the output directory at the size the task wrote
    (cheap: the engine wrote and fsynced each; this catches an output directory that is not shared)."""
    for f, size in sorted(written.items()):
        try:
            found = (out_dir / f).stat().st_size
        except OSError:
            found = None
        if found != size:
            raise OutputError(f"{out_dir / f}: a Ray task wrote it ({size} bytes) but this machine sees "
                              f"{'no such file' if found is None else f'{found} bytes'}: the output directory must "
                              "be on storage every node shares")
