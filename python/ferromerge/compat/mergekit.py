"""Run mergekit 0.1.5's own pipelines on ferromerge's kernels: ``register()`` / ``unregister()``.

>>> from ferromerge.compat import mergekit as fm_mergekit
>>> fm_mergekit.register()            # every mergekit method ferromerge implements now runs on our kernels
>>> mergekit.merge.run_merge(config, "./out", options=MergeOptions())        # unchanged code, same YAML
>>> fm_mergekit.unregister()          # mergekit's own methods again

From the shell, ``python -m ferromerge.compat.mergekit CONFIG OUT [mergekit-yaml options]`` is ``mergekit-yaml``
with the kernels registered (mergekit has no plugin mechanism, so its own ``mergekit-yaml`` command cannot load
them by itself).

How: mergekit looks every method up by name in ``mergekit.merge_methods.registry`` (planning, the graph task
``ExecuteMergeMethodTask`` and ``merge_tensors`` / ``merge_state_dicts`` all call ``merge_methods.get``).
``register()`` replaces those entries with wrappers that keep the original method's ``spec``, so mergekit binds,
defaults and validates every parameter (weights, densities, gradients, filters, input contracts) exactly as before;
only the kernel call changes. A wrapper turns the bound values into one ``ferromerge._engine.merge_arrays`` call per
output tensor: weight → weights, density (> 1 → 1: both are "keep all"), gamma, epsilon, normalize, lambda,
``rescale: true`` → L1 norm matching (mergekit's rescale), ``t``, ``select_topk``, ... → ``params``. The inputs are
rounded to the group's dtype (mergekit's ``dtype``, else the promoted input dtype) and the result is returned in
``out_dtype``, else that dtype; the math is float32 with one rounding.

A group runs on mergekit's own implementation instead (same result as without ``register``) when our kernels
cannot take it: tensors not on the CPU (``--cuda``: mergekit's GPU path beats a round trip to host memory), dtypes
other than float32/float16/bfloat16, inputs that require grad while autograd is on, empty tensors, groups without
the inputs the method merges, a density ≤ 0 (mergekit zeroes that model's delta), ``passthrough`` without a
``scale`` (a plain copy), ``karcher`` over a single tensor.

Randomness (dare_ties, dare_linear, della, della_linear, arcee_fusion's quantile sample of tensors over 1e6
elements): mergekit draws from torch's global RNG, so masks depend on ``--random-seed`` and on every draw before
them. ferromerge's masks come from a counter-based generator keyed by (seed, tensor name, model position among the
non-base models). ``register(seed=None)`` (default) takes each tensor's seed from torch's global RNG (one draw per
random tensor), so ``--random-seed`` / ``torch.manual_seed`` still make runs reproducible and unseeded runs differ,
as in mergekit; ``register(seed=N)`` ignores torch's RNG and gives ``ferromerge run --seed N``'s masks (the same
bytes, whatever the schedule or thread count). Masks never bit-match torch's.

Departures from mergekit's own kernels (docs/compat.md, "Drop-in backends"): float32 math where mergekit computes
task-vector methods in bf16/fp16 (rounding noise); lowest-index tie-breaks; ``linear`` with ``normalize`` and
weights summing to 0 raises ``ParameterError`` instead of writing inf/NaN; ``arcee_fusion`` returns the input dtype
(mergekit returns float32, its issue #604); the kernels' own validation messages (e.g. della's epsilon).
"""

from __future__ import annotations

import sys
from collections.abc import Mapping, Sequence
from typing import Any

from .. import _engine
from .._validate import check_seed
from ..arrays import as_array, give_back, torch_dtype_name
from ..methods import EXTENSIONS, GENERALIZED_TASK_ARITHMETIC, REGISTRY

__all__ = ["SUPPORTED", "register", "registered", "unregister", "main"]

#: every mergekit method that ``register()`` can back with a kernel (mergekit 0.1.5's names; their contract is
#: ``ferromerge.methods.REGISTRY``'s)
SUPPORTED: tuple[str, ...] = (
    "linear", "passthrough", "task_arithmetic", "ties", "dare_ties", "dare_linear", "breadcrumbs", "breadcrumbs_ties",
    "della", "della_linear", "slerp", "nearswap", "nuslerp", "multislerp", "karcher", "model_stock", "sce", "ram",
    "ramplus_tl", "arcee_fusion",
)

