"""Build the merge plan (docs/architecture.md): every output tensor with its inputs, method, dtypes and shard.

Which output tensors exist and which model tensors feed them is ``layout``'s job; this module checks that those
tensors line up (float dtypes, equal shapes: mismatches are ``InputError``s naming the model, file and tensor,
raised before anything is written), resolves every parameter for every tensor (``config.settings``: filters see
the output name for method-wide parameters and each model's own tensor name for per-model ones), and cuts the
output into shards.

A non-float tensor (int64 ``position_ids``, bool masks, ...: an integer or bool dtype, ``io.dtypes.COPIED_DTYPES``) is never merged: it is
copied byte for byte (the engine's passthrough of one input in its own dtype) from the slice's base when it has
it, else from the first model (config order) that does; models without it are fine, and models holding other
values get a note, the copied model's value winning (docs/compat.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .. import methods
from .._validate import format_bytes, parse_size
from ..config import settings as params
from ..config.resolve import InputModel, MergeConfig, OutputSlice
from ..errors import ConfigError, InputError
from ..io.dtypes import COPIED_DTYPES, ITEMSIZE, MERGEABLE_DTYPES, ST_NAME
from ..models.architecture import is_vocab_tensor
from ..models.index import ModelIndex, TensorInfo, tensor_bytes
from ..tokenizer.embed import Aligner, PermutedTensor
from ..tokenizer.vocab import Vocabulary, build_vocabulary
from .layout import Job, LayerSources, Layout, build_layout, tensor_of

DEFAULT_SHARD_SIZE = "5B"


@dataclass(frozen=True)
class PlanSource:
    """A model's tensor: its file entry and its name in that file."""

    info: TensorInfo
    tensor: str


@dataclass(frozen=True)
class PlanInput:
    """One model's tensor entering an output tensor, with that model's parameters for it."""

    info: TensorInfo
    tensor: str
    weight: float
    density: float
    model_id: int
    #: breadcrumbs' and della's per-model parameters (None for methods without them: not in the plan JSON)
    gamma: float | None = None
    epsilon: float | None = None


@dataclass(frozen=True)
class PlanTensor:
    """One output tensor."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    #: the plan JSON's ``method`` object (method-wide parameters may differ per tensor)
    method: dict[str, Any]
    base: PlanSource | None
    inputs: tuple[PlanInput, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def float(self) -> bool:
        """Whether the tensor is merged (a float dtype), not copied (a non-float one: ``out_dtype`` is then the
        safetensors name of its one input's dtype, ``I64``, ``BOOL``, ...)."""
        return self.out_dtype in ST_NAME

    @property
    def bytes_out(self) -> int:
        return self.numel * ITEMSIZE[ST_NAME.get(self.out_dtype, self.out_dtype)]

    @property
    def bytes_in(self) -> int:
        infos = [i.info for i in self.inputs] + ([self.base.info] if self.base is not None else [])
        return sum(self.numel * ITEMSIZE[i.dtype] for i in infos)


@dataclass
class Shard:
    file: str
    tensors: list[PlanTensor] = field(default_factory=list)

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)


