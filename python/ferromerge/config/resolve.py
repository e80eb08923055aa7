"""Resolve a mergekit YAML merge config into a ``MergeConfig`` (and serialize it back: ``MergeConfig.resolved``).

The config may be a path, a YAML string or a mapping. Every key is checked before any model is opened (the keys
and types by ``schema``). What mergekit 0.1.5 accepts is accepted, with mergekit's result: a key neither tool
declares (``merge_methd``, ``models[1].weight`` beside ``parameters:``) and a parameter the method does not use
(``models[1].parameters.gamma`` in a ties merge) are ignored as mergekit ignores them, each with a compat warning
naming its place (``leniency``; ``strict=True`` makes them errors), and values are read as mergekit's pydantic
reads them (``methods.coerce``). What mergekit refuses is refused, with the place. A file of several YAML documents
(mergekit-multi) is not one merge: ``ferromerge.multi`` runs those.

A config lists its inputs either as ``models:`` (whole models) or as ``slices:`` (layer ranges, concatenated into
the output's layers). Both become a tuple of ``OutputSlice``; ``models:`` is one slice whose sources span every
layer. Parameter settings (scalars, gradients, filters; see ``settings``) are validated here and resolved per
tensor by the planner, with mergekit's precedence: the source's own ``parameters`` (``models[i]`` or
``slices[j].sources[i]``), then ``slices[j].parameters``, then the top-level ``parameters``, then the method's
default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from .. import methods
from .._validate import check_text_file
from ..errors import ConfigError
from ..io.dtypes import CONFIG_DTYPE_SUGGESTIONS, ST_NAME
from ..methods.registry import PARAMETER_NAMES
from ..methods.spec import MethodSpec
from ..models.refs import check_ref
from ..tokenizer.chat_template import check_chat_template
from ..tokenizer.config import TokenizerSettings, check_settings
from ..torch_spectral import check_device
from . import settings
from .leniency import IGNORED, QUIET, Lenient, drop_unknown_keys, suggest
from .schema import ModelEntry, ModuleEntry, RawConfig, SliceEntry, validation_message
from .settings import Level, Setting


@dataclass(frozen=True)
class InputModel:
    """One source of an output slice: a model (and, for ``slices:``, its layer range) with its parameters.

    For methods that take a base (required or optional) the slice's base is a separate ``OutputSlice.base``; every
    other source is an input.
    """

    ref: str
    #: where it is in the config, for messages: ``models[2]``, ``slices[1].sources[0]`` or ``base_model``
    where: str
    #: position among the slice's non-base inputs in config order (keys the DARE random stream)
    model_id: int
    #: [start, end) of its layers, None for a whole model (``models:``)
    layer_range: tuple[int, int] | None
    #: precedence levels of its per-model parameters, highest first (own, slice, global)
    levels: tuple[Level, ...]
    #: per-model parameters that have one value for every tensor, defaults filled in
    values: Mapping[str, Any] = field(default_factory=dict)
    #: per-model parameters that filters or gradients make vary between tensors
    varying: frozenset[str] = frozenset()

    @property
    def weight(self) -> float | None:
        """The weight when it is the same for every tensor (else None: see ``levels``)."""
        return self.values.get("weight")

    @property
    def density(self) -> float | None:
        """The density when it is the same for every tensor (1.0 for methods without one; None when it varies)."""
        return None if "density" in self.varying else self.values.get("density", 1.0)


@dataclass(frozen=True)
class OutputSlice:
    """A run of output layers: every source contributes the same number of layers (``models:``: all of them)."""

    #: ``slices[1]``, or ``models`` for the one slice of a ``models:`` config
    where: str
    inputs: tuple[InputModel, ...]
    #: the reference of task vectors (or slerp's start point), a source of this slice; None for methods that take no
    #: base (linear, karcher, passthrough) and for nuslerp/multislerp without one
    base: InputModel | None
    #: precedence levels of method-wide parameters, highest first (slice, global)
    shared_levels: tuple[Level, ...]

    def sources(self) -> list[InputModel]:
        """Every source of the slice, base first."""
        return ([self.base] if self.base is not None else []) + list(self.inputs)

    def template(self) -> InputModel:
        """The source whose tensors define the slice's output tensors: the base, else the first input."""
        return self.base if self.base is not None else self.inputs[0]


