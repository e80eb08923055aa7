"""Build the merge plan (docs/architecture.md): every output tensor with its inputs, method, dtypes and shard.

The output has exactly the tensors of the reference model (the base, or the first model without one), in its
shard order. Every model must hold every one of them with the same shape and a float dtype, and no model may
hold a tensor the reference lacks: mismatches are ``InputError``s naming the model, file and tensor, raised
before anything is written.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from . import methods
from .config import MergeConfig
from .errors import InputError, ParameterError
from .models import MERGEABLE_DTYPES, ModelIndex, TensorInfo

_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}

#: tensors whose first axis is the vocabulary
_VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out)(\.|$)")

DEFAULT_SHARD_SIZE = "5B"

_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([kmgb]|kb|mb|gb|kib|mib|gib)?\s*", re.IGNORECASE)
_UNITS = {
    "": 1,
    "k": 10**3,
    "m": 10**6,
    "b": 10**9,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "g": 10**9,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
}


def parse_size(value: str | int) -> int:
    """Bytes from a size: an int, or a number with mergekit's K/M/B suffixes (x1000, so "5B" is 5e9 bytes),
    or KB/MB/GB (x1000) or KiB/MiB/GiB (x1024)."""
    if isinstance(value, int) and not isinstance(value, bool):
        size = value
    else:
        match = _SIZE.fullmatch(str(value))
        if match is None:
            raise ParameterError(f"shard size {value!r}: expected a number of bytes with an optional K/M/B suffix")
        size = int(float(match.group(1)) * _UNITS[(match.group(2) or "").lower()])
    if size <= 0:
        raise ParameterError(f"shard size {value!r}: must be positive")
    return size


@dataclass(frozen=True)
class PlanInput:
    """One model's tensor entering an output tensor, with that model's parameters."""

    info: TensorInfo
    weight: float
    density: float
    model_id: int


@dataclass(frozen=True)
class PlanTensor:
    """One output tensor (its inputs and base have its name in their files)."""

    name: str
    shape: tuple[int, ...]
    out_dtype: str
    base: TensorInfo | None
    inputs: tuple[PlanInput, ...]

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def bytes_out(self) -> int:
        return self.numel * _ITEMSIZE[self.out_dtype]

    @property
    def bytes_in(self) -> int:
        infos = [i.info for i in self.inputs] + ([self.base] if self.base is not None else [])
        return sum(self.numel * _ITEMSIZE[MERGEABLE_DTYPES[i.dtype]] for i in infos)


@dataclass
class Shard:
    file: str
    tensors: list[PlanTensor] = field(default_factory=list)

    @property
    def bytes_out(self) -> int:
        return sum(t.bytes_out for t in self.tensors)


@dataclass(frozen=True)
class Plan:
    """Everything the engine needs; ``to_json`` is the input of ``_core.execute_plan``."""

    method: dict[str, Any]
    cast_dtype: str | None
    shards: tuple[Shard, ...]
    models: tuple[ModelIndex, ...]

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

    def to_json(self) -> str:
        def tensor(t: PlanTensor) -> dict[str, Any]:
            return {
                "name": t.name,
                "shape": list(t.shape),
                "out_dtype": t.out_dtype,
                "cast_dtype": self.cast_dtype,
                "method": self.method,
                "base": None if t.base is None else {"file": str(t.base.file), "tensor": t.name},
                "inputs": [
                    {
                        "file": str(i.info.file),
                        "tensor": t.name,
                        "weight": i.weight,
                        "density": i.density,
                        "model_id": i.model_id,
                    }
                    for i in t.inputs
                ],
            }

        return json.dumps(
            {
                "metadata": {"format": "pt"},
                "chunk_elems": None,
                "shards": [{"file": s.file, "tensors": [tensor(t) for t in s.tensors]} for s in self.shards],
            }
        )

    def summary(self) -> str:
        """A few human-readable lines: method, models, tensors, bytes in and out, shards."""
        lines = [f"method: {self.method['name']} (seed {self.method['seed']})"]
        lines += [f"model: {m.ref} -> {m.path} ({len(m.files)} file(s))" for m in self.models]
        lines.append(f"tensors: {len(self.tensors)}")
        reads, writes = format_bytes(self.bytes_in), format_bytes(self.bytes_out)
        lines.append(f"reads: {reads}, writes: {writes} in {len(self.shards)} shard(s)")
        return "\n".join(lines)


def format_bytes(n: int) -> str:
    """Decimal units, as disks and ``--out-shard-size`` count: ``1.23 GB``, ``45.6 MB``."""
    return f"{n / 1e9:.2f} GB" if n >= 10**9 else f"{n / 1e6:.1f} MB"


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
) -> Plan:
    """The plan of ``config`` over the indexed ``models`` (keyed by reference)."""
    max_shard = parse_size(out_shard_size)
    reference = models[config.reference]
    if not reference.tensors:
        raise InputError(f"model {reference.ref!r} ({reference.path}) has no tensors")
    others = [models[r] for r in config.model_refs() if r != config.reference]
    for model in others:
        _check_no_extra(reference, model)
    base = models[config.base] if config.base is not None else None

    planned: list[PlanTensor] = []
    for name, ref_info in reference.tensors.items():
        _check_dtype(reference, name, ref_info)
        for model in others:
            _check_tensor(reference, model, name, ref_info)
        inputs = tuple(PlanInput(models[m.ref].tensors[name], m.weight, m.density, m.model_id) for m in config.inputs)
        out_dtype = config.out_dtype or config.dtype or MERGEABLE_DTYPES[ref_info.dtype]
        planned.append(
            PlanTensor(name, ref_info.shape, out_dtype, base.tensors[name] if base is not None else None, inputs)
        )

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
        method=methods.kernel_spec(config.method, config.shared, seed),
        cast_dtype=config.dtype,
        shards=tuple(Shard(n, g) for n, g in zip(names, groups, strict=False)),
        models=tuple(models[r] for r in config.model_refs()),
    )


def _check_dtype(model: ModelIndex, name: str, info: TensorInfo) -> None:
    if info.dtype not in MERGEABLE_DTYPES:
        raise InputError(
            f"{info.file}: tensor {name} has dtype {info.dtype}; ferromerge merges F32, F16 and BF16 tensors only"
            f" (model {model.ref!r})"
        )


def _check_tensor(reference: ModelIndex, model: ModelIndex, name: str, ref_info: TensorInfo) -> None:
    info = model.tensors.get(name)
    if info is None:
        raise InputError(
            f"model {model.ref!r} ({model.path}) has no tensor {name}, which {reference.ref!r} "
            f"({ref_info.file}) has; every model must have every tensor"
        )
    _check_dtype(model, name, info)
    if info.shape == ref_info.shape:
        return
    if _VOCAB_TENSOR.search(name) and len(info.shape) == len(ref_info.shape) and info.shape[1:] == ref_info.shape[1:]:
        raise InputError(
            f"{info.file}: tensor {name} has shape {list(info.shape)} but {ref_info.file} has {list(ref_info.shape)}: "
            f"a vocabulary-size mismatch ({info.shape[0]} vs {ref_info.shape[0]} tokens); tokenizer-based "
            "vocabulary alignment is not supported yet, and ferromerge never truncates embeddings"
        )
    raise InputError(
        f"{info.file}: tensor {name} has shape {list(info.shape)} but {ref_info.file} has {list(ref_info.shape)}"
    )


def _check_no_extra(reference: ModelIndex, model: ModelIndex) -> None:
    extra = [n for n in model.tensors if n not in reference.tensors]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise InputError(
            f"{model.tensors[extra[0]].file}: tensor {extra[0]}{more} of model {model.ref!r} is not in "
            f"{reference.ref!r} ({reference.path}), which defines the output's tensors; ferromerge does not drop "
            "tensors silently"
        )
