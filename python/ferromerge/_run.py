"""``run``: one merge from a config to a finished output directory (config -> models -> plan -> engine -> output)."""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _core
from .models import lora
from .config.resolve import MergeConfig, load_config
from .tokenizer.embed import write_permuted
from .errors import ParameterError
from .methods.spec import MethodSpec
from .models.index import ModelIndex
from .io.output_dir import OutputDir, check_free_space
from .output_files import (
    config_updates,
    copy_tokenizer,
    set_chat_template,
    write_configs,
    write_index,
    write_model_config,
    write_tokenizer,
)
from ._plan.build import DEFAULT_SHARD_SIZE, Plan, build_plan
from ._validate import parse_size
from .progress import ProgressBar
from .torch_spectral import check_device, make_hook, torch_unavailable_reason
from .tokenizer.chat_template import chat_template

#: the directory inside the output's temporary directory that holds the permuted embeddings during the merge
SCRATCH = ".vocab-scratch"

ProgressCallback = Callable[[int, int, int, int], None]

#: the engine's smallest memory budget; checked here too so that a bad value fails before the models are indexed,
#: and ``ferromerge plan`` rejects what ``run`` would
MIN_MEMORY_LIMIT = _core.MIN_MEMORY_LIMIT


@dataclass(frozen=True)
class RunReport:
    """What a finished run did."""

    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    out_dir: Path

    @property
    def gb_per_s(self) -> float:
        """Input read rate (bytes read / wall time), the figure of merit of a streaming merge."""
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


def _log(quiet: bool) -> Callable[[str], None]:
    return (lambda _: None) if quiet else (lambda msg: print(f"ferromerge: {msg}", file=sys.stderr))