#: mergekit method name -> the kernel ``params`` it takes, which mergekit binds under the same names (ferromerge's
#: own additions, such as breadcrumbs' ``per_row``, are not mergekit parameters: the kernel's default applies)
_PARAMS: dict[str, tuple[str, ...]] = {
    name: tuple(p for p in REGISTRY[name].kernel_params if p not in EXTENSIONS) for name in SUPPORTED
}
_GTA = GENERALIZED_TASK_ARITHMETIC
#: the base is one more input (mergekit: base ignored), so the kernel gets none
_BASE_JOINS = tuple(name for name in SUPPORTED if REGISTRY[name].base == "joins")
#: methods that use the seed (see the module docstring)
_RANDOM = tuple(name for name in SUPPORTED if REGISTRY[name].random)
#: methods whose per-input weight the kernel uses; the others get 1.0, which their kernels ignore
_WEIGHTED = tuple(name for name in SUPPORTED if REGISTRY[name].weight_param == "weight")

#: name -> mergekit's own method, while registered
_originals: dict[str, Any] = {}


def _registry() -> Any:
    try:
        from mergekit.merge_methods import registry
    except ImportError as e:
        raise ImportError("ferromerge.compat.mergekit needs mergekit 0.1.5 (pip install mergekit==0.1.5)") from e
    if not hasattr(registry, "_METHODS"):
        raise ImportError(
            "this mergekit has no merge_methods.registry._METHODS table; ferromerge.compat.mergekit supports 0.1.5"
        )
    return registry


class _Unsupported(Exception):
    """This group goes to mergekit's own implementation (the reason is only for debugging)."""


def _make_wrapper(original: Any, seed: int | None, threads: int | None) -> Any:
    """A ``MergeMethod`` with ``original``'s spec whose execution calls our kernel."""
    from mergekit.merge_methods.base import MergeMethod

    class FerromergeMethod(MergeMethod):
        spec = original.spec
        supports_batching = False
        ferromerge_original = original

        def __repr__(self) -> str:
            return f"<ferromerge-backed mergekit method {self.spec.name!r}>"

        def _execute(self, groups, parameters, options, *, input_dtypes, out_dtype=None):
            results = []
            for group, params, dtype in zip(groups, parameters, input_dtypes):
                try:
                    result = _merge_group(self.spec.name, group, params, dtype, out_dtype, seed, threads)
                except _Unsupported:
                    (result,) = original._execute((group,), [params], options, input_dtypes=[dtype],
                                                  out_dtype=out_dtype)
                results.append(result)
            return tuple(results)

    return FerromergeMethod()


def _floats(values: Any, entries: Sequence[Any]) -> list[float]:
    return [float(values[e.id]) for e in entries]


