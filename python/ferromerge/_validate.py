"""The values users give both the API functions and the CLI (seed, threads, sizes): one rule and one message each.

The API functions call these directly (a bad value is a ``ParameterError``); ``cli/args.py`` wraps the same
functions as argparse ``type=`` converters, so ``--seed -1`` and ``seed=-1`` fail with the same words.
"""

from __future__ import annotations

import math
import re
from typing import Any

import numpy as np

from .errors import ParameterError

#: seeds are u64 in the engine
SEED_LIMIT = 2**64

#: sizes (shard size, memory limit) are u64 in the engine; 2**63 keeps every sum of them below 2**64
SIZE_LIMIT = 2**63


def check_seed(value: Any, error: type[Exception] = ParameterError) -> int:
    """``value`` as a seed: an integer in [0, 2**64). ``error`` is the exception raised otherwise (``compat``
    raises the ``ValueError`` of the libraries it stands in for)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value < SEED_LIMIT:
        raise error(f"seed must be an integer in [0, 2**64), got {value!r}")
    return int(value)


def check_positive_int(value: Any, what: str) -> int:
    """``value`` as a positive integer; ``what`` names it in the message."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ParameterError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def check_threads(value: Any) -> int | None:
    """Worker threads: None (all cores) or a positive integer."""
    return None if value is None else check_positive_int(value, "threads")


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


def format_bytes(n: int) -> str:
    """Decimal units, as disks and ``--out-shard-size`` count: ``1.23 GB``, ``45.6 MB``."""
    return f"{n / 1e9:.2f} GB" if n >= 10**9 else f"{n / 1e6:.1f} MB"