@dataclass(frozen=True)
class Plan:
    """Everything the engine needs; ``to_json`` is the input of ``_engine.execute``."""

    #: the method's name (as configured) and seed, for the summary
    method: dict[str, Any]
    cast_dtype: str | None
    shards: tuple[Shard, ...]
    models: tuple[ModelIndex, ...]
    #: the output's layer count when slices changed it, else None
    num_layers: int | None = None
    #: the output has an explicit lm_head that some input (or the reference's config) has tied
    untied_head: bool = False
    #: config.json keys (dotted into sub-configs) holding a sliced stack's layer count -> its output layers' sources
    config_layers: Mapping[str, LayerSources] = field(default_factory=dict)
    #: remarks of the layout for the user (``Layout.remarks``)
    remarks: tuple[str, ...] = ()
    #: the output vocabulary when the config aligns vocabularies (``tokenizer`` / ``tokenizer_source``)
    vocabulary: Vocabulary | None = None
    #: the vocabulary tensors' permuted sources, to write (``tokenizer.embed.write_permuted``) before the engine runs
    permuted: tuple[PermutedTensor, ...] = ()
    #: what the user should know, printed before the merge (how models were read, non-float tensors that differ)
    notes: tuple[str, ...] = ()
    #: NaN and infinite input values are merged as they are (``--allow-nonfinite``), not refused by the engine
    allow_nonfinite: bool = False

    @property
    def bytes_scratch(self) -> int:
        """Disk taken by the permuted sources while the merge runs."""
        return sum(p.bytes_out for p in self.permuted)

    @property
    def tensors(self) -> list[PlanTensor]:
        return [t for s in self.shards for t in s.tensors]

    @property
    def bytes_in(self) -> int:
        return sum(t.bytes_in for t in self.tensors)

    @property
    def bytes_out(self) -> int:
        return sum(s.bytes_out for s in self.shards)

    def weight_map(self) -> dict[str, str]:
        return {t.name: s.file for s in self.shards for t in s.tensors}

    def reads(self) -> set[tuple[Path, str]]:
        """Every (file, tensor) of the models that the run reads: the engine's inputs and the permuted
        vocabulary tensors' sources."""
        out = {(i.info.file, i.tensor) for t in self.tensors for i in t.inputs}
        out |= {(t.base.info.file, t.base.tensor) for t in self.tensors if t.base is not None}
        out |= {(m.info.file, m.tensor) for p in self.permuted for m in p.members}
        return out

    @property
    def float_dtype(self) -> str:
        """The output's float dtype (the first merged tensor's), for config.json."""
        return next((t.out_dtype for t in self.tensors if t.float), "float32")

    def to_json(self) -> str:
        def tensor(t: PlanTensor) -> dict[str, Any]:
            return {
                "name": t.name,
                "shape": list(t.shape),
                "out_dtype": t.out_dtype,
                "cast_dtype": self.cast_dtype if t.float else None,
                "method": t.method,
                "base": None if t.base is None else {"file": str(t.base.info.file), "tensor": t.base.tensor},
                "inputs": [_input_json(i) for i in t.inputs],
            }

        return json.dumps(
            {
                "metadata": {"format": "pt"},
                "chunk_elems": None,
                "shards": [{"file": s.file, "tensors": [tensor(t) for t in s.tensors]} for s in self.shards],
                **({"allow_nonfinite": True} if self.allow_nonfinite else {}),
            }
        )

    def summary(self) -> str:
        """A few human-readable lines: method, models, tensors, bytes in and out, shards."""
        lines = [f"method: {self.method['name']} (seed {self.method['seed']})"]
        lines += [f"model: {m.ref} -> {m.path} ({len(m.files)} file(s))" for m in self.models]
        layers = f" in {self.num_layers} layers" if self.num_layers is not None else ""
        lines.append(f"tensors: {len(self.tensors)}{layers}")
        reads, writes = format_bytes(self.bytes_in), format_bytes(self.bytes_out)
        lines.append(f"reads: {reads}, writes: {writes} in {len(self.shards)} shard(s)")
        return "\n".join(lines)


def _input_json(i: PlanInput) -> dict[str, Any]:
    out: dict[str, Any] = {
        "file": str(i.info.file),
        "tensor": i.tensor,
        "weight": i.weight,
        "density": i.density,
        "model_id": i.model_id,
    }
    if i.gamma is not None:
        out["gamma"] = i.gamma
    if i.epsilon is not None:
        out["epsilon"] = i.epsilon
    return out


