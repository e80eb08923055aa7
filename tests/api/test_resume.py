"""``ferromerge.run(..., resume=True)`` (issue 13): a run interrupted at 10%, 50% or 90% and resumed writes the same
bytes as an uninterrupted run, merging only the shards its journal does not list as finished (asserted from the
engine's progress totals and the report, not from timing); a resume of another config, other inputs or another
ferromerge version is refused; a damaged journaled shard or a journal cut short is redone; without ``resume``,
an interrupted run leaves nothing."""

from __future__ import annotations

import json
import os
import shutil
import zlib
from pathlib import Path
from typing import Any

import pytest

import ferromerge
from ferromerge import _engine
from ferromerge.errors import OutputError
from ferromerge.io import journal
from ferromerge.synth import Family, make_family
from helpers.cli import ties_config

#: 22 output shards of 1-3 tensors each over the 4-layer family
SHARD = 20_000


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 3 fine-tunes, bf16, 4 layers (read-only)."""
    return make_family(tmp_path_factory.mktemp("resume_family"), layers=4, seed=5)


@pytest.fixture(scope="module")
def reference(family: Family, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The uninterrupted run's output (named ``out``, as every output here: the model card's title is its name)."""
    out = tmp_path_factory.mktemp("reference") / "out"
    ferromerge.run(ties_config(family), out, quiet=True, out_shard_size=SHARD)
    return out


def partials(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.ferromerge-partial-*"))


def leftovers(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.ferromerge-*"))


def same_files(a: Path, b: Path) -> None:
    assert sorted(p.name for p in a.iterdir()) == sorted(p.name for p in b.iterdir())
    for p in a.iterdir():
        assert p.read_bytes() == (b / p.name).read_bytes(), p.name


def interrupt_at(config: dict[str, Any], out: Path, at: int, **kw: Any) -> None:
    """A run with ``resume=True`` interrupted (KeyboardInterrupt, as Ctrl-C/SIGTERM arrive) after tensor ``at``."""

    def stop(done: int, _total: int, _b: int, _bt: int) -> None:
        if done == at:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ferromerge.run(config, out, quiet=True, out_shard_size=SHARD, on_progress=stop, resume=True, **kw)


def shard_tensors(reference: Path) -> dict[str, int]:
    """Tensors per output shard, from the reference's index."""
    counts: dict[str, int] = {}
    for shard in json.loads((reference / "model.safetensors.index.json").read_text())["weight_map"].values():
        counts[shard] = counts.get(shard, 0) + 1
    return counts


@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.9])
def test_an_interrupted_run_resumes_to_identical_bytes_merging_only_what_is_missing(
    family: Family, reference: Path, tmp_path: Path, fraction: float
) -> None:
    counts = shard_tensors(reference)
    total = sum(counts.values())
    out = tmp_path / "out"
    at = max(1, int(total * fraction))
    interrupt_at(ties_config(family), out, at=at)
    assert not out.exists() and len(partials(out)) == 1
    _, finished = journal.read(partials(out)[0])
    # every shard whose last tensor came before the interrupted one (the engine had fsynced it), and no other
    ends, done_before = 0, set()
    for shard in sorted(counts):
        ends += counts[shard]
        if ends < at:
            done_before.add(shard)
    assert set(finished) == done_before and finished
    reported: list[tuple[int, int]] = []
    report = ferromerge.run(
        ties_config(family), out, quiet=True, out_shard_size=SHARD, resume=True,
        on_progress=lambda done, tot, _b, _bt: reported.append((done, tot)),
    )
    missing = total - sum(counts[s] for s in finished)
    assert report.shards_reused == len(finished)
    assert report.tensors == missing and reported[-1] == (missing, missing)
    same_files(out, reference)
    assert leftovers(out) == []


