"""``ferromerge run``, ``multi``, ``plan`` and ``demo``: the commands of a config-driven merge.

``run`` takes every mergekit-yaml option (``cli.mergekit_options``), so a script can call it where it called
``mergekit-yaml``; on a file of several YAML documents (mergekit-multi's format) it runs them all, as ``multi``
does (``ferromerge.multi``). ``plan`` checks a config and its models like ``run`` (same errors, same exit codes) and
prints what a run would do and need (disk, peak memory, time: see ``ferromerge.plan``) without writing anything.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from .._validate import format_bytes
from ..executors import EXECUTORS
from . import mergekit_options
from .args import add_memory_limit_option, positive_int
from .mergekit_options import FERROMERGE_NAMES, PLAN_FIELDS, RUN_FIELDS


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register ``run``, ``multi``, ``plan`` and ``demo``; each sets ``func``, which ``cli.main`` calls."""
    p = sub.add_parser(
        "run",
        help="merge the models of a config into OUT_DIR (takes mergekit-yaml's options)",
        description="Merge the models of a mergekit config into OUT_DIR. A file of several YAML documents "
        "(mergekit-multi) runs every merge, as `ferromerge multi CONFIG OUT_DIR` does.",
    )
    p.add_argument("config", metavar="CONFIG", help="mergekit YAML config")
    p.add_argument("out_dir", metavar="OUT_DIR", help="output model directory (must not exist, see --overwrite)")
    _add_plan_options(p)
    _add_run_options(p)
    _add_multi_options(p, "multi-merge files only: ")
    p.set_defaults(func=_cmd_run)

    p = sub.add_parser(
        "multi",
        help="run several named merges from one file, later ones using earlier ones' outputs (mergekit-multi)",
        description="Run the merges of a mergekit-multi file (YAML documents, each a config with a name:; a "
        "reference to a name means that merge's output) in dependency order. Named merges go to "
        "INTERMEDIATE_DIR/NAME and are reused while their config, settings and inputs are unchanged; the unnamed "
        "merge (or, when all have names, the last) goes to OUT.",
    )
    p.add_argument("config", metavar="CONFIG", help="mergekit-multi YAML file")
    p.add_argument("out_dir", metavar="OUT", nargs="?", default=None,
                   help="output of the final merge (needed when a merge has no name)")
    p.add_argument("--out-path", dest="out_path", default=None, metavar="OUT", help="mergekit-multi's spelling of OUT")
    _add_plan_options(p)
    _add_run_options(p)
    _add_multi_options(p, "")
    p.set_defaults(func=_cmd_multi)

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
    """The options ``plan`` shares with ``run``: mergekit's that change what is checked, the memory budget and
    ``--strict``."""
    mergekit_options.add(p, PLAN_FIELDS, FERROMERGE_NAMES)
    add_memory_limit_option(p, "the engine")
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


def _add_run_options(p: argparse.ArgumentParser) -> None:
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
    g = p.add_argument_group("past one machine (docs/scale.md)")
    g.add_argument(
        "--executor",
        choices=EXECUTORS,
        default="local",
        help="local: merge in this process (default); ray: merge the output shards in Ray tasks on the nodes of a "
        "cluster (pip install 'ferromerge[ray]'; models and OUT_DIR on storage every node sees; same bytes)",
    )
    g.add_argument(
        "--address",
        "--ray-address",
        dest="ray_address",
        default=None,
        metavar="ADDR",
        help="with --executor ray: the Ray cluster, e.g. HEAD:6379 or auto (default: $RAY_ADDRESS, else a Ray "
        "instance on this machine started for the run)",
    )
    g.add_argument(
        "--ray-tasks",
        type=positive_int,
        default=None,
        metavar="N",
        help="with --executor ray: cut the output shards into N tasks of about equal bytes (default: one task per "
        "shard; more shards than tasks need a smaller --out-shard-size)",
    )
    mergekit_options.add(p.add_argument_group("mergekit-yaml's other options"), RUN_FIELDS)


