"""``ferromerge run``, ``plan`` and ``demo``: the commands of a config-driven merge.

``plan`` checks a config and its models like ``run`` (same errors, same exit codes) and prints what a run would
do and need (disk, peak memory, time: see ``ferromerge.plan``) without writing anything.
"""

from __future__ import annotations

import argparse
import json

from .._plan.build import DEFAULT_SHARD_SIZE
from .._validate import format_bytes
from .args import parse_seed, parse_threads


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``run``, ``plan`` and ``demo``; each sets ``func``, which ``cli.main`` calls."""
    p = sub.add_parser("run", help="merge the models of a config into OUT_DIR")
    p.add_argument("config", metavar="CONFIG", help="mergekit YAML config")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output model directory (must not exist, see --overwrite)")
    _add_plan_options(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar or summary")
    p.add_argument(
        "--overwrite", action="store_true", help="replace OUT_DIR if it exists (only once the merge is done)"
    )
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the partial output a killed or interrupted run left beside OUT_DIR: its finished shards are "
        "verified and kept, only the rest is merged (the same config, inputs and ferromerge version only); a run "
        "with --resume that fails or is interrupted keeps its partial output for the next --resume",
    )
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser("plan", help="check a config and its models and print what a run would do (writes nothing)")
    p.add_argument("config", metavar="CONFIG", help="mergekit YAML config")
    p.add_argument(
        "out_dir",
        metavar="OUT_DIR",
        nargs="?",
        default=None,
        help="where a run would write, for the disk-space check (default: somewhere in the current directory)",
    )
    _add_plan_options(p)
    p.add_argument(
        "--json",
        action="store_true",
        help="print the engine's plan JSON, with the summary added under \"summary\", instead of the summary",
    )
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("demo", help="make a small family of Llama-shaped models and TIES-merge them")
    p.add_argument(
        "--out", default="ferromerge-demo", metavar="DIR", help="working directory (default ./ferromerge-demo)"
    )
    p.add_argument("--quiet", action="store_true", help="print nothing")
    p.set_defaults(func=_cmd_demo)



def _add_plan_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads", type=parse_threads, default=None, metavar="N", help="worker threads (default: all cores)"
    )
    p.add_argument(
        "--memory-limit",
        default=None,
        metavar="SIZE",
        help="memory budget of the engine, e.g. 2GiB (at least 64MiB; default: half of RAM or of the cgroup "
        "limit, at most 8 GiB); never changes the output",
    )
    p.add_argument(
        "--seed",
        type=parse_seed,
        default=0,
        help="seed of every random choice: DARE/DELLA masks, arcee_fusion's sample of large tensors, randomized SVD "
        "sketches (default 0: reproducible)",
    )
    p.add_argument(
        "--out-shard-size",
        default=DEFAULT_SHARD_SIZE,
        metavar="SIZE",
        help="bytes per output shard, K/M/B = x1000 as in mergekit, also KiB/MiB/GiB (default 5B = 5e9 bytes)",
    )
    p.add_argument(
        "--lora-merge-cache",
        default=None,
        metavar="DIR",
        help="where model+lora references are merged to, and reused from by later runs (default: a temporary "
        "directory inside the output's, removed after the merge)",
    )
    p.add_argument(
        "--device",
        default=None,
        metavar="DEVICE",
        help="where SVD-heavy methods (tsv_m, iso_c, iso_cts, star) run: cpu (the Rust kernels, default), cuda, "
        "cuda:N or torch:cpu (torch); overrides the config's device:. Without torch or a GPU the Rust kernels run",
    )
    p.add_argument("--cuda", action="store_const", const="cuda", dest="device", help="mergekit's spelling of --device cuda")
    p.add_argument(
        "--strict",
        action="store_true",
        help="make every compat warning an error (exit 2): what mergekit accepts and ferromerge questions, such as a "
        "parameter the method does not use or a misspelled key, which are otherwise ignored as mergekit ignores them",
    )
    p.add_argument(
        "--allow-nonfinite",
        action="store_true",
        help="merge NaN and infinite input values as they are (the method's arithmetic carries them into the "
        "output) instead of stopping with an error naming the file, tensor and count",
    )


def _cmd_run(args: argparse.Namespace) -> int:
    from .._run import run

    report = run(
        args.config,
        args.out_dir,
        threads=args.threads,
        seed=args.seed,
        out_shard_size=args.out_shard_size,
        quiet=args.quiet,
        overwrite=args.overwrite,
        memory_limit=args.memory_limit,
        lora_merge_cache=args.lora_merge_cache,
        device=args.device,
        strict=args.strict,
        resume=args.resume,
        allow_nonfinite=args.allow_nonfinite,
    )
    if not args.quiet:
        if report.shards_reused:
            print(f"resumed: {report.shards_reused} finished shard(s) kept, the counts below are the rest")
        print(
            f"merged {report.tensors} tensors into {report.out_dir}: read {format_bytes(report.bytes_read)}, "
            f"wrote {format_bytes(report.bytes_written)} in {report.seconds:.2f} s ({report.gb_per_s:.2f} GB/s read)"
        )
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .._run import plan

    report = plan(
        args.config,
        args.out_dir,
        threads=args.threads,
        seed=args.seed,
        out_shard_size=args.out_shard_size,
        memory_limit=args.memory_limit,
        lora_merge_cache=args.lora_merge_cache,
        strict=args.strict,
        allow_nonfinite=args.allow_nonfinite,
    )
    if args.json:
        print(json.dumps({**json.loads(report.plan.to_json()), "summary": report.summary()}))
        return 0
    for line in report.lines():
        print(line)
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from ..demo import run_demo

    _, checks = run_demo(args.out, quiet=args.quiet)
    return 0 if all(c.bounded for c in checks) else 1
