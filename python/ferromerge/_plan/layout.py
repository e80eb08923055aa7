"""The output's tensors, and for each one which tensor of which model feeds it (no parameters, no dtypes).

``models:`` configs: the output has the reference model's tensors (base, else the first model), in its file
order, each fed by the same name in every model.

``slices:`` configs (mergekit's planning): output layers are the slices' layers concatenated in order and
renumbered from 0; output layer j of a slice is fed by layer ``start + k`` of each of its sources. Non-layer
tensors are planned as mergekit plans its "pre" and "post" weights: input embeddings (``embed_tokens``, ``wte``,
``word_embeddings``, ...) from the first slice's sources, everything else (final norm, lm_head) from the last
slice's sources. Non-layer tensors use ``t = 0`` (a gradient's first value), layers ``t = k / (n − 1)``.

When slices change a stack's layer count, the layout names the config.json keys that hold it (every layer-count key
of the reference's config that holds the old count; under ``modules:``, the module's key) and, for each output
layer, the model and layer it is taken from (the slice template's), so that per-layer lists in config.json
(``layer_types``, ...) can follow the slices (``output_files.config_updates``).

Tied embeddings (mergekit's ``lm_head`` with ``tied_names``): when no feeding model has ``lm_head.weight``, the
output has none (it stays tied). When only some have it, the others feed it from their input embedding, and the
output gets an explicit lm_head (``Layout.untied_head``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

from ..config.resolve import InputModel, MergeConfig, OutputSlice
from ..config.settings import layer_t
from ..errors import InputError
from ..io.dtypes import COPIED_DTYPES
from ..models import layers
from ..models.architecture import HEAD_WEIGHT, INPUT_EMBEDDING_WEIGHT, LAYER_COUNT_KEYS, PRE_LAYER_TENSOR
from ..models.index import ModelIndex
from . import modules


@dataclass(frozen=True)
class Job:
    """One output tensor: its name, ``t``, the slice whose parameters apply, and each source's tensor name."""

    out: str
    t: float
    slice: OutputSlice
    #: model reference -> the name of the tensor it contributes, as the config's filters see it
    names: Mapping[str, str]
    #: the model whose tensor defines shape and (without dtype/out_dtype) the output dtype
    template: str
    #: where it comes from, for messages (``slices[1]``, layer 3 of the slice)
    origin: str


#: per output layer of a sliced stack: the model it is taken from and its layer index there
LayerSources = tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Layout:
    jobs: tuple[Job, ...]
    #: the output's layer count when slices changed it (else None)
    num_layers: int | None
    #: the output has lm_head although some feeding model has it tied (or the reference lacks it)
    untied_head: bool
    #: config.json keys (dotted into sub-configs) that hold the layer count of a sliced stack -> its output layers'
    #: sources (their number is the new count)
    config_layers: Mapping[str, LayerSources] = field(default_factory=dict)
    #: the sliced stack's output layers' sources (set by ``_sliced``, for the caller to name its config keys)
    sources: LayerSources = ()
    #: things the user should know about the layout (a layer count no config.json key could be found for)
    remarks: tuple[str, ...] = ()


def is_head(name: str) -> bool:
    return HEAD_WEIGHT.search(name) is not None


def is_copied(model: ModelIndex, name: str) -> bool:
    """A non-float tensor of ``model`` (int64 ``position_ids``, bool masks, ...): copied from one model, never
    merged, so other models may lack it (``_plan.build``)."""
    info = model.tensors.get(name)
    return info is not None and info.dtype in COPIED_DTYPES


def _add_copied(names: list[str], sources: list[tuple[ModelIndex, list[str]]]) -> list[str]:
    """``names`` and, after them, the non-float tensors among each source's ``candidates`` that it lacks."""
    out = list(names)
    for model, candidates in sources:
        out += [n for n in candidates if n not in out and is_copied(model, n)]
    return out