def test_resume_refuses_another_config_other_inputs_or_another_version(
    family: Family, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    interrupt_at(ties_config(family), out, at=20)
    partial = partials(out)[0]
    with pytest.raises(OutputError, match=r"cannot resume .* the config or the run's options .* differ"):
        ferromerge.run(ties_config(family), out, quiet=True, out_shard_size=SHARD, resume=True, seed=7)
    with pytest.raises(OutputError, match=r"the config or the run's options"):
        ferromerge.run(ties_config(family), out, quiet=True, out_shard_size=30_000, resume=True)
    with monkeypatch.context() as m:
        m.setattr(_engine, "version", lambda: "0.0.0-other")
        with pytest.raises(OutputError, match=r"made by ferromerge .*, this is 0\.0\.0-other"):
            ferromerge.run(ties_config(family), out, quiet=True, out_shard_size=SHARD, resume=True)
    # the refusals keep the partial output (it is still resumable by the right run)
    assert partials(out) and not out.exists()
    # an input rewritten with the same bytes still counts as changed (its mtime): its content cannot be trusted
    shard = family.finetunes[1] / "model.safetensors"
    st = shard.stat()
    try:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
        with pytest.raises(OutputError, match=rf"input {shard} changed since"):
            ferromerge.run(ties_config(family), out, quiet=True, out_shard_size=SHARD, resume=True)
    finally:
        os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert partials(out) == [partials(out)[0]] and partials(out)[0].name.startswith(f".{out.name}.")
    report = ferromerge.run(ties_config(family), out, quiet=True, out_shard_size=SHARD, resume=True)
    assert report.shards_reused > 0
    same_files(out, reference)
    assert not partial.exists() and leftovers(out) == []


def test_a_damaged_shard_or_a_torn_journal_is_merged_again(
    family: Family, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    interrupt_at(ties_config(family), out, at=30)
    partial = partials(out)[0]
    _, finished = journal.read(partial)
    names = sorted(finished)
    assert len(names) >= 5
    # the journal's crc32 is the engine's, of what it fsynced
    assert all(finished[n].crc32 == zlib.crc32((partial / n).read_bytes()) for n in names)
    damaged = partial / names[0]
    st = damaged.stat()
    raw = bytearray(damaged.read_bytes())
    raw[-1] ^= 0xFF  # same size, other bytes...
    damaged.write_bytes(bytes(raw))
    os.utime(damaged, ns=(st.st_atime_ns, st.st_mtime_ns))  # ...and the old mtime: the ctime still tells
    (partial / names[1]).unlink()  # journaled, then lost
    with open(partial / names[2], "r+b") as f:  # cut short
        f.truncate(st.st_size // 2)
    replaced = partial / names[3]  # the same bytes in another file: its content cannot be vouched for
    copy = replaced.with_name("copy")
    shutil.copyfile(replaced, copy)
    os.replace(copy, replaced)
    with open(partial / journal.JOURNAL, "a", encoding="utf-8") as f:
        f.write('{"shard": "model-000')  # a line cut short by the kill
    report = ferromerge.run(ties_config(family), out, out_shard_size=SHARD, resume=True)
    err = capsys.readouterr().err
    for name in (names[0], names[2], names[3]):
        assert f"{partial / name} was changed after it was journaled" in err
    assert f"{partial / names[1]} was changed" not in err
    assert report.shards_reused == len(names) - 4
    same_files(out, reference)


def test_resume_without_a_partial_output_starts_from_the_beginning(
    family: Family, reference: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    report = ferromerge.run(ties_config(family), out, out_shard_size=SHARD, resume=True)
    assert "no partial output" in capsys.readouterr().err and report.shards_reused == 0
    same_files(out, reference)
    # a finished output is not resumed into: it exists
    with pytest.raises(OutputError, match="already exists"):
        ferromerge.run(ties_config(family), out, out_shard_size=SHARD, resume=True)


def test_without_resume_an_interrupted_run_leaves_nothing_and_a_stale_partial_is_removed(
    family: Family, reference: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"

    def stop(done: int, _t: int, _b: int, _bt: int) -> None:
        if done == 20:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ferromerge.run(ties_config(family), out, quiet=True, out_shard_size=SHARD, on_progress=stop)
    assert leftovers(out) == [] and not out.exists()
    # what a kill -9 leaves (the process cannot clean): removed by the next run without resume
    interrupt_at(ties_config(family), out, at=20)
    assert partials(out)
    report = ferromerge.run(ties_config(family), out, quiet=True, out_shard_size=SHARD)
    assert report.shards_reused == 0
    same_files(out, reference)
    assert leftovers(out) == []


def test_a_single_shard_output_resumes_too(family: Family, tmp_path: Path) -> None:
    full = tmp_path / "a" / "out"
    ferromerge.run(ties_config(family), full, quiet=True)
    out = tmp_path / "b" / "out"
    out.parent.mkdir()

    def stop(done: int, _t: int, _b: int, _bt: int) -> None:
        if done == 10:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        ferromerge.run(ties_config(family), out, quiet=True, on_progress=stop, resume=True)
    report = ferromerge.run(ties_config(family), out, quiet=True, resume=True)
    assert report.shards_reused == 0 and report.tensors > 0
    same_files(out, full)


@pytest.mark.parametrize("user_cache", [False, True])
def test_a_model_plus_lora_run_resumes(family: Family, tmp_path: Path, user_cache: bool) -> None:
    # the LoRA merge cache is written by the run itself (in the partial directory, or a cache directory the user
    # gives): it must not count as a changed input when the run resumes
    adapter = tmp_path / "adapter"
    ferromerge.extract_lora(family.base, family.finetunes[0], adapter, rank=4)
    config = ties_config(family)
    config["models"][0]["model"] = f"{family.base}+{adapter}"
    cache = {"lora_merge_cache": tmp_path / "cache"} if user_cache else {}
    full = tmp_path / "a" / "out"
    ferromerge.run(config, full, quiet=True, out_shard_size=SHARD, lora_merge_cache=tmp_path / "cache-a")
    out = tmp_path / "b" / "out"
    out.parent.mkdir()
    interrupt_at(config, out, at=25, **cache)
    report = ferromerge.run(config, out, quiet=True, out_shard_size=SHARD, resume=True, **cache)
    assert report.shards_reused > 0
    same_files(out, full)
    assert leftovers(out) == []
