"""``ferromerge extract-lora BASE FINETUNED OUT``: the command-line face of ``extract_lora.extract_lora``.

mergekit-extract-lora's option names are accepted where they mean the same (``--max-rank``, ``--save-module``,
``-i/--include-regex``, ``-e/--exclude-regex``, ``--sv-epsilon``, ``--skip-undecomposable``,
``--[no-]distribute-scale``, ``--[no-]embed-lora``). Values are checked by ``extract_lora`` (a bad one is a
``ParameterError``: exit 2, one line, as every ferromerge command).
"""

from __future__ import annotations

import argparse
from typing import Any

from .args import add_adapter_output_options

#: the randomized SVD's sketch defaults: the engine's (those of tsv_m's kernel)


def add_parser(sub: Any) -> None:
    """Add the ``extract-lora`` subcommand to ``sub`` (the ``ferromerge`` parser's subparsers)."""
    p = sub.add_parser(
        "extract-lora",
        help="extract a PEFT LoRA adapter from a fine-tuned model and its base (like mergekit-extract-lora)",
        description="Factorise each linear layer's ΔW = W_finetuned − W_base into a LoRA B·A (randomized SVD unless "
        "--exact) and write a PEFT adapter into OUT; embeddings, norms and other tensors are saved at full rank "
        "(modules_to_save).",
    )
    p.add_argument("base", metavar="BASE", help="base model (directory or org/name in the Hugging Face cache)")
    p.add_argument("finetuned", metavar="FINETUNED", help="fine-tuned model")
    p.add_argument("out", metavar="OUT", help="adapter directory to write (must not exist, see --overwrite)")
    p.add_argument("--rank", "--max-rank", dest="rank", type=int, default=128, metavar="R",
                   help="most singular triplets per module (default 128)")
    p.add_argument("--sv-epsilon", type=float, default=0.0, metavar="E",
                   help="drop singular values ≤ E (default 0: only exact zeros)")
    p.add_argument("--exact", action="store_true", help="exact thin SVD instead of the randomized one")
    p.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="A = √S·Vᵀ, B = U·√S (default); --no-distribute-scale: A = S·Vᵀ, B = U")
    p.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="factorise embeddings too instead of saving them at full rank")
    p.add_argument("-i", "--include-regex", dest="include", action="append", default=None, metavar="REGEX",
                   help="factorise only modules whose name matches (repeatable)")
    p.add_argument("-e", "--exclude-regex", dest="exclude", action="append", default=None, metavar="REGEX",
                   help="leave out modules whose name matches (repeatable)")
    p.add_argument("--save-module", dest="save_modules", action="append", default=[], metavar="MODULE",
                   help="also save this module (name or last name component) at full rank (repeatable)")
    p.add_argument("--skip-undecomposable", action="store_true",
                   help="leave out norms and other tensors that are not linear layers instead of saving them")
    add_adapter_output_options(p, "seed of the randomized SVD's sketch (default 0)")
    p.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    """Run the subcommand; errors propagate to ``cli.main``, which prints them and picks the exit status."""
    from .._extract_lora import extract_lora
    from ..progress import ProgressBar

    bar = None if args.quiet else ProgressBar("extracting")
    try:
        summary = extract_lora(
            args.base, args.finetuned, args.out, rank=args.rank, sv_epsilon=args.sv_epsilon, exact=args.exact,
            distribute_scale=args.distribute_scale, embed_lora=args.embed_lora, include=args.include,
            exclude=args.exclude, save_modules=args.save_modules, skip_undecomposable=args.skip_undecomposable,
            seed=args.seed, threads=args.threads, oversample=args.oversample, power_iters=args.power_iters,
            overwrite=args.overwrite, quiet=args.quiet, on_progress=bar,
        )
    finally:
        if bar is not None:
            bar.close()
    if not args.quiet:
        print(
            f"extracted a rank-{summary['r']} LoRA of {len(summary['ranks'])} modules "
            f"({len(summary['modules_to_save'])} module keys saved at full rank) into {summary['out']} in "
            f"{summary['seconds']:.2f} s; relative error ‖ΔW − B·A‖/‖ΔW‖: max {summary['max_error']:.3g} "
            f"({summary['max_error_module']}), mean {summary['mean_error']:.3g}"
        )
    return 0
