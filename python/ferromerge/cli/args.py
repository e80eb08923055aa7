"""argparse ``type=`` validators shared by the ``ferromerge`` subcommands (``cli``, ``compress_cli``).

A bad value is an ``argparse.ArgumentTypeError``: argparse reports it with the option's name and exits with 2, the
exit status of every parameter error. (``extract-lora`` passes its values through to ``extract_lora``, which checks
them with the API's messages, so it uses none of these.)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T", int, float)


def _checked(convert: Callable[[str], T], valid: Callable[[T], bool], expected: str) -> Callable[[str], T]:
    """A validator: ``convert`` the text, then require ``valid``; either failure says what was ``expected``."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}") from None
        if not valid(value):
            raise argparse.ArgumentTypeError(f"expected {expected}, got {text!r}")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
#: seeds are u64 in the engine
seed = _checked(int, lambda v: 0 <= v < 2**64, "an integer in [0, 2**64)")
unit_fraction = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
non_negative = _checked(float, lambda v: 0 <= v and math.isfinite(v), "a finite number >= 0")