@dataclass(frozen=True)
class OutputModule:
    """One entry of ``modules:``: a part of a multi-module model (its tensors: see ``modules``), with its slices."""

    name: str
    #: ``modules.vision_tower``
    where: str
    slices: tuple[OutputSlice, ...]
    #: ``slices:`` was used (else ``models:``)
    sliced: bool


@dataclass(frozen=True)
class MergeConfig:
    """A validated config; per-tensor parameter values are resolved by the planner."""

    raw: RawConfig
    method: MethodSpec
    slices: tuple[OutputSlice, ...]
    #: ``slices:`` was used (else ``models:``, one slice spanning whole models)
    sliced: bool
    #: method-wide parameters that have one value for every tensor, defaults filled in (absent: they vary)
    shared: dict[str, Any]
    #: the base model when the method takes one (required or optional), else None (``linear``, ``karcher``)
    base: str | None
    #: the model that donates config.json and tokenizer (and, for ``models:``, defines the output's tensors):
    #: base_model, else the first model
    reference: str
    #: mergekit's ``dtype``: inputs are rounded to it before the math
    dtype: str | None
    out_dtype: str | None
    #: the config text as given (YAML), saved with the output as mergekit_config.yml
    text: str
    #: remarks about accepted keys that have no effect, for the user
    notes: tuple[str, ...]
    #: vocabulary alignment (``tokenizer`` or ``tokenizer_source``); None: the reference's tokenizer is copied
    tokenizer: TokenizerSettings | None = None
    #: ``modules:`` configs: the modules in config order (``slices`` then holds all their slices); else empty
    modules: tuple[OutputModule, ...] = ()
    #: the config's ``device`` (None: not given; the run's own ``device`` argument wins over it)
    device: str | None = None

    @property
    def inputs(self) -> tuple[InputModel, ...]:
        """The inputs of a config with one slice (every ``models:`` config)."""
        if len(self.slices) != 1:
            raise ValueError(f"the config has {len(self.slices)} slices; use .slices")
        return self.slices[0].inputs

    def model_refs(self) -> list[str]:
        """Every model the merge reads, reference first, each once."""
        refs = [self.reference]
        for s in self.slices:
            refs += [m.ref for m in s.sources() if m.ref not in refs]
        return refs

    def resolved(self) -> dict[str, Any]:
        """The effective merge, as plain data (saved as ferromerge_config.yml beside the output)."""
        out: dict[str, Any] = {"merge_method": self.method.name}
        if self.raw.base_model is not None and (self.base is not None or self.sliced):
            out["base_model"] = self.raw.base_model
        if self.modules:
            out["modules"] = {m.name: _module_data(self.method, m) for m in self.modules}
        elif self.sliced:
            out["slices"] = [_slice_data(self.method, s) for s in self.slices]
        else:
            out["models"] = [
                {"model": m.ref, "parameters": _model_params(self.method, m)} for m in self.slices[0].inputs
            ]
        top = {name: settings.to_data(v) for name, v in _global_settings(self.slices).items()}
        out["parameters"] = {**top, **self.shared}
        if self.dtype:
            out["dtype"] = self.dtype
        if self.out_dtype:
            out["out_dtype"] = self.out_dtype
        if self.tokenizer is not None:
            out["tokenizer"] = self.tokenizer.model_dump(exclude_none=True)
        if self.raw.chat_template is not None:
            out["chat_template"] = self.raw.chat_template
        if self.device is not None:
            out["device"] = self.device
        return out


