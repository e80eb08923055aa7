"""The ``ferromerge`` command: ``run``, ``plan``, ``demo`` (``cli.merge``), ``extract-lora`` (``cli.extract_lora``),
``merge-lora`` (``cli.merge_lora``), ``compress`` and ``decompress`` (``cli.compress``), ``--version``.

Errors print one line, ``ferromerge: error: <message>``, and exit with 2 for config/parameter problems, 1 for
input/output problems, 130 on Ctrl-C (SIGINT), 143 on SIGTERM (``kill``, ``docker stop``, Slurm, systemd) and 129 on
SIGHUP (no output is left behind in any of these cases; ``run --resume`` keeps its partial output to resume).
SIGTERM and SIGHUP take Ctrl-C's road: their handler raises ``KeyboardInterrupt`` (``Terminated``), which the engine
lets through at its next tensor (it checks for signals after each one) and every cleanup already handles.

A compat warning (what mergekit accepts and ferromerge questions: ``errors.CompatWarning``) prints one line,
``ferromerge: warning: <message>``, and the command goes on (``--strict`` makes it an error).

A Ctrl-C during start-up (importing the commands and what they use, reading the arguments) prints the same one line
and exits 130 as well: this module imports only the standard library when it loads, and ``main`` imports the rest
under its ``except KeyboardInterrupt`` (the package's ``__init__`` imports nothing heavy either, as the console
script imports it first). What stays unguarded is Python's own start-up (``site``), before any ferromerge code runs.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from types import FrameType
from typing import TextIO

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    # imported here, under main's guard against Ctrl-C: the commands import NumPy, the engine and the methods
    from .. import _engine
    from . import compress, extract_lora, merge, merge_lora

    parser = argparse.ArgumentParser(
        prog="ferromerge", description="Merge LLM weights (mergekit YAML configs) by streaming safetensors shards."
    )
    parser.add_argument("--version", action="version", version=f"ferromerge {_engine.version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge.add_parsers(sub)  # run, plan, demo
    extract_lora.add_parser(sub)
    merge_lora.add_parser(sub)
    compress.add_parser(sub)  # compress, decompress
    return parser


def interrupted() -> int:
    """Ctrl-C's message and exit status (``mergekit_yaml`` too), for a command that leaves no output behind."""
    print("ferromerge: interrupted; no output was written", file=sys.stderr)
    return 128 + signal.SIGINT


def _error(message: object) -> None:
    print(f"ferromerge: error: {message}", file=sys.stderr)


class Terminated(KeyboardInterrupt):
    """A SIGTERM or SIGHUP, raised where Ctrl-C's ``KeyboardInterrupt`` would be."""

    def __init__(self, signo: int) -> None:
        super().__init__(signal.Signals(signo).name)
        self.signo = signo


#: the signals that stop a command as Ctrl-C does
STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


@contextmanager
def _stop_on_signals() -> Iterator[None]:
    """While a command runs, SIGTERM and SIGHUP raise ``Terminated`` (once: a second signal while cleaning up is
    ignored, so the cleanup finishes); the previous handlers come back after."""
    raised = False

    def handler(signo: int, _frame: FrameType | None) -> None:
        nonlocal raised
        if not raised:
            raised = True
            raise Terminated(signo)

    try:
        previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS}
    except ValueError:  # not the main thread (main() called from a worker thread): leave the signals alone
        yield
        return
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _print_compat_warnings() -> None:
    """From now on (within ``_dispatch``'s ``catch_warnings``), each compat warning prints as ``ferromerge: warning:
    ...``, every time (a command loads its config once); other warnings print as Python prints them."""
    from .. import errors

    python_way = warnings.showwarning

    def show(message: Warning | str, category: type[Warning], filename: str, lineno: int,
             file: TextIO | None = None, line: str | None = None) -> None:
        if issubclass(category, errors.CompatWarning):
            print(f"ferromerge: warning: {message}", file=sys.stderr)
        else:
            python_way(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    warnings.simplefilter("always", errors.CompatWarning)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ferromerge`` console script; returns the exit status."""
    # NumPy's OpenBLAS starts its threads when numpy is imported, and by default each spins about 0.1 s of CPU
    # before it sleeps, on every core, whether or not a BLAS call ever comes (a merge makes none: the engine does
    # the work). 2^4 cycles makes them sleep at once; the commands that do call BLAS (merge-lora, extract-lora)
    # still get its threads. Set before the commands import numpy; a user's own setting wins.
    os.environ.setdefault("OPENBLAS_THREAD_TIMEOUT", "4")
    try:
        args = _parser().parse_args(argv)
    except KeyboardInterrupt:  # during start-up: nothing was written yet
        return interrupted()
    return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> int:
    from ..errors import MergeError, ParameterError  # loaded already (by the commands): a dictionary look-up

    try:
        with warnings.catch_warnings(), _stop_on_signals():
            _print_compat_warnings()
            return int(args.func(args))
    except ParameterError as e:
        _error(e)
        return 2
    except MergeError as e:
        _error(e)
        return 1
    except OSError as e:
        _error(e)
        return 1
    except Terminated as e:
        print(f"ferromerge: terminated by {signal.Signals(e.signo).name}; no output was written", file=sys.stderr)
        return 128 + e.signo
    except KeyboardInterrupt:
        return interrupted()


if __name__ == "__main__":
    sys.exit(main())