def _merge_group(method: str, group: Any, params: Mapping[str, Any], dtype: Any, out_dtype: Any,
                 seed: int | None, threads: int | None) -> Any:
    import torch

    entries = list(group.entries)
    if not entries:
        raise _Unsupported("empty group")
    tensors = [e.tensor for e in entries]
    if any(t.device.type != "cpu" for t in tensors):
        raise _Unsupported("not on the CPU")
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise _Unsupported("autograd")
    cast = torch_dtype_name(dtype)
    out_name = torch_dtype_name(out_dtype) if out_dtype is not None else cast
    if cast is None or out_name is None or any(torch_dtype_name(t.dtype) is None for t in tensors):
        raise _Unsupported("dtype")
    if tensors[0].numel() == 0:
        raise _Unsupported("empty tensor")

    if method in _BASE_JOINS:
        inputs, base = entries, None
    else:
        base = group.base
        inputs = list(group.non_base)
    if not inputs:
        raise _Unsupported("nothing to merge")
    if method == "karcher" and len(inputs) == 1:
        raise _Unsupported("single tensor")

    n = len(inputs)
    weights = [1.0] * n
    densities = [1.0] * n
    extra: dict[str, Any] = {}
    normalize = False
    lambda_ = 1.0
    rescale = "none"
    kernel = method
    if method == "passthrough":
        scale = params["scale"][inputs[0].id]
        if scale is None:
            raise _Unsupported("plain copy")
        kernel, weights = "linear", [float(scale)]
    elif method == "linear":
        weights = _floats(params["weight"], inputs)
        normalize = bool(params["normalize"])
    elif method in _WEIGHTED:
        weights = _floats(params["weight"], inputs)
    if method in _GTA:
        densities = _floats(params["density"], inputs)
        if any(d <= 0 for d in densities):
            raise _Unsupported("density <= 0")
        # mergekit: density >= 1 leaves the delta untouched, which is what our kernels do at exactly 1
        densities = [min(d, 1.0) for d in densities]
        normalize = bool(params["normalize"])
        lambda_ = float(params["lambda"])
        rescale = "l1" if params["rescale"] else "none"
        if "gamma" in params:
            extra["gammas"] = _floats(params["gamma"], inputs)
        if "epsilon" in params:
            extra["epsilons"] = _floats(params["epsilon"], inputs)
    kparams = {name: float(params[name]) for name in _PARAMS[method]}
    if kparams:
        extra["params"] = kparams
    if method in _RANDOM:
        # None: one draw from torch's global RNG per random tensor, so --random-seed governs the masks as in mergekit
        extra["seed"] = int(torch.randint(0, 2**62, ())) if seed is None else seed

    name = group.metadata.name or ""
    arrays = [as_array(e.tensor, f"{e.id}: {name}") for e in inputs]
    base_array = None if base is None else as_array(base.tensor, f"{base.id}: {name}")
    shape = list(tensors[0].shape)
    method_object: dict[str, Any] = {
        "name": kernel, "normalize": normalize, "lambda": lambda_, "rescale": rescale, "seed": extra.get("seed", 0)
    }
    if "params" in extra:
        method_object["params"] = extra["params"]
    flat = _engine.merge_arrays(
        method_object,
        [a.flat for a in arrays],
        None if base_array is None else base_array.flat,
        _engine.input_values(weights, densities, extra.get("gammas"), extra.get("epsilons")),
        out_dtype=out_name,
        cast_dtype=cast,
        name=name,
        threads=threads,
        shape=shape,
    )
    ref = base_array if base_array is not None else arrays[0]
    return give_back(flat, out_name, tuple(shape), ref.kind)


def register(methods: Sequence[str] | None = None, *, seed: int | None = None, threads: int | None = None) -> list[str]:
    """Back mergekit's ``methods`` (default: all of :data:`SUPPORTED` that this mergekit has) with our kernels.

    ``seed``: None takes each random tensor's seed from torch's global RNG (``--random-seed`` applies); an int
    keys the masks as ``ferromerge run --seed`` does. ``threads``: worker threads per tensor (default: all cores).
    Calling it again re-registers with the new settings. Returns the names now backed by ferromerge.
    """
    registry = _registry()
    if seed is not None:
        check_seed(seed, ValueError)
    names = list(SUPPORTED) if methods is None else list(methods)
    unknown = [m for m in names if m not in SUPPORTED]
    if unknown:
        raise ValueError(f"ferromerge does not implement {unknown}; it backs: {', '.join(SUPPORTED)}")
    done = []
    for name in names:
        current = registry._METHODS.get(name)
        if current is None:
            if methods is not None:
                raise ValueError(f"mergekit has no merge method {name!r}")
            continue
        original = _originals.get(name, current)
        registry._METHODS[name] = _make_wrapper(original, seed, threads)
        _originals[name] = original
        done.append(name)
    return done


def unregister() -> list[str]:
    """Put mergekit's own methods back; returns the names restored."""
    if not _originals:
        return []
    registry = _registry()
    restored = []
    for name, original in list(_originals.items()):
        registry._METHODS[name] = original
        del _originals[name]
        restored.append(name)
    return restored


def registered() -> list[str]:
    """The mergekit methods currently backed by ferromerge."""
    return list(_originals)


def main(argv: Sequence[str] | None = None) -> None:
    """``mergekit-yaml`` with ferromerge's kernels registered (``python -m ferromerge.compat.mergekit --help``)."""
    register()
    from mergekit.scripts.run_yaml import main as run_yaml

    run_yaml(list(sys.argv[1:] if argv is None else argv), prog_name="python -m ferromerge.compat.mergekit")


if __name__ == "__main__":
    main()
