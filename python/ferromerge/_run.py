"""``run``: one merge from a config to a finished output directory (config -> models -> plan -> engine -> output);
``plan``: the same checks and a prediction of the run's cost, writing nothing."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import _engine
from ._plan.build import DEFAULT_SHARD_SIZE, Plan, build_plan
from ._plan.estimate import Estimate, estimate
from ._validate import check_seed, check_threads, memory_limit_bytes
from .adapters import COMBINATIONS, merge_adapters
from .config.adapters import AdaptersConfig, load_adapters_config
from .config.resolve import MergeConfig, load_config
from .errors import InputError
from .executors import check_executor
from .executors import ray as on_ray
from .io import journal
from .io.json_file import read_json
from .io.output_dir import OutputDir, check_free_space
from .methods.spec import MethodSpec
from .model_card import merge_card, write_card
from .models import lora
from .models.index import ModelIndex, convert_pickled, pickled_pending_bytes
from .output_files import (
    config_updates,
    copy_tokenizer,
    set_chat_template,
    write_configs,
    write_index,
    write_model_config,
    write_tokenizer,
)
from .progress import ProgressBar
from .tokenizer.chat_template import chat_template
from .tokenizer.embed import write_permuted
from .torch_spectral import ExternalMerge, check_device, external_merge, torch_unavailable_reason

#: the directory inside the output's temporary directory that holds the permuted embeddings during the merge
SCRATCH = ".vocab-scratch"

ProgressCallback = Callable[[int, int, int, int], None]

#: how the shards of a plan (its JSON, or what a resume left of it) get merged into a directory:
#: ``execute(plan_json, out, progress, on_shard_done) -> {"tensors", "bytes_read", "bytes_written"}``
Execute = Callable[[dict[str, Any], Path, ProgressCallback | None, Callable[[str, int, int], None]], dict[str, int]]


@dataclass(frozen=True)
class RunReport:
    """What a finished run did."""

    tensors: int
    bytes_read: int
    bytes_written: int
    seconds: float
    out_dir: Path
    #: output shards a resumed run found finished and verified (not merged again); tensors and bytes count the rest
    shards_reused: int = 0
    #: a config with ``adapters:`` (``config.adapters``): ``merge_adapters``' summary; ``tensors`` then counts the
    #: LoRA factors written and ``bytes_read`` is not counted (0)
    adapters: Mapping[str, Any] | None = None

    @property
    def gb_per_s(self) -> float:
        """Input read rate (bytes read / wall time), the figure of merit of a streaming merge."""
        return self.bytes_read / self.seconds / 1e9 if self.seconds > 0 else 0.0


def _log(quiet: bool) -> Callable[[str], None]:
    return (lambda _: None) if quiet else (lambda msg: print(f"ferromerge: {msg}", file=sys.stderr))


def _external_merge(device: str | None, method: MethodSpec, log: Callable[[str], None]) -> ExternalMerge | None:
    """The engine's external merge (torch) on ``device``, or None when the Rust kernels run everything (device ``cpu``,
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
    return external_merge(device)


def prepare(
    config_or_path: str | os.PathLike[str] | Mapping[str, Any],
    *,
    seed: int = 0,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    lora_merge_cache: str | os.PathLike[str] | None = None,
    scratch: Path | None = None,
    strict: bool = False,
    allow_nonfinite: bool = False,
) -> tuple[MergeConfig, Plan]:
    """Load the config, index every model and build the plan; nothing is written (``model+lora`` models are
    planned to be read from ``lora_merge_cache``, which ``run`` fills: see ``models.lora``). ``scratch``: where a
    run puts the permuted vocabulary tensors (``_plan.build.build_plan``). ``allow_nonfinite``: the engine merges
    NaN and infinite input values as they are instead of refusing them."""
    check_seed(seed)
    config = load_config(config_or_path, strict=strict)
    models: dict[str, ModelIndex] = {ref: lora.index_any(ref, lora_merge_cache) for ref in config.model_refs()}
    built = build_plan(config, models, seed=seed, out_shard_size=out_shard_size, scratch=scratch)
    _check_model_config(built)
    return config, dataclasses.replace(built, allow_nonfinite=bool(allow_nonfinite))


def _model_config(plan: Plan) -> Path:
    """The ``config.json`` the output's is made from: the reference model's (the first of the plan)."""
    return plan.models[0].path / "config.json"


def _check_model_config(plan: Plan) -> None:
    """A reference ``config.json`` that is not a JSON object fails before merging (``InputError`` naming it), not
    after: the output's is made from it, and transformers cannot load anything else."""
    src = _model_config(plan)
    if src.is_file():
        data = read_json(src, "the model config")
        if not isinstance(data, dict):
            raise InputError(f"{src}: the model config is a JSON {type(data).__name__}, not an object")


