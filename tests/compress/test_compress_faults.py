"""Faults around ``compress`` / ``decompress`` (issue 13): a base of the same family but other values is refused,
an archive made before the content digest rebuilds with a note, hostile paths (symlink loops, a FIFO) and huge
integers are one-line errors, and SIGTERM stops a compress with exit 143 and nothing left behind."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ferromerge import compress, decompress
from ferromerge.errors import InputError
from ferromerge.synth import Family, make_family
from helpers.cli import run_cli


def leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".ferromerge-" in p.name)


@pytest.fixture(scope="module")
def archive(family_bf16: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("faults_archive") / "arch"
    compress(family_bf16.base, family_bf16.finetunes, out, scheme="tall")
    return out


def test_a_fine_tune_of_the_family_as_base_is_refused(family_bf16: Family, archive: Path, tmp_path: Path) -> None:
    # a fine-tune has the base's names, dtypes, shapes, shard sizes and header: only the values tell it apart
    out = tmp_path / "out"
    result = run_cli("decompress", archive, out, "--model", "0", "--base", family_bf16.finetunes[1])
    assert result.returncode == 1, result.stderr
    assert result.stderr.startswith("ferromerge: error: ") and result.stderr.count("\n") == 1
    assert "holds other values" in result.stderr and str(family_bf16.finetunes[1]) in result.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_an_archive_without_the_content_digest_rebuilds_with_a_note(
    family_bf16: Family, archive: Path, tmp_path: Path
) -> None:
    old = tmp_path / "old"
    old.mkdir()
    for p in archive.rglob("*"):
        if p.is_file():
            (old / p.relative_to(archive)).parent.mkdir(parents=True, exist_ok=True)
            (old / p.relative_to(archive)).write_bytes(p.read_bytes())
    manifest = json.loads((old / "manifest.json").read_text())
    for shard in manifest["base"]["shards"]:
        del shard["sample_sha256"]
    (old / "manifest.json").write_text(json.dumps(manifest))
    result = run_cli("decompress", old, tmp_path / "out", "--model", "1")
    assert result.returncode == 0, result.stderr
    assert "ferromerge: note: " in result.stderr and "predates the base's content digest" in result.stderr
    report = decompress(archive, 1, tmp_path / "new")
    assert report.notes == ()
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(p.name for p in (tmp_path / "new").iterdir())
    for p in (tmp_path / "new").iterdir():
        assert (tmp_path / "out" / p.name).read_bytes() == p.read_bytes()


def test_hostile_paths_and_numbers_are_one_line_errors(family_bf16: Family, archive: Path, tmp_path: Path) -> None:
    loop = tmp_path / "loop"
    os.symlink(tmp_path / "loop2", loop)
    os.symlink(loop, tmp_path / "loop2")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    base, ft = family_bf16.base, family_bf16.finetunes[0]
    cases = [
        (["compress", loop, ft, "--out", tmp_path / "a"], 1, "Too many levels of symbolic links"),
        (["compress", base, loop, "--out", tmp_path / "a"], 1, str(loop)),
        (["compress", base, ft, "--out", loop / "a"], 1, "Too many levels of symbolic links"),
        (["compress", base, ft, "--out", tmp_path / "a", "--rank", "9" * 30], 2, "rank must be below 2**63"),
        (["compress", base, ft, "--out", tmp_path / "a", "--threads", "9" * 30], 2, "threads must be below 2**63"),
        (["decompress", loop, tmp_path / "b", "--model", "0"], 1, str(loop)),
        (["decompress", fifo, tmp_path / "b", "--model", "0"], 1, "not a directory"),
        (["decompress", archive, tmp_path / "b", "--model", "0", "--base", loop], 1, "symbolic links"),
        (["decompress", archive, loop / "b", "--model", "0"], 1, "Too many levels of symbolic links"),
    ]
    for args, code, fragment in cases:
        result = run_cli(*args, timeout=60)
        assert result.returncode == code, (args, result.stderr)
        # one error line (argparse's own errors come after its usage lines)
        last = result.stderr.strip().splitlines()[-1]
        assert "error: " in last and fragment in last and "Traceback" not in result.stderr, (args, result.stderr)
    assert leftovers(tmp_path) == [] and not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# the compressor, wrapped so that the process sends itself the signal after its second tensor: deterministic
_SIGNAL_AT_TENSOR_2 = """
import os, signal, sys
from ferromerge._compress import pack
real = pack._Compressor.tall_tensor
seen = []
def tall_tensor(self, *args, **kw):
    seen.append(1)
    if len(seen) == 2:
        os.kill(os.getpid(), int(os.environ["SIGNO"]))
    return real(self, *args, **kw)
pack._Compressor.tall_tensor = tall_tensor
from ferromerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.parametrize("signo", [15, 1])
def test_a_signal_stops_compress_and_leaves_nothing(family_bf16: Family, tmp_path: Path, signo: int) -> None:
    out = tmp_path / "arch"
    proc = subprocess.run(
        [sys.executable, "-c", _SIGNAL_AT_TENSOR_2, "compress", family_bf16.base, *family_bf16.finetunes,
         "--out", out, "--scheme", "tall"],
        capture_output=True, text=True, timeout=120, env={**os.environ, "SIGNO": str(signo)},
    )
    assert proc.returncode == 128 + signo, proc.stderr
    name = {15: "SIGTERM", 1: "SIGHUP"}[signo]
    assert f"ferromerge: terminated by {name}; no output was written" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() and leftovers(tmp_path) == []


def test_another_family_base_with_the_same_layout_is_refused(archive: Path, tmp_path: Path) -> None:
    other = make_family(tmp_path / "other", dtype="bfloat16", seed=9, n_finetunes=0)
    with pytest.raises(InputError, match="holds other values"):
        decompress(archive, 2, tmp_path / "out", base=other.base)
    assert leftovers(tmp_path) == []
