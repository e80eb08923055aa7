"""argparse ``type=`` converters shared by the ``ferromerge`` subcommands (``cli.merge``, ``cli.compress``), and the
options the two adapter-writing subcommands (``extract-lora``, ``merge-lora``) share (``add_adapter_output_options``).

A bad value is an ``argparse.ArgumentTypeError``: argparse reports it with the option's name and exits with 2, the
exit status of every parameter error. Values the API takes too (seed, threads) are checked by the API's own rule
and message (``_validate``). (``extract-lora`` passes its values through to ``extract_lora``, which checks them
with the API's messages, so it uses none of these.)
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

from .._validate import check_seed, check_threads
from ..errors import ParameterError

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


def _api_checked(check: Callable[[int], object]) -> Callable[[str], int]:
    """A converter of integer text whose range rule (and message) is the API's ``check``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        try:
            check(value)
        except ParameterError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
parse_seed = _api_checked(check_seed)
parse_threads = _api_checked(check_threads)
unit_fraction = _checked(float, lambda v: 0 < v <= 1, "a number in (0, 1]")
non_negative = _checked(float, lambda v: v >= 0 and math.isfinite(v), "a finite number >= 0")


def add_adapter_output_options(p: argparse.ArgumentParser, seed_help: str) -> None:
    """``--seed``, the randomized SVD's ``--oversample``/``--power-iters`` (tsv_m's defaults, one home in the method
    table), ``--threads``, ``--overwrite`` and ``--quiet`` of ``extract-lora`` and ``merge-lora``; their values pass
    through to the API, which checks them."""
    from ..methods import default

    oversample, power_iters = default("tsv_m", "oversample"), default("tsv_m", "power_iters")
    p.add_argument("--seed", type=int, default=0, help=seed_help)
    p.add_argument("--oversample", type=int, default=oversample, help=f"extra sketch columns (default {oversample})")
    p.add_argument("--power-iters", type=int, default=power_iters, help=f"power iterations (default {power_iters})")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="worker threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only once the adapter is done)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")


def add_memory_limit_option(p: argparse.ArgumentParser, what: str) -> None:
    """``--memory-limit SIZE`` of ``run``, ``plan`` and ``merge-lora``: the text passes through to the API, which
    parses and checks it (``_validate.memory_limit_bytes``); ``what`` says what the budget bounds."""
    p.add_argument(
        "--memory-limit",
        default=None,
        metavar="SIZE",
        help=f"memory budget of {what}, e.g. 2GiB (at least 64MiB; default: half of RAM or of the cgroup "
        "limit, at most 8 GiB); never changes the output",
    )
