"""Parse and validate a mergekit YAML merge config (the subset this release merges) into a ``MergeConfig``.

The config may be a path, a YAML string or a mapping. Every key is checked before any model is opened:
a key ferromerge does not know is an error naming its place (``models[1].parameters.densty``), and mergekit
features that a later ferromerge release will merge (``slices``, ``tokenizer``, parameter filters and
gradients, ...) are "not supported yet" errors, so that no part of a config is ever silently ignored.

Parameter precedence is mergekit's, restricted to what this release accepts: a model's own ``parameters``,
then the top-level ``parameters``, then the method's default.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from . import methods
from .errors import ConfigError
from .methods import MethodSpec

#: Output/compute dtype names, as mergekit spells them.
DTYPES = ("float32", "float16", "bfloat16")

#: Short names people write that mergekit does not accept (``dtype_from_name`` only strips a ``torch.`` prefix);
#: accepting them would make configs that mergekit then rejects, so they get a "did you mean" error instead.
_DTYPE_ALIASES = {"fp32": "float32", "float": "float32", "fp16": "float16", "half": "float16", "bf16": "bfloat16"}

#: mergekit keys that a later ferromerge release will support.
_NOT_YET = {
    "slices": "slices (layer ranges, frankenmerges) are not supported yet; list whole models under models:",
    "modules": "modules (multi-module architectures) are not supported yet; list whole models under models:",
    "tokenizer_source": "tokenizer_source (vocabulary alignment) is not supported yet; "
    "the tokenizer is copied from the base (or first) model",
    "tokenizer": "tokenizer (vocabulary alignment) is not supported yet; "
    "the tokenizer is copied from the base (or first) model",
    "chat_template": "chat_template is not supported yet; the tokenizer files of the base (or first) model are copied",
}

#: mergekit methods that ferromerge does not implement yet (for a clearer message than "unknown").
_MERGEKIT_METHODS = (
    "slerp",
    "nuslerp",
    "multislerp",
    "karcher",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
    "sce",
    "ram",
    "ramplus_tl",
    "model_stock",
    "nearswap",
    "arcee_fusion",
    "passthrough",
)


class ModelEntry(BaseModel):
    """One item of ``models:``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    parameters: dict[str, Any] | None = None


