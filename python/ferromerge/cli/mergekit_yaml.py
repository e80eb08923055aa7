"""``ferromerge-yaml CONFIG_FILE OUT_PATH [options]``: mergekit-yaml's command line, run by ferromerge.

It takes exactly mergekit-yaml's arguments (every ``MergeOptions`` field, ``cli.mergekit_options``; anything else
is a usage error, exit 2) and then runs ``ferromerge run`` with them, so a script can replace ``mergekit-yaml`` by
``ferromerge-yaml`` and keep its arguments. What each option does here, and which do nothing, is
``mergekit_options``' table. ferromerge's own options (``--memory-limit``, ``--overwrite``, ``--strict``, ...) are
``ferromerge run``'s. A Ctrl-C during start-up prints one line and exits 130, as ``ferromerge``'s does (``cli``).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from . import interrupted

__all__ = ["main", "parser"]


def parser() -> argparse.ArgumentParser:
    """mergekit-yaml's arguments: CONFIG_FILE, OUT_PATH and its options (no abbreviations, as click has none)."""
    from .mergekit_options import OPTIONS, add  # here, under main's guard against Ctrl-C: it imports the planner

    p = argparse.ArgumentParser(
        prog="ferromerge-yaml",
        description="mergekit-yaml's command line, merged by ferromerge (`ferromerge run` with the same arguments).",
        allow_abbrev=False,
    )
    p.add_argument("config_file", metavar="CONFIG_FILE", help="mergekit YAML config")
    p.add_argument("out_path", metavar="OUT_PATH", help="output model directory (must not exist)")
    add(p, OPTIONS)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ferromerge-yaml`` console script; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    try:
        parser().parse_args(args)  # only mergekit-yaml's arguments (argparse exits 2 on others)
    except KeyboardInterrupt:  # during start-up: nothing was written yet
        return interrupted()
    from . import main as ferromerge

    return ferromerge(["run", *args])


if __name__ == "__main__":
    sys.exit(main())
