"""``run_multi``: several merges from one file, later ones using earlier ones' outputs (mergekit-multi's format).

The file holds YAML documents, each a merge config with a ``name:``; at most one document has no name, the final
merge. A model reference that is a merge's name (or ``name+lora``) means that merge's output. Merges run in
dependency order (a cycle is a ``ConfigError`` naming it); a named merge is written to ``INTERMEDIATE_DIR/name``, the
unnamed one to ``out`` (when every merge has a name and ``out`` is given, the last document is the final merge and
goes to ``out``). Every config is checked before the first merge starts.

Reuse: each output gets a stamp (``STAMP``) holding a fingerprint of its config (with the names replaced by paths),
the settings that change the output (seed, shard size, tokenizer, model card, device, ferromerge's version) and the
size and modification time of every file of its input models (an intermediate one included). With ``lazy`` (the
default, as mergekit's ``--lazy``), a merge whose output carries the same fingerprint is not run again; any other
output in the intermediate directory is replaced. mergekit's rule is weaker: it skips any directory that holds a
config.json and weights, whatever made them.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from . import _engine
from ._plan.build import DEFAULT_SHARD_SIZE
from ._run import RunReport, run
from ._validate import check_text_file
from .config.resolve import parse_config
from .errors import ConfigError, InputError, ParameterError
from .models.refs import resolve

__all__ = ["STAMP", "Merge", "MergeResult", "is_multi", "load_multi", "run_multi"]

#: the fingerprint file in each output of a multi-merge
STAMP = "ferromerge_multi.json"

#: the keys whose string values are model references (model, base_model, tokenizer sources)
_REF_KEYS = frozenset({"model", "base_model", "tokenizer_source", "source"})


@dataclass(frozen=True)
class Merge:
    """One merge of a multi-merge file, its references to other merges replaced by their output paths."""

    #: None for the unnamed (final) merge
    name: str | None
    out: Path
    config: dict[str, Any]
    #: the names of the merges whose outputs it reads
    needs: tuple[str, ...]

    @property
    def label(self) -> str:
        return f"merge {self.name!r}" if self.name is not None else "the unnamed merge"

    @property
    def text(self) -> str:
        return yaml.safe_dump(self.config, sort_keys=False)


@dataclass(frozen=True)
class MergeResult:
    """What ``run_multi`` did with one merge: ``report`` is None when its output was reused."""

    merge: Merge
    report: RunReport | None

    @property
    def reused(self) -> bool:
        return self.report is None


def _documents(text: str, origin: str) -> list[Any]:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: YAML syntax error: {e}") from None
    return [d for d in docs if d is not None]


def _read(source: str | os.PathLike[str]) -> tuple[str, str]:
    """(text, origin) of a file path, or of YAML text given as a string with a newline."""
    if isinstance(source, str) and "\n" in source and not os.path.isfile(source):
        return source, "config"
    check_text_file(source, "config file", ConfigError)
    try:
        return Path(source).read_text(encoding="utf-8"), os.fspath(source)
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {source}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {source}: {e}") from None


def is_multi(source: str | os.PathLike[str]) -> bool:
    """Whether a config file (or YAML text) holds more than one document (a multi-merge); False when it cannot be
    read or parsed (the single-merge loader reports that)."""
    try:
        text, origin = _read(source)
        return len(_documents(text, origin)) > 1
    except ConfigError:
        return False


def _refs(value: Any, key: str | None = None) -> list[str]:
    """The model references in a config: strings under ``_REF_KEYS``, at any depth."""
    if isinstance(value, Mapping):
        return [r for k, v in value.items() for r in _refs(v, str(k))]
    if isinstance(value, list):
        return [r for v in value for r in _refs(v, key)]
    return [value] if isinstance(value, str) and key in _REF_KEYS else []


def _target(ref: str) -> str:
    """The model part of a reference (``name`` of ``name+lora``)."""
    model, plus, _ = ref.partition("+")
    return model if plus else ref


def _patched(value: Any, paths: Mapping[str, Path], used: list[str], key: str | None = None) -> Any:
    """``value`` with every reference to a merge's name replaced by that merge's output path."""
    if isinstance(value, Mapping):
        return {k: _patched(v, paths, used, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_patched(v, paths, used, key) for v in value]
    if isinstance(value, str) and key in _REF_KEYS and _target(value) in paths:
        name = _target(value)
        if name not in used:
            used.append(name)
        return str(paths[name]) + value[len(name):]
    return value


def _name(doc: Mapping[str, Any], where: str) -> str | None:
    name = doc.get("name")
    if name is None:  # absent or null: mergekit-multi's unnamed merge
        return None
    if not isinstance(name, str) or not name.strip() or name in (".", "..") or "/" in name or "\\" in name:
        raise ConfigError(f"{where}: name: {name!r} must be a non-empty string usable as a directory name")
    return name


def _order(merges: dict[str | None, Merge], origin: str) -> list[Merge]:
    """Dependencies first, otherwise file order; a cycle is a ``ConfigError`` naming it."""
    done: list[str | None] = []
    path: list[str | None] = []

    def visit(name: str | None) -> None:
        if name in done:
            return
        if name in path:
            cycle = [*path[path.index(name):], name]
            raise ConfigError(
                f"{origin}: the merges use each other's outputs in a cycle: "
                f"{' -> '.join(repr(n) for n in cycle)}; none of them can run first"
            )
        path.append(name)
        for need in merges[name].needs:
            visit(need)
        path.pop()
        done.append(name)

    for name in merges:
        visit(name)
    return [merges[n] for n in done]


def load_multi(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None,
    intermediate_dir: str | os.PathLike[str] | None = None,
    *,
    strict: bool = False,
) -> list[Merge]:
    """The merges of a multi-merge file in the order they run, each config checked (``ConfigError`` or
    ``ParameterError`` naming the merge; ``strict``: compat warnings are errors too, as in ``load_config``).
    ``intermediate_dir`` defaults to ``OUT-intermediates`` beside ``out``."""
    text, origin = _read(source)
    docs = _documents(text, origin)
    if not docs:
        raise ConfigError(f"{origin}: the config is empty")
    named: dict[str | None, dict[str, Any]] = {}
    for i, doc in enumerate(docs):
        where = f"{origin}: document {i + 1}"
        if not isinstance(doc, Mapping):
            raise ConfigError(f"{where}: expected a merge config (a mapping of keys), got {type(doc).__name__}")
        name = _name(doc, where)
        if name in named:
            raise ConfigError(
                f"{where}: two merges are named {name!r}" if name is not None
                else f"{where}: a second merge without a name; only the final merge may have none"
            )
        named[name] = {k: v for k, v in doc.items() if k != "name"}
    final: str | None = None
    if None not in named and out is not None:
        final = list(named)[-1]  # every merge is named: the last one is the final merge
    if None in named and out is None:
        raise ConfigError(f"{origin}: the merge without a name is the final one: give the output directory (OUT)")
    if intermediate_dir is None:
        if out is None:
            raise ParameterError("a multi-merge without OUT needs --intermediate-dir")
        intermediate_dir = Path(os.path.abspath(out) + "-intermediates")
    inter = Path(os.path.abspath(intermediate_dir))
    paths: dict[str, Path] = {n: inter / n for n in named if n is not None}
    if final is not None:
        paths[final] = Path(os.path.abspath(out))  # type: ignore[arg-type]
    merges: dict[str | None, Merge] = {}
    for name, doc in named.items():
        used: list[str] = []
        config = _patched(doc, paths, used)
        target = paths[name] if name is not None else Path(os.path.abspath(out))  # type: ignore[arg-type]
        merges[name] = Merge(name, target, config, tuple(used))
    ordered = _order(merges, origin)
    for m in ordered:
        # checked before anything runs (warnings come again when it runs)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                parse_config(m.config, text=m.text, origin=f"{origin}: {m.label}", strict=strict)
            except (ConfigError, ParameterError) as e:
                where = f"{origin}: {m.label}"
                if where in str(e):
                    raise
                raise type(e)(f"{where}: {e}") from None
    return ordered


def _files(path: Path) -> list[tuple[str, int, int]]:
    try:
        entries = sorted(os.scandir(path), key=lambda e: e.name)
    except OSError:
        return []
    out = []
    for entry in entries:
        if entry.name != STAMP and entry.is_file():
            st = entry.stat()
            out.append((entry.name, st.st_size, st.st_mtime_ns))
    return out


def fingerprint(merge: Merge, settings: Mapping[str, Any]) -> str:
    """A digest of what decides a merge's output: its config, the output-changing ``settings``, ferromerge's version
    and every input model's files (names, sizes, modification times)."""
    inputs: dict[str, Any] = {}
    for ref in _refs(merge.config):
        for part in ref.split("+"):
            try:
                inputs[part] = _files(resolve(part))
            except (InputError, OSError):
                inputs[part] = None  # not a model ("union", "base"), or missing: the run says so
    payload = {"config": merge.config, "settings": dict(settings), "inputs": inputs, "version": _engine.version()}
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def _stamp(out: Path) -> str | None:
    try:
        data = json.loads((out / STAMP).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data.get("fingerprint") if isinstance(data, dict) else None


def run_multi(
    source: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    *,
    intermediate_dir: str | os.PathLike[str] | None = None,
    lazy: bool = True,
    overwrite: bool = False,
    quiet: bool = False,
    seed: int = 0,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    device: str | None = None,
    copy_tokenizer: bool = True,
    write_model_card: bool = True,
    strict: bool = False,
    **run_kwargs: Any,
) -> list[MergeResult]:
    """Run every merge of a multi-merge file (see the module docstring) and return what each did, in run order.

    ``intermediate_dir``: where named merges go (default ``OUT-intermediates``); ``lazy``: reuse an output whose
    stamp matches; ``overwrite``: replace an existing ``out`` (intermediates are always replaced when stale). The
    other keywords are ``run``'s, applied to every merge.
    """
    if run_kwargs.get("resume"):
        raise ParameterError("resume applies to one merge; a multi-merge reuses its finished merges by itself (lazy)")
    merges = load_multi(source, out, intermediate_dir, strict=strict)
    log: Callable[[str], None] = (lambda _: None) if quiet else (lambda m: print(f"ferromerge: {m}", file=sys.stderr))
    settings = dict(seed=seed, out_shard_size=str(out_shard_size), device=device, copy_tokenizer=copy_tokenizer,
                    write_model_card=write_model_card)
    final = Path(os.path.abspath(out)) if out is not None else None
    results = []
    for m in merges:
        digest = fingerprint(m, settings)
        if lazy and _stamp(m.out) == digest:
            log(f"{m.label}: {m.out} is up to date (same config, settings and inputs); reused")
            results.append(MergeResult(m, None))
            continue
        log(f"{m.label} -> {m.out}")
        report = run(
            m.text, m.out, overwrite=overwrite if m.out == final else True, quiet=quiet, seed=seed,
            out_shard_size=out_shard_size, device=device, copy_tokenizer=copy_tokenizer,
            write_model_card=write_model_card, strict=strict, **run_kwargs,
        )
        try:
            (m.out / STAMP).write_text(json.dumps({"name": m.name, "fingerprint": digest}) + "\n", encoding="utf-8")
        except OSError as e:
            log(f"note: {m.out / STAMP} not written ({e}): the output will not be reused by the next run")
        results.append(MergeResult(m, report))
    return results