def _global_settings(slices: tuple[OutputSlice, ...]) -> dict[str, Setting]:
    """The top-level settings of per-model parameters (the last level of every input)."""
    for s in slices:
        for m in s.inputs:
            if m.levels and m.levels[-1].place == "parameters":
                return dict(m.levels[-1].settings)
    return {}


def _model_params(method: MethodSpec, model: InputModel) -> dict[str, Any]:
    own = model.levels[0].settings if model.levels and model.levels[0].place == f"{model.where}.parameters" else {}
    out: dict[str, Any] = {}
    for name in method.per_model:
        if name in model.values:
            out[name] = model.values[name]
        elif name in own:
            out[name] = settings.to_data(own[name])
    return out


def _slice_data(method: MethodSpec, s: OutputSlice) -> dict[str, Any]:
    data: dict[str, Any] = {
        "sources": [
            {"model": m.ref, "layer_range": list(m.layer_range or ()), "parameters": _model_params(method, m)}
            for m in s.sources()
        ]
    }
    if s.base is not None:
        data["base_model"] = s.base.ref
    own = s.shared_levels[0] if s.shared_levels and s.shared_levels[0].place == f"{s.where}.parameters" else None
    if own is not None and own.settings:
        data["parameters"] = {k: settings.to_data(v) for k, v in own.settings.items()}
    return data


def _module_data(method: MethodSpec, m: OutputModule) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if m.sliced:
        data["slices"] = [_slice_data(method, s) for s in m.slices]
    else:
        data["models"] = [{"model": i.ref, "parameters": _model_params(method, i)} for i in m.slices[0].inputs]
    levels = m.slices[0].shared_levels
    own = next((lv for lv in levels if lv.place == f"{m.where}.parameters"), None)
    if own is not None and own.settings:
        data["parameters"] = {k: settings.to_data(v) for k, v in own.settings.items()}
    return data


def load_config(source: str | os.PathLike[str] | Mapping[str, Any], *, strict: bool = False) -> MergeConfig:
    """Read and validate a config from a path, a YAML string or a mapping.

    A ``str`` naming an existing file is read as a path; a ``str`` containing a newline or a ``:`` is YAML text;
    any other ``str`` is taken as a path that does not exist. Raises ``ConfigError`` (syntax, keys, values) or
    ``ParameterError`` (unknown method). What mergekit accepts and ferromerge questions is a ``CompatWarning``
    (``leniency``), or with ``strict`` a ``ConfigError``.
    """
    data, text, origin = _read(source)
    return parse_config(data, text=text, origin=origin, strict=strict)


def read_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[Any, str | None, str]:
    """The config as parsed, not validated: its data, its YAML text (None for a mapping) and its name in messages
    (``config.adapters`` reads an ``adapters:`` config with it)."""
    return _read(source)


def not_a_model_merge(data: Mapping[str, Any], origin: str) -> ConfigError:
    """The error for a config with ``adapters:`` (a LoRA adapter merge, ``config.adapters``) where a model merge is
    read: beside ``models:``/``slices:``/``modules:``, or where only model merges run (``plan``, mergekit-multi)."""
    given = [k for k in ("models", "slices", "modules") if data.get(k)]
    if given:
        return ConfigError(
            f"{origin}: adapters: and {' and '.join(given)}: give one of them (adapters: merges LoRA adapters into "
            f"one adapter, {given[0]}: merges models)"
        )
    return ConfigError(
        f"{origin}: adapters: this config merges LoRA adapters into one adapter, which `ferromerge run` (or "
        "ferromerge.run / ferromerge.merge_adapters) does; it is no model merge"
    )


def _read(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[Any, str | None, str]:
    if isinstance(source, Mapping):
        return dict(source), None, "config"
    if isinstance(source, str) and not os.path.isfile(source) and ("\n" in source or ":" in source):
        return _parse_yaml(source, "config"), source, "config"
    path = Path(source)
    check_text_file(path, "config file", ConfigError)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"config file not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read config file {path}: {e}") from None
    return _parse_yaml(text, str(path)), text, str(path)