def tied_embedding(model: ModelIndex) -> str | None:
    """The input embedding a model without lm_head ties its head to (None when it has no single one)."""
    found = [n for n in model.tensors if INPUT_EMBEDDING_WEIGHT.search(n) and layers.parse(n) is None]
    return found[0] if len(found) == 1 else None


def tensor_of(model: ModelIndex, name: str) -> str | None:
    """The tensor of ``model`` that feeds ``name``: itself, or for a missing lm_head the tied embedding."""
    if name in model.tensors:
        return name
    if is_head(name):
        return tied_embedding(model)
    return None


def build_layout(config: MergeConfig, models: Mapping[str, ModelIndex]) -> Layout:
    """Every output tensor of ``config`` over the indexed ``models``; ``InputError`` for tensors that do not line up."""
    if config.modules:
        return _modular(config, models)
    stacks = {ref: layers.layer_stacks(models[ref]) for ref in config.model_refs()}
    if not config.sliced:
        return _whole_models(config, models, stacks)
    part = _sliced(config, models, stacks)
    reference = models[config.reference]
    out_config = layers.read_model_config(reference)
    declared = layers.declared_layers(out_config)
    if declared is None:
        remark = None if out_config is None else (
            f"{reference.path / 'config.json'} has no layer count ({', '.join(LAYER_COUNT_KEYS)}); the output has "
            f"{part.num_layers} layers"
        )
        return dataclasses.replace(part, remarks=(remark,) if remark else ())
    assert out_config is not None
    # every key that holds the count (configs may carry aliases, n_layer beside num_hidden_layers)
    keys = [k for k in LAYER_COUNT_KEYS if out_config.get(k) == declared[1] and not isinstance(out_config[k], bool)]
    return dataclasses.replace(part, config_layers={k: part.sources for k in keys})


def _modular(config: MergeConfig, models: Mapping[str, ModelIndex]) -> Layout:
    """``modules:``: each module laid out on its own over its tensors (``modules``), in config order."""
    views = modules.module_views(config, models)
    out_config = layers.read_model_config(models[config.reference])
    jobs: list[Job] = []
    untied = False
    counts: dict[str, LayerSources] = {}
    remarks: list[str] = []
    for module in config.modules:
        sub = modules.sub_config(config, module)
        mine = views[module.name]
        stacks = {ref: layers.layer_stacks(mine[ref], check_declared=False) for ref in sub.model_refs()}
        part = _sliced(sub, mine, stacks) if module.sliced else _whole_models(sub, mine, stacks)
        jobs += part.jobs
        untied = untied or part.untied_head
        if not part.sources:
            continue
        # the output's config.json is the reference's: its count for this module is under some key
        before = layers.layer_stacks(mine[config.reference], check_declared=False) if config.reference in mine else {}
        key = modules.layer_key(out_config, module.name, next(iter(before.values()))) if len(before) == 1 else None
        if key is None:
            remarks.append(
                f"{module.where}: the output has {part.num_layers} layers in this module, but no config.json key of "
                f"{config.reference!r} could be told to hold its layer count; set it by hand"
            )
        else:
            counts[key] = part.sources
    return Layout(tuple(jobs), None, untied, counts, remarks=tuple(remarks))


def _whole_models(
    config: MergeConfig, models: Mapping[str, ModelIndex], stacks: Mapping[str, dict[str, int]]
) -> Layout:
    (s,) = config.slices
    reference = models[config.reference]
    if not reference.tensors:
        raise InputError(f"model {reference.ref!r} ({reference.path}) has no tensors")
    for model in [models[m.ref] for m in s.sources() if m.ref != reference.ref]:
        _check_no_extra(reference, model)
    names = _add_copied(list(reference.tensors), [(models[m.ref], list(models[m.ref].tensors)) for m in s.sources()])
    heads = {n for m in s.sources() for n in models[m.ref].tensors if is_head(n)}
    names += sorted(heads - set(names))
    jobs = []
    untied = False
    for name in names:
        layer = layers.parse(name)
        t = layer_t(layer.index, stacks[reference.ref][layer.stack]) if layer is not None else 0.0
        if is_head(name) and any(name not in models[m.ref].tensors for m in s.sources()):
            untied = True
        template = reference.ref if name in reference.tensors else next(
            m.ref for m in s.sources() if name in models[m.ref].tensors
        )
        jobs.append(Job(name, t, s, {m.ref: name for m in s.sources()}, template, "models"))
    return Layout(tuple(jobs), None, untied)


