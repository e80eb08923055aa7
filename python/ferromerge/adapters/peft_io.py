"""PEFT LoRA adapter directories read as per-module ``Factors``, and the merged adapter's config.

An adapter directory (or ``org/name[@revision]`` in the local Hugging Face cache, as ``models.refs`` resolves it)
holds ``adapter_config.json`` and ``adapter_model.safetensors``. ``read_adapter`` reads only the config and the
header; ``Adapter.factors(module)`` reads one module's two factors (float32, exactly decoded), so a merge holds one
module at a time. A module is a linear layer (``<module>.lora_A.weight`` / ``lora_B.weight``) or an embedding
(``lora_embedding_A`` / ``lora_embedding_B``); its scale is PEFT's (``lora_alpha / r``, ``/ √r`` with
``use_rslora``, ``rank_pattern`` / ``alpha_pattern`` per module: ``models.lora`` holds those rules).

The base-layer copies PEFT saves beside an embedding LoRA (``<module>.base_layer.weight``) are carried over as
they are (``merge`` checks that every adapter holding one holds the same bytes).

Refused with an ``InputError`` naming the file and tensor: other tensors that are not LoRA factors (``modules_to_save``
copies, ``lora_bias`` biases, DoRA magnitudes: PEFT's ``add_weighted_adapter`` cannot merge them either), a factor
without its partner, ranks that disagree with the config, factors of other dtypes than F32/F16/BF16.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .. import _engine
from ..errors import InputError, ParameterError
from ..io.dtypes import MERGEABLE_DTYPES, RAW, to_f32
from ..io.reader import Header, read_header
from ..models.architecture import PEFT_PREFIX
from ..models.lora import (
    ADAPTER_CONFIG,
    EMBED_KEY,
    LORA_KEY,
    UNSUPPORTED_KEY,
    adapter_files,
    pattern_value,
)
from .factors import Factors

__all__ = ["BASE_LAYER", "Adapter", "ModuleInfo", "merged_config", "read_adapter", "tensor_keys"]

#: the suffix of the base-layer weights PEFT saves with an adapter that targets embeddings
#: (``save_embedding_layers="auto"``): copies of the model's tensors, carried over unchanged
BASE_LAYER = ".base_layer.weight"


@dataclass(frozen=True)
class ModuleInfo:
    """One adapted module of an adapter: ``embedding`` (lora_embedding_A/B keys), its factors' stored names and
    dtypes, rank, ΔW's shape (out, in) in B·A orientation, and PEFT's scale."""

    name: str
    embedding: bool
    key_a: str
    key_b: str
    dtype_a: str
    dtype_b: str
    rank: int
    shape: tuple[int, int]
    scale: float


@dataclass
class Adapter:
    """A PEFT LoRA adapter: its directory, config, weights file and modules (read lazily, one at a time)."""

    ref: str
    path: Path
    config: dict[str, Any]
    weights_file: Path
    modules: dict[str, ModuleInfo]
    #: base-layer copies PEFT saves beside embedding LoRAs (``<module>.base_layer.weight``): name -> (dtype, shape)
    base_layers: dict[str, tuple[str, tuple[int, ...]]]
    _header: Header | None = None

    @property
    def max_rank(self) -> int:
        """PEFT's rank of the adapter: ``r``, or the largest of ``r`` and the ``rank_pattern`` values."""
        pattern = self.config.get("rank_pattern") or {}
        return max([int(self.config["r"]), *(int(v) for v in pattern.values())])

    def _read(self, key: str, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
        if self._header is None:
            try:
                self._header = read_header(self.weights_file)
            except (OSError, ValueError) as e:
                raise InputError(f"{self.weights_file}: cannot read: {e}") from None
        _, _, start, _ = self._header.tensors[key]
        raw = np.fromfile(self.weights_file, dtype=RAW[dtype], count=int(np.prod(shape)), offset=start)
        if raw.size != int(np.prod(shape)):
            raise InputError(f"{self.weights_file}: tensor {key} is truncated (file shorter than its header says)")
        return to_f32(raw.reshape(shape), dtype)

    def raw_span(self, key: str) -> tuple[int, int]:
        """The absolute byte span of stored tensor ``key``."""
        if self._header is None:
            self._header = read_header(self.weights_file)
        _, _, start, end = self._header.tensors[key]
        return start, end

    def factors(self, module: str) -> Factors:
        """The module's factors in float32 (exact: F16 and BF16 widen without rounding) and its scale."""
        m = self.modules[module]
        a = self._read(m.key_a, m.dtype_a, (m.rank, m.shape[1]))
        b = self._read(m.key_b, m.dtype_b, (m.shape[0], m.rank))
        if not (np.isfinite(a).all() and np.isfinite(b).all()):
            raise InputError(f"{self.weights_file}: tensor {m.key_a if not np.isfinite(a).all() else m.key_b} "
                             "holds NaN or infinite values")
        return Factors(np.ascontiguousarray(a), np.ascontiguousarray(b), m.scale)


def read_adapter(ref: str | os.PathLike[str]) -> Adapter:
    """The adapter at ``ref`` (a directory, or an id in the local Hugging Face cache): config and header checked."""
    text = os.fspath(ref)
    path, config, weights = adapter_files(text, "LoRA adapter")
    header = _engine.read_header(str(weights))
    base_layers = {k: (d, tuple(int(x) for x in sh)) for k, (d, sh) in header.items() if k.endswith(BASE_LAYER)}
    factors = {k: v for k, v in header.items() if k not in base_layers}
    return Adapter(text, path, config, weights, _modules(config, path / ADAPTER_CONFIG, weights, factors),
                   base_layers)


def _modules(config: Mapping[str, Any], config_path: Path, weights: Path,
             header: Mapping[str, tuple[str, list[int]]]) -> dict[str, ModuleInfo]:
    pairs: dict[str, dict[str, tuple[str, str, tuple[int, ...]]]] = {}
    embedding: dict[str, bool] = {}
    for key, (dtype, shape) in header.items():
        if UNSUPPORTED_KEY.search(key):
            raise InputError(f"{weights}: tensor {key}: DoRA magnitudes and LoRA biases (lora_bias) cannot be merged "
                             "into one adapter")
        name = key.removeprefix(PEFT_PREFIX)
        m = LORA_KEY.match(name) or EMBED_KEY.match(name)
        if m is None:
            raise InputError(f"{weights}: tensor {key} is not a LoRA factor (modules_to_save and other full tensors "
                             "cannot be merged into one adapter; PEFT's add_weighted_adapter refuses them too)")
        if dtype not in MERGEABLE_DTYPES:
            raise InputError(f"{weights}: tensor {key} has dtype {dtype}; LoRA factors must be F32, F16 or BF16")
        if len(shape) != 2:
            raise InputError(f"{weights}: tensor {key} has shape {list(shape)}: only 2-D LoRA factors (linear and "
                             "embedding layers) can be merged")
        kind = m["kind"]
        pairs.setdefault(m["module"], {})[kind[-1]] = (key, dtype, tuple(int(d) for d in shape))
        embedding[m["module"]] = kind.startswith("lora_embedding")
    if not pairs:
        raise InputError(f"{weights}: the adapter has no LoRA factors")
    r0, alpha0 = int(config["r"]), config.get("lora_alpha", 8)
    rslora = bool(config.get("use_rslora", False))
    out: dict[str, ModuleInfo] = {}
    for module, ab in pairs.items():
        for have, lack in (("A", "B"), ("B", "A")):
            if have in ab and lack not in ab:
                raise InputError(f"{weights}: tensor {ab[have][0]} has no matching lora_{lack} (a LoRA needs both "
                                 f"factors of {module})")
        (ka, da, sa), (kb, db, sb) = ab["A"], ab["B"]
        r = int(pattern_value(config.get("rank_pattern") or {}, module, r0))
        alpha = float(pattern_value(config.get("alpha_pattern") or {}, module, alpha0))
        if sa[0] != r or sb[1] != r:
            raise InputError(f"{weights}: rank mismatch for {module}: {ka} has shape {list(sa)} and {kb} {list(sb)}, "
                             f"but {config_path} gives rank r = {r}")
        scale = alpha / (float(r) ** 0.5 if rslora else float(r))
        out[module] = ModuleInfo(module, embedding[module], ka, kb, da, db, r, (sb[0], sa[1]), scale)
    return out


def tensor_keys(module: str, embedding: bool) -> tuple[str, str]:
    """PEFT's saved names of a module's A and B factors."""
    if embedding:
        return f"{PEFT_PREFIX}{module}.lora_embedding_A", f"{PEFT_PREFIX}{module}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module}.lora_A.weight", f"{PEFT_PREFIX}{module}.lora_B.weight"


def _target_modules(adapters: Sequence[Adapter]) -> Any:
    """PEFT's union of the adapters' ``target_modules``: a regex alternation of strings, or the union of lists."""
    values = [a.config.get("target_modules") for a in adapters]
    strings = [v for v in values if isinstance(v, str)]
    lists = [v for v in values if isinstance(v, list)]
    if len(strings) == len(values):
        return strings[0] if len(set(strings)) == 1 else "|".join(f"({v})" for v in strings)
    if len(lists) == len(values):
        return sorted({str(t) for v in lists for t in v})
    raise ParameterError(
        "the adapters' target_modules mix regex strings and lists ("
        + ", ".join(f"{a.path}: {type(v).__name__}" for a, v in zip(adapters, values, strict=True))
        + "); PEFT cannot combine those either"
    )


def merged_config(adapters: Sequence[Adapter], ranks: Mapping[str, int], r: int,
                  base_model: str | None) -> dict[str, Any]:
    """The merged adapter's ``adapter_config.json``: the first adapter's config (as PEFT's ``replace`` keeps it)
    with ``r = lora_alpha`` (scale 1: the factors carry every scale), the union of ``target_modules``, the modules
    of another rank in ``rank_pattern`` / ``alpha_pattern`` (alpha = rank, scale 1), and ``use_rslora`` off."""
    config = dict(adapters[0].config)
    different = {m: k for m, k in sorted(ranks.items()) if k != r}
    config.update(
        r=int(r),
        lora_alpha=int(r),
        target_modules=_target_modules(adapters),
        rank_pattern=different,
        alpha_pattern=dict(different),
        # the factors are built for scale 1; rsLoRA would scale them by √r (PEFT keeps the first adapter's flag,
        # so its own merged adapter is scaled by √r when that adapter used rsLoRA)
        use_rslora=False,
        inference_mode=True,
    )
    if base_model is not None:
        config["base_model_name_or_path"] = base_model
    return config
