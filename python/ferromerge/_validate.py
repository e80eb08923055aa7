"""The values users give both the API functions and the CLI (seed, threads, sizes): one rule and one message each.

The API functions call these directly (a bad value is a ``ParameterError``); ``cli/args.py`` wraps the same
functions as argparse ``type=`` converters, so ``--seed -1`` and ``seed=-1`` fail with the same words.
"""

from __future__ import annotations

import math
import os
import re
import stat
from typing import Any

import numpy as np

from . import _engine
from .errors import ParameterError

#: seeds are u64 in the engine
SEED_LIMIT = 2**64

#: sizes (shard size, memory limit) and counts (rank) are u64/usize in the engine; 2**63 keeps every sum of them
#: below 2**64
SIZE_LIMIT = 2**63

#: more worker threads than this is a typo, not a machine (each is an OS thread with its own stack)
THREADS_LIMIT = 4096


def check_seed(value: Any, error: type[Exception] = ParameterError) -> int:
    """``value`` as a seed: an integer in [0, 2**64). ``error`` is the exception raised otherwise (``compat``
    raises the ``ValueError`` of the libraries it stands in for)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < SEED_LIMIT:
        raise error(f"seed must be an integer in [0, 2**64), got {value!r}")
    return int(value)


def check_positive_int(value: Any, what: str) -> int:
    """``value`` as a positive integer below ``SIZE_LIMIT``; ``what`` names it in the message."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{what} must be a positive integer, got {value!r}")
    if value >= SIZE_LIMIT:
        raise ParameterError(f"{what} must be below 2**63, got {value!r}")
    return int(value)


def check_threads(value: Any) -> int | None:
    """Worker threads: None (all cores) or a positive integer up to ``THREADS_LIMIT``."""
    if value is None:
        return None
    if check_positive_int(value, "threads") > THREADS_LIMIT:
        raise ParameterError(f"threads must be at most {THREADS_LIMIT}, got {value!r}")
    return int(value)


_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgb]|kb|mb|gb|kib|mib|gib)?\s*", re.IGNORECASE)


_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "b": 10**9,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "g": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(value: str | int, what: str = "shard size") -> int:
    """Bytes from a size: an int, or a number with mergekit's K/M/B suffixes (x1000, so "5B" is 5e9 bytes),
    or KB/MB/GB (x1000) or KiB/MiB/GiB (x1024), below ``SIZE_LIMIT``. ``what`` names the setting in error
    messages."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(str(value))
        if match is None:
            raise ParameterError(
                f"{what} {value!r}: expected a number of bytes with an optional K/M/B or KiB/MiB/GiB suffix"
            )
        # float arithmetic as mergekit's; a long digit string ("9" * 400) is inf, which int() would not take
        scaled = float(match.group(1)) * _UNITS[(match.group(2) or "").lower()]
        size = int(scaled) if math.isfinite(scaled) else SIZE_LIMIT
    if size <= 0:
        raise ParameterError(f"{what} {value!r}: must be positive")
    if size >= SIZE_LIMIT:
        raise ParameterError(f"{what} {value!r}: too large (at most 2**63 - 1 bytes)")
    return size


def memory_limit_bytes(memory_limit: str | int | None) -> int | None:
    """The memory budget in bytes from a size (``parse_size``: "8GiB", "500M", an int); None stays None (the
    engine's default, ``_engine.default_memory_limit()``). Below the engine's smallest budget (64 MiB) is a
    ``ParameterError``, checked here so that a bad value fails before any input is read (``run``, ``plan`` and
    ``merge_adapters`` take the same values)."""
    if memory_limit is None:
        return None
    limit = parse_size(memory_limit, "memory limit")
    if limit < _engine.MIN_MEMORY_LIMIT:
        raise ParameterError(f"memory limit {memory_limit!r} ({limit} bytes) is too small: at least 64 MiB")
    return limit


#: the largest config or JSON side file read: far above any real one, and a bound on what a hostile one costs
TEXT_FILE_LIMIT = 64 << 20


def check_text_file(path: str | os.PathLike[str], what: str, error: type[Exception] = ParameterError) -> None:
    """``path`` is a regular file of at most ``TEXT_FILE_LIMIT`` bytes, else ``error`` naming it as ``what``
    ("config file"): checked before reading, since reading a FIFO waits forever and ``/dev/zero`` never ends.
    A path that does not exist passes (the reader says so in its own words)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return
    except OSError as e:
        raise error(f"cannot read {what} {path}: {e.strerror}") from None
    if not stat.S_ISREG(st.st_mode):
        kind = (
            "a directory" if stat.S_ISDIR(st.st_mode)
            else "a FIFO" if stat.S_ISFIFO(st.st_mode)
            else "a device" if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode)
            else "a socket" if stat.S_ISSOCK(st.st_mode)
            else "not a regular file"
        )
        raise error(f"{what} {path} is {kind}, not a regular file")
    if st.st_size > TEXT_FILE_LIMIT:
        raise error(f"{what} {path} is {st.st_size} bytes; at most {format_bytes(TEXT_FILE_LIMIT)} is read")


def format_bytes(n: int) -> str:
    """Decimal units, as disks and ``--out-shard-size`` count: ``1.23 GB``, ``45.6 MB``."""
    return f"{n / 1e9:.2f} GB" if n >= 10**9 else f"{n / 1e6:.1f} MB"