def _check_no_extra(reference: ModelIndex, model: ModelIndex) -> None:
    extra = [n for n in model.tensors if n not in reference.tensors and not is_head(n) and not is_copied(model, n)]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise InputError(
            f"{model.tensors[extra[0]].file}: tensor {extra[0]}{more} of model {model.ref!r} is not in "
            f"{reference.ref!r} ({reference.path}), which defines the output's tensors; ferromerge does not drop "
            "tensors silently"
        )


def _single_stack(model: ModelIndex, counts: dict[str, int], where: str) -> tuple[str, int]:
    if len(counts) != 1:
        found = ", ".join(f"{k} ({n} layers)" for k, n in counts.items()) or "no layer tensors"
        raise InputError(
            f"{where}: model {model.ref!r} ({model.path}) has {found}; slices need a model with one stack of "
            "layers (for a multi-module model, give each module its slices under modules:)"
        )
    ((stack, n),) = counts.items()
    return stack, n


def _sliced(config: MergeConfig, models: Mapping[str, ModelIndex], stacks: Mapping[str, dict[str, int]]) -> Layout:
    # {ref: {layer index: [names in file order]}}
    by_layer: dict[str, dict[int, list[str]]] = {}
    stack_of: dict[str, str] = {}
    for s in config.slices:
        for src in s.sources():
            model = models[src.ref]
            stack, n = _single_stack(model, stacks[src.ref], src.where)
            assert src.layer_range is not None
            start, end = src.layer_range
            if end > n:
                raise InputError(
                    f"{src.where}.layer_range: [{start}, {end}] is out of bounds for model {src.ref!r} "
                    f"({model.path}), which has {n} layers ({stack}.0 to {stack}.{n - 1})"
                )
            if src.ref not in by_layer:
                stack_of[src.ref] = stack
                table: dict[int, list[str]] = {}
                for name in model.tensors:
                    layer = layers.parse(name)
                    if layer is not None:
                        table.setdefault(layer.index, []).append(name)
                by_layer[src.ref] = table

    first, last = config.slices[0], config.slices[-1]
    out_stack = stack_of[first.template().ref]
    pre = _non_layer(first, models, pre=True)
    post = _non_layer(last, models, pre=False)
    untied = False
    jobs: list[Job] = []
    for name in pre:
        jobs.append(_non_layer_job(name, first, models))
    j = 0
    sources: list[tuple[str, int]] = []
    for s in config.slices:
        template = s.template()
        assert template.layer_range is not None
        n = template.layer_range[1] - template.layer_range[0]
        for k in range(n):
            sources.append((template.ref, template.layer_range[0] + k))
            rests = _rests(template, k, by_layer, stack_of)
            for src in s.sources():
                if src is not template:
                    _check_same_layer(src, template, k, rests, by_layer, stack_of, models)
            for src in s.sources():  # non-float tensors the template's layer lacks
                rests += [r for r in _rests(src, k, by_layer, stack_of)
                          if r not in rests and is_copied(models[src.ref], _layer_name(src, k, r, stack_of))]
            for rest in rests:
                names = {src.ref: _layer_name(src, k, rest, stack_of) for src in s.sources()}
                origin = f"{s.where}, layer {k} of the slice"
                holder = next(m.ref for m in [template, *s.sources()] if names[m.ref] in models[m.ref].tensors)
                jobs.append(Job(f"{out_stack}.{j}.{rest}", layer_t(k, n), s, names, holder, origin))
            j += 1
    for name in post:
        job = _non_layer_job(name, last, models)
        if is_head(name) and any(name not in models[m.ref].tensors for m in last.sources()):
            untied = True
        jobs.append(job)
    return Layout(tuple(jobs), j, untied, sources=tuple(sources))


