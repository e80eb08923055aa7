"""``extract_lora``: a PEFT LoRA adapter from the difference between a fine-tuned model and its base, one tensor at a
time (what ``mergekit-extract-lora`` does, without loading models whole and with a randomized SVD by default).

What goes where is decided from tensor names and shapes (mergekit decides from a transformers model built on the
meta device; ferromerge needs no transformers and no config.json). A *module* is a tensor's name without its last
component (``model.layers.0.self_attn.q_proj`` for ``...q_proj.weight``); its *key* is the module's last component
(``q_proj``), which is what PEFT's ``target_modules`` and ``modules_to_save`` hold.

* **Embeddings**: modules whose key is in ``INPUT_EMBEDDINGS`` (``embed_tokens``, ``wte``, ``wpe``, ...) or
  ``HEADS`` (``lm_head``, ``embed_out``, a top-level ``output``). Unless ``embed_lora``, they are saved at full rank
  (the fine-tune's tensors) and their key goes to ``modules_to_save`` (an ``exclude`` regex drops them; ``include``
  does not, as in mergekit). With ``embed_lora``, input embeddings are factorised transposed into PEFT's
  ``lora_embedding_A`` (r × vocab) / ``lora_embedding_B`` (dim × r) and heads like linear layers; when an
  embedding's shape differs between the models (another vocabulary), ``embed_lora`` is turned off (mergekit's rule).
* **Linear layers**: every other module whose tensors are a 2-D float ``weight`` (out × in) and optionally a 1-D
  ``bias``. ΔW = W_ft − W_base in float32 (from the exact stored values) is factorised by ``_engine.svd``
  (randomized, or ``exact``), at most ``rank`` triplets, singular values ≤ ``sv_epsilon`` dropped. With
  ``distribute_scale``: A = √S·Vᵀ, B = U·√S; else A = S·Vᵀ, B = U. The bias delta is saved as ``lora_B.bias``.
  Factors have the models' dtype (float32 when base and fine-tune differ), as mergekit casts them.
* **Everything else** (norms, other 1-D, 3-D and larger tensors, modules with other parameters) is saved at full
  rank through ``modules_to_save``, or left out with ``skip_undecomposable``.
* ``include`` / ``exclude`` regexes are searched (``re.search``) in module names: a module is factorised only if
  some ``include`` matches (when given) and no ``exclude`` does. As in PEFT, a key in ``modules_to_save`` stands
  for every module with that key, so all of them are saved.

Departures from mergekit 0.1.5: a zero ΔW (a module the fine-tune did not change) has no singular value above 0,
so it gets no factors at all (mergekit writes all-zero factors of full rank, or with ``--sv-epsilon`` rank-0 ones
PEFT cannot load); ``lora_bias`` is set when every factorised module carries a bias delta (without it PEFT ignores
``lora_B.bias``); 3-D+ tensors are saved at full rank; tensors the base has and the fine-tune lacks, or shapes
that differ outside the vocabulary, are errors. GPT-2-style Conv1D weights (stored in × in) are refused.

The module reads top-down: the parameter checks, planning (which modules are factorised, saved whole or left
out), reading the two models' tensors, then writing the adapter.
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _engine
from ._validate import check_seed, check_threads
from .errors import InputError, MergeError, ParameterError
from .io.dtypes import MERGEABLE_DTYPES, RAW, from_f32, to_f32
from .io.output_dir import OutputDir, check_free_space
from .io.reader import Header, read_header
from .io.writer import PlannedTensor, SafetensorsWriter
from .methods import default
from .model_card import lora_card, write_card
from .models.architecture import (
    CONV1D_MODEL_TYPES,
    HEADS,
    INPUT_EMBEDDINGS,
    PEFT_PREFIX,
)
from .models.index import ModelIndex, TensorInfo, index_model, natural_key
from .models.lora import ADAPTER_CONFIG, ADAPTER_WEIGHTS

__all__ = ["extract_lora"]

#: bytes of float32 rows handled at once when subtracting, measuring errors and copying (bounds memory beyond ΔW)
BLOCK_BYTES = 64 << 20

Progress = Callable[[int, int, int, int], None]


@dataclass(frozen=True)
class Module:
    """One module of the fine-tune and what the adapter gets of it: ``lora`` (factors of ΔW), ``embed_lora`` (factors of
    ΔWᵀ), ``save`` (its tensors at full rank) or ``skip``."""

    name: str
    tensors: tuple[str, ...]
    kind: str

    @property
    def key(self) -> str:
        return self.name.rpartition(".")[2]

    @property
    def weight(self) -> str:
        return f"{self.name}.weight"

    @property
    def bias(self) -> str | None:
        return f"{self.name}.bias" if f"{self.name}.bias" in self.tensors else None


def _int(value: Any, what: str, lo: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < lo:
        bound = f"an integer ≥ {lo}"
        raise ParameterError(f"{what} must be {bound}, got {value!r}")
    if value >= 2**63:  # the engine takes it as usize: a larger value was an OverflowError traceback
        raise ParameterError(f"{what} must be below 2**63, got {value!r}")
    return int(value)


def _regexes(value: str | Sequence[str] | None, what: str) -> list[re.Pattern[str]]:
    if value is None:
        return []
    items = [value] if isinstance(value, str) else list(value)
    out = []
    for r in items:
        if not isinstance(r, str):
            raise ParameterError(f"{what} regex must be a string, got {r!r}")
        try:
            out.append(re.compile(r))
        except re.error as e:
            raise ParameterError(f"{what} regex {r!r}: {e}") from None
    return out


def _is_embedding(module: str) -> bool:
    key = module.rpartition(".")[2]
    return key in INPUT_EMBEDDINGS or key in HEADS or module == "output"


def _is_input_embedding(module: str) -> bool:
    return module.rpartition(".")[2] in INPUT_EMBEDDINGS


def _decomposable(model: ModelIndex, module: str, names: Sequence[str], embed_lora: bool) -> bool:
    """A linear layer: a 2-D float weight and at most a 1-D bias (input embeddings: only with embed_lora, no bias)."""
    weight = model.tensors.get(f"{module}.weight")
    if weight is None or len(weight.shape) != 2 or weight.dtype not in MERGEABLE_DTYPES:
        return False
    others = [n for n in names if n != f"{module}.weight"]
    if _is_embedding(module) and not embed_lora:
        return False
    if _is_input_embedding(module):
        return not others  # PEFT's Embedding LoRA has no bias
    return _bias_ok(model, module, others)


def _bias_ok(model: ModelIndex, module: str, others: Sequence[str]) -> bool:
    if not others:
        return True
    bias = model.tensors.get(f"{module}.bias")
    weight = model.tensors[f"{module}.weight"]
    return (
        list(others) == [f"{module}.bias"] and bias is not None and bias.shape == weight.shape[:1]
        and bias.dtype in MERGEABLE_DTYPES
    )


def plan_modules(
    base: ModelIndex,
    ft: ModelIndex,
    *,
    embed_lora: bool = False,
    include: Sequence[re.Pattern[str]] = (),
    exclude: Sequence[re.Pattern[str]] = (),
    save_modules: Sequence[str] = (),
    skip_undecomposable: bool = False,
) -> tuple[list[Module], list[str], list[str]]:
    """Every module of ``ft`` with what the adapter gets of it, the ``modules_to_save`` keys and notes for the user.

    Checks what would make the adapter wrong before anything is computed: tensors of the base the fine-tune lacks,
    tensors the adapter needs that the base lacks, shapes that differ (other than an embedding's vocabulary).
    """
    _check_architecture(ft)
    extra = [n for n in base.tensors if n not in ft.tensors]
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise InputError(
            f"{base.tensors[extra[0]].file}: tensor {extra[0]}{more} of the base model is not in the fine-tuned model "
            f"{ft.ref!r} ({ft.path}); an adapter cannot remove tensors"
        )
    groups: dict[str, list[str]] = {}
    # natural name order, not shard order: the adapter does not depend on how the fine-tune is sharded
    for name in sorted(ft.tensors, key=natural_key):
        module, dot, _ = name.rpartition(".")
        if not dot:
            raise InputError(f"{ft.tensors[name].file}: tensor {name} belongs to no module (no '.' in its name); a "
                             "PEFT adapter cannot hold it")
        groups.setdefault(module, []).append(name)

    notes: list[str] = []
    vocab = [
        m for m in groups if _is_embedding(m) and f"{m}.weight" in base.tensors and f"{m}.weight" in ft.tensors
        and base.tensors[f"{m}.weight"].shape != ft.tensors[f"{m}.weight"].shape
    ]
    if vocab:
        shapes = f"{list(base.tensors[vocab[0] + '.weight'].shape)} in the base, " \
                 f"{list(ft.tensors[vocab[0] + '.weight'].shape)} in the fine-tune"
        notes.append(f"{vocab[0]}.weight is {shapes}: the vocabularies differ"
                     + ("; embed_lora is turned off, embeddings are saved at full rank" if embed_lora else "")
                     + "; resize the base model's token embeddings before loading the adapter")
        embed_lora = False

    def excluded(module: str) -> bool:
        return any(r.search(module) for r in exclude)

    def wanted(module: str) -> bool:
        return (not include or any(r.search(module) for r in include)) and not excluded(module)

    keys: list[str] = []
    for key in save_modules:
        if key not in keys:
            keys.append(key)
    for module, names in groups.items():
        key = module.rpartition(".")[2]
        if _is_embedding(module) and not embed_lora:
            if not excluded(module) and key not in keys:
                keys.append(key)
        elif wanted(module) and not _decomposable(ft, module, names, embed_lora):
            if not skip_undecomposable and key not in keys:
                keys.append(key)
    for key in save_modules:
        if not any(m == key or m.rpartition(".")[2] == key for m in groups):
            raise ParameterError(f"save module {key!r} matches no module of {ft.ref!r} ({ft.path})")

    modules = []
    for module, names in groups.items():
        if module in keys or module.rpartition(".")[2] in keys:
            kind = "save"
        elif wanted(module) and _decomposable(ft, module, names, embed_lora):
            kind = "embed_lora" if _is_input_embedding(module) else "lora"
        else:
            kind = "skip"
        modules.append(Module(module, tuple(names), kind))
        if kind != "skip":
            _check_base(base, ft, modules[-1])
    if not any(m.kind in ("lora", "embed_lora") for m in modules):
        raise ParameterError(
            f"no module of {ft.ref!r} ({ft.path}) is left to factorise (include/exclude regexes, save modules): a "
            "LoRA adapter needs at least one target module"
        )
    return modules, keys, notes


def _check_architecture(ft: ModelIndex) -> None:
    config = ft.path / "config.json"
    try:
        model_type = json.loads(config.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return
    if model_type in CONV1D_MODEL_TYPES:
        raise InputError(
            f"{config}: model_type {model_type!r} stores its linear layers transposed (transformers' Conv1D); "
            "extract-lora supports nn.Linear layouts (out × in) only"
        )


def _check_base(base: ModelIndex, ft: ModelIndex, module: Module) -> None:
    for name in module.tensors:
        mine, theirs = ft.tensors[name], base.tensors.get(name)
        if theirs is None:
            need = "a delta" if module.kind != "save" else "a module to save"
            raise InputError(
                f"{mine.file}: tensor {name} of the fine-tuned model is not in the base model {base.ref!r} "
                f"({base.path}); the adapter needs it there ({need})"
            )
        if theirs.shape != mine.shape and not (module.kind == "save" and _is_embedding(module.name)):
            raise InputError(
                f"{mine.file}: tensor {name} has shape {list(mine.shape)}, but {theirs.file} has it with shape "
                f"{list(theirs.shape)}"
            )
        if module.kind != "save" and theirs.dtype not in MERGEABLE_DTYPES:
            raise InputError(f"{theirs.file}: tensor {name} has dtype {theirs.dtype}; only F32/F16/BF16 are factorised")


class _Reader:
    """Read-only memory maps of stored tensors (safetensors layouts parsed once per file)."""

    def __init__(self) -> None:
        self._headers: dict[Path, Header] = {}

    def _span(self, info: TensorInfo, name: str) -> tuple[int, int]:
        if info.file not in self._headers:
            self._headers[info.file] = read_header(info.file)
        _, _, start, end = self._headers[info.file].tensors[name]
        return start, end - start

    def raw(self, info: TensorInfo, name: str) -> npt.NDArray[np.uint8]:
        """The stored bytes of a tensor of any dtype."""
        start, size = self._span(info, name)
        if size == 0:
            return np.zeros(0, np.uint8)
        return np.memmap(info.file, dtype=np.uint8, mode="r", offset=start, shape=(size,))

    def typed(self, info: TensorInfo, name: str) -> npt.NDArray[Any]:
        """A float tensor in its stored dtype (bfloat16: uint16 bits), shaped."""
        start, size = self._span(info, name)
        if size == 0:
            return np.zeros(info.shape, RAW[info.dtype])
        return np.memmap(info.file, dtype=RAW[info.dtype], mode="r", offset=start, shape=info.shape)


def _rows(n_rows: int, row_elems: int) -> Iterator[slice]:
    step = max(1, BLOCK_BYTES // (4 * max(row_elems, 1)))
    for r in range(0, n_rows, step):
        yield slice(r, min(n_rows, r + step))


def _delta(reader: _Reader, base: ModelIndex, ft: ModelIndex, name: str) -> npt.NDArray[np.float32]:
    """ft − base in float32, exact inputs; ``InputError`` naming the model file if either holds NaN or inf."""
    fi, bi = ft.tensors[name], base.tensors[name]
    f, b = reader.typed(fi, name), reader.typed(bi, name)
    out = np.empty(fi.shape, np.float32)
    if out.ndim == 1:
        np.subtract(to_f32(f, fi.dtype), to_f32(b, bi.dtype), out=out)
    else:
        # row blocks: no second full-size float32 temporary beside ΔW
        for rows in _rows(out.shape[0], out.shape[1]):
            np.subtract(to_f32(f[rows], fi.dtype), to_f32(b[rows], bi.dtype), out=out[rows])
    if not np.isfinite(out).all():
        bad = fi if not np.isfinite(to_f32(f, fi.dtype)).all() else bi
        raise InputError(f"{bad.file}: tensor {name} has NaN or infinite values")
    return out


def _out_dtype(base: TensorInfo, ft: TensorInfo) -> str:
    """The dtype of ft − base, as torch promotes (mergekit's factors have it): the common dtype, else float32."""
    return ft.dtype if ft.dtype == base.dtype else "F32"


def _frobenius2(x: npt.NDArray[np.float32]) -> float:
    return float(sum(np.dot(x[r].ravel().astype(np.float64), x[r].ravel().astype(np.float64))
                     for r in _rows(x.shape[0], x.shape[1])))


def _rel_error(delta: npt.NDArray[np.float32], b: npt.NDArray[np.float32], a: npt.NDArray[np.float32]) -> float:
    """‖Δ − B·A‖_F / ‖Δ‖_F in float64 accumulation, B·A formed a row block at a time (0 when both are zero)."""
    num = 0.0
    for rows in _rows(delta.shape[0], delta.shape[1]):
        diff = (delta[rows] - b[rows] @ a).astype(np.float64).ravel()
        num += float(np.dot(diff, diff))
    den = _frobenius2(delta)
    if den == 0.0:
        return 0.0 if num == 0.0 else math.inf
    return math.sqrt(num / den)


def _factor_keys(module: Module) -> tuple[str, str]:
    if module.kind == "embed_lora":
        return f"{PEFT_PREFIX}{module.name}.lora_embedding_A", f"{PEFT_PREFIX}{module.name}.lora_embedding_B"
    return f"{PEFT_PREFIX}{module.name}.lora_A.weight", f"{PEFT_PREFIX}{module.name}.lora_B.weight"


def _planned(base: ModelIndex, ft: ModelIndex, modules: Sequence[Module], rank: int, reader: _Reader
             ) -> list[PlannedTensor]:
    """Every tensor the adapter may get, at its largest (the rank is known only after each SVD)."""
    out = []
    for m in modules:
        if m.kind == "save":
            for name in m.tensors:
                info = ft.tensors[name]
                out.append(PlannedTensor(PEFT_PREFIX + name, info.dtype, info.shape, reader._span(info, name)[1]))
        elif m.kind in ("lora", "embed_lora"):
            info = ft.tensors[m.weight]
            dtype = _out_dtype(base.tensors[m.weight], info)
            rows, cols = info.shape if m.kind == "lora" else info.shape[::-1]
            # a zero ΔW with a bias keeps one zero triplet to carry lora_B.bias (see _factorise)
            r = max(1, min(rank, rows, cols))
            key_a, key_b = _factor_keys(m)
            out.append(PlannedTensor.of(key_a, dtype, (r, cols)))
            out.append(PlannedTensor.of(key_b, dtype, (rows, r)))
            if m.bias is not None:
                bdt = _out_dtype(base.tensors[m.bias], ft.tensors[m.bias])
                out.append(PlannedTensor.of(f"{PEFT_PREFIX}{m.name}.lora_B.bias", bdt, (rows,)))
    return out


@dataclass(frozen=True)
class _Factored:
    rank: int
    error: float


def _factorise(
    module: Module,
    base: ModelIndex,
    ft: ModelIndex,
    reader: _Reader,
    writer: SafetensorsWriter,
    svd_args: dict[str, Any],
    distribute_scale: bool,
) -> _Factored:
    """ΔW of one module by SVD into the adapter's A and B (and the bias delta); returns the rank and the error."""
    info = ft.tensors[module.weight]
    dtype = _out_dtype(base.tensors[module.weight], info)
    delta = _delta(reader, base, ft, module.weight)
    if module.kind == "embed_lora":
        # PEFT's Embedding LoRA: W' = W + (B·A)ᵀ with A r × vocab, B dim × r
        delta = np.ascontiguousarray(delta.T)
    try:
        u, s, vt = _engine.svd(delta, name=module.weight, **svd_args)
    except MergeError as e:
        raise type(e)(f"{info.file}: tensor {module.weight}: {e}") from None
    s = np.asarray(s, np.float32)
    if distribute_scale:
        root = np.sqrt(s)
        a, b = root[:, None] * np.asarray(vt), np.asarray(u) * root[None, :]
    else:
        a, b = s[:, None] * np.asarray(vt), np.asarray(u, np.float32)
    if s.size == 0:
        if module.bias is None:
            # no singular value above sv_epsilon (ΔW = 0, or all of them ≤ sv_epsilon): no factors at all, where
            # mergekit writes zero-filled ones (full rank) or rank-0 ones that PEFT cannot load
            return _Factored(0, 0.0 if not delta.any() else 1.0)
        # lora_B.bias needs a lora_B: one zero triplet carries it and changes nothing
        a, b = np.zeros((1, delta.shape[1]), np.float32), np.zeros((delta.shape[0], 1), np.float32)
    a_st, b_st = from_f32(a, dtype), from_f32(b, dtype)
    key_a, key_b = _factor_keys(module)
    writer.add(key_a, dtype, a.shape, a_st)
    writer.add(key_b, dtype, b.shape, b_st)
    # the error of what the adapter holds: the factors after rounding to their dtype
    error = _rel_error(delta, to_f32(b_st, dtype), to_f32(a_st, dtype))
    if module.bias is not None:
        bdt = _out_dtype(base.tensors[module.bias], ft.tensors[module.bias])
        writer.add(f"{PEFT_PREFIX}{module.name}.lora_B.bias", bdt, ft.tensors[module.bias].shape,
                   from_f32(_delta(reader, base, ft, module.bias), bdt))
    return _Factored(int(s.size) if s.size else 1, error)


def _copy(module: Module, ft: ModelIndex, reader: _Reader, writer: SafetensorsWriter) -> None:
    """The fine-tune's tensors of a module to save, byte for byte."""
    for name in module.tensors:
        info = ft.tensors[name]
        raw = reader.raw(info, name)
        writer.begin(PEFT_PREFIX + name, info.dtype, info.shape)
        for i in range(0, raw.size, BLOCK_BYTES):
            writer.write(raw[i : i + BLOCK_BYTES])


def adapter_config(base_ref: str, ranks: dict[str, int], modules_to_save: list[str], lora_bias: bool) -> dict[str, Any]:
    """PEFT's adapter_config.json: r = lora_alpha = the largest rank (scale 1), the other ranks by pattern."""
    r = max(ranks.values())
    different = {k: v for k, v in ranks.items() if v != r}
    config: dict[str, Any] = {
        "base_model_name_or_path": base_ref,
        "peft_type": "LORA",
        "use_rslora": False,
        "target_modules": sorted({k.rpartition(".")[2] for k in ranks}),
        "modules_to_save": modules_to_save,
        "task_type": "CAUSAL_LM",
        "r": r,
        "lora_alpha": r,
        "rank_pattern": different,
        "alpha_pattern": dict(different),
        "lora_dropout": 0.0,
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    if lora_bias:
        config["lora_bias"] = True
    return config


def extract_lora(
    base: str | os.PathLike[str],
    finetuned: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    rank: int = 128,
    sv_epsilon: float = 0.0,
    exact: bool = False,
    distribute_scale: bool = True,
    embed_lora: bool = False,
    include: str | Sequence[str] | None = None,
    exclude: str | Sequence[str] | None = None,
    save_modules: Sequence[str] = (),
    skip_undecomposable: bool = False,
    seed: int = 0,
    threads: int | None = None,
    oversample: int = default("tsv_m", "oversample"),
    power_iters: int = default("tsv_m", "power_iters"),
    overwrite: bool = False,
    quiet: bool = True,
    on_progress: Progress | None = None,
    write_model_card: bool = True,
) -> dict[str, Any]:
    """Write a PEFT LoRA adapter (``adapter_model.safetensors``, ``adapter_config.json``, ``README.md``) into ``out``
    that turns ``base`` into (an approximation of) ``finetuned``; see the module docstring for what goes where.

    ``rank``: the most singular triplets per module (mergekit's ``--max-rank``); ``sv_epsilon`` drops smaller
    singular values. The SVD is randomized (``oversample`` extra sketch columns, ``power_iters`` power iterations,
    the sketch keyed by ``seed`` and the tensor name, so the result does not depend on ``threads``) unless
    ``exact``. ``include`` / ``exclude``: regexes searched in module names; ``save_modules``: module names or keys
    saved at full rank besides the automatic ones. The output is built beside ``out`` and renamed onto it when
    complete; an existing ``out`` is an ``OutputError`` unless ``overwrite``. Models are read one tensor at a time.
    ``write_model_card=False``: no ``README.md`` (a PEFT adapter card, ``model_card.lora_card``).

    Returns a summary: ``r``, ``ranks`` and ``errors`` (‖ΔW − B·A‖_F / ‖ΔW‖_F of the stored factors) per module,
    ``max_error`` (and ``max_error_module``), ``mean_error``, ``target_modules``, ``modules_to_save``, ``unchanged``
    (modules whose ΔW is zero: no factors), ``skipped``, ``notes``, ``bytes_written``, ``seconds``, ``out``.
    """
    start = time.perf_counter()
    rank = _int(rank, "rank", 1)
    if isinstance(sv_epsilon, bool) or not isinstance(sv_epsilon, (int, float)) or not (
        math.isfinite(sv_epsilon) and sv_epsilon >= 0
    ):
        raise ParameterError(f"sv_epsilon must be a finite number ≥ 0, got {sv_epsilon!r}")
    oversample = _int(oversample, "oversample", 0)
    power_iters = _int(power_iters, "power_iters", 0)
    seed = check_seed(seed)
    threads = check_threads(threads)
    inc, exc = _regexes(include, "include"), _regexes(exclude, "exclude")
    if isinstance(save_modules, str):
        save_modules = [save_modules]
    log: Callable[[str], None] = (lambda _: None) if quiet else (lambda m: print(f"ferromerge: {m}", file=sys.stderr))

    output = OutputDir(out, overwrite=overwrite)
    base_ix, ft_ix = index_model(os.fspath(base)), index_model(os.fspath(finetuned))
    output.check_inputs([base_ix.path, ft_ix.path])
    modules, keys, notes = plan_modules(
        base_ix, ft_ix, embed_lora=embed_lora, include=inc, exclude=exc, save_modules=list(save_modules),
        skip_undecomposable=skip_undecomposable,
    )
    reader = _Reader()
    planned = _planned(base_ix, ft_ix, modules, rank, reader)
    check_free_space(output.target, sum(p.nbytes for p in planned))
    for note in notes:
        log(f"note: {note}")

    work = [m for m in modules if m.kind != "skip"]
    sizes = [sum(reader._span(ft_ix.tensors[n], n)[1] * (1 if m.kind == "save" else 2) for n in m.tensors)
             for m in work]
    svd_args = dict(rank=rank, sv_epsilon=float(sv_epsilon), exact=bool(exact), oversample=oversample,
                    power_iters=power_iters, seed=seed, threads=threads)
    ranks: dict[str, int] = {}
    errors: dict[str, float] = {}
    unchanged: list[str] = []
    with output.building(log) as tmp:
        writer = SafetensorsWriter(tmp / ADAPTER_WEIGHTS, planned=planned, metadata={"format": "pt"})
        try:
            done, tensors_done, tensors = 0, 0, sum(len(m.tensors) for m in work)
            for i, m in enumerate(work):
                if m.kind == "save":
                    _copy(m, ft_ix, reader, writer)
                else:
                    got = _factorise(m, base_ix, ft_ix, reader, writer, svd_args, distribute_scale)
                    if got.rank == 0 and got.error == 0.0:
                        unchanged.append(m.name)
                    else:
                        # a module whose every singular value is ≤ sv_epsilon has no factors and error 1
                        errors[m.name] = got.error
                        if got.rank:
                            ranks[m.name] = got.rank
                done += sizes[i]
                tensors_done += len(m.tensors)
                if on_progress is not None:
                    on_progress(tensors_done, tensors, done, sum(sizes))
            bytes_written = writer.close()
        except BaseException:
            writer.abort()
            raise
        if not ranks:
            why = "equals the base" if not errors else f"differs by no singular value above {sv_epsilon} from the base"
            raise InputError(
                f"the fine-tuned model {ft_ix.ref!r} ({ft_ix.path}) {why} {base_ix.ref!r} in every module to "
                "factorise: there is no LoRA to extract"
            )
        if unchanged:
            notes.append(f"{len(unchanged)} module(s) are unchanged by the fine-tune and get no factors "
                         f"({unchanged[0]}{', ...' if len(unchanged) > 1 else ''})")
        lora_modules = [m for m in work if m.name in ranks]
        lora_bias = all(m.bias is not None for m in lora_modules)
        config = adapter_config(os.fspath(base), ranks, keys, lora_bias)
        worst = max(errors, key=lambda k: errors[k])
        summary: dict[str, Any] = {
            "out": str(output.target),
            "r": config["r"],
            "target_modules": config["target_modules"],
            "modules_to_save": keys,
            "ranks": ranks,
            "errors": errors,
            "max_error": errors[worst],
            "max_error_module": worst,
            "mean_error": float(np.mean(list(errors.values()))),
            "unchanged": unchanged,
            "skipped": [m.name for m in modules if m.kind == "skip"],
            "notes": notes,
            "bytes_written": bytes_written,
        }
        params = dict(rank=rank, sv_epsilon=sv_epsilon, exact=exact, distribute_scale=distribute_scale,
                      embed_lora=embed_lora, seed=seed, oversample=oversample, power_iters=power_iters)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if write_model_card:
            write_card(tmp, lora_card(os.fspath(base), os.fspath(finetuned), output.target.name, summary, params))
    summary["seconds"] = time.perf_counter() - start
    return summary
