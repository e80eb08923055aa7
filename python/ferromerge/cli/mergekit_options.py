"""mergekit-yaml's command-line options (every field of mergekit 0.1.5's ``MergeOptions``, under mergekit's option
names), so that a script can call ``ferromerge run`` (or ``ferromerge-yaml``, ``ferromerge multi``) where it called
``mergekit-yaml`` / ``mergekit-multi``.

``OPTIONS`` has one row per ``MergeOptions`` field: the option strings, how it parses, and either the ferromerge
setting it sets (``dest``: seed, threads, device, ...) or, for an option that has no effect here, why (``inert``).
``add(parser, fields)`` registers rows on an argparse parser; ``settings(args)`` turns the parsed values into
``run``'s keywords plus the notes (``note: ...``) for options given a value that asks for something ferromerge does
not do. docs/compat.md ("mergekit-yaml's options") has the same table in words.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .._plan.build import DEFAULT_SHARD_SIZE
from .args import parse_seed, parse_threads, positive_int

__all__ = ["FERROMERGE_NAMES", "OPTIONS", "RUN_FIELDS", "PLAN_FIELDS", "Option", "add", "settings"]


@dataclass(frozen=True)
class Option:
    """One ``MergeOptions`` field as a command-line option."""

    #: mergekit's option strings (a boolean's ``--no-`` form is added by argparse)
    flags: tuple[str, ...]
    #: "bool" (``--x/--no-x``), "flag" (``--x`` only), "count" (repeatable ``-v``) or "value"
    kind: str
    help: str
    #: the argparse destination; a ferromerge setting, or the field's own name for an inert option
    dest: str
    default: Any = None
    type: Any = None
    metavar: str | None = None
    #: why the option has no effect (None: it sets ``dest``), and the values that need no note because they ask
    #: for what ferromerge does anyway (mergekit's default, or ferromerge's fixed behaviour)
    inert: str | None = None
    silent: tuple[Any, ...] = field(default=(None,))


_GPU = "ferromerge merges on the CPU (memory-mapped inputs, Rust kernels); only the SVD-heavy methods use a GPU, " \
    "through --device/--cuda"

#: every field of mergekit 0.1.5's MergeOptions, in its order
OPTIONS: dict[str, Option] = {
    "allow_crimes": Option(
        ("--allow-crimes",), "bool", "accepted: ferromerge never refuses mixed architectures (it checks tensor names "
        "and shapes instead)", "allow_crimes",
        inert="ferromerge checks tensor names and shapes, not architecture names", silent=(None, True, False)),
    "unsafe_truncate_embeddings": Option(
        ("--unsafe-truncate-embeddings",), "bool", "not supported: a vocabulary mismatch stays an error (align "
        "vocabularies with tokenizer_source / tokenizer)", "unsafe_truncate_embeddings",
        inert="a vocabulary mismatch stays an error; align the vocabularies with tokenizer_source or tokenizer: in "
        "the config", silent=(None, False)),
    "transformers_cache": Option(
        ("--transformers-cache",), "value", "the Hugging Face cache to find org/name models in (default: "
        "$HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub; ferromerge never downloads)", "transformers_cache",
        metavar="DIR"),
    "lora_merge_cache": Option(
        ("--lora-merge-cache",), "value", "where model+lora references are merged to, and PyTorch-pickled models' tensors copied to "
        "(safetensors), reused by later runs "
        "(default: a temporary directory inside the output's, removed after the merge)", "lora_merge_cache",
        metavar="DIR"),
    "lora_merge_dtype": Option(
        ("--lora-merge-dtype",), "value", "no effect: a merged LoRA keeps the model's dtypes", "lora_merge_dtype",
        metavar="DTYPE", inert="a model+lora merge keeps the model's dtypes (the arithmetic is float32)"),
    "cuda": Option(
        ("--cuda",), "bool", "mergekit's spelling of --device cuda (an explicit --device wins)", "cuda",
        default=False),
    "device": Option(
        ("--device",), "value", "where SVD-heavy methods (tsv_m, iso_c, iso_cts, star) run: cpu (the Rust kernels, "
        "default), cuda, cuda:N, torch:cpu (torch) or auto (cuda when torch sees a GPU); overrides the config's "
        "device:. Without torch or a GPU the Rust kernels run", "device", metavar="DEVICE"),
    "low_cpu_memory": Option(
        ("--low-cpu-memory",), "bool", "no effect: memory is bounded by --memory-limit", "low_cpu_memory",
        inert=f"{_GPU}; memory is bounded by --memory-limit instead", silent=(None, False)),
    "out_shard_size": Option(
        ("--out-shard-size",), "value", "bytes per output shard, K/M/B = x1000 as in mergekit, also KiB/MiB/GiB "
        "(default 5B = 5e9 bytes)", "out_shard_size", default=DEFAULT_SHARD_SIZE, metavar="SIZE"),
    "copy_tokenizer": Option(
        ("--copy-tokenizer",), "bool", "copy the base (or first) model's tokenizer files into the output (default; "
        "an aligned vocabulary is written either way)", "copy_tokenizer", default=True),
    "clone_tensors": Option(
        ("--clone-tensors",), "bool", "accepted: ferromerge writes every output tensor from its own data",
        "clone_tensors", inert="every output tensor is written from its own data", silent=(None, True, False)),
    "trust_remote_code": Option(
        ("--trust-remote-code",), "bool", "no effect: ferromerge runs no model code", "trust_remote_code",
        inert="ferromerge never runs model code (it reads config.json and the tensors only)", silent=(None, False)),
    "random_seed": Option(
        ("--random-seed",), "value", "seed of every random choice: DARE/DELLA masks, arcee_fusion's sample of large "
        "tensors, randomized SVD sketches (default 0: reproducible)", "seed", default=0, type=parse_seed),
    "lazy_unpickle": Option(
        ("--lazy-unpickle",), "bool", "accepted: ferromerge always reads checkpoints one tensor at a time",
        "lazy_unpickle", inert="checkpoints are always read one tensor at a time", silent=(None, True, False)),
    "write_model_card": Option(
        ("--write-model-card",), "bool", "write README.md, a model card with the method, its paper, the models and "
        "the config (default)", "write_model_card", default=True),
    "safe_serialization": Option(
        ("--safe-serialization",), "bool", "accepted: ferromerge writes safetensors only", "safe_serialization",
        inert="ferromerge writes safetensors only", silent=(None, True)),
    "verbosity": Option(
        ("-v",), "count", "no effect: ferromerge has one level of output (see --quiet)", "verbosity",
        inert="ferromerge has one level of output (--quiet turns it off)", silent=(None, 0)),
    "quiet": Option(("--quiet",), "bool", "no progress bar, summary or notes", "quiet", default=False),
    "read_to_gpu": Option(
        ("--read-to-gpu",), "bool", "no effect: inputs are memory-mapped", "read_to_gpu",
        inert=f"{_GPU}; inputs are memory-mapped", silent=(None, False)),
    "multi_gpu": Option(
        ("--multi-gpu",), "bool", "no effect: one device at most", "multi_gpu",
        inert=f"{_GPU}, one device at most", silent=(None, False)),
    "num_threads": Option(
        ("--num-threads", "-j"), "value", "worker threads (default: all cores)", "threads", type=parse_threads,
        metavar="N"),
    "gpu_rich": Option(
        ("--gpu-rich",), "flag", "mergekit's --cuda --low-cpu-memory --read-to-gpu --multi-gpu: here --cuda",
        "gpu_rich", default=False),
    "async_write": Option(
        ("--async-write",), "bool", "accepted: the engine already writes behind the merge", "async_write",
        inert="the engine writes each tensor into its place as it is merged and the kernel writes it back in the "
        "background", silent=(None, True, False)),
    "write_threads": Option(
        ("--write-threads",), "value", "no effect: the engine has its own writer", "write_threads", type=positive_int,
        metavar="N", inert="the engine's writer is not configured by thread count"),
}

#: the fields ``ferromerge plan`` takes too (they change what is checked and predicted); ``run`` takes them all
PLAN_FIELDS = ("random_seed", "num_threads", "out_shard_size", "lora_merge_cache", "device", "cuda",
               "transformers_cache")
RUN_FIELDS = tuple(f for f in OPTIONS if f not in PLAN_FIELDS)

#: ferromerge's own spellings, accepted beside mergekit's by ``ferromerge run`` and ``plan`` (not by
#: ``ferromerge-yaml``, which takes exactly mergekit-yaml's arguments)
FERROMERGE_NAMES: dict[str, tuple[str, ...]] = {"random_seed": ("--seed",), "num_threads": ("--threads",)}


def add(
    p: argparse.ArgumentParser | argparse._ArgumentGroup,
    fields: Iterable[str],
    names: Mapping[str, tuple[str, ...]] | None = None,
) -> None:
    """Register the options of ``fields`` (keys of ``OPTIONS``) on ``p``; ``names`` puts other option strings of a
    field before mergekit's (``--seed`` before ``--random-seed``)."""
    for name in fields:
        o = OPTIONS[name]
        flags = (*(names or {}).get(name, ()), *o.flags)
        if o.kind == "bool":
            p.add_argument(*flags, dest=o.dest, action=argparse.BooleanOptionalAction, default=o.default, help=o.help)
        elif o.kind == "flag":
            p.add_argument(*flags, dest=o.dest, action="store_true", default=o.default, help=o.help)
        elif o.kind == "count":
            p.add_argument(*flags, dest=o.dest, action="count", default=o.default, help=o.help)
        else:
            p.add_argument(*flags, dest=o.dest, type=o.type, default=o.default, metavar=o.metavar, help=o.help)