def _add_multi_options(p: argparse.ArgumentParser, prefix: str) -> None:
    p.add_argument("-I", "--intermediate-dir", default=None, metavar="DIR",
                   help=f"{prefix}where named merges are written and reused from (default: OUT-intermediates)")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help=f"{prefix}reuse a merge whose config, settings and inputs are unchanged (default)")


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    """``run``'s keywords from the options, after printing a note for each one that has no effect here."""
    kwargs, notes = mergekit_options.settings(args)
    if not kwargs.get("quiet", False):
        for note in notes:
            print(f"ferromerge: note: {note}", file=sys.stderr)
    return kwargs


def _cmd_run(args: argparse.Namespace) -> int:
    from ..multi import is_multi

    if is_multi(args.config):
        return _cmd_multi(args)
    from .._run import run

    kwargs = _settings(args)
    report = run(
        args.config,
        args.out_dir,
        overwrite=args.overwrite,
        memory_limit=args.memory_limit,
        strict=args.strict,
        resume=args.resume,
        allow_nonfinite=args.allow_nonfinite,
        **_executor_options(args),
        **kwargs,
    )
    if not kwargs["quiet"] and report.adapters is not None:
        a = report.adapters
        print(f"merged the adapters by {a['combination']} into a rank-{a['r']} {a['dtype']} LoRA of {a['modules']} "
              f"modules in {report.out_dir} ({report.seconds:.2f} s)")
    elif not kwargs["quiet"]:
        if report.shards_reused:
            print(f"resumed: {report.shards_reused} finished shard(s) kept, the counts below are the rest")
        print(
            f"merged {report.tensors} tensors into {report.out_dir}: read {format_bytes(report.bytes_read)}, "
            f"wrote {format_bytes(report.bytes_written)} in {report.seconds:.2f} s ({report.gb_per_s:.2f} GB/s read)"
        )
    return 0


def _executor_options(args: argparse.Namespace) -> dict[str, Any]:
    """``run``'s executor keywords from ``--executor``, ``--address`` and ``--ray-tasks`` (left out when not given,
    so that Ray's options without ``--executor ray`` are the API's error)."""
    out = {"executor": getattr(args, "executor", "local")}
    for key in ("ray_address", "ray_tasks"):
        if getattr(args, key, None) is not None:
            out[key] = getattr(args, key)
    return out


def _cmd_multi(args: argparse.Namespace) -> int:
    from ..multi import run_multi

    out = getattr(args, "out_path", None) or args.out_dir
    kwargs = _settings(args)
    results = run_multi(
        args.config, out, intermediate_dir=args.intermediate_dir, lazy=args.lazy, overwrite=args.overwrite,
        memory_limit=args.memory_limit, strict=args.strict, allow_nonfinite=args.allow_nonfinite,
        resume=getattr(args, "resume", False), **_executor_options(args), **kwargs,
    )
    if not kwargs["quiet"]:
        for r in results:
            if r.report is None:
                print(f"{r.merge.label}: reused {r.merge.out} (config, settings and inputs unchanged)")
            else:
                print(f"{r.merge.label}: merged {r.report.tensors} tensors into {r.merge.out} in "
                      f"{r.report.seconds:.2f} s")
    return 0


def _cmd_plan(args: argparse.Namespace) -> int:
    from .._run import plan

    # what a run of the same config spends before merging too: the interpreter's start-up and imports
    startup = time.process_time()
    kwargs = _settings(args)
    report = plan(
        args.config,
        args.out_dir,
        threads=kwargs["threads"],
        seed=kwargs["seed"],
        out_shard_size=kwargs["out_shard_size"],
        memory_limit=args.memory_limit,
        lora_merge_cache=kwargs["lora_merge_cache"],
        strict=args.strict,
        allow_nonfinite=args.allow_nonfinite,
        startup_seconds=startup,
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