def _parse_yaml(text: str, origin: str) -> Any:
    try:
        docs = list(yaml.safe_load_all(text))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark
        at = f" (line {mark.line + 1}, column {mark.column + 1})" if mark is not None else ""
        raise ConfigError(f"{origin}: YAML syntax error{at}: {e.problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{origin}: YAML syntax error: {e}") from None
    docs = [d for d in docs if d is not None]
    if len(docs) > 1:
        raise ConfigError(
            f"{origin}: {len(docs)} YAML documents: a mergekit-multi file of several merges; run it with "
            "`ferromerge multi` (or `ferromerge run`) or ferromerge.multi.run_multi"
        )
    if not docs:
        raise ConfigError(f"{origin}: the config is empty")
    return docs[0]


def parse_config(
    data: Any, *, text: str | None = None, origin: str = "config", strict: bool = False
) -> MergeConfig:
    """Validate already-parsed config data (``origin`` names it in messages; ``strict``: see ``load_config``)."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{origin}: expected a mapping of keys (merge_method, models, ...), got {type(data).__name__}"
        )
    if "adapters" in data:
        raise not_a_model_merge(data, origin)
    lenient = Lenient(strict)
    data = drop_unknown_keys(data, PARAMETER_NAMES, lenient)
    if "merge_method" not in data:
        raise ConfigError(f"{origin}: merge_method: missing (e.g. merge_method: ties)")
    given = [k for k in ("models", "slices", "modules") if data.get(k)]
    if len(given) > 1:
        raise ConfigError(
            f"{origin}: {' and '.join(given)}: give one of them (models: is one slice of whole models; modules: "
            "gives each module of a multi-module model its own models: or slices:)"
        )
    if not given:
        raise ConfigError(f"{origin}: models: missing or empty; list the models to merge (or use slices: or modules:)")
    try:
        raw = RawConfig.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(f"{origin}: {validation_message(e)}") from None

    method = methods.get(raw.merge_method)
    dtype = _dtype(raw.dtype, "dtype")
    out_dtype = _dtype(raw.out_dtype, "out_dtype")
    device = check_device(raw.device) if raw.device is not None else None
    top = Level(_settings(method, raw.parameters or {}, "parameters", "global", lenient), "parameters")
    base_ref = check_ref(raw.base_model, "base_model") if raw.base_model is not None else None
    notes: list[str] = []
    modules: tuple[OutputModule, ...] = ()
    if raw.modules:
        modules = tuple(
            _module(method, name, m, base_ref, top, notes, lenient) for name, m in raw.modules.items()
        )
        slices = tuple(s for m in modules for s in m.slices)
        reference = base_ref if base_ref is not None else slices[0].sources()[0].ref
    elif raw.models:
        slices = (_models_slice(method, raw.models, base_ref, top, notes, lenient),)
        reference = base_ref if base_ref is not None else slices[0].sources()[0].ref
    else:
        assert raw.slices is not None
        slices = tuple(_slice(method, i, s, base_ref, top, notes, lenient) for i, s in enumerate(raw.slices))
        reference = base_ref if base_ref is not None else slices[0].sources()[0].ref
        if reference == base_ref and not any(m.ref == base_ref for s in slices for m in s.sources()):
            notes.append(
                f"base_model {base_ref!r} is no source of any slice: it only donates config.json and the tokenizer"
            )

    for name, spec in method.shared.items():
        if spec.default is None and not all(settings.mentioned(name, s.shared_levels) for s in slices):
            # mergekit's message; a filter-only setting that misses a tensor is caught per tensor by the planner
            raise ConfigError(
                f"Missing required parameter {name} for {method.name}: set it in the top-level parameters"
                + (" (or in every slice's parameters)" if raw.slices is not None else "")
            )
    tokenizer = _tokenizer(raw, [reference] + [m.ref for s in slices for m in s.sources()])
    shared: dict[str, Any] = {}
    for name, spec in method.shared.items():
        constant, value = settings.uniform(name, slices[0].shared_levels)
        if constant and all(settings.uniform(name, s.shared_levels) == (True, value) for s in slices):
            shared[name] = spec.default if value is None else value
    return MergeConfig(
        raw=raw,
        method=method,
        slices=slices,
        sliced=raw.slices is not None,
        shared=shared,
        base=base_ref if method.takes_base else None,
        reference=reference,
        dtype=dtype,
        out_dtype=out_dtype,
        text=text if text is not None else yaml.safe_dump(raw.model_dump(exclude_none=True), sort_keys=False),
        notes=tuple(notes),
        tokenizer=tokenizer,
        modules=modules,
        device=device,
    )


def _tokenizer(raw: RawConfig, refs: list[str]) -> TokenizerSettings | None:
    """The vocabulary alignment settings (``tokenizer.config.check_settings``) and the chat template's form."""
    if raw.tokenizer_source is not None and raw.tokenizer is not None:
        raise ConfigError("tokenizer_source and tokenizer: give one of them (tokenizer_source: X is tokenizer: {source: X})")
    if raw.chat_template is not None:
        check_chat_template(raw.chat_template)
    settings = raw.tokenizer
    if raw.tokenizer_source is not None:
        settings = TokenizerSettings(source=raw.tokenizer_source)
    if settings is None:
        return None
    check_settings(settings, "tokenizer_source" if raw.tokenizer_source is not None else "tokenizer.source", refs)
    return settings


