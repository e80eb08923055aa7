"""The ``ferromerge`` command: ``run``, ``plan``, ``demo`` (``cli.merge``), ``extract-lora`` (``cli.extract_lora``),
``compress`` and ``decompress`` (``cli.compress``), ``--version``.

Errors print one line, ``ferromerge: error: <message>``, and exit with 2 for config/parameter problems, 1 for
input/output problems, 130 on Ctrl-C (no output is left behind in any of these cases).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .. import _engine
from ..errors import MergeError, ParameterError
from . import compress, extract_lora, merge

__all__ = ["main"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ferromerge", description="Merge LLM weights (mergekit YAML configs) by streaming safetensors shards."
    )
    parser.add_argument("--version", action="version", version=f"ferromerge {_engine.version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    merge.add_parsers(sub)  # run, plan, demo
    extract_lora.add_parser(sub)
    compress.add_parser(sub)  # compress, decompress
    return parser


def _error(message: object) -> None:
    print(f"ferromerge: error: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``ferromerge`` console script; returns the exit status."""
    args = _parser().parse_args(argv)
    try:
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
    except KeyboardInterrupt:
        print("ferromerge: interrupted; no output was written", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
