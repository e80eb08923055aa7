"""``modules:`` configs: which tensors belong to which module of a multi-module model, and the module-wise layout.

mergekit 0.1.5 lists each module's tensors in per-architecture JSON tables (a ``weight_prefix`` plus names).
ferromerge finds them from the tensor names alone: a module claims the tensors in which one of its *markers*
appears as whole dotted components, anywhere in the name. A module's markers are its own name and, for the
module names mergekit's architectures use, the containers transformers models put them in:

* ``vision_tower`` / ``vision_model``: ``vision_tower``, ``vision_model``, ``visual``
* ``multi_modal_projector``: ``multi_modal_projector``, ``mm_projector``, ``visual.merger``,
  ``visual.deepstack_merger_list``
* ``text_decoder`` / ``language_model``: ``language_model``

The longest marker wins (``model.visual.merger.mlp.0.weight`` is the projector's, not the vision tower's), then
the one nearest the start of the name. Tensors that no marker names (Qwen2-VL's ``model.layers.*`` and
``lm_head``) belong to the text decoder: the module called ``text_decoder``, ``language_model``, ``decoder`` or
``default`` in the config, or its only module whose markers name no tensor. Every tensor of the reference model
must land in a module of the config: mergekit leaves the tensors of modules a config does not list out of the
output (a model that no longer loads); ferromerge reports them.

Each module is then laid out on its own like a ``models:`` or ``slices:`` config (``layout``) over the module's
tensors, so each has its own layer stack and layer count, and a sliced module's new layer count is written under
the config.json key that held its old one (``text_config.num_hidden_layers``, ``vision_config.depth``, ...).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping

from ..config.resolve import MergeConfig, OutputModule
from ..errors import ConfigError, InputError
from ..models.architecture import (
    KNOWN_MARKERS,
    MODULE_COUNT_KEY_HINTS,
    MODULE_LAYER_COUNT_KEYS,
    REMAINDER_NAMES,
    SUBCONFIG_HINTS,
)
from ..models.index import ModelIndex


def markers(name: str) -> tuple[str, ...]:
    """The dotted markers of module ``name``: its own name first, then the known containers."""
    return tuple(dict.fromkeys((name, *KNOWN_MARKERS.get(name, ()))))


def _match(tensor: str, marker: str) -> int | None:
    """Position (component index) of ``marker`` as whole components of ``tensor``, None when absent."""
    parts, mark = tensor.split("."), marker.split(".")
    for i in range(len(parts) - len(mark) + 1):
        if parts[i : i + len(mark)] == mark:
            return i
    return None


def _claim(tensor: str, names: Iterable[str]) -> str | None:
    """The module among ``names`` (config modules first, then known ones) whose marker names ``tensor`` best."""
    best: tuple[int, int, int, str] | None = None
    for order, name in enumerate(names):
        for marker in markers(name):
            pos = _match(tensor, marker)
            if pos is None:
                continue
            # equal markers (aliases such as text_decoder / language_model): the earlier name, a config module
            key = (-len(marker.split(".")), pos, order, name)
            if best is None or key < best:
                best = key
    return None if best is None else best[3]


def assign(tensors: Iterable[str], config_modules: list[str]) -> dict[str, str | None]:
    """``{tensor: module}`` for every tensor; a module the config does not list is named too (so that a tensor
    is never silently given to the wrong module), None when no module claims it."""
    names = list(dict.fromkeys([*config_modules, *KNOWN_MARKERS]))
    claimed = {t: _claim(t, names) for t in tensors}
    remainder = [m for m in config_modules if m in REMAINDER_NAMES]
    if not remainder:
        idle = [m for m in config_modules if m not in claimed.values()]
        remainder = idle if len(idle) == 1 else []
    if len(remainder) == 1:
        claimed = {t: remainder[0] if m is None else m for t, m in claimed.items()}
    return claimed


def _view(model: ModelIndex, names: set[str]) -> ModelIndex:
    """The model restricted to ``names`` (same files: nothing is read or copied)."""
    return dataclasses.replace(model, tensors={n: i for n, i in model.tensors.items() if n in names})


def module_views(config: MergeConfig, models: Mapping[str, ModelIndex]) -> dict[str, dict[str, ModelIndex]]:
    """``{module: {ref: model restricted to the module's tensors}}``; ``InputError`` for a tensor outside every
    module of the config, ``ConfigError`` for a module that has no tensor."""
    names = [m.name for m in config.modules]
    views: dict[str, dict[str, ModelIndex]] = {n: {} for n in names}
    for ref in config.model_refs():
        model = models[ref]
        owner = assign(model.tensors, names)
        stray = [t for t, m in owner.items() if m not in names]
        if stray and any(ref in {s.ref for sl in m.slices for s in sl.sources()} for m in config.modules):
            t = stray[0]
            what = f"module {owner[t]!r}" if owner[t] is not None else "no module (no module name or container in it)"
            raise InputError(
                f"{model.tensors[t].file}: tensor {t} of model {ref!r} belongs to {what}, which the config's "
                f"modules ({', '.join(names)}) do not list{f' (and {len(stray) - 1} more tensors)' if len(stray) > 1 else ''}; "
                "mergekit would leave it out of the output; list its module (e.g. with models: [base] to keep it)"
            )
        for module in config.modules:
            mine = {t for t, m in owner.items() if m == module.name}
            views[module.name][ref] = _view(model, mine)
    for module in config.modules:
        template = module.slices[0].template().ref
        if not views[module.name][template].tensors:
            raise ConfigError(
                f"{module.where}: model {template!r} has no tensor of module {module.name!r} (looked for names "
                f"containing {', '.join(markers(module.name))} as dotted components)"
            )
    return views


def sub_config(config: MergeConfig, module: OutputModule) -> MergeConfig:
    """The config of one module as a ``models:`` / ``slices:`` config over its slices (for ``layout``)."""
    refs = {m.ref for s in module.slices for m in s.sources()}
    reference = config.reference if config.reference in refs else module.slices[0].template().ref
    return dataclasses.replace(
        config, slices=module.slices, sliced=module.sliced, modules=(), reference=reference
    )


def layer_key(config: Mapping[str, object] | None, module: str, count: int) -> str | None:
    """The config.json key (dotted into sub-configs) holding ``module``'s layer count ``count``: the one key with
    that value, or among several the one the module name hints at (T5's ``decoder``: ``num_decoder_layers``), else
    the one in the sub-config the module name hints at; None when unclear."""
    if config is None:
        return None
    found: list[str] = []
    scopes: list[tuple[str, Mapping[str, object]]] = [("", config)]
    scopes += [(f"{k}.", v) for k, v in config.items() if isinstance(v, Mapping)]
    for prefix, scope in scopes:
        for key in MODULE_LAYER_COUNT_KEYS:
            value = scope.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value == count:
                found.append(prefix + key)
    if len(found) > 1:
        named = [k for word, keys in MODULE_COUNT_KEY_HINTS.items() if word in module for k in keys]
        found = [k for k in found if k.rpartition(".")[2] in named] or found
    if len(found) > 1:
        hinted = [sub for word, sub in SUBCONFIG_HINTS.items() if word in module]
        found = [k for k in found if hinted and k.startswith(hinted[0] + ".")] or [
            k for k in found if "." not in k and not hinted
        ]
    return found[0] if len(found) == 1 else None