def _check_threads(threads: int | None) -> None:
    """``ParameterError`` unless ``threads`` is None (all cores) or a positive integer."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ParameterError(f"threads must be a positive integer, got {threads!r}")


def memory_limit_bytes(memory_limit: str | int | None) -> int | None:
    """The memory budget in bytes from a size (``plan.parse_size``: "8GiB", "500M", an int); None stays None (the
    engine's default, ``_core.default_memory_limit()``). Below 64 MiB is a ``ParameterError``."""
    if memory_limit is None:
        return None
    limit = parse_size(memory_limit, "memory limit")
    if limit < MIN_MEMORY_LIMIT:
        raise ParameterError(f"memory limit {memory_limit!r} ({limit} bytes) is too small: at least 64 MiB")
    return limit


def torch_hook(device: str | None, method: MethodSpec, log: Callable[[str], None]) -> Callable[..., Any] | None:
    """The executor's torch hand-off for ``device``, or None when the Rust kernels run everything (device ``cpu``,
    a method that is not SVD-heavy, or torch/CUDA missing: then a note says why)."""
    if device is None:
        return None
    check_device(device)
    if device == "cpu":
        return None
    if not method.gpu_bound:
        log(f"note: device {device}: {method.name} is not SVD-heavy and runs on the Rust kernels")
        return None
    why = torch_unavailable_reason(device)
    if why is not None:
        log(f"note: device {device}: {why}; the Rust kernels run instead")
        return None
    return make_hook(device)


def prepare(
    config_or_path: str | os.PathLike[str] | Mapping[str, Any],
    *,
    seed: int = 0,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    lora_merge_cache: str | os.PathLike[str] | None = None,
    scratch: Path | None = None,
) -> tuple[MergeConfig, Plan]:
    """Load the config, index every model and build the plan; nothing is written (``model+lora`` models are
    planned to be read from ``lora_merge_cache``, which ``run`` fills: see ``lora``). ``scratch``: where a run puts
    the permuted vocabulary tensors (``plan.build_plan``)."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**64:
        raise ParameterError(f"seed must be an integer in [0, 2**64), got {seed!r}")
    config = load_config(config_or_path)
    models: dict[str, ModelIndex] = {ref: lora.index_any(ref, lora_merge_cache) for ref in config.model_refs()}
    return config, build_plan(config, models, seed=seed, out_shard_size=out_shard_size, scratch=scratch)


def run(
    config_or_path: str | os.PathLike[str] | Mapping[str, Any],
    out_dir: str | os.PathLike[str],
    *,
    threads: int | None = None,
    seed: int = 0,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    quiet: bool = False,
    overwrite: bool = False,
    on_progress: ProgressCallback | None = None,
    memory_limit: str | int | None = None,
    lora_merge_cache: str | os.PathLike[str] | None = None,
    device: str | None = None,
) -> RunReport:
    """Merge the models of a mergekit config into ``out_dir``.

    ``config_or_path``: a config file path, YAML text or a mapping. ``seed`` keys DARE's random masks (the output
    is a pure function of inputs, config and seed). ``out_shard_size``: bytes per output shard ("5B" = 5e9, as in
    mergekit). ``on_progress(tensors_done, tensors_total, bytes_done, bytes_total)`` is called after each tensor;
    an exception it raises aborts the run. ``memory_limit`` (bytes or a size such as "2GiB", at least 64 MiB; None =
    ``_core.default_memory_limit()``) bounds what the engine keeps resident; it never changes the output. Raises
    ``OutputError`` before merging when the output's filesystem lacks room for the shards (+1%). On any failure
    (or Ctrl-C) ``out_dir`` is left absent, never partial. ``lora_merge_cache``: where ``model+lora`` models are
    merged to (kept and reused across runs); None = inside the output's temporary directory, removed after the merge.
    ``device`` (overrides the config's ``device:``): ``cpu`` (default) runs the Rust kernels; ``cuda``, ``cuda:N`` or
    ``torch:cpu`` hand the SVD-heavy methods' matrices to torch (``torch_path``), falling back to the Rust kernels
    with a note when torch or the GPU is missing.
    """
    _check_threads(threads)
    limit = memory_limit_bytes(memory_limit)
    log = _log(quiet)
    start = time.perf_counter()
    output = OutputDir(out_dir, overwrite=overwrite)
    # the default LoRA cache lives in the output's temporary directory, so a failed run leaves nothing behind
    temp_cache = output.temp / "lora-merge-cache" if lora_merge_cache is None else None
    scratch = output.temp / SCRATCH
    config, plan = prepare(
        config_or_path,
        seed=seed,
        out_shard_size=out_shard_size,
        lora_merge_cache=lora_merge_cache or temp_cache,
        scratch=scratch,
    )
    output.check_inputs([m.path for m in plan.models])
    check_free_space(
        output.target,
        plan.bytes_out + plan.bytes_scratch + (lora.pending_bytes(plan.models) if temp_cache else 0),
    )
    if plan.vocabulary is not None:
        for note in plan.vocabulary.notes:
            log(f"note: {note}")
    for note in config.notes:
        log(f"note: {note}")
    hook = torch_hook(device if device is not None else config.device, config.method, log)
    reference = plan.models[0]
    bar = None if quiet else ProgressBar()

    def progress(done: int, total: int, bytes_done: int, bytes_total: int) -> None:
        if bar is not None:
            bar(done, total, bytes_done, bytes_total)
        if on_progress is not None:
            on_progress(done, total, bytes_done, bytes_total)

    with output.building(log) as tmp:
        lora.materialise_all(plan.models, log)
        try:
            if plan.permuted:
                scratch.mkdir()
                write_permuted(plan.permuted, log)
            stats = _core.execute_plan(
                plan.to_json(),
                str(tmp),
                progress if (bar is not None or on_progress is not None) else None,
                threads,
                limit,
                hook,
            )
        finally:
            if bar is not None:
                bar.close()
            # never part of the output: removed before the tokenizer and config files are written
            shutil.rmtree(scratch, ignore_errors=True)
        if temp_cache is not None:
            shutil.rmtree(temp_cache, ignore_errors=True)
        if len(plan.shards) > 1:
            write_index(tmp, plan.weight_map(), plan.bytes_out)
        updates, remarks = config_updates(reference, plan)
        for remark in remarks:
            log(f"note: {remark}")
        write_model_config(
            tmp, reference.path, config.out_dtype or config.dtype or plan.tensors[0].out_dtype, updates
        )
        if plan.vocabulary is not None:
            write_tokenizer(tmp, plan.vocabulary)
        else:
            copy_tokenizer(tmp, reference.path)
        if config.raw.chat_template is not None:
            template = chat_template(config.raw.chat_template, [m.path for m in plan.models])
            if template is None:
                log("note: chat_template auto: no model has a chat template; the output keeps its tokenizer's")
            elif not set_chat_template(tmp, template):
                log(f"note: chat_template not written: {reference.path} has no tokenizer to carry it")
        resolved = config.resolved()
        resolved["sources"] = {m.ref: str(m.path) for m in plan.models}
        resolved["seed"] = seed
        resolved["ferromerge_version"] = _core.__version__
        write_configs(tmp, config.text, resolved)
    return RunReport(
        tensors=stats["tensors"],
        bytes_read=stats["bytes_read"],
        bytes_written=stats["bytes_written"],
        seconds=time.perf_counter() - start,
        out_dir=output.target,
    )
