"""The output directory: built in a temporary directory beside the target and renamed onto it when complete, and
the free space of the filesystem it goes to.

A failed or interrupted run removes its temporary directory and leaves no target, so an output directory that
exists is always complete. Partial directories of killed runs are found and removed on the next run.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .._validate import format_bytes
from ..errors import OutputError

#: headroom of the free-space check beyond the shards' bytes (the small config and tokenizer files, filesystem
#: block rounding)
SPACE_MARGIN = 0.01


_PARTIAL = ".ferromerge-partial-"


_TRASH = ".ferromerge-old-"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class OutputDir:
    """The target directory of one run; ``building()`` yields the temporary directory to fill."""

    def __init__(self, target: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.target = Path(target).expanduser().absolute()
        self.overwrite = overwrite
        self.temp = self.target.parent / f".{self.target.name}{_PARTIAL}{os.getpid()}"
        self.check()

    def check(self) -> None:
        """Fail early (before any work) when the target cannot be written."""
        if self.target.exists() or self.target.is_symlink():
            if not self.overwrite:
                raise OutputError(f"output directory {self.target} already exists; use --overwrite to replace it")
            if not self.target.is_dir() or self.target.is_symlink():
                raise OutputError(f"{self.target} exists and is not a directory; refusing to replace it")
            if Path.cwd().resolve().is_relative_to(self.target.resolve()):
                raise OutputError(f"refusing to replace {self.target}: it contains the current directory")
        parent = self.target.parent
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"cannot create {self.target}: {parent} is not a directory")

    def check_inputs(self, model_dirs: list[Path]) -> None:
        """Refuse a target that holds an input model: replacing it would delete what is being read."""
        target = self.target.resolve()
        for d in model_dirs:
            if d.resolve().is_relative_to(target):
                raise OutputError(f"output directory {self.target} contains the input model {d}; choose another")

    def stale(self) -> list[Path]:
        """Partial or trash directories of this target left by runs that were killed."""
        found = []
        for marker in (_PARTIAL, _TRASH):
            for p in self.target.parent.glob(f".{self.target.name}{marker}*"):
                pid = p.name.rpartition("-")[2]
                # our own pid can only be a leftover of an earlier process that had the same pid
                if p == self.temp or (pid.isdigit() and not _pid_alive(int(pid))):
                    found.append(p)
        return sorted(found)

    @contextmanager
    def building(self, log: Callable[[str], None] = lambda _: None) -> Iterator[Path]:
        """Yield a fresh temporary directory; on normal exit it replaces the target, on any exit it is gone."""
        for p in self.stale():
            log(f"removing {p}, left by an interrupted run")
            shutil.rmtree(p, ignore_errors=True)
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
            self.temp.mkdir()
        except OSError as e:
            raise OutputError(f"cannot create {self.temp}: {e}") from None
        try:
            yield self.temp
            self._commit()
        finally:
            # BaseException included: Ctrl-C must not leave a partial directory behind.
            shutil.rmtree(self.temp, ignore_errors=True)

    def _commit(self) -> None:
        try:
            if self.target.exists():
                self.check()
                trash = self.target.parent / f".{self.target.name}{_TRASH}{os.getpid()}"
                os.rename(self.target, trash)
                os.rename(self.temp, self.target)
                shutil.rmtree(trash, ignore_errors=True)
            else:
                os.rename(self.temp, self.target)
        except OSError as e:
            raise OutputError(f"cannot move the finished output to {self.target}: {e}") from None


def free_space(directory: str | os.PathLike[str]) -> tuple[Path, int]:
    """``directory`` or its nearest existing ancestor, and the bytes free on that filesystem."""
    where = Path(directory).expanduser().absolute()
    while not where.exists() and where != where.parent:
        where = where.parent
    try:
        return where, shutil.disk_usage(where).free
    except OSError as e:
        raise OutputError(f"cannot tell the free space at {where} (for {directory}): {e}") from None


def check_free_space(target: str | os.PathLike[str], needed: int) -> None:
    """``OutputError`` naming the path, the bytes needed and free when ``needed`` (+``SPACE_MARGIN``) does not fit
    on the filesystem of ``target``'s parent (the output is built beside ``target``, then renamed onto it)."""
    where, free = free_space(Path(target).expanduser().absolute().parent)
    wanted = int(needed * (1 + SPACE_MARGIN))
    if free < wanted:
        raise OutputError(
            f"not enough disk space for {Path(target).expanduser().absolute()}: the output needs {wanted} bytes "
            f"({format_bytes(wanted)}, shards + {SPACE_MARGIN:.0%}) but {where} has {free} bytes "
            f"({format_bytes(free)}) free"
        )
