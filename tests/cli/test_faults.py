"""Faults injected into real ``ferromerge`` processes (issue 13): kill -9 at 10%, 50% and 90% then ``--resume``
(identical bytes, only the missing shards merged), SIGTERM and SIGHUP (exit 143/129, one message, nothing left, or
the partial output kept with ``--resume``), a disk that fills up during the run (a small tmpfs, root only), two
runs into one output directory (the second fails at its start; a stale lock blocks nothing), and hostile
arguments: a FIFO, ``/dev/zero`` or a directory as the config, an overflowing ``--memory-limit``, a symlink loop as
a model, a config.json that is not an object."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import ferromerge
from ferromerge import _engine
from ferromerge.cli import main
from ferromerge.errors import OutputError
from ferromerge.io import journal
from ferromerge.synth import Family, make_family
from helpers.cli import run_cli, ties_config, write_config

SHARD = "20000"  # 22 output shards over the 4-layer family

# The CLI with the engine's progress hook slowed down (SLOW_S seconds per tensor) and able to stop: at tensor
# SIGNAL_AT it sends itself SIGNO; at tensor WAIT_AT it creates READY and waits for GO to exist.
_CLI = """
import os, signal, sys, time
from pathlib import Path
import ferromerge._engine as engine
real = engine.execute
env = os.environ
def execute(plan, out, progress=None, *args, **kw):
    def hook(done, total, b, bt):
        if progress is not None:
            progress(done, total, b, bt)
        time.sleep(float(env.get("SLOW_S", "0")))
        if done == int(env.get("SIGNAL_AT", "-1")):
            os.kill(os.getpid(), int(env["SIGNO"]))
        if done == int(env.get("WAIT_AT", "-1")):
            Path(env["READY"]).touch()
            while not Path(env["GO"]).exists():
                time.sleep(0.01)
        if done == int(env.get("FILL_AT", "-1")):
            # take every free block of the output's filesystem: the next writes fail with ENOSPC
            with open(env["FILLER"], "wb", buffering=0) as f:
                try:
                    while True:
                        f.write(bytes(4096))
                except OSError:
                    pass
    return real(plan, out, hook, *args, **kw)
engine.execute = execute
from ferromerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def cli(*args: str | os.PathLike[str], **env: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _CLI, *map(str, args)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **env},
    )


def finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("faults_family"), layers=4, seed=3)


