"""The resume journal of a run: which output shards are finished, so that ``run(..., resume=True)`` (``ferromerge
run --resume``) redoes only the others after a run was killed.

The journal is a JSON-lines file inside the hidden partial output directory (``output_dir``), written by every
run, whether or not ``--resume`` was given (a ``kill -9`` or a power loss cannot be foreseen). Its first line is
the run's identity (``identity``): ferromerge's version, a digest of the plan and of the resolved config, and the
size, mtime and inode of every input file. Each further line is one finished shard: its name, size and crc32
(``zlib.crc32`` of the whole file), as the engine reports it (``on_shard_done``: computed while writing, reported
once the shard is fsynced), appended and fsynced. A line cut short by a kill is ignored.

``resume`` reads it back: a journal of another identity is refused (``OutputError`` saying what differs), every
listed shard is verified (size and crc32; one that fails is redone), and every other file of the partial directory
is removed (shards the kill cut short, side files), except the LoRA merge cache, whose files are written atomically
and named by a digest of their sources.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import threading
import zlib
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from .. import _engine
from ..errors import OutputError

#: the journal's name inside the partial directory (removed before the directory becomes the output)
JOURNAL = ".ferromerge-journal.jsonl"

FORMAT = "ferromerge-journal"
VERSION = 1

#: what a resume keeps besides the verified shards and the journal (``_run``'s temporary LoRA merge cache)
KEEP = ("lora-merge-cache",)

#: bytes read per step when checksumming a shard
_BLOCK = 16 << 20

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


def file_crc32(path: Path) -> tuple[int, int]:
    """``(size, zlib.crc32)`` of a file, read in blocks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
            size += len(block)
    return size, crc


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


def read(partial: Path) -> tuple[dict[str, Any] | None, dict[str, tuple[int, int]]]:
    """The identity and the finished shards ``{file: (size, crc32)}`` a journal lists; ``(None, {})`` when
    ``partial`` has none or its first line is unreadable (a kill right after creating it)."""
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
    shards: dict[str, tuple[int, int]] = {}
    for r in records[1:]:
        if isinstance(r, dict) and isinstance(r.get("shard"), str) and isinstance(r.get("size"), int) and isinstance(
            r.get("crc32"), int
        ):
            shards[r["shard"]] = (r["size"], r["crc32"])
    return head.get("identity"), shards


def resume(
    partial: Path, ident: Mapping[str, Any], shards: Sequence[str], log: Callable[[str], None]
) -> dict[str, tuple[int, int]]:
    """Prepare the adopted partial directory of a killed run for ``resume``: refuse another run's
    (``OutputError``), keep the journaled shards of ``shards`` that verify, remove everything else. Returns the
    kept shards ``{file: (size, crc32)}``."""
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
    kept: dict[str, tuple[int, int]] = {}
    for name in shards:
        if name in listed and (partial / name).is_file():
            try:
                found = file_crc32(partial / name)
            except OSError:
                found = None
            if found == listed[name]:
                kept[name] = listed[name]
            else:
                log(f"note: {partial / name} does not match its journal entry (size or crc32); merging it again")
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

    def __init__(self, partial: Path, ident: Mapping[str, Any], kept: Mapping[str, tuple[int, int]]) -> None:
        """A new journal in ``partial`` (replacing any), listing ``kept`` (the shards a resume verified)."""
        self.path = partial / JOURNAL
        self._lock = threading.Lock()
        tmp = partial / (JOURNAL + ".new")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(json.dumps({"format": FORMAT, "version": VERSION, "identity": ident}) + "\n")
                for name, (size, crc) in kept.items():
                    f.write(json.dumps({"shard": name, "size": size, "crc32": crc}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self._file: IO[str] | None = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        except OSError as e:
            raise OutputError(f"cannot write the resume journal {self.path}: {e}") from None

    def record(self, name: str, size: int, crc32: int) -> None:
        """Append a finished shard (the engine fsynced it) and fsync the journal. Never raises: a journal that
        cannot be written (a full disk) stops there, which only means that a resume merges more again; the run
        itself goes on (and meets the full disk in its own words)."""
        with self._lock:
            if self._file is None:
                return
            try:
                self._file.write(json.dumps({"shard": name, "size": size, "crc32": crc32}) + "\n")
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