def _module(
    method: MethodSpec,
    name: str,
    entry: ModuleEntry,
    base_ref: str | None,
    top: Level,
    notes: list[str],
    lenient: Lenient,
) -> OutputModule:
    """One ``modules:`` entry; its ``parameters`` rank between its slices' and the top-level ones (mergekit)."""
    where = f"modules.{name}"
    if bool(entry.models) == bool(entry.slices):
        raise ConfigError(f"{where}: give models: or slices: (exactly one, not empty)")
    own = Level(
        _settings(method, entry.parameters or {}, f"{where}.parameters", "slice", lenient), f"{where}.parameters"
    )
    if entry.models:
        slices = (
            _models_slice(method, entry.models, base_ref, top, notes, lenient, prefix=f"{where}.", module=own),
        )
    else:
        assert entry.slices is not None
        slices = tuple(
            _slice(method, i, s, base_ref, top, notes, lenient, prefix=f"{where}.", module=own)
            for i, s in enumerate(entry.slices)
        )
    return OutputModule(name, where, slices, entry.slices is not None)


def _models_slice(
    method: MethodSpec,
    entries: list[ModelEntry],
    base_ref: str | None,
    top: Level,
    notes: list[str],
    lenient: Lenient,
    prefix: str = "",
    module: Level | None = None,
) -> OutputSlice:
    """``models:`` as one slice of whole models (mergekit's shorthand); ``prefix`` and ``module`` place it in a
    ``modules:`` entry (its where-prefix, and its parameters as a level above the top-level ones)."""
    refs: list[str] = []
    for i, entry in enumerate(entries):
        ref = check_ref(entry.model, f"{prefix}models[{i}].model")
        if ref in refs:
            raise ConfigError(
                f"{prefix}models[{i}].model: {ref!r} is listed twice (also {prefix}models[{refs.index(ref)}])"
            )
        refs.append(ref)
    sources = [
        (
            refs[i],
            f"{prefix}models[{i}]",
            None,
            _settings(method, e.parameters or {}, f"{prefix}models[{i}].parameters", "model", lenient),
        )
        for i, e in enumerate(entries)
    ]
    if base_ref is not None and base_ref not in refs:
        # mergekit appends a base_model that models: does not list: the base of a GTA method, one more input of
        # linear (and a second input that passthrough then rejects).
        sources.append((base_ref, "base_model", None, {}))
    upper = (top,) if module is None else (module, top)
    return _build_slice(method, f"{prefix}models", sources, base_ref, upper, notes)