class RawConfig(BaseModel):
    """The config as written, keys and types checked (values are resolved into ``MergeConfig``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    merge_method: str
    models: list[ModelEntry]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    #: mergekit-multi's document name; accepted so such documents load, no effect on a single merge.
    name: str | None = None


@dataclass(frozen=True)
class InputModel:
    """A model whose tensors are combined (for GTA methods: a non-base model), with its resolved parameters."""

    ref: str
    #: where it is in the config, for messages: ``models[2]`` or ``base_model``
    where: str
    weight: float
    density: float
    #: position among the non-base models in config order (keys the DARE random stream)
    model_id: int


@dataclass(frozen=True)
class MergeConfig:
    """A validated config with every parameter resolved."""

    raw: RawConfig
    method: MethodSpec
    #: method-wide parameters, defaults filled in (``normalize``, ``lambda``, ...)
    shared: dict[str, Any]
    #: the base model when the method takes one as the reference of task vectors, else None (``linear``)
    base: str | None
    #: the model that defines the output's tensors and donates config.json and tokenizer: base_model or models[0]
    reference: str
    inputs: tuple[InputModel, ...]
    #: mergekit's ``dtype``: inputs are rounded to it before the math
    dtype: str | None
    out_dtype: str | None
    #: the config text as given (YAML), saved with the output as mergekit_config.yml
    text: str
    #: remarks about accepted keys that have no effect, for the user
    notes: tuple[str, ...]

    def model_refs(self) -> list[str]:
        """Every model the merge reads, reference first, each once."""
        refs = [self.reference]
        refs += [m.ref for m in self.inputs if m.ref not in refs]
        return refs

    def resolved(self) -> dict[str, Any]:
        """The effective merge, as plain data (saved as ferromerge_config.yml beside the output)."""
        out: dict[str, Any] = {"merge_method": self.method.name}
        if self.base is not None:
            out["base_model"] = self.base
        out["models"] = [{"model": m.ref, "parameters": _model_params(self.method, m)} for m in self.inputs]
        out["parameters"] = dict(self.shared)
        if self.dtype:
            out["dtype"] = self.dtype
        if self.out_dtype:
            out["out_dtype"] = self.out_dtype
        return out


def _model_params(method: MethodSpec, model: InputModel) -> dict[str, float]:
    params = {"weight": model.weight}
    if "density" in method.per_model:
        params["density"] = model.density
    return params


def load_config(source: str | os.PathLike[str] | Mapping[str, Any]) -> MergeConfig:
    """Read and validate a config from a path, a YAML string or a mapping.

    A ``str`` naming an existing file is read as a path; a ``str`` containing a newline or a ``:`` is YAML text;
    any other ``str`` is taken as a path that does not exist. Raises ``ConfigError`` (syntax, keys, values) or
    ``ParameterError`` (unknown method).
    """
    data, text, origin = _read(source)
    return parse_config(data, text=text, origin=origin)


def _read(source: str | os.PathLike[str] | Mapping[str, Any]) -> tuple[Any, str | None, str]:
    if isinstance(source, Mapping):
        return dict(source), None, "config"
    if isinstance(source, str) and not os.path.isfile(source) and ("\n" in source or ":" in source):
        return _parse_yaml(source, "config"), source, "config"
    path = Path(source)
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
            f"{origin}: {len(docs)} YAML documents (mergekit-multi) are not supported yet; give one merge per file"
        )
    if not docs:
        raise ConfigError(f"{origin}: the config is empty")
    return docs[0]


def parse_config(data: Any, *, text: str | None = None, origin: str = "config") -> MergeConfig:
    """Validate already-parsed config data (``origin`` names it in messages)."""
    if not isinstance(data, Mapping):
        raise ConfigError(
            f"{origin}: expected a mapping of keys (merge_method, models, ...), got {type(data).__name__}"
        )
    for key in data:
        if key in _NOT_YET:
            raise ConfigError(f"{origin}: {key}: {_NOT_YET[key]}")
        if key not in RawConfig.model_fields:
            known = ", ".join(sorted(RawConfig.model_fields))
            raise ConfigError(f"{origin}: {key}: unknown key; known: {known}")
    if "merge_method" not in data:
        raise ConfigError(f"{origin}: merge_method: missing (e.g. merge_method: ties)")
    if not data.get("models"):
        raise ConfigError(f"{origin}: models: missing or empty; list the models to merge")
    try:
        raw = RawConfig.model_validate(dict(data))
    except ValidationError as e:
        raise ConfigError(f"{origin}: {_pydantic_message(e)}") from None

    method = _method(raw.merge_method)
    dtype = _dtype(raw.dtype, "dtype")
    out_dtype = _dtype(raw.out_dtype, "out_dtype")
    top = _check_names(method, raw.parameters or {}, "parameters", per_model_level=False)
    notes: list[str] = []

    refs: list[str] = []
    for i, entry in enumerate(raw.models):
        ref = _ref(entry.model, f"models[{i}].model")
        if ref in refs:
            raise ConfigError(f"models[{i}].model: {ref!r} is listed twice (also models[{refs.index(ref)}])")
        refs.append(ref)
    base_ref = _ref(raw.base_model, "base_model") if raw.base_model is not None else None

    inputs: list[InputModel] = []
    for i, entry in enumerate(raw.models):
        where = f"models[{i}]"
        given = _check_names(method, entry.parameters or {}, f"{where}.parameters", per_model_level=True)
        if method.requires_base and refs[i] == base_ref:
            if given:
                notes.append(
                    f"{where}.parameters ({', '.join(given)}) of the base model have no effect with "
                    f"{method.name}: the base is the reference the task vectors are taken from"
                )
            continue
        inputs.append(_input(method, refs[i], where, given, top, model_id=len(inputs)))

    if method.requires_base:
        if base_ref is None:
            raise ConfigError(f"base_model: {method.name} needs a base model (the reference of the task vectors)")
        if not inputs:
            raise ConfigError(f"models: {method.name} needs at least one model besides the base model {base_ref!r}")
    elif base_ref is not None and base_ref not in refs:
        # mergekit appends a base_model that models: does not list as one more input of a linear merge.
        inputs.append(_input(method, base_ref, "base_model", {}, top, model_id=len(inputs)))

    shared = methods.resolve_shared(method, {k: v for k, v in top.items() if k in method.shared})
    return MergeConfig(
        raw=raw,
        method=method,
        shared=shared,
        base=base_ref if method.requires_base else None,
        reference=base_ref if base_ref is not None else refs[0],
        inputs=tuple(inputs),
        dtype=dtype,
        out_dtype=out_dtype,
        text=text if text is not None else yaml.safe_dump(raw.model_dump(exclude_none=True), sort_keys=False),
        notes=tuple(notes),
    )


def _pydantic_message(e: ValidationError) -> str:
    """The first validation error as ``place: problem`` in config notation (``models[1].layer_range``)."""
    err = e.errors()[0]
    place = ""
    for part in err["loc"]:
        place += f"[{part}]" if isinstance(part, int) else (f".{part}" if place else str(part))
    if err["type"] == "extra_forbidden":
        return f"{place}: unknown key; known: model, parameters"
    if err["type"] == "missing":
        return f"{place}: missing"
    return f"{place}: {err['msg'].lower()}, got {err['input']!r}"


def _method(name: str) -> MethodSpec:
    if name in _MERGEKIT_METHODS:
        raise ConfigError(
            f"merge_method: {name!r} is a mergekit method ferromerge does not support yet; "
            f"supported: {', '.join(sorted(methods.REGISTRY))}"
        )
    return methods.get(name)


def _dtype(value: str | None, where: str) -> str | None:
    if value is None:
        return None
    name = value.removeprefix("torch.")
    if name in DTYPES:
        return name
    if name in _DTYPE_ALIASES:
        raise ConfigError(f"{where}: {value!r} is not a dtype name mergekit accepts; write {_DTYPE_ALIASES[name]}")
    raise ConfigError(f"{where}: unsupported dtype {value!r}; use one of {', '.join(DTYPES)}")


def _ref(value: str, where: str) -> str:
    if not value.strip():
        raise ConfigError(f"{where}: empty model reference")
    if "+" in value:
        raise ConfigError(f"{where}: {value!r}: model+LoRA references are not supported yet; merge the LoRA first")
    return value


def _check_names(method: MethodSpec, params: dict[str, Any], where: str, *, per_model_level: bool) -> dict[str, Any]:
    """Reject unknown or misplaced parameter names and unwrap values; returns ``{name: scalar}``."""
    out: dict[str, Any] = {}
    for name, value in params.items():
        place = f"{where}.{name}"
        if per_model_level and name in method.shared:
            # mergekit reads method-wide parameters only from the slice/module/top level: here it is ignored.
            raise ConfigError(
                f"{place}: {name!r} applies to the whole merge, not to one model; set it under the top-level parameters"
            )
        known = method.per_model if per_model_level else {**method.per_model, **method.shared}
        if name not in known:
            raise ConfigError(f"{place}: unknown parameter for method {method.name}; known: {', '.join(sorted(known))}")
        scalar = _scalar(value, place)
        if scalar is not None:
            out[name] = scalar
    return out


def _scalar(value: Any, place: str) -> Any:
    """A plain parameter value; an unfiltered ``{value: x}`` is the same as ``x``."""
    if isinstance(value, Mapping):
        if "value" not in value or not set(value) <= {"filter", "value"}:
            raise ConfigError(f"{place}: expected a value or {{filter, value}}, got {dict(value)!r}")
        if value.get("filter") not in (None, "*"):
            raise ConfigError(f"{place}: parameter filters (filter: {value['filter']!r}) are not supported yet")
        return _scalar(value["value"], place)
    if isinstance(value, list):
        if any(isinstance(v, Mapping) for v in value):
            raise ConfigError(f"{place}: per-tensor parameter filters ([{{filter, value}}, ...]) are not supported yet")
        raise ConfigError(f"{place}: gradients (a list of values across layers) are not supported yet")
    return value


def _input(
    method: MethodSpec, ref: str, where: str, given: dict[str, Any], top: dict[str, Any], *, model_id: int
) -> InputModel:
    values: dict[str, Any] = {}
    for name, spec in method.per_model.items():
        if name in given:
            values[name] = methods.coerce(spec, name, given[name], f"{where}.parameters.{name}")
        elif name in top:
            values[name] = methods.coerce(spec, name, top[name], f"parameters.{name}")
        elif spec.default is None:
            raise ConfigError(
                f"Missing required parameter {name} for {ref} ({where}); "
                f"set it in its parameters or in the top-level parameters"
            )
        else:
            values[name] = spec.default
    return InputModel(
        ref=ref, where=where, weight=values["weight"], density=values.get("density", 1.0), model_id=model_id
    )