def _flag(name: str, value: Any) -> str:
    o = OPTIONS[name]
    if o.kind == "bool":
        return o.flags[0] if value else "--no-" + o.flags[0][2:]
    if o.kind == "count":
        return "-" + "v" * int(value)
    return f"{o.flags[0]} {value}"


def _device(args: argparse.Namespace) -> str | None:
    """``--device`` (``auto``: cuda when torch sees a GPU, else cpu), else cuda for ``--cuda``/``--gpu-rich``."""
    device = getattr(args, "device", None)
    if device == "auto":
        from ..torch_spectral import torch_unavailable_reason

        return "cuda" if torch_unavailable_reason("cuda") is None else "cpu"
    if device is None and (getattr(args, "cuda", False) or getattr(args, "gpu_rich", False)):
        return "cuda"
    return device


def settings(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """``run``'s keywords from parsed options (those ``args`` has), and a note for every inert option given a
    value that asks for something ferromerge does not do. ``--transformers-cache`` sets ``$HF_HUB_CACHE`` (where
    ``models.refs`` looks for org/name models) for this process."""
    kwargs: dict[str, Any] = {}
    for key in ("seed", "threads", "out_shard_size", "lora_merge_cache", "quiet", "copy_tokenizer",
                "write_model_card"):
        if hasattr(args, key):
            kwargs[key] = getattr(args, key)
    if hasattr(args, "device"):
        kwargs["device"] = _device(args)
    cache = getattr(args, "transformers_cache", None)
    if cache is not None:
        os.environ["HF_HUB_CACHE"] = os.path.abspath(os.path.expanduser(cache))
    notes = []
    for name, o in OPTIONS.items():
        value = getattr(args, o.dest, None)
        if o.inert is not None and value not in o.silent:
            notes.append(f"{_flag(name, value)} has no effect here: {o.inert}")
    if getattr(args, "gpu_rich", False):
        notes.append(f"--gpu-rich is --cuda here: {_GPU}")
    return kwargs, notes
