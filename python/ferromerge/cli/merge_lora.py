"""``ferromerge merge-lora OUT --adapter PATH[:WEIGHT] ...``: the command-line face of ``adapters.merge_adapters``.

Option names follow PEFT's ``add_weighted_adapter`` arguments (``--combination`` is its ``combination_type``,
``--rank`` its ``svd_rank``, ``--svd-clamp``, ``--density``, ``--majority-sign``). Values are checked by
``merge_adapters`` (a bad one is a ``ParameterError``: exit 2, one line, as every ferromerge command).
"""

from __future__ import annotations

import argparse
from typing import Any

from .args import add_adapter_output_options, add_memory_limit_option


def parse_adapter(text: str) -> tuple[str, float]:
    """``PATH[:WEIGHT]``: the weight is the text after the last ``:`` when it is a number (else all is the path)."""
    path, sep, tail = text.rpartition(":")
    if sep and path:
        try:
            return path, float(tail)
        except ValueError:
            pass
    return text, 1.0


def add_parser(sub: Any) -> None:
    """Add the ``merge-lora`` subcommand to ``sub`` (the ``ferromerge`` parser's subparsers)."""
    from ..adapters import COMBINATIONS

    p = sub.add_parser(
        "merge-lora",
        help="merge PEFT LoRA adapters into one adapter (PEFT's add_weighted_adapter types, without the base model)",
        description="Merge LoRA adapters module by module into one PEFT LoRA adapter in OUT, with the combination "
        "types of PEFT's add_weighted_adapter; the base model is never loaded.",
    )
    p.add_argument("out", metavar="OUT", help="adapter directory to write (must not exist, see --overwrite)")
    p.add_argument("--adapter", dest="adapters", action="append", required=True, type=parse_adapter,
                   metavar="PATH[:WEIGHT]", help="an adapter directory or Hugging Face cache id, and its weight "
                   "(default 1); repeat for each adapter")
    p.add_argument("--combination", default="svd", choices=COMBINATIONS, metavar="TYPE",
                   help=f"combination type (default svd): {', '.join(COMBINATIONS)}")
    p.add_argument("--rank", type=int, default=None, metavar="R",
                   help="output rank of the SVD types (default: the largest input rank)")
    p.add_argument("--density", type=float, default=None, metavar="D",
                   help="fraction of entries kept by ties, dare_* and magnitude_prune types")
    p.add_argument("--majority-sign", choices=("total", "frequency"), default="total",
                   help="sign election of the ties types (default total)")
    p.add_argument("--svd-clamp", type=float, default=None, metavar="Q",
                   help="clip the SVD types' factors at this quantile of their entries")
    p.add_argument("--exact", action="store_true", help="exact SVD for the full-delta SVD types (svd is always exact)")
    p.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None,
                   help="dtype of the output factors (default: the adapters' dtype)")
    p.add_argument("--base-model", default=None, metavar="NAME",
                   help="base_model_name_or_path of the output (default: the first adapter's)")
    add_memory_limit_option(p, "the merge (it holds one module at a time; a module that cannot fit is refused)")
    add_adapter_output_options(p, "seed of DARE masks and randomized SVD sketches (default 0)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the subcommand; errors propagate to ``cli.main``, which prints them and picks the exit status."""
    from ..adapters import merge_adapters
    from ..progress import ProgressBar

    bar = None if args.quiet else ProgressBar("merging adapters")

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar(done, total, done, total)

    try:
        summary = merge_adapters(
            args.out, args.adapters, combination=args.combination, rank=args.rank, density=args.density,
            majority_sign=args.majority_sign, seed=args.seed, exact=args.exact, svd_clamp=args.svd_clamp,
            dtype=args.dtype, base_model=args.base_model, threads=args.threads, memory_limit=args.memory_limit,
            oversample=args.oversample, power_iters=args.power_iters, overwrite=args.overwrite, quiet=args.quiet,
            on_progress=progress,
        )
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print(f"merged {len(args.adapters)} adapter(s) by {summary['combination']} into a rank-{summary['r']} "
              f"{summary['dtype']} LoRA of {summary['modules']} modules in {summary['out']} "
              f"({summary['seconds']:.2f} s)")
    return 0
