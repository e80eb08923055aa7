"""The resume journal of a run: which output shards are finished, so that ``run(..., resume=True)`` (``ferromerge
run --resume``) redoes only the others after a run was killed.

The journal is a JSON-lines file inside the hidden partial output directory (``output_dir``), written by every
run, whether or not ``--resume`` was given (a ``kill -9`` or a power loss cannot be foreseen). Its first line is
the run's identity (``identity``): ferromerge's version, a digest of the plan and of the resolved config, and the
size, mtime and inode of every input file. Each further line is one finished shard (``Shard``): its name, size and
crc32 (``zlib.crc32`` of the whole file) as the engine reports them (``on_shard_done``: computed while writing,
reported once the shard is fsynced), and the file's stamp (mtime, ctime, inode) taken then; appended and fsynced. A
line cut short by a kill is ignored.

``resume`` reads it back: a journal of another identity is refused (``OutputError`` saying what differs), every
listed shard is verified by its stamp (one that fails is redone), and every other file of the partial directory is
removed (shards the kill cut short, side files), except the LoRA merge cache, whose files are written atomically
and named by a digest of their sources.

Why the stamp and not the crc32: a shard is journaled only after the engine fsynced it, so neither a kill nor a
power loss can tear a journaled shard; what can still damage one is a later write, truncation or replacement, and
each of those changes its size, inode or ctime (no system call sets a ctime back; Linux 6.13+ gives a write after
our ``stat`` a newer ctime at once, older kernels from their next clock tick, milliseconds later). Reading every
kept shard back to recompute its crc32 costs a read of the whole finished output from disk (the engine drops
written pages from the page cache), about 1.5 s per GB, which made a resume at 90% cost half a full run; the stamp
costs one ``stat`` per shard. What the stamp cannot see is a disk that silently returns other bytes than it stored,
which nothing else in a run checks either (inputs included); the crc32 stays in the journal for a check by hand
(``zlib.crc32`` of the file).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import stat
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple

from .. import _engine
from ..errors import OutputError

#: the journal's name inside the partial directory (removed before the directory becomes the output)
JOURNAL = ".ferromerge-journal.jsonl"

FORMAT = "ferromerge-journal"
VERSION = 2

#: what a resume keeps besides the verified shards and the journal (``_run``'s temporary LoRA merge cache)
KEEP = ("lora-merge-cache",)

#: the placeholder of the partial directory's own path in the plan digest (it holds the process id)
_PARTIAL = "<partial>"


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def identity(plan_json: str, config: Mapping[str, Any], inputs: Iterable[Path], partial: Path) -> dict[str, Any]:
    """What makes two runs the same run: ferromerge's version, the plan (engine input, ``partial``'s own path
    masked), the resolved config (which decides the side files), and ``(size, mtime_ns, inode)`` of each input
    file (files under ``partial`` are derived from the others and left out)."""
    return {
        "ferromerge": _engine.version(),
        "plan_sha256": _sha256(plan_json.replace(str(partial), _PARTIAL)),
        "config_sha256": _sha256(json.dumps(config, sort_keys=True, default=str)),
        "inputs": fingerprints(inputs, partial),
    }


def fingerprints(inputs: Iterable[Path], partial: Path | None = None) -> dict[str, list[int]]:
    """``{file: [size, mtime_ns, inode]}`` of each input file that exists (a missing one is the engine's to name),
    files under ``partial`` left out: what tells a changed input from the one a run read."""
    stats: dict[str, list[int]] = {}
    for f in sorted({Path(p) for p in inputs}):
        if partial is not None and f.is_relative_to(partial):
            continue
        try:
            st = f.stat()
        except OSError:
            continue
        stats[str(f)] = [st.st_size, st.st_mtime_ns, st.st_ino]
    return stats


def plan_inputs(plan: Mapping[str, Any]) -> set[Path]:
    """Every file a plan (its parsed JSON) reads."""
    files: set[Path] = set()
    for shard in plan["shards"]:
        for t in shard["tensors"]:
            if t.get("base") is not None:
                files.add(Path(t["base"]["file"]))
            files.update(Path(i["file"]) for i in t["inputs"])
    return files


class Shard(NamedTuple):
    """A finished shard as the journal lists it: size and crc32 from the engine, and the file's stamp (``stat``
    right after the engine fsynced it): ``mtime_ns``, ``ctime_ns`` and ``inode``."""

    size: int
    crc32: int
    mtime_ns: int
    ctime_ns: int
    inode: int

    @classmethod
    def stamped(cls, path: Path, size: int, crc32: int) -> Shard:
        """The entry of ``path`` as it is now (``OSError`` when it cannot be stat'ed)."""
        st = path.stat()
        return cls(size, crc32, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)

    def matches(self, path: Path) -> bool:
        """``path`` is still the file this entry was stamped from: same size, mtime, ctime and inode."""
        try:
            st = path.stat()
        except OSError:
            return False
        found = (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
        return stat.S_ISREG(st.st_mode) and found == (self.size, self.mtime_ns, self.ctime_ns, self.inode)

    def line(self, name: str) -> str:
        return json.dumps({"shard": name, **self._asdict()}) + "\n"


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    why = []
    if old.get("ferromerge") != new["ferromerge"]:
        why.append(f"it was made by ferromerge {old.get('ferromerge')}, this is {new['ferromerge']}")
    if old.get("plan_sha256") != new["plan_sha256"] or old.get("config_sha256") != new["config_sha256"]:
        why.append("the config or the run's options (seed, shard size, dtypes, models) differ")
    inputs_old: Mapping[str, Any] = old.get("inputs") or {}
    changed = sorted(f for f in set(inputs_old) | set(new["inputs"]) if inputs_old.get(f) != new["inputs"].get(f))
    if changed:
        more = f" (and {len(changed) - 1} more)" if len(changed) > 1 else ""
        why.append(f"input {changed[0]}{more} changed since (size, modification time or inode)")
    return why


def read(partial: Path) -> tuple[dict[str, Any] | None, dict[str, Shard]]:
    """The identity and the finished shards ``{file: Shard}`` a journal lists; ``(None, {})`` when ``partial`` has
    none or its first line is unreadable (a kill right after creating it)."""
    try:
        lines = (partial / JOURNAL).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError):
        return None, {}
    records = []
    for line in lines:
        try:
            records.append(json.loads(line))
        except ValueError:
            break  # cut short by the kill: nothing after it was written
    head = records[0] if records else None
    if not isinstance(head, dict) or head.get("format") != FORMAT or head.get("version") != VERSION:
        return None, {}
    shards: dict[str, Shard] = {}
    for r in records[1:]:
        if not isinstance(r, dict) or not isinstance(r.get("shard"), str):
            continue
        values = [r.get(f) for f in Shard._fields]
        if all(isinstance(v, int) for v in values):
            shards[r["shard"]] = Shard(*(int(v) for v in values if v is not None))
    return head.get("identity"), shards


def resume(
    partial: Path, ident: Mapping[str, Any], shards: Sequence[str], log: Callable[[str], None]
) -> dict[str, Shard]:
    """Prepare the adopted partial directory of a killed run for ``resume``: refuse another run's
    (``OutputError``), keep the journaled shards of ``shards`` whose stamp verifies, remove everything else.
    Returns the kept shards."""
    old, listed = read(partial)
    if old is None:
        if any(partial.iterdir()):
            log(f"note: {partial} has no journal of finished shards; starting from the beginning")
        listed = {}
    else:
        why = _differences(old, ident)
        if why:
            raise OutputError(
                f"cannot resume into {partial}: {'; '.join(why)}. Run without --resume to start over (that "
                "removes the partial output)"
            )
    kept: dict[str, Shard] = {}
    for name in shards:
        if name not in listed or not (partial / name).exists():
            continue
        if listed[name].matches(partial / name):
            kept[name] = listed[name]
        else:
            log(
                f"note: {partial / name} was changed after it was journaled (its size, modification time, change "
                "time or inode); merging it again"
            )
    for p in partial.iterdir():
        if p.name in kept or p.name == JOURNAL or p.name in KEEP:
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    return kept


class Journal:
    """The journal being written by a run: the identity, then one line per finished shard."""

    def __init__(self, partial: Path, ident: Mapping[str, Any], kept: Mapping[str, Shard]) -> None:
        """A new journal in ``partial`` (replacing any), listing ``kept`` (the shards a resume verified)."""
        self.partial = partial
        self.path = partial / JOURNAL
        self._lock = threading.Lock()
        tmp = partial / (JOURNAL + ".new")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"format": FORMAT, "version": VERSION, "identity": ident}) + "\n")
                for name, shard in kept.items():
                    f.write(shard.line(name))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise OutputError(f"cannot write the resume journal {self.path}: {e}") from None

    def record(self, name: str, size: int, crc32: int) -> None:
        """Append a finished shard (the engine fsynced it; its stamp is taken now) and fsync the journal. Never
        raises: a journal that cannot be written (a full disk) stops there, which only means that a resume merges
        more again; the run itself goes on (and meets the full disk in its own words)."""
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(Shard.stamped(self.partial / name, size, crc32).line(name))
                self._file.flush()
                os.fsync(self._file.fileno())
            except OSError:
                # a line cut short is ignored by ``read``, as a kill's is
                file, self._file = self._file, None
                with contextlib.suppress(OSError):
                    file.close()

    def close(self, remove: bool) -> None:
        """Close; ``remove``: delete the journal (the directory is about to become the output)."""
        with self._lock:
            if self._file is not None:
                self._file.close()
                self._file = None
        if remove:
            self.path.unlink(missing_ok=True)


def reduced_plan(plan: Mapping[str, Any], kept: Iterable[str]) -> dict[str, Any]:
    """The plan without the shards in ``kept``: what is left for the engine after a resume."""
    skip = set(kept)
    return {**plan, "shards": [s for s in plan["shards"] if s["file"] not in skip]}
