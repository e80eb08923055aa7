"""The mergekit YAML as written: pydantic models of its keys and types (values are resolved in ``resolve``)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, ValidationError

from ..tokenizer.config import TokenizerSettings


class ModelEntry(BaseModel):
    """One item of ``models:``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    parameters: dict[str, Any] | None = None


class SourceEntry(BaseModel):
    """One item of ``slices[].sources``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str
    layer_range: tuple[int, int]
    parameters: dict[str, Any] | None = None


class SliceEntry(BaseModel):
    """One item of ``slices:``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    sources: list[SourceEntry]
    base_model: str | None = None
    #: accepted like mergekit, which parses it and never uses it
    residual_weight: float | None = None
    parameters: dict[str, Any] | None = None


class ModuleEntry(BaseModel):
    """One item of ``modules:`` (multi-module models: a text decoder, a vision tower, a projector, ...)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    models: list[ModelEntry] | None = None
    slices: list[SliceEntry] | None = None
    parameters: dict[str, Any] | None = None


class RawConfig(BaseModel):
    """The config as written, keys and types checked (values are resolved into ``MergeConfig``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    merge_method: str
    models: list[ModelEntry] | None = None
    slices: list[SliceEntry] | None = None
    modules: dict[str, ModuleEntry] | None = None
    base_model: str | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = None
    out_dtype: str | None = None
    tokenizer_source: str | None = None
    tokenizer: TokenizerSettings | None = None
    #: "auto", a built-in template name or a literal Jinja template (``tokenizer.chat_template``)
    chat_template: str | None = None
    #: mergekit-multi's document name; accepted so such documents load, no effect on a single merge.
    name: str | None = None
    #: where SVD-heavy methods run: "cpu" (the Rust kernels), "cuda", "cuda:N" or "torch:cpu" (``torch_spectral``)
    device: str | None = None


def validation_message(e: ValidationError) -> str:
    """The first validation error as ``place: problem`` in config notation (``models[1].layer_range``)."""
    err = e.errors()[0]
    place = ""
    for part in err["loc"]:
        place += f"[{part}]" if isinstance(part, int) else (f".{part}" if place else str(part))
    if err["type"] == "extra_forbidden":
        # the unknown keys mergekit ignores are dropped before (``leniency``); what is left is in a malformed entry
        return f"{place}: unknown key"
    if err["type"] == "missing":
        return f"{place}: missing"
    return f"{place}: {err['msg'].lower()}, got {err['input']!r}"