@dataclass(frozen=True)
class PlanReport:
    """What ``plan`` found: the validated config, the engine's plan and the predicted cost of running it."""

    config: MergeConfig
    plan: Plan
    estimate: Estimate
    #: what ``run`` would print as notes before merging (``merge_notes``)
    notes: tuple[str, ...] = ()

    def summary(self) -> dict[str, Any]:
        """The JSON summary ``ferromerge plan --json`` adds to the plan under ``"summary"``."""
        return {
            "method": self.plan.method,
            "models": {m.ref: str(m.path) for m in self.plan.models},
            "tensors": len(self.plan.tensors),
            "num_layers": self.plan.num_layers,
            "shards": len(self.plan.shards),
            **self.estimate.to_dict(),
            "notes": list(self.notes),
        }

    def lines(self) -> list[str]:
        """The human-readable report ``ferromerge plan`` prints."""
        return [self.plan.summary(), *self.estimate.lines(), *(f"note: {note}" for note in self.notes)]


def plan(
    config_or_path: str | os.PathLike[str] | Mapping[str, Any],
    out_dir: str | os.PathLike[str] | None = None,
    *,
    threads: int | None = None,
    seed: int = 0,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    memory_limit: str | int | None = None,
    lora_merge_cache: str | os.PathLike[str] | None = None,
    allow_nonfinite: bool = False,
    strict: bool = False,
    startup_seconds: float = 0.0,
) -> PlanReport:
    """Check a config and its models as ``run`` does (same errors, in the same order, all but the output
    directory's) and predict the run's disk, peak memory and time (``_plan.estimate``); writes nothing.
    ``out_dir``: where a run would write, for the disk-space check (None: the current directory).
    ``startup_seconds``: the CPU time the caller spent before this call that a run spends too (the CLI: the
    interpreter's start-up and imports); the CPU time of preparing the plan, which a run repeats, is added. The other
    arguments are ``run``'s."""
    check_threads(threads)
    limit = memory_limit_bytes(memory_limit)
    start = time.process_time()
    config, built = prepare(
        config_or_path,
        seed=seed,
        out_shard_size=out_shard_size,
        lora_merge_cache=lora_merge_cache,
        allow_nonfinite=allow_nonfinite,
        strict=strict,
    )
    startup = startup_seconds + time.process_time() - start
    estimated = estimate(built, out_dir, threads=threads, memory_limit=limit, startup_seconds=startup)
    return PlanReport(config, built, estimated, tuple(merge_notes(config, built)))


def _check_space(output: OutputDir, plan: Plan, temp_cache: Path | None, reused: int = 0) -> None:
    """The output's filesystem must hold the shards (less the ``reused`` bytes a resume keeps), the permuted
    vocabulary and the LoRA merges a temporary cache will hold during the run."""
    check_free_space(
        output.target,
        plan.bytes_out
        - reused
        + plan.bytes_scratch
        + (lora.pending_bytes(plan.models) + pickled_pending_bytes(plan.models, plan.reads()) if temp_cache else 0),
    )


def merge_notes(config: MergeConfig, plan: Plan) -> list[str]:
    """The notes of a merge that its config and models decide: the one list ``run`` prints before merging and
    ``plan`` shows (the reference model's missing config.json, the vocabulary's, the models' and the plan's, the
    config's, and what the output's config.json will change)."""
    notes = []
    if not _model_config(plan).is_file():
        notes.append(
            f"{plan.models[0].path} has no config.json, so the output has none either (transformers needs one to "
            "load it: copy or write it before loading)"
        )
    if plan.vocabulary is not None:
        notes += plan.vocabulary.notes
    notes += [*plan.notes, *config.notes]
    notes += config_updates(plan.models[0], plan)[1]
    return notes


def _progress(bar: ProgressBar | None, on_progress: ProgressCallback | None) -> ProgressCallback | None:
    """The engine's progress callback: the bar and the caller's callback, or None when neither is wanted."""
    if bar is None and on_progress is None:
        return None

    def progress(done: int, total: int, bytes_done: int, bytes_total: int) -> None:
        if bar is not None:
            bar(done, total, bytes_done, bytes_total)
        if on_progress is not None:
            on_progress(done, total, bytes_done, bytes_total)

    return progress


