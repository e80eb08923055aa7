"""In-memory merging: mergekit 0.1.5's ``merge_tensors`` / ``merge_state_dicts`` over the Rust kernels.

>>> out = merge_tensors([a, b, base], "ties", parameters={"weight": [0.5, 0.5], "density": 0.5}, base_index=2)
>>> sd = merge_state_dicts({"a": sd_a, "b": sd_b, "base": sd_0}, "dare_ties", base="base",
...                        parameters={"weight": {"a": 0.5, "b": 0.5}, "density": 0.7}, seed=1)

Arrays may be

* NumPy ``float32`` / ``float16`` arrays;
* NumPy ``uint16`` (or ``int16``) arrays, read as **bfloat16 bit patterns** (NumPy has no bfloat16); a bfloat16
  result comes back as ``uint16`` bits too;
* ``ml_dtypes.bfloat16`` arrays (when ml_dtypes is installed); a bfloat16 result comes back as that type;
* torch tensors (when torch is installed; it is imported only when a torch tensor is passed). CPU contiguous
  float32/float16/bfloat16 tensors are shared without a copy; other devices are copied to the CPU and the result
  is moved back to the input's device.

The result has the input shape and the same kind of array as the reference input (the base when there is one,
else the first tensor). All math is float32; ``dtype`` rounds the inputs to that dtype first (mergekit's ``dtype``),
``out_dtype`` is the dtype of the result (default: ``dtype``, else the reference input's dtype). Dtypes can be given
as mergekit names (``"float32"``, ``"float16"``, ``"bfloat16"``, also ``"fp32"``, ``"bf16"``, ...), NumPy dtypes,
``ml_dtypes.bfloat16`` or torch dtypes.

Every mergekit 0.1.5 method is available (``ferromerge.methods.REGISTRY``). Parameters follow mergekit: per-model
ones (``weight``, ``density``, ``gamma``, ``epsilon``) are a scalar (broadcast), a list with one value per non-base
tensor (per tensor for ``linear`` and ``karcher``, where a base is just one more input) or a mapping (tensor
position for ``merge_tensors``, model name for ``merge_state_dicts``); shared ones (``normalize``, ``lambda``,
``t``, ``select_topk``, ...) are scalars. Defaults, required ones (slerp's and nearswap's ``t``), input counts
(slerp: a base and exactly 1 other) and validation come from :mod:`ferromerge.methods`; unknown names raise
``ParameterError``. A base is required by the task-vector methods, slerp, nearswap, model_stock, sce, ram and
arcee_fusion, optional for nuslerp and multislerp (with one they merge task vectors), and one more input for
``linear`` and ``karcher``. ``passthrough`` takes a single tensor and multiplies it by ``scale`` (default 1).
``seed``, the tensor ``name`` and each model's position among the non-base models key the random masks of DARE and
DELLA, so results are reproducible and independent of ``threads``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import _engine
from . import methods as _methods
from ._validate import check_seed
from .arrays import FlatArray, as_array, dtype_name, give_back, is_torch
from .errors import InputError, ParameterError

__all__ = ["merge_tensors", "merge_state_dicts"]


def _check_names(spec: _methods.MethodSpec, given: Mapping[str, Any]) -> None:
    known = spec.known_parameters()
    unknown = sorted(k for k in given if k not in known)
    if unknown:
        raise ParameterError(
            f"unknown parameter(s) {', '.join(map(repr, unknown))} for method {spec.name!r}; "
            f"known parameters: {', '.join(known)}"
        )


def _per_model(
    spec: _methods.MethodSpec, given: Mapping[str, Any], keys: Sequence[Any], labels: Sequence[str], base: Any = None
) -> dict[str, list[float]]:
    """Resolve per-model parameters to one float per model (``keys`` are mapping keys, ``labels`` for messages).

    A mapping may also hold a value for the base (``base``), which non-base parameters ignore, as in mergekit.
    """
    out: dict[str, list[float]] = {}
    for pname, pspec in spec.per_model.items():
        value = given.get(pname)
        if value is None:
            if pspec.default is None:
                raise ParameterError(f"missing required parameter {pname!r} for method {spec.name!r}")
            out[pname] = [float(pspec.default)] * len(keys)
            continue
        if isinstance(value, Mapping):
            missing = [lab for k, lab in zip(keys, labels) if k not in value]
            if missing:
                raise ParameterError(f"parameter {pname!r}: no value for {', '.join(missing)}")
            extra = [k for k in value if k not in keys and not (base is not None and k == base)]
            if extra:
                raise ParameterError(f"parameter {pname!r}: values given for unknown input(s) {extra!r}")
            raw = [value[k] for k in keys]
        elif isinstance(value, (Sequence, np.ndarray)) and not isinstance(value, (str, bytes)):
            raw = list(value)
            if len(raw) != len(keys):
                raise ParameterError(
                    f"parameter {pname!r} expects {len(keys)} values (one per "
                    f"{'input' if not spec.takes_base else 'non-base input'}), got {len(raw)}"
                )
        else:
            raw = [value] * len(keys)
        vals = []
        for lab, v in zip(labels, raw):
            if isinstance(v, np.generic):
                v = v.item()
            vals.append(_methods.coerce(pspec, pname, v, f"{pname} of {lab}"))
        out[pname] = vals
    return out


def _shared(spec: _methods.MethodSpec, given: Mapping[str, Any]) -> dict[str, Any]:
    shared = {}
    for k in spec.shared:
        if k in given:
            v = given[k]
            shared[k] = v.item() if isinstance(v, np.generic) else v
    return _methods.resolve_shared(spec, shared)


@dataclass
class _Resolved:
    spec: _methods.MethodSpec
    kernel: dict[str, Any]
    weights: list[float]
    densities: list[float]
    #: breadcrumbs' gamma and della's epsilon per input (None for other methods)
    gammas: list[float] | None = None
    epsilons: list[float] | None = None
    #: the method-wide parameters (spectral methods' ``exclude`` is matched against each tensor's name)
    shared: dict[str, Any] | None = None


def _resolve(
    method: str | _methods.MethodSpec, parameters: Mapping[str, Any] | None, keys: Sequence[Any],
    labels: Sequence[str], seed: int, base: Any = None, *, thing: str = "tensor", base_word: str = "base tensor",
) -> _Resolved:
    spec = _methods.get(method) if isinstance(method, str) else method
    if not spec.takes_base and spec.max_inputs is not None and len(keys) > spec.max_inputs:
        raise ParameterError(
            f"method {spec.name!r} takes at most {spec.max_inputs} input(s), got {len(keys)}: {', '.join(labels)}"
        )
    if not spec.count_ok(len(keys)):
        raise ParameterError(
            f"method {spec.name!r} takes {spec.inputs_rule(thing, base_word)}, got {len(keys)}: {', '.join(labels)}"
        )
    given = dict(parameters or {})
    _check_names(spec, given)
    per = _per_model(spec, given, keys, labels, base)
    for i, lab in enumerate(labels):
        _methods.check_model(spec, {name: values[i] for name, values in per.items()}, lab)
    shared = _shared(spec, given)
    kernel = _methods.kernel_spec(spec, shared, check_seed(seed))
    # the kernel's input weight is the method's weight parameter (passthrough: "scale"); methods without weights
    # (slerp, karcher, ...) pass 1.0, which their kernels ignore
    weights = per[spec.weight_param] if spec.weight_param is not None else [1.0] * len(keys)
    densities = per.get("density", [1.0] * len(keys))
    return _Resolved(spec, kernel, weights, densities, per.get("gamma"), per.get("epsilon"), shared)


def _merge_flat(
    r: _Resolved,
    inputs: Sequence[FlatArray],
    base: FlatArray | None,
    *,
    shape: tuple[int, ...],
    name: str,
    cast: str | None,
    out_dtype: str,
    threads: int | None,
    chunk_elems: int | None,
    model_ids: Sequence[int] | None = None,
    allow_nonfinite: bool = False,
) -> np.ndarray:
    k = _methods.kernel_for_tensor(r.spec, r.kernel, r.shared or {}, name, shape, len(inputs))
    params = k.get("params")
    extra = _methods.kernel_kwargs(r.spec, shape=shape, params=params, gammas=r.gammas, epsilons=r.epsilons)
    method = {key: value for key, value in k.items() if key != "params"}
    if "params" in extra:
        method["params"] = extra["params"]
    return _engine.merge_arrays(
        method,
        [a.flat for a in inputs],
        None if base is None else base.flat,
        _engine.input_values(r.weights, r.densities, extra.get("gammas"), extra.get("epsilons"), model_ids),
        out_dtype=out_dtype,
        cast_dtype=cast,
        name=name,
        shape=extra.get("shape"),
        threads=threads,
        chunk_elems=chunk_elems,
        allow_nonfinite=allow_nonfinite,
    )


def merge_tensors(
    tensors: Sequence[Any],
    method: str,
    parameters: Mapping[str, Any] | None = None,
    base_index: int | None = None,
    *,
    seed: int = 0,
    name: str = "",
    dtype: Any = None,
    out_dtype: Any = None,
    threads: int | None = None,
    chunk_size: int | None = None,
    allow_nonfinite: bool = False,
) -> Any:
    """Merge the tensors that contribute to one output tensor (mergekit 0.1.5's ``merge_tensors``).

    ``tensors[base_index]`` is the base: required by most methods, optional for ``nuslerp``/``multislerp``, one
    more input for ``linear`` and ``karcher``. Per-model parameters are a scalar, a list with one value per non-base
    tensor (per tensor for ``linear``/``karcher``) or a mapping keyed by position in ``tensors``. ``name`` keys the
    random streams (DARE, DELLA) together with ``seed`` and each model's position among the non-base tensors.
    ``chunk_size`` (elements) and ``threads`` never change the result.
    Raises ``ParameterError`` for bad parameters and ``InputError`` for bad arrays, NaN or infinite values among
    them included (``allow_nonfinite=True`` merges those as they are: the method's arithmetic carries them).
    """
    if isinstance(tensors, (str, bytes)) or not isinstance(tensors, Sequence) or len(tensors) == 0:
        raise InputError("merge_tensors: expected a non-empty sequence of arrays")
    spec = _methods.get(method) if isinstance(method, str) else method
    n = len(tensors)
    if base_index is not None:
        if isinstance(base_index, bool) or not isinstance(base_index, (int, np.integer)) or not 0 <= base_index < n:
            raise ParameterError(f"base_index must be an integer in [0, {n}), got {base_index!r}")
        base_index = int(base_index)
    if spec.requires_base and base_index is None:
        raise ParameterError(f"method {spec.name!r} requires a base tensor: pass base_index")

    arrays = [as_array(t, f"tensors[{i}]") for i, t in enumerate(tensors)]
    ref_i = base_index if base_index is not None else 0
    shape = arrays[ref_i].shape
    for i, a in enumerate(arrays):
        if a.shape != shape:
            raise InputError(f"tensors[{i}] has shape {list(a.shape)}, expected {list(shape)} (tensors[{ref_i}])")

    if spec.takes_base and base_index is not None:
        idx = [i for i in range(n) if i != base_index]
        base = arrays[base_index]
    else:
        idx = list(range(n))
        base = None
    if not idx:
        raise ParameterError(f"method {spec.name!r} needs at least one non-base tensor")
    r = _resolve(spec, parameters, idx, [f"tensors[{i}]" for i in idx], seed, base_index)

    cast = dtype_name(dtype, "dtype")
    out = dtype_name(out_dtype, "out_dtype") or cast or arrays[ref_i].dtype
    flat = _merge_flat(
        r,
        [arrays[i] for i in idx],
        base,
        shape=shape,
        name=str(name),
        cast=cast,
        out_dtype=out,
        threads=threads,
        chunk_elems=chunk_size,
        allow_nonfinite=allow_nonfinite,
    )
    return give_back(flat, out, shape, arrays[ref_i].kind)


def _copy_nonfloat(values: list[Any], tname: str, labels: list[str]) -> Any | None:
    """For integer/bool buffers: the first value when every model agrees exactly, else an InputError.

    Returns None when the tensor is a floating-point one (to be merged).
    """
    first = values[0]
    if is_torch(first):
        if first.is_floating_point():
            return None
        for lab, v in zip(labels[1:], values[1:]):
            if not (is_torch(v) and v.dtype == first.dtype and v.shape == first.shape and bool((v == first).all())):
                raise InputError(f"model {lab!r}, tensor {tname!r}: non-floating tensor differs between models")
        return first.clone()
    if isinstance(first, np.ndarray) and (first.dtype.kind in "biu" and first.dtype not in (np.uint16, np.int16)):
        for lab, v in zip(labels[1:], values[1:]):
            if not (isinstance(v, np.ndarray) and v.dtype == first.dtype and np.array_equal(v, first)):
                raise InputError(f"model {lab!r}, tensor {tname!r}: non-floating tensor differs between models")
        return first.copy()
    return None


def merge_state_dicts(
    state_dicts: Mapping[str, Mapping[str, Any]],
    method: str,
    base: str | None = None,
    parameters: Mapping[str, Any] | None = None,
    *,
    seed: int = 0,
    dtype: Any = None,
    out_dtype: Any = None,
    threads: int | None = None,
    allow_nonfinite: bool = False,
) -> dict[str, Any]:
    """Merge whole state dicts ``{model_name: {tensor_name: array}}`` (mergekit 0.1.5's ``merge_state_dicts``).

    Every state dict must have the same tensor names and shapes (else ``InputError`` naming the model and tensor).
    Per-model parameters are a scalar, a list (in mapping order, non-base models only unless ``linear`` or
    ``karcher``) or a dict keyed by model name. Random masks (DARE, DELLA) are keyed by ``seed``, the tensor name and
    the model's position among the non-base models in mapping order. Integer/bool buffers are copied when every
    model agrees. NaN or infinite values are an ``InputError`` unless ``allow_nonfinite=True`` (``merge_tensors``).
    Returns ``{tensor_name: merged array}`` in the first model's key order.
    """
    if not isinstance(state_dicts, Mapping) or not state_dicts:
        raise InputError("merge_state_dicts: expected a non-empty mapping {model_name: state_dict}")
    spec = _methods.get(method) if isinstance(method, str) else method
    names = list(state_dicts)
    if base is not None and base not in state_dicts:
        raise ParameterError(f"base {base!r} is not one of the models: {names!r}")
    if spec.requires_base and base is None:
        raise ParameterError(f"method {spec.name!r} requires a base model: pass base=<model name>")
    with_base = spec.takes_base and base is not None
    inputs = [m for m in names if not (with_base and m == base)]
    if not inputs:
        raise ParameterError(f"method {spec.name!r} needs at least one non-base model")
    labels = [f"model {m!r}" for m in inputs]
    r = _resolve(spec, parameters, inputs, labels, seed, base, thing="model", base_word="base model")
    cast = dtype_name(dtype, "dtype")
    out_name = dtype_name(out_dtype, "out_dtype")
    ref_model = base if base is not None else names[0]

    keys = list(state_dicts[ref_model])
    key_set = set(keys)
    for m in names:
        sd = state_dicts[m]
        for k in sd:
            if k not in key_set:
                raise InputError(f"model {m!r} has tensor {k!r} that model {ref_model!r} lacks")
        for k in keys:
            if k not in sd:
                raise InputError(f"model {m!r} lacks tensor {k!r}")

    result: dict[str, Any] = {}
    for k in keys:
        all_models = names
        copied = _copy_nonfloat([state_dicts[m][k] for m in all_models], k, all_models)
        if copied is not None:
            result[k] = copied
            continue
        arrays = {m: as_array(state_dicts[m][k], f"model {m!r}, tensor {k!r}") for m in names}
        shape = arrays[ref_model].shape
        for m in names:
            if arrays[m].shape != shape:
                raise InputError(
                    f"model {m!r}, tensor {k!r}: shape {list(arrays[m].shape)} differs from "
                    f"{list(shape)} in model {ref_model!r}"
                )
        out = out_name or cast or arrays[ref_model].dtype
        flat = _merge_flat(
            r,
            [arrays[m] for m in inputs],
            arrays[base] if with_base else None,
            shape=shape,
            name=k,
            cast=cast,
            out_dtype=out,
            threads=threads,
            chunk_elems=None,
            model_ids=list(range(len(inputs))),
            allow_nonfinite=allow_nonfinite,
        )
        result[k] = give_back(flat, out, shape, arrays[ref_model].kind)
    return result