def _slice(
    method: MethodSpec,
    index: int,
    entry: SliceEntry,
    base_ref: str | None,
    top: Level,
    notes: list[str],
    lenient: Lenient,
    prefix: str = "",
    module: Level | None = None,
) -> OutputSlice:
    where = f"{prefix}slices[{index}]"
    if not entry.sources:
        raise ConfigError(f"{where}.sources: empty; list the models (with layer_range) of this slice")
    if entry.residual_weight is not None:
        notes.append(f"{where}.residual_weight has no effect (mergekit does not use it either)")
    sources = []
    refs: list[str] = []
    for i, src in enumerate(entry.sources):
        place = f"{where}.sources[{i}]"
        ref = check_ref(src.model, f"{place}.model")
        if ref in refs:
            # mergekit rejects it too ("Duplicate merge inputs"): one model contributes once per output tensor.
            raise ConfigError(
                f"{place}.model: {ref!r} is listed twice in {where} (also sources[{refs.index(ref)}]); "
                "to stack its layers, put each range in its own slice"
            )
        refs.append(ref)
        start, end = src.layer_range
        if start < 0 or end <= start:
            raise ConfigError(
                f"{place}.layer_range: [{start}, {end}] is empty or negative; give [start, end), start < end"
            )
        own = _settings(method, src.parameters or {}, f"{place}.parameters", "model", lenient)
        sources.append((ref, place, (start, end), own))
    lengths = [r[2][1] - r[2][0] for r in sources]
    if len(set(lengths)) > 1:
        detail = ", ".join(f"sources[{i}] ({r[0]}) {n}" for i, (r, n) in enumerate(zip(sources, lengths)))
        raise ConfigError(f"{where}: every source of a slice must span the same number of layers; got {detail}")
    slice_base = check_ref(entry.base_model, f"{where}.base_model") if entry.base_model is not None else base_ref
    if entry.base_model is not None and not method.takes_base:
        notes.append(f"{where}.base_model has no effect with {method.name}")
    own = Level(
        _settings(method, entry.parameters or {}, f"{where}.parameters", "slice", lenient), f"{where}.parameters"
    )
    upper = (own, top) if module is None else (own, module, top)
    return _build_slice(method, where, sources, slice_base, upper, notes)


def _build_slice(
    method: MethodSpec,
    where: str,
    sources: list[tuple[str, str, tuple[int, int] | None, dict[str, Setting]]],
    base_ref: str | None,
    upper: tuple[Level, ...],
    notes: list[str],
) -> OutputSlice:
    """Split a slice's sources into base and inputs, and resolve what does not vary per tensor."""
    base: InputModel | None = None
    inputs: list[InputModel] = []
    for ref, place, layer_range, own in sources:
        levels = ((Level(own, f"{place}.parameters"),) if own else ()) + upper
        if method.takes_base and ref == base_ref:
            if own:
                notes.append(
                    f"{place}.parameters ({', '.join(own)}) of the base model have no effect with "
                    f"{method.name}: the base is the reference the task vectors are taken from"
                )
            base = InputModel(ref, place, -1, layer_range, levels)
            continue
        values: dict[str, Any] = {}
        varying: set[str] = set()
        for name, spec in method.per_model.items():
            constant, value = settings.uniform(name, levels)
            if not constant:
                varying.add(name)
            elif value is not None:
                values[name] = value
            elif spec.default is not None:
                values[name] = spec.default
            else:
                raise ConfigError(
                    f"Missing required parameter {name} for {ref} ({place}); "
                    f"set it in its parameters or in the top-level parameters"
                )
        if not varying:  # else the planner checks each tensor's values
            methods.check_model(method, values, f"{place} ({ref})")
        inputs.append(InputModel(ref, place, len(inputs), layer_range, levels, values, frozenset(varying)))
    if method.takes_base and base_ref is not None and base is None:
        # mergekit: "Base input is not present in merge inputs"; models: adds it, slices: must list it.
        raise ConfigError(
            f"{where}: base model {base_ref!r} is not one of its sources; {method.name} uses the base model of each "
            "slice (the reference of task vectors), so each slice must list it (with the layer_range to use)"
        )
    if method.requires_base:
        if base_ref is None:
            raise ConfigError(f"base_model: {method.name} needs a base model (the reference of the task vectors)")
        if not inputs and not method.base_alone:
            raise ConfigError(f"{where}: {method.name} needs at least one model besides the base model {base_ref!r}")
        if not inputs:
            # mergekit's task-vector methods (and sce, ram) return the base when there is no task vector (a recipe:
            # base+LoRA merged on its own); the planner copies the base's tensors
            notes.append(
                f"{where}: only the base model {base_ref!r}: its tensors are copied as they are ({method.name} has "
                "no task vector to add, as in mergekit)"
            )
            return OutputSlice(where, (), base, upper)
    listed = ", ".join(f"{m.where} {m.ref!r}" for m in inputs)
    if not method.takes_base and method.max_inputs is not None and len(inputs) > method.max_inputs:
        raise ConfigError(
            f"{where}: {method.name} takes exactly {method.max_inputs} model per output tensor, got {len(inputs)} "
            f"({listed}); to take layers from several models, give each its own slice"
        )
    if not method.count_ok(len(inputs)):
        # mergekit checks the same contract per tensor group ("Merge method requires exactly 2 inputs").
        raise ConfigError(f"{where}: {method.name} takes {method.inputs_rule()}, got {len(inputs)} ({listed})")
    return OutputSlice(where, tuple(inputs), base, upper)