def _executor(
    plan: Plan,
    executor: str,
    *,
    threads: int | None,
    limit: int | None,
    merge: ExternalMerge | None,
    ray_address: str | None,
    ray_tasks: int | None,
    bar: ProgressBar | None,
    log: Callable[[str], None],
) -> Execute:
    """The engine in this process (``local``), or Ray tasks running it on a cluster's nodes (``executors.ray``)."""
    if executor == "ray":

        def on_cluster(plan_json: dict[str, Any], out: Path, progress: ProgressCallback | None,
                       done: Callable[[str, int, int], None]) -> dict[str, int]:
            return on_ray.execute(plan, plan_json, out, threads=threads, memory_limit=limit, address=ray_address,
                                  tasks=ray_tasks, progress=progress, on_shard_done=done,
                                  status=bar.status if bar is not None else None, log=log)

        return on_cluster

    def here(plan_json: dict[str, Any], out: Path, progress: ProgressCallback | None,
             done: Callable[[str, int, int], None]) -> dict[str, int]:
        return _engine.execute(json.dumps(plan_json), str(out), progress, threads, limit, merge, on_shard_done=done)

    return here


def _merge_tensors(
    plan: Plan,
    plan_json: dict[str, Any],
    book: journal.Journal,
    out: Path,
    scratch: Path,
    *,
    execute: Execute,
    bar: ProgressBar | None,
    on_progress: ProgressCallback | None,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Write the permuted vocabulary tensors (if any), then ``execute`` ``plan_json`` (the plan, less the shards a
    resume kept) into ``out``, journaling each shard as it is finished (the engine hands over its size and the
    crc32 it computed while writing, once the shard is fsynced)."""
    try:
        if not plan_json["shards"]:
            return {"tensors": 0, "bytes_read": 0, "bytes_written": 0}
        if plan.permuted:
            scratch.mkdir()
            write_permuted(plan.permuted, log)
        try:
            return execute(plan_json, out, _progress(bar, on_progress), book.record)
        except InputError as e:
            raise _naming_the_model(e, plan) from None
    finally:
        if bar is not None:
            bar.close()
        # never part of the output: removed before the tokenizer and config files are written
        shutil.rmtree(scratch, ignore_errors=True)


def _naming_the_model(error: InputError, plan: Plan) -> InputError:
    """The engine's error about an input file (NaN values, a truncated or changed shard), with the config's name
    of the model that file belongs to when the message does not say it (a hub model lives in a cache snapshot)."""
    message = str(error)
    for m in plan.models:
        if m.ref not in message and any(message.startswith(f"{f}:") or message.startswith(f"{f} ") for f in m.files):
            return InputError(f"{message} (model {m.ref})")
    return error


def _write_side_files(
    out: Path,
    config: MergeConfig,
    plan: Plan,
    seed: int,
    log: Callable[[str], None],
    *,
    tokenizer: bool,
    card: bool,
    out_name: str,
) -> None:
    """Everything besides the shards: the index, config.json, the tokenizer (unless not ``tokenizer``), the chat
    template, the configs, the model card (if ``card``; ``out_name``, the output's name, is its title)."""
    reference = plan.models[0]
    if len(plan.shards) > 1:
        write_index(out, plan.weight_map(), plan.bytes_out)
    updates, _ = config_updates(reference, plan)  # its remarks were printed before the merge (merge_notes)
    write_model_config(out, reference.path, config.out_dtype or config.dtype or plan.float_dtype, updates)
    if plan.vocabulary is not None:
        write_tokenizer(out, plan.vocabulary)
    elif tokenizer:
        copy_tokenizer(out, reference.path)
    if config.raw.chat_template is not None:
        template = chat_template(config.raw.chat_template, [m.path for m in plan.models])
        if not tokenizer and plan.vocabulary is None:
            log("note: chat_template not written: the tokenizer is not copied (--no-copy-tokenizer)")
        elif template is None:
            log("note: chat_template auto: no model has a chat template; the output keeps its tokenizer's")
        elif not set_chat_template(out, template):
            log(f"note: chat_template not written: {reference.path} has no tokenizer to carry it")
    resolved = config.resolved()
    resolved["sources"] = {m.ref: str(m.path) for m in plan.models}
    resolved["seed"] = seed
    resolved["ferromerge_version"] = _engine.version()
    write_configs(out, config.text, resolved)
    if card:
        write_card(out, merge_card(config, out_name, seed=seed))


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
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    resume: bool = False,
    allow_nonfinite: bool = False,
    strict: bool = False,
    executor: str = "local",
    ray_address: str | None = None,
    ray_tasks: int | None = None,
) -> RunReport:
    """Merge the models of a mergekit config into ``out_dir``.

    ``config_or_path``: a config file path, YAML text or a mapping; ``strict``: what mergekit accepts and ferromerge
    questions (``errors.CompatWarning``: an unused parameter, a misspelled key) is a ``ConfigError``, not a warning.
    ``seed`` keys every random choice (DARE and
    DELLA masks, arcee_fusion's sample of large tensors, randomized SVD sketches: the output is a pure function of
    inputs, config and seed). ``out_shard_size``: bytes per output shard ("5B" = 5e9, as in mergekit).
    ``on_progress(tensors_done, tensors_total, bytes_done, bytes_total)`` is called after each tensor; an exception
    it raises aborts the run. ``memory_limit`` (bytes or a size such as "2GiB", at least 64 MiB; None =
    ``_engine.default_memory_limit()``) bounds what the engine keeps resident; it never changes the output. Raises
    ``OutputError`` before merging when the output's filesystem lacks room for the shards (+1%), and at once when
    another run is writing ``out_dir`` (a lock beside it). On any failure (or Ctrl-C) ``out_dir`` is left absent,
    never partial. ``lora_merge_cache``: where ``model+lora`` models are merged to, and the tensors of PyTorch-pickled
    models copied to as safetensors (kept and reused across runs);
    None = inside the output's temporary directory, removed after the merge. ``device`` (overrides the config's
    ``device:``): ``cpu`` (default) runs the Rust kernels; ``cuda``, ``cuda:N`` or ``torch:cpu`` hand the
    SVD-heavy methods' matrices to torch (``torch_spectral``), falling back to the Rust kernels with a note when
    torch or the GPU is missing. ``copy_tokenizer=False`` leaves the reference model's tokenizer files out (an
    aligned vocabulary is still written, as mergekit's ``--no-copy-tokenizer`` does); ``write_model_card=False``
    writes no ``README.md`` model card (``model_card``). ``allow_nonfinite``: merge NaN and infinite input values as they are (the
    method's arithmetic carries them into the output) instead of failing with an ``InputError`` naming them.

    ``resume``: continue the hidden partial output a killed run left beside ``out_dir`` (``io.journal``): its
    journaled shards are verified (unchanged since the engine fsynced them: size, times, inode) and kept, only the
    others are merged; the result is byte-identical to an uninterrupted run. A partial output of another config, other inputs or another ferromerge version is
    refused (``OutputError``). With ``resume``, a run that fails or is interrupted keeps its partial output for the
    next resume; without it, the partial output is removed (and a killed run's is removed by the next run).

    ``executor="ray"`` (``pip install 'ferromerge[ray]'``) merges the output shards in Ray tasks on the nodes of a
    cluster (``executors.ray``; docs/scale.md): ``ray_address`` is the cluster (None: ``$RAY_ADDRESS``, else a Ray
    instance on this machine started for the run; an open ``ray.init`` session is used as it is), ``ray_tasks`` how
    many tasks the shards are cut into (None: one per shard). The models and ``out_dir`` must be on storage every
    node sees; each task runs with ``threads`` CPUs (None: 1) and ``memory_limit`` as its budget. The output is
    byte-identical to a local run's, and ``resume`` works across executors.

    A config with ``adapters:`` instead of ``models:`` (``config.adapters``) merges LoRA adapters into one adapter:
    ``merge_adapters`` runs it with ``seed``, ``threads``, ``memory_limit``, ``overwrite``, ``quiet`` and
    ``on_progress`` (per module); the other options of a model merge have no effect there (a note says so).

    The steps: check the arguments; lock the output; ``prepare`` (config -> models -> plan); check the output's
    place; merge the tensors; write the side files; rename the finished directory into place
    (``OutputDir.building``).
    """
    check_threads(threads)
    executor = check_executor(executor, ray_address, ray_tasks)
    limit = memory_limit_bytes(memory_limit)
    log = _log(quiet)
    adapter_config = load_adapters_config(config_or_path, COMBINATIONS, strict=strict)
    if adapter_config is not None:
        unused = {"lora_merge_cache": lora_merge_cache, "device": device, "resume": resume,
                  "allow_nonfinite": allow_nonfinite, "executor": executor != "local"}
        for name in (k for k, v in unused.items() if v):
            log(f"note: {name} has no effect on an adapter merge (adapters:)")
        return _merge_adapters(adapter_config, out_dir, seed=seed, threads=threads, memory_limit=limit, quiet=quiet,
                               overwrite=overwrite, on_progress=on_progress)
    start = time.perf_counter()
    with OutputDir(out_dir, overwrite=overwrite) as output:
        # the default LoRA cache lives in the output's temporary directory, so a failed run leaves nothing behind
        temp_cache = output.temp / journal.KEEP[0] if lora_merge_cache is None else None
        scratch = output.temp / SCRATCH
        config, plan = prepare(
            config_or_path,
            seed=seed,
            out_shard_size=out_shard_size,
            lora_merge_cache=lora_merge_cache or temp_cache,
            scratch=scratch,
            strict=strict,
            allow_nonfinite=allow_nonfinite,
        )
        output.check_inputs([m.path for m in plan.models])
        if not resume:
            _check_space(output, plan, temp_cache)
        for note in merge_notes(config, plan):
            log(f"note: {note}")
        merge = _external_merge(device if device is not None else config.device, config.method, log)
        if merge is not None and executor == "ray":
            # the torch hand-off is a callable of this process; a task would need its own GPU and torch
            log("note: the Ray executor runs the Rust kernels on every node; --device is not used")
            merge = None
        bar = None if quiet else ProgressBar()
        full_plan = json.loads(plan.to_json())
        # what decides the bytes besides the plan: the resolved config (side files), and whether torch merges the
        # SVD-heavy tensors (its results differ from the Rust kernels' in the last bits)
        torch_device = (device if device is not None else config.device) if merge is not None else None
        decides = {"config": config.resolved(), "torch_device": torch_device}
        ident = journal.identity(plan.to_json(), decides, _input_files(plan, full_plan), output.temp)
        with output.building(log, resume=resume) as tmp:
            kept = journal.resume(tmp, ident, [s.file for s in plan.shards], log) if resume else {}
            if resume:
                if kept:
                    log(f"resuming: {len(kept)} of {len(plan.shards)} shards are finished and verified")
                _check_space(output, plan, temp_cache, sum(s.size for s in kept.values()))
            book = journal.Journal(tmp, ident, kept)
            convert_pickled(plan.models, plan.reads(), log)
            lora.materialise_all(plan.models, log)
            execute = _executor(plan, executor, threads=threads, limit=limit, merge=merge, ray_address=ray_address,
                                ray_tasks=ray_tasks, bar=bar, log=log)
            stats = _merge_tensors(
                plan,
                journal.reduced_plan(full_plan, kept),
                book,
                tmp,
                scratch,
                execute=execute,
                bar=bar,
                on_progress=on_progress,
                log=log,
            )
            if temp_cache is not None:
                shutil.rmtree(temp_cache, ignore_errors=True)
            _write_side_files(
                tmp,
                config,
                plan,
                seed,
                log,
                tokenizer=copy_tokenizer,
                card=write_model_card,
                out_name=output.target.name,
            )
            book.close(remove=True)
    return RunReport(
        tensors=stats["tensors"],
        bytes_read=stats["bytes_read"],
        bytes_written=stats["bytes_written"],
        seconds=time.perf_counter() - start,
        out_dir=output.target,
        shards_reused=len(kept),
    )


def _merge_adapters(
    config: AdaptersConfig,
    out_dir: str | os.PathLike[str],
    *,
    seed: int,
    threads: int | None,
    memory_limit: int | None,
    quiet: bool,
    overwrite: bool,
    on_progress: ProgressCallback | None,
) -> RunReport:
    """A config with ``adapters:``: ``merge_adapters`` with its arguments and the run's seed, threads, memory limit
    and ``overwrite``; ``on_progress`` counts modules (bytes 0)."""
    bar = None if quiet else ProgressBar("merging adapters")

    def progress(done: int, total: int) -> None:
        if bar is not None:
            bar(done, total, done, total)
        if on_progress is not None:
            on_progress(done, total, 0, 0)

    try:
        summary = merge_adapters(out_dir, **config.arguments(), seed=seed, threads=threads, memory_limit=memory_limit,
                                 overwrite=overwrite, quiet=quiet, on_progress=progress)
    finally:
        if bar is not None:
            bar.close()
    return RunReport(tensors=2 * int(summary["modules"]), bytes_read=0, bytes_written=int(summary["bytes_written"]),
                     seconds=float(summary["seconds"]), out_dir=Path(summary["out"]), adapters=summary)


def _input_files(plan: Plan, plan_json: Mapping[str, Any]) -> set[Path]:
    """The files a resume checks for changes: those the plan reads and every model's, less the LoRA merge cache's
    (written by the run itself, and named by a digest of the adapter and model files they come from, which the
    plan digest covers), plus each LoRA adapter's files."""
    files = journal.plan_inputs(plan_json) | {f for m in plan.models for f in m.files}
    for m in plan.models:
        if isinstance(m, lora.LoraModelIndex):
            files -= set(m.cache_files)
            if m.adapter.is_dir():
                files |= {p for p in m.adapter.iterdir() if p.is_file()}
    return files