def shard_names(count: int) -> list[str]:
    """transformers' names: ``model.safetensors`` alone, else ``model-00001-of-0000N.safetensors``."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i:05d}-of-{count:05d}.safetensors" for i in range(1, count + 1)]


def build_plan(
    config: MergeConfig,
    models: Mapping[str, ModelIndex],
    *,
    seed: int = 0,
    out_shard_size: str | int = DEFAULT_SHARD_SIZE,
    scratch: Path | None = None,
) -> Plan:
    """The plan of ``config`` over the indexed ``models`` (keyed by reference). ``scratch``: the directory where
    the run writes the vocabulary tensors' permuted sources (vocabulary alignment only; the plan's file names
    point there)."""
    max_shard = parse_size(out_shard_size)
    layout: Layout = build_layout(config, models)
    kernels: dict[tuple[Any, ...], dict[str, Any]] = {}
    vocabulary = build_vocabulary(config, models)
    aligner = None
    if vocabulary is not None:
        aligner = Aligner(vocabulary, scratch if scratch is not None else Path("vocab-scratch"), config.dtype)
    notes = [note for ref in config.model_refs() for note in models[ref].notes]
    planned = [_plan_tensor(config, models, job, seed, kernels, aligner, notes) for job in layout.jobs]

    groups: list[list[PlanTensor]] = [[]]
    size = 0
    for t in planned:
        # mergekit's rule: start a new shard when this tensor would push the current one past the limit.
        if groups[-1] and size + t.bytes_out > max_shard:
            groups.append([])
            size = 0
        groups[-1].append(t)
        size += t.bytes_out
    names = shard_names(len(groups))
    return Plan(
        method={"name": config.method.name, "seed": int(seed)},
        cast_dtype=config.dtype,
        shards=tuple(Shard(n, g) for n, g in zip(names, groups, strict=False)),
        models=tuple(models[r] for r in config.model_refs()),
        num_layers=layout.num_layers,
        untied_head=layout.untied_head,
        config_layers=dict(layout.config_layers),
        remarks=layout.remarks,
        vocabulary=vocabulary,
        permuted=tuple(aligner.tensors) if aligner is not None else (),
        notes=tuple(notes),
    )


def _source(
    models: Mapping[str, ModelIndex], job: Job, model: InputModel, template: PlanSource, aligned: bool = False
) -> PlanSource:
    """The tensor ``model`` contributes to ``job``, checked against the template's dtype and shape (``aligned``:
    a vocabulary tensor whose rows are laid out anew, checked by ``tokenizer.embed.Aligner``)."""
    index = models[model.ref]
    wanted = job.names[model.ref]
    name = tensor_of(index, wanted)
    if name is None:
        where = "" if job.origin == "models" else f" ({model.where}, {job.origin})"
        raise InputError(
            f"model {model.ref!r} ({index.path}) has no tensor {wanted}{where}, which {job.template!r} "
            f"({template.info.file}) has; every model must have every tensor"
        )
    info = index.tensors[name]
    _check_dtype(index, name, info)
    if info.shape != template.info.shape and not aligned:
        _shape_error(name, info, template)
    return PlanSource(info, name)


def _plan_tensor(
    config: MergeConfig,
    models: Mapping[str, ModelIndex],
    job: Job,
    seed: int,
    kernels: dict[tuple[Any, ...], dict[str, Any]],
    aligner: Aligner | None = None,
    notes: list[str] | None = None,
) -> PlanTensor:
    method = config.method
    s = job.slice
    tmpl_index = models[job.template]
    tmpl_name = tensor_of(tmpl_index, job.names[job.template])
    assert tmpl_name is not None  # layout picks a template that has the tensor
    template = PlanSource(tmpl_index.tensors[tmpl_name], tmpl_name)
    if template.info.dtype in COPIED_DTYPES:
        return _copied(config, models, job, seed, notes if notes is not None else [])
    aligned = aligner is not None and is_vocab_tensor(job.out)
    base = _source(models, job, s.base, template, aligned) if s.base is not None else None
    inputs = []
    for model in s.inputs:
        src = _source(models, job, model, template, aligned)
        values = _per_model(method, model, job)
        methods.check_model(method, values, f"{model.where} ({model.ref}), tensor {job.names[model.ref]}")
        # methods without weights (slerp, karcher, ...) give the kernel 1.0 each, which it ignores
        weight = values[method.weight_param] if method.weight_param is not None else 1.0
        inputs.append(
            PlanInput(
                src.info,
                src.tensor,
                weight,
                values.get("density", 1.0),
                model.model_id,
                values.get("gamma"),
                values.get("epsilon"),
            )
        )
    shared = _shared(method, job)
    key = tuple(sorted(shared.items()))
    kernel = kernels.get(key)
    if kernel is None:
        kernel = kernels[key] = methods.kernel_spec(method, shared, seed)
    out_dtype = config.out_dtype or config.dtype or MERGEABLE_DTYPES[template.info.dtype]
    shape = template.info.shape
    kernel = methods.kernel_for_tensor(method, kernel, shared, job.out, shape, len(inputs))
    if notes is not None and methods.too_small(method, shape, len(inputs)):
        notes.append(methods.too_small_note(job.out, shape, len(inputs)))
    if aligned:
        assert aligner is not None
        refs = ([s.base.ref] if s.base is not None else []) + [m.ref for m in s.inputs]
        found = ([base] if base is not None else []) + [PlanSource(i.info, i.tensor) for i in inputs]
        files = aligner.permute(
            job.out, [(r, f.info, f.tensor) for r, f in zip(refs, found, strict=True)], _vocab_base(config, s)
        )
        shape = files[0].shape
        if base is not None:
            base = PlanSource(files.pop(0), job.out)
        inputs = [dataclasses.replace(i, info=f, tensor=job.out) for i, f in zip(inputs, files, strict=True)]
    if not inputs:
        # only the slice's base (a task-vector method with no task vector; mergekit returns the base): a copy
        assert base is not None
        copy = PlanInput(base.info, base.tensor, 1.0, 1.0, 0)
        passthrough = methods.kernel_spec(methods.get("passthrough"), {}, seed)
        return PlanTensor(job.out, shape, out_dtype, passthrough, None, (copy,))
    return PlanTensor(job.out, shape, out_dtype, kernel, base, tuple(inputs))


def _copied(
    config: MergeConfig, models: Mapping[str, ModelIndex], job: Job, seed: int, notes: list[str]
) -> PlanTensor:
    """A non-float tensor, copied from the slice's base (``models:`` configs without one: the config's base,
    else the reference) when it has it, else from the first source that does; other values are a note."""
    s = job.slice
    sources = s.sources()
    first = s.base.ref if s.base is not None else config.reference
    sources.sort(key=lambda m: m.ref != first)  # stable: the base, then config order
    having = [m for m in sources if job.names[m.ref] in models[m.ref].tensors]
    chosen = having[0]
    index = models[chosen.ref]
    name = job.names[chosen.ref]
    info = index.tensors[name]
    differ: list[str] = []
    for m in having[1:]:
        other = models[m.ref]
        if m.ref == chosen.ref or m.ref in differ:
            continue
        theirs = other.tensors[job.names[m.ref]]
        if theirs.dtype not in COPIED_DTYPES:
            # a float here and an integer there: one of the two files is not what it claims to be, and neither
            # merging nor copying would be right
            raise InputError(
                f"{info.file}: tensor {name} has dtype {info.dtype} (model {chosen.ref!r}) but {theirs.file} holds "
                f"it as {theirs.dtype} (model {m.ref!r}): a tensor must be a float in every model (merged) or an "
                "integer/bool buffer in every model (copied)"
            )
        if (theirs.dtype, theirs.shape) != (info.dtype, info.shape) or not _same_bytes(
            index, name, other, job.names[m.ref]
        ):
            differ.append(m.ref)
    if differ:
        notes.append(
            f"tensor {job.out} ({info.dtype}, not a float: copied, never merged) differs between models: "
            f"{', '.join(repr(r) for r in differ)} hold other values than {chosen.ref!r}, whose are kept"
        )
    kernel = methods.kernel_spec(methods.get("passthrough"), {}, seed)
    copy = PlanInput(info, name, 1.0, 1.0, 0)  # model_id keys random streams: a copy has none
    return PlanTensor(job.out, info.shape, info.dtype, kernel, None, (copy,))


def _same_bytes(a: ModelIndex, a_name: str, b: ModelIndex, b_name: str) -> bool:
    """Whether two stored tensors (of the same dtype and shape) hold the same bytes, compared a chunk at a time."""
    left, right = tensor_bytes(a, a_name), tensor_bytes(b, b_name)
    pending = b""
    for block in left:
        while len(pending) < len(block):
            more = next(right, None)
            if more is None:
                return False
            pending += more
        if pending[: len(block)] != block:
            return False
        pending = pending[len(block) :]
    return not pending and next(right, None) is None


def _vocab_base(config: MergeConfig, s: OutputSlice) -> str | None:
    """The model whose row a token several models have takes by default: the slice's base (mergekit's
    ``base_model`` of the slice, else of the config), also for methods where it is one more input."""
    if s.base is not None:
        return s.base.ref
    if config.sliced and config.raw.slices is not None:
        own = config.raw.slices[int(s.where[len("slices[") : -1])].base_model
        if own is not None:
            return own
    return config.raw.base_model


def _per_model(method: methods.MethodSpec, model: InputModel, job: Job) -> dict[str, Any]:
    """The per-model parameters of ``model`` for ``job``: filters see the model's own tensor name."""
    tensor = job.names[model.ref]
    out: dict[str, Any] = {}
    for name, spec in method.per_model.items():
        if name not in model.varying:
            out[name] = model.values[name]
            continue
        found = params.resolve(name, model.levels, tensor, job.t)
        if found is None:
            if spec.default is None:
                raise ConfigError(
                    f"Missing required parameter {name} for {model.ref} ({model.where}) at tensor {tensor}: "
                    f"no filter of {', '.join(f'{lv.place}.{name}' for lv in model.levels if name in lv.settings)} "
                    "matches it and no lower level sets it; add a fallback entry without filter"
                )
            out[name] = spec.default
        else:
            value, place = found
            out[name] = methods.coerce(spec, name, value, f"{place} (tensor {tensor})")
    return out


