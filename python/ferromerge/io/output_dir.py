"""The output directory: built in a temporary directory beside the target and renamed onto it when complete, and
the free space of the filesystem it goes to.

A failed or interrupted run removes its temporary directory and leaves no target, so an output directory that
exists is always complete. Partial directories of killed runs are found and removed on the next run, or, by a run
that resumes (``building(resume=True)``), taken over and kept when it fails in turn (``io.journal`` says which of
their shards are finished).

One run at a time per target: a run holds an exclusive ``flock`` on a lock file beside the target
(``.<name>.ferromerge-lock``) from its start (``lock``) to its end, so a second run into the same directory fails at
once, and a killed run's lock dies with its process (a stale lock file blocks nothing).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import TracebackType

from .._validate import format_bytes
from ..errors import OutputError

#: headroom of the free-space check beyond the shards' bytes (the small config and tokenizer files, filesystem
#: block rounding)
SPACE_MARGIN = 0.01


_PARTIAL = ".ferromerge-partial-"


_TRASH = ".ferromerge-old-"


_LOCK = ".ferromerge-lock"


def _real(path: Path) -> Path:
    """``path`` with symlinks resolved; unlike ``Path.resolve`` (RuntimeError), a symlink loop stays as it is."""
    return Path(os.path.realpath(path))


class OutputDir:
    """The target directory of one run; ``building()`` yields the temporary directory to fill. As a context
    manager it holds the target's lock (``lock``/``unlock``) for the whole run."""

    def __init__(self, target: str | os.PathLike[str], *, overwrite: bool = False) -> None:
        self.target = Path(target).expanduser().absolute()
        self.overwrite = overwrite
        self.temp = self.target.parent / f".{self.target.name}{_PARTIAL}{os.getpid()}"
        self.lock_file = self.target.parent / f".{self.target.name}{_LOCK}"
        self._lock_fd: int | None = None
        self.check()

    def __enter__(self) -> OutputDir:
        self.lock()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.unlock()

    def check(self) -> None:
        """Fail early (before any work) when the target cannot be written."""
        if self.target.exists() or self.target.is_symlink():
            if not self.overwrite:
                raise OutputError(f"output directory {self.target} already exists; use --overwrite to replace it")
            if not self.target.is_dir() or self.target.is_symlink():
                raise OutputError(f"{self.target} exists and is not a directory; refusing to replace it")
            if _real(Path.cwd()).is_relative_to(_real(self.target)):
                raise OutputError(f"refusing to replace {self.target}: it contains the current directory")
        parent = self.target.parent
        try:
            os.stat(parent)
        except FileNotFoundError:
            pass  # created by building()
        except OSError as e:  # a symlink loop on the way, a file where a directory should be
            raise OutputError(f"cannot create {self.target}: {parent}: {e.strerror}") from None
        if parent.exists() and not parent.is_dir():
            raise OutputError(f"cannot create {self.target}: {parent} is not a directory")

    def check_inputs(self, model_dirs: list[Path]) -> None:
        """Refuse a target that holds an input model: replacing it would delete what is being read."""
        target = _real(self.target)
        for d in model_dirs:
            if _real(d).is_relative_to(target):
                raise OutputError(f"output directory {self.target} contains the input model {d}; choose another")

    def lock(self) -> None:
        """Take the target's lock (``OutputError`` at once when another run holds it). Nothing to lock while the
        parent directory does not exist (``building`` creates it, then locks)."""
        if self._lock_fd is not None or not self.target.parent.is_dir():
            return
        while True:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as e:
                raise OutputError(f"cannot create {self.lock_file} (the lock of {self.target}): {e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.read(fd, 32).decode("ascii", "replace").strip()
                os.close(fd)
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise OutputError(f"cannot lock {self.lock_file} (the lock of {self.target}): {e}") from None
                raise OutputError(
                    f"output directory {self.target} is being written by another ferromerge run"
                    + (f" (process {holder})" if holder.isdigit() else "")
                    + f", which holds {self.lock_file}; wait for it to end or choose another output directory"
                ) from None
            # the previous holder unlinks the file before unlocking it: the lock counts only if this is still
            # the file at that path
            try:
                same = os.stat(self.lock_file).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def unlock(self) -> None:
        """Release the lock and remove its file (removed first, so that nobody locks a file about to vanish)."""
        if self._lock_fd is None:
            return
        try:
            self.lock_file.unlink(missing_ok=True)
        finally:
            os.close(self._lock_fd)
            self._lock_fd = None

    def stale(self) -> list[Path]:
        """Partial or trash directories of this target: left by killed runs, since this run holds the lock."""
        found = {p for marker in (_PARTIAL, _TRASH) for p in self.target.parent.glob(f".{self.target.name}{marker}*")}
        return sorted(found)

    def _adopt(self, log: Callable[[str], None]) -> None:
        """Take over the newest partial directory of a killed run as this run's temporary directory."""
        partials = [p for p in self.stale() if _PARTIAL in p.name and p.is_dir() and not p.is_symlink()]
        if not partials:
            log(f"note: no partial output of {self.target} to resume; starting from the beginning")
            return
        newest = max(partials, key=lambda p: p.stat().st_mtime_ns)
        try:
            os.rename(newest, self.temp)
        except OSError as e:
            raise OutputError(f"cannot take over {newest} to resume: {e}") from None
        log(f"resuming from {newest}")

    @contextmanager
    def building(self, log: Callable[[str], None] = lambda _: None, *, resume: bool = False) -> Iterator[Path]:
        """Yield a temporary directory; on normal exit it replaces the target. On any other exit it is removed,
        unless ``resume``: then it is kept for a later resume. ``resume`` also starts from the newest partial
        directory a killed run left, instead of a fresh one."""
        try:
            self.target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OutputError(f"cannot create {self.target.parent}: {e}") from None
        locked_here = self._lock_fd is None
        self.lock()
        try:
            if resume:
                self._adopt(log)
            for p in self.stale():
                # our own pid's directory, when not adopted, can only be a leftover of an earlier process
                if not (resume and p == self.temp):
                    log(f"removing {p}, left by an interrupted run")
                    shutil.rmtree(p, ignore_errors=True)
            try:
                self.temp.mkdir(exist_ok=resume)
            except OSError as e:
                raise OutputError(f"cannot create {self.temp}: {e}") from None
            committed = False
            try:
                yield self.temp
                self._commit()
                committed = True
            finally:
                # BaseException included: Ctrl-C must not leave a partial directory behind, unless it is to be
                # resumed
                if resume and not committed and self.temp.is_dir():
                    log(f"kept the partial output {self.temp}; run again with --resume to continue it")
                else:
                    shutil.rmtree(self.temp, ignore_errors=True)
        finally:
            if locked_here:
                self.unlock()

    def _commit(self) -> None:
        try:
            if self.target.exists():
                self.check()
                trash = self.target.parent / f".{self.target.name}{_TRASH}{os.getpid()}"
                os.rename(self.target, trash)
                try:
                    os.rename(self.temp, self.target)
                except BaseException:
                    # a failed rename, or Ctrl-C/SIGTERM between the two: the old output goes back, or the user
                    # would be left with neither (the next run removes trash directories as stale)
                    with contextlib.suppress(OSError):
                        os.rename(trash, self.target)
                    raise
                # the new output is in place and complete: a Ctrl-C/SIGTERM now must not make the run report
                # "no output was written"; what is left of the old one is removed by the next run (stale)
                with contextlib.suppress(KeyboardInterrupt):
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