@pytest.fixture(scope="module")
def config(family: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_config(tmp_path_factory.mktemp("faults_config") / "merge.yml", ties_config(family))


@pytest.fixture(scope="module")
def reference(config: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults_reference") / "out"
    assert main(["run", str(config), str(out), "--quiet", "--out-shard-size", SHARD]) == 0
    return out


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.ferromerge-*"))


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.ferromerge-partial-*"))


def same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def shard_tensors(reference: Path) -> dict[str, int]:
    counts: dict[str, int] = {}
    for shard in json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"].values():
        counts[shard] = counts.get(shard, 0) + 1
    return counts


def journaled(out: Path) -> dict[str, journal.Shard]:
    found = partials(out)
    return journal.read(found[0])[1] if found else {}


# ---------------------------------------------------------------- kill -9, then --resume


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_kill_9_then_resume_gives_identical_bytes_and_merges_only_the_missing_shards(
    config: Path, reference: Path, tmp_path: Path, fraction: float
) -> None:
    counts = shard_tensors(reference)
    out = tmp_path / "out"
    want = max(1, round(len(counts) * fraction))
    proc = cli("run", config, out, "--quiet", "--threads", "1", "--out-shard-size", SHARD, SLOW_S="0.03")
    deadline = time.monotonic() + 60
    while len(journaled(out)) < want and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # the process cannot clean up: its partial directory and journal stay
    assert finish(proc)[0] == -signal.SIGKILL
    assert not out.exists() and len(partials(out)) == 1
    finished = journaled(out)
    assert len(finished) >= want
    missing = sum(counts.values()) - sum(counts[s] for s in finished)
    result = run_cli("run", config, out, "--resume", "--threads", "1", "--out-shard-size", SHARD)
    assert result.returncode == 0, result.stderr
    assert f"resuming: {len(finished)} of {len(counts)} shards are finished and verified" in result.stderr
    assert f"resumed: {len(finished)} finished shard(s) kept" in result.stdout
    assert f"merged {missing} tensors into {out}" in result.stdout
    same_files(out, reference)
    assert leftovers(out) == []


# ---------------------------------------------------------------- SIGTERM, SIGHUP


@pytest.mark.parametrize("signo", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_exit_128_plus_signo_and_leave_nothing(
    config: Path, tmp_path: Path, signo: int
) -> None:
    out = tmp_path / "out"
    code, err = finish(cli("run", config, out, "--out-shard-size", SHARD, SIGNAL_AT="5", SIGNO=str(signo)))
    assert code == 128 + signo, err
    assert f"ferromerge: terminated by {signal.Signals(signo).name}; no output was written" in err
    assert "Traceback" not in err
    assert not out.exists() and leftovers(out) == []


def test_sigterm_with_resume_keeps_the_partial_output_and_resume_finishes_it(
    config: Path, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    code, err = finish(
        cli("run", config, out, "--resume", "--out-shard-size", SHARD, SIGNAL_AT="20", SIGNO=str(signal.SIGTERM))
    )
    assert code == 143 and "Traceback" not in err, err
    [partial] = partials(out)
    assert f"kept the partial output {partial}; run again with --resume to continue it" in err
    assert journaled(out) and not out.exists()
    result = run_cli("run", config, out, "--resume", "--out-shard-size", SHARD)
    assert result.returncode == 0, result.stderr
    same_files(out, reference)
    assert leftovers(out) == []


def test_an_external_sigterm_stops_a_run_within_a_second(config: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = cli("run", config, out, "--quiet", "--out-shard-size", SHARD, SLOW_S="0.05")
    deadline = time.monotonic() + 60
    while not journaled(out) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    code, err = finish(proc)
    # within a second of the signal (a tensor takes 0.05 s here); slack for a loaded machine
    assert time.monotonic() - sent < 3.0
    assert code == 143 and "terminated by SIGTERM" in err and "Traceback" not in err, err
    assert not out.exists() and leftovers(out) == []


# ---------------------------------------------------------------- disk full


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 600 KiB tmpfs (the output takes about 360 KB): root only."""
    where = tmp_path / "tmpfs"
    where.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(where)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {mounted.stderr.decode().strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_a_disk_that_fills_up_during_the_run(config: Path, reference: Path, tmpfs: Path) -> None:
    out = tmpfs / "out"
    filler = tmpfs / "filler"
    code, err = finish(cli("run", config, out, "--quiet", "--out-shard-size", SHARD, FILL_AT="15", FILLER=filler))
    lines = err.strip().splitlines()
    assert code == 1 and len(lines) == 1 and lines[0].startswith("ferromerge: error: "), err
    assert "No space left on device" in lines[0] and str(tmpfs) in lines[0]
    assert not out.exists() and leftovers(out) == []
    filler.unlink()
    # with --resume the partial output stays; once there is room again, --resume finishes it
    code, err = finish(
        cli("run", config, out, "--quiet", "--resume", "--out-shard-size", SHARD, FILL_AT="15", FILLER=filler)
    )
    assert code == 1 and "No space left on device" in err and "Traceback" not in err, err
    assert partials(out) and journaled(out)
    filler.unlink()
    result = run_cli("run", config, out, "--resume", "--out-shard-size", SHARD)
    assert result.returncode == 0, result.stderr
    assert "resumed: " in result.stdout
    same_files(out, reference)
    assert leftovers(out) == []


# ---------------------------------------------------------------- two runs into one output


def test_a_second_run_into_the_same_output_fails_at_its_start(
    config: Path, family: Family, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    ready, go = tmp_path / "ready", tmp_path / "go"
    first = cli("run", config, out, "--quiet", "--out-shard-size", SHARD, WAIT_AT="10", READY=ready, GO=go)
    try:
        deadline = time.monotonic() + 60
        while not ready.exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ready.exists(), first.stderr.read() if first.stderr else ""
        # at its start: before its config's models are even looked at (this one names a model that does not exist)
        broken = write_config(tmp_path / "broken.yml", {**ties_config(family), "base_model": str(tmp_path / "nope")})
        for args in (["run", str(broken), str(out)], ["run", str(config), str(out), "--resume"]):
            capsys.readouterr()
            assert main(args) == 1
            err = capsys.readouterr().err
            assert err.startswith("ferromerge: error: ") and err.count("\n") == 1, err
            assert f"output directory {out} is being written by another ferromerge run (process {first.pid})" in err
    finally:
        go.touch()
    code, err = finish(first)
    assert code == 0, err
    same_files(out, reference)
    assert leftovers(out) == []


def test_a_stale_lock_file_blocks_nothing(config: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    # what a killed run leaves: the file, no lock on it (flock dies with its process)
    (tmp_path / ".out.ferromerge-lock").write_text("999999\n")
    assert main(["run", str(config), str(out), "--quiet", "--out-shard-size", SHARD]) == 0
    same_files(out, reference)
    assert leftovers(out) == []


# ---------------------------------------------------------------- hostile arguments


def one_error(code: int, args: list[str], fragment: str, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(args) == code, args
    err = capsys.readouterr().err
    assert err.startswith("ferromerge: error: ") and err.count("\n") == 1 and fragment in err, (args, err)


def test_a_config_must_be_a_regular_file_of_sane_size(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fifo = tmp_path / "fifo.yml"
    os.mkfifo(fifo)  # reading it would wait for a writer forever
    big = tmp_path / "big.yml"
    with open(big, "wb") as f:
        f.truncate(65 << 20)  # sparse: costs no disk
    out = tmp_path / "out"
    for command in (["run"], ["plan"]):
        target = [str(out)]
        one_error(2, [*command, str(fifo), *target], f"config file {fifo} is a FIFO, not a regular file", capsys)
        one_error(2, [*command, "/dev/zero", *target], "config file /dev/zero is a device, not a regular file", capsys)
        one_error(2, [*command, str(tmp_path), *target], f"config file {tmp_path} is a directory", capsys)
        one_error(2, [*command, str(big), *target], f"config file {big} is {65 << 20} bytes", capsys)
    assert not out.exists() and leftovers(out) == []


def test_an_overflowing_memory_limit_or_shard_size_is_a_parameter_error(
    config: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    for command in ("run", "plan"):
        one_error(2, [command, str(config), str(out), "--memory-limit", "99999999999999GiB"],
                  "memory limit '99999999999999GiB': too large", capsys)
        one_error(2, [command, str(config), str(out), "--out-shard-size", "9" * 400], "too large", capsys)
    assert not out.exists() and leftovers(out) == []


def test_a_symlink_loop_as_a_model_or_output_is_named(
    family: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    loop = tmp_path / "loop"
    os.symlink(tmp_path / "loop2", loop)
    os.symlink(loop, tmp_path / "loop2")
    bad = write_config(tmp_path / "merge.yml", {**ties_config(family), "base_model": str(loop)})
    out = tmp_path / "out"
    for command in ("run", "plan"):
        one_error(1, [command, str(bad), str(out)], f"model '{loop}': cannot open {loop}: Too many levels", capsys)
    good = write_config(tmp_path / "good.yml", ties_config(family))
    one_error(1, ["run", str(good), str(loop / "out")], f"cannot create {loop / 'out'}: {loop}: Too many", capsys)
    assert not out.exists() and leftovers(out) == []


def test_the_reference_config_json(family: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    models = tmp_path / "models"
    shutil.copytree(family.base.parent, models)
    fam = Family(models / "base", [models / ft.name for ft in family.finetunes])
    config = write_config(tmp_path / "merge.yml", ties_config(fam))
    out = tmp_path / "out"
    (fam.base / "config.json").write_text("[1, 2]")
    for command in ("run", "plan"):
        one_error(1, [command, str(config), str(out)],
                  f"{fam.base / 'config.json'}: the model config is a JSON list, not an object", capsys)
    (fam.base / "config.json").unlink()
    capsys.readouterr()
    note = f"note: {fam.base} has no config.json, so the output has none either"
    # plan shows the notes run prints (one list of them: _run.merge_notes), in the human and the JSON report
    assert main(["plan", str(config), str(out)]) == 0
    assert note in capsys.readouterr().out
    assert main(["plan", str(config), str(out), "--json"]) == 0
    assert any(n.startswith(note.removeprefix("note: ")) for n in json.loads(capsys.readouterr().out)["summary"]["notes"])
    assert main(["run", str(config), str(out)]) == 0
    assert note in capsys.readouterr().err
    assert not (out / "config.json").exists()


def test_an_engine_error_about_a_cached_file_names_the_model(
    family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a hub model lives in a cache snapshot: its path does not say which model of the config it is
    commit = "0" * 40
    repo = tmp_path / "hub" / "models--org--base"
    shutil.copytree(family.base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    shard = repo / "snapshots" / commit / "model.safetensors"

    def execute(*_args: object, **_kw: object) -> None:
        raise ferromerge.InputError(f"{shard}: tensor lm_head.weight: 1 NaN and 0 infinite values")

    monkeypatch.setattr(_engine, "execute", execute)
    with pytest.raises(ferromerge.InputError) as e:
        ferromerge.run({**ties_config(family), "base_model": "org/base"}, tmp_path / "out", quiet=True)
    assert str(e.value) == f"{shard}: tensor lm_head.weight: 1 NaN and 0 infinite values (model org/base)"
    assert leftovers(tmp_path / "out") == []


# ---------------------------------------------------------------- non-finite values (CONTRACTS R2)

def test_nan_and_inf_stop_a_run_unless_allowed(
    family: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import numpy as np

    from ferromerge import _engine as engine
    from helpers.cli import read_model

    models = tmp_path / "models"
    shutil.copytree(family.base.parent, models)
    fam = Family(models / "base", [models / ft.name for ft in family.finetunes])
    shard = fam.finetunes[1] / "model.safetensors"
    header = engine.read_header(str(shard))
    name = "model.layers.1.mlp.down_proj.weight"
    tensors = {}
    for n, (dtype, _shape) in header.items():
        tensors[n] = (np.asarray(read_model(fam.finetunes[1])[n][1]), dtype)
    values, dtype = tensors[name]
    values = values.copy()
    values.flat[3], values.flat[7], values.flat[8] = np.nan, np.inf, -np.inf
    tensors[name] = (values, dtype)
    engine.save_file(str(shard), {n: (engine.encode(v, d) if d != "F32" else v, d) for n, (v, d) in tensors.items()})
    config = write_config(tmp_path / "merge.yml", ties_config(fam))
    out = tmp_path / "out"
    capsys.readouterr()
    assert main(["run", str(config), str(out), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"ferromerge: error: {shard}: tensor ") and err.count("\n") == 1, err
    assert name in err and "1 NaN and 2 infinite values; pass --allow-nonfinite" in err
    assert not out.exists() and leftovers(out) == []
    assert main(["plan", str(config), "--json", "--allow-nonfinite"]) == 0
    assert json.loads(capsys.readouterr().out)["allow_nonfinite"] is True
    assert main(["run", str(config), str(out), "--quiet", "--allow-nonfinite"]) == 0
    merged = read_model(out)[name][1]
    assert not np.isfinite(merged).all()
    with pytest.raises(ferromerge.InputError, match="1 NaN and 2 infinite values"):
        ferromerge.merge_state_dicts(
            {"base": {name: np.zeros(values.shape, np.float32)}, "ft": {name: values.astype(np.float32)}},
            "task_arithmetic", base="base", parameters={"weight": 1.0},
        )
    got = ferromerge.merge_state_dicts(
        {"base": {name: np.zeros(values.shape, np.float32)}, "ft": {name: values.astype(np.float32)}},
        "task_arithmetic", base="base", parameters={"weight": 1.0}, allow_nonfinite=True,
    )[name]
    assert np.isnan(got.flat[3]) and got.flat[7] == np.inf and got.flat[8] == -np.inf


def test_extract_lora_takes_hostile_arguments_as_one_line_errors(family: Family, tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    os.symlink(tmp_path / "loop2", loop)
    os.symlink(loop, tmp_path / "loop2")
    base, ft = family.base, family.finetunes[0]
    cases = [
        (["extract-lora", loop, ft, tmp_path / "a"], 1, f"model '{loop}': cannot open {loop}: Too many levels"),
        (["extract-lora", base, loop, tmp_path / "a"], 1, f"model '{loop}': cannot open {loop}"),
        (["extract-lora", base, ft, loop / "a"], 1, f"cannot create {loop / 'a'}: {loop}: Too many levels"),
        (["extract-lora", base, ft, tmp_path / "a", "--rank", "9" * 30], 2, "rank must be below 2**63"),
        (["extract-lora", base, ft, tmp_path / "a", "--threads", "9" * 30], 2, "threads must be below 2**63"),
    ]
    for args, code, fragment in cases:
        result = run_cli(*args, timeout=60)
        last = result.stderr.strip().splitlines()[-1]
        assert result.returncode == code and "error: " in last and fragment in last, (args, result.stderr)
        assert "Traceback" not in result.stderr
    assert not (tmp_path / "a").exists() and leftovers(tmp_path / "a") == []


@pytest.mark.parametrize("fault", [OSError(30, "Read-only file system"), KeyboardInterrupt()])
def test_a_commit_that_fails_between_its_two_renames_keeps_the_old_output(
    config: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fault: BaseException
) -> None:
    """--overwrite moves the old output aside, then the new one into place: a failure (a read-only remount) or a
    signal between the two puts the old output back instead of leaving neither."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous merge")
    real = os.rename

    def rename(src: str | os.PathLike[str], dst: str | os.PathLike[str]) -> None:
        if ".ferromerge-partial-" in str(src) and Path(dst) == out:
            raise fault
        real(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OutputError if isinstance(fault, OSError) else KeyboardInterrupt):
        ferromerge.run(config, out, quiet=True, overwrite=True, out_shard_size=SHARD)
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert leftovers(out) == []


def test_a_signal_while_the_replaced_output_is_removed_does_not_undo_the_finished_run(
    config: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once the new output is in place, a Ctrl-C/SIGTERM during the removal of the old one must not report "no
    output was written": the run returns, and the next run removes what is left of the old output."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("the previous merge")
    real = shutil.rmtree

    def rmtree(path: str | os.PathLike[str], *args: object, **kw: object) -> None:
        if ".ferromerge-old-" in str(path):
            raise KeyboardInterrupt
        real(path, *args, **kw)  # type: ignore[arg-type]

    with monkeypatch.context() as m:
        m.setattr(shutil, "rmtree", rmtree)
        assert main(["run", str(config), str(out), "--quiet", "--overwrite", "--out-shard-size", SHARD]) == 0
    same_files(out, reference)
    assert [p.name for p in leftovers(out)] == [f".out.ferromerge-old-{os.getpid()}"]
    assert main(["run", str(config), str(out), "--quiet", "--overwrite", "--out-shard-size", SHARD]) == 0
    assert leftovers(out) == []