def _shared(method: methods.MethodSpec, job: Job) -> dict[str, Any]:
    """The method-wide parameters for ``job``: filters see the output tensor name."""
    out: dict[str, Any] = {}
    for name, spec in method.shared.items():
        found = params.resolve(name, job.slice.shared_levels, job.out, job.t)
        if found is None and spec.default is None:
            raise ConfigError(
                f"Missing required parameter {name} for {method.name} at tensor {job.out}: no filter of "
                f"{', '.join(f'{lv.place}.{name}' for lv in job.slice.shared_levels if name in lv.settings)} "
                "matches it and no lower level sets it; add a fallback entry without filter"
            )
        out[name] = spec.default if found is None else methods.coerce(spec, name, found[0], found[1])
    return out


def _check_dtype(model: ModelIndex, name: str, info: TensorInfo) -> None:
    if info.dtype not in MERGEABLE_DTYPES:
        raise InputError(
            f"{info.file}: tensor {name} has dtype {info.dtype}; ferromerge merges F32, F16 and BF16 tensors only"
            f" (model {model.ref!r})"
        )


def _shape_error(name: str, info: TensorInfo, template: PlanSource) -> None:
    ref_info = template.info
    if is_vocab_tensor(name) and len(info.shape) == len(ref_info.shape) and info.shape[1:] == ref_info.shape[1:]:
        raise InputError(
            f"{info.file}: tensor {name} has shape {list(info.shape)} but {ref_info.file} has {list(ref_info.shape)}: "
            f"a vocabulary-size mismatch ({info.shape[0]} vs {ref_info.shape[0]} tokens); align the vocabularies with "
            "tokenizer_source: union (or base, or a model) or tokenizer:; ferromerge never truncates embeddings"
        )
    what = "" if name == template.tensor else f" ({template.tensor} there)"
    raise InputError(
        f"{info.file}: tensor {name} has shape {list(info.shape)} but {ref_info.file} has {list(ref_info.shape)}{what}"
    )
