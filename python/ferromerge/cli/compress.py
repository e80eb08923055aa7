"""``ferromerge compress`` and ``ferromerge decompress`` (see ``ferromerge.compress``).

``add_parser(sub)`` registers both subcommands on the main parser's subparsers; each sets ``func`` to ``main``,
which the ``ferromerge`` command calls with the parsed arguments (its error handling and exit codes apply).
"""

from __future__ import annotations

import argparse
import sys

from ..io.dtypes import ST_NAME
from ..methods import default
from .args import non_negative, parse_seed, parse_threads, positive_int, unit_fraction


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compress",
        help="store fine-tunes of one base as low-rank or TALL-masked task vectors (an archive directory)",
        description="Store the fine-tunes MODEL... of BASE in the archive directory ARCHIVE: per model, each "
        "matrix's task vector truncated to low rank (lowrank), or one summed task vector plus a bit mask per model "
        "(tall). The base is referenced, not copied. Prints the size saved and the reconstruction errors.",
    )
    p.add_argument("base", metavar="BASE", help="the base model directory")
    p.add_argument("models", metavar="MODEL", nargs="+", help="fine-tuned model directories")
    p.add_argument("--out", required=True, metavar="ARCHIVE", help="archive directory to write")
    p.add_argument("--scheme", choices=("lowrank", "tall"), default="lowrank", help="default: lowrank")
    rank = p.add_mutually_exclusive_group()
    rank.add_argument("--rank", type=positive_int, default=None, metavar="R",
                      help="lowrank: singular triplets kept per matrix (default: floor(min(m, n) / number of models))")
    rank.add_argument("--fraction", type=unit_fraction, default=None, metavar="F",
                      help="lowrank: keep floor(F * min(m, n)) triplets per matrix")
    rank.add_argument("--energy", type=unit_fraction, default=None, metavar="E",
                      help="lowrank: keep the fewest triplets holding E of each task vector's squared Frobenius norm")
    p.add_argument("--exact", action="store_true", help="lowrank: exact thin SVD (default: randomized)")
    tall_lambda = default("tall_masks", "tall_mask_lambda")  # the TALL-mask methods' (the engine's)
    p.add_argument("--tall-mask-lambda", type=non_negative, default=tall_lambda, metavar="L",
                   help=f"tall: mask = |tau_t| > L * |tau_MTL - tau_t| (default {tall_lambda})")
    p.add_argument("--dtype", choices=tuple(ST_NAME), default=None,
                   help="storage dtype of the factors / tau_MTL (default: the models' dtype)")
    p.add_argument("--seed", type=parse_seed, default=0, help="seed of the randomized SVD's sketches (default 0)")
    p.add_argument("--threads", type=parse_threads, default=None, metavar="N",
                   help="SVD worker threads (default: all cores)")
    p.add_argument("--overwrite", action="store_true", help="replace ARCHIVE if it exists (once done)")
    p.set_defaults(func=main, compress_command="compress")

    p = sub.add_parser("decompress", help="rebuild one model of a compress archive as a model directory")
    p.add_argument("archive", metavar="ARCHIVE", help="archive directory written by `ferromerge compress`")
    p.add_argument("out", metavar="OUT", help="model directory to write")
    p.add_argument("--model", required=True, metavar="NAME_OR_INDEX",
                   help="which model: its name in the archive (its directory name) or its 0-based index")
    p.add_argument("--base", default=None, metavar="PATH",
                   help="the base model, when not at the path recorded in the archive (it must be the same model)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (once done)")
    p.set_defaults(func=main, compress_command="decompress")


def main(args: argparse.Namespace) -> int:
    from .._compress import compress, decompress

    if args.compress_command == "compress":
        report = compress(
            args.base, args.models, args.out, scheme=args.scheme, rank=args.rank, fraction=args.fraction,
            energy=args.energy, exact=args.exact, tall_mask_lambda=args.tall_mask_lambda, dtype=args.dtype,
            seed=args.seed, threads=args.threads, overwrite=args.overwrite,
        )
        lines = report.lines()
    else:
        rebuilt = decompress(args.archive, args.model, args.out, base=args.base, overwrite=args.overwrite)
        for note in rebuilt.notes:
            print(f"ferromerge: note: {note}", file=sys.stderr)
        lines = rebuilt.lines()
    for line in lines:
        print(line)
    return 0