def _dtype(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.")
    if name in ST_NAME:
        return name
    if name in CONFIG_DTYPE_SUGGESTIONS:
        raise ConfigError(f"{where}: {value!r} is not a dtype name mergekit accepts; write {CONFIG_DTYPE_SUGGESTIONS[name]}")
    raise ConfigError(f"{where}: unsupported dtype {value!r}; use one of {', '.join(ST_NAME)}")


def _settings(
    method: MethodSpec, given: dict[str, Any], where: str, level: str, lenient: Lenient
) -> dict[str, Setting]:
    """Validate the parameter settings of one level (``model``, ``slice`` or ``global``). A parameter the method
    does not read at that level is ignored, as mergekit ignores it, with a compat warning (its form is still
    checked: mergekit's pydantic refuses a malformed one before any method looks)."""
    out: dict[str, Setting] = {}
    known = method.per_model if level == "model" else {**method.per_model, **method.shared}
    for name, value in given.items():
        place = f"{where}.{name}"
        spec = known.get(name)
        setting = settings.parse_setting(value, name, spec, place, lenient if spec is not None else QUIET)
        if spec is None:
            lenient.warn(_unused_message(method, name, place, level, known))
        elif setting is not None:
            out[name] = setting
    return out


def _unused_message(method: MethodSpec, name: str, place: str, level: str, known: Mapping[str, Any]) -> str:
    """Why parameter ``name`` at ``place`` has no effect, and the one probably meant."""
    if level == "model" and name in method.shared:
        # mergekit reads method-wide parameters only from the slice, module and top-level parameters
        return (
            f"{place}: {name!r} applies to the whole merge, not to one model (set it under the top-level or the "
            f"slice's parameters); {IGNORED} here"
        )
    close = suggest(name, known)
    if close is not None:
        return f"{place}: {method.name} has no parameter {name!r} (did you mean {close!r}?); {IGNORED}"
    if name in PARAMETER_NAMES:
        return f"{place}: {method.name} does not use {name!r}; {IGNORED}"
    other = suggest(name, PARAMETER_NAMES, cutoff=0.8)  # a near miss only: there are many names
    if other is not None:
        return (
            f"{place}: {method.name} has no parameter {name!r} (a misspelling of {other!r}? {method.name} does not "
            f"use that either); {IGNORED}"
        )
    names = ", ".join(sorted(known)) or "none"
    return f"{place}: {method.name} has no parameter {name!r} (known: {names}); {IGNORED}"