def _non_layer(s: OutputSlice, models: Mapping[str, ModelIndex], *, pre: bool) -> list[str]:
    """The slice template's non-layer tensors of one side (pre: embeddings; post: the rest), checking that the
    slice's other sources have no such tensor the template lacks (nothing is dropped silently)."""
    template = models[s.template().ref]

    def side(model: ModelIndex) -> list[str]:
        return [
            n for n in model.tensors if layers.parse(n) is None and (PRE_LAYER_TENSOR.search(n) is not None) == pre
        ]

    names = _add_copied(side(template), [(models[m.ref], side(models[m.ref])) for m in s.sources()])
    if not pre:
        heads = {n for m in s.sources() for n in side(models[m.ref]) if is_head(n)}
        names += sorted(heads - set(names))
    for src in s.sources():
        extra = [n for n in side(models[src.ref]) if n not in names]
        if extra:
            model = models[src.ref]
            raise InputError(
                f"{model.tensors[extra[0]].file}: tensor {extra[0]} of model {src.ref!r} ({src.where}) is not in "
                f"{template.ref!r} ({template.path}), whose non-layer tensors the output takes; ferromerge does not "
                "drop tensors silently"
            )
    return names


def _non_layer_job(name: str, s: OutputSlice, models: Mapping[str, ModelIndex]) -> Job:
    template = s.template().ref
    if name not in models[template].tensors:
        template = next(m.ref for m in s.sources() if name in models[m.ref].tensors)
    return Job(name, 0.0, s, {m.ref: name for m in s.sources()}, template, s.where)


def _layer_name(src: InputModel, k: int, rest: str, stack_of: Mapping[str, str]) -> str:
    assert src.layer_range is not None
    return f"{stack_of[src.ref]}.{src.layer_range[0] + k}.{rest}"


def _rests(
    src: InputModel, k: int, by_layer: Mapping[str, dict[int, list[str]]], stack_of: Mapping[str, str]
) -> list[str]:
    assert src.layer_range is not None
    prefix = f"{stack_of[src.ref]}.{src.layer_range[0] + k}."
    return [n[len(prefix) :] for n in by_layer[src.ref][src.layer_range[0] + k]]


def _check_same_layer(
    src: InputModel,
    template: InputModel,
    k: int,
    rests: list[str],
    by_layer: Mapping[str, dict[int, list[str]]],
    stack_of: Mapping[str, str],
    models: Mapping[str, ModelIndex],
) -> None:
    mine = _rests(src, k, by_layer, stack_of)
    model = models[src.ref]
    tmpl = models[template.ref]
    # non-float tensors may be missing anywhere (_plan.build copies them from a model that has them)
    missing = [r for r in rests if r not in mine and not is_copied(tmpl, _layer_name(template, k, r, stack_of))]
    extra = [r for r in mine if r not in rests and not is_copied(model, _layer_name(src, k, r, stack_of))]
    if missing or extra:
        if missing:
            raise InputError(
                f"model {src.ref!r} ({model.path}, {src.where}) has no tensor "
                f"{_layer_name(src, k, missing[0], stack_of)}, which {template.ref!r} ({tmpl.path}) has as "
                f"{_layer_name(template, k, missing[0], stack_of)}"
            )
        name = _layer_name(src, k, extra[0], stack_of)
        raise InputError(
            f"{model.tensors[name].file}: tensor {name} of model {src.ref!r} ({src.where}) has no counterpart in "
            f"layer {template.layer_range[0] + k if template.layer_range else k} of {template.ref!r} ({tmpl.path}); "
            "ferromerge does not drop tensors silently"
        )
