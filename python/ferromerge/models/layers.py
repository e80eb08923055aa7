"""Layer indices of tensor names, parsed generically, and the layer stacks of a model.

A layer tensor is named ``<stack>.<index>.<rest>``, where the stack's last component is one of the container
names transformers models use for their repeated blocks: ``layers`` (Llama, Mistral, Qwen, Gemma, GPT-NeoX,
``model.layers.N.``), ``h`` (GPT-2, ``transformer.h.N.``), ``layer`` (BERT, ``encoder.layer.N.``), ``blocks`` /
``block``. The first such component wins, so the expert index of ``model.layers.3.mlp.experts.7.w1`` is not
mistaken for a layer. Everything else (embeddings, final norm, lm_head) is a non-layer tensor.

A model may hold several stacks (a vision tower beside a text decoder); each is counted on its own. The count is
cross-checked against ``config.json`` (``num_hidden_layers``, ``n_layer`` or ``num_layers``) for single-stack
models, so that a truncated checkpoint is caught before merging.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from ..errors import InputError
from .architecture import LAYER_COUNT_KEYS, LAYER_TENSOR
from .index import ModelIndex


@dataclass(frozen=True)
class LayerName:
    """A layer tensor's name split at its layer index: ``model.layers`` / ``3`` / ``mlp.up_proj.weight``."""

    stack: str
    index: int
    rest: str

    def renamed(self, index: int) -> str:
        """The same tensor of layer ``index``."""
        return f"{self.stack}.{index}.{self.rest}"


def parse(name: str) -> LayerName | None:
    """The layer part of a tensor name, None for a non-layer tensor."""
    m = LAYER_TENSOR.match(name)
    if m is None:
        return None
    return LayerName(m["stack"], int(m["index"]), m["rest"])


def read_model_config(model: ModelIndex) -> dict[str, object] | None:
    """The model's ``config.json`` as a dict, None when it has none; an unreadable one is an ``InputError``."""
    path = model.path / "config.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"model {model.ref!r}: cannot read {path}: {e}") from None
    return data if isinstance(data, dict) else None


def declared_layers(config: dict[str, object] | None) -> tuple[str, int] | None:
    """``(key, count)`` of the first layer-count key config.json sets, None when it sets none."""
    if config is None:
        return None
    for key in LAYER_COUNT_KEYS:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None


def layer_stacks(model: ModelIndex, *, check_declared: bool = True) -> dict[str, int]:
    """``{stack: number of layers}`` of a model, in order of first appearance.

    Every stack's indices must run 0..n−1 without gaps, and a single stack must have the count that config.json
    declares (when it declares one, and ``check_declared``: a module's view of a multi-module model has one stack
    whose count is under a sub-config's key); otherwise the model is incomplete and this is an ``InputError``.
    """
    seen: dict[str, set[int]] = {}
    for name in model.tensors:
        layer = parse(name)
        if layer is not None:
            seen.setdefault(layer.stack, set()).add(layer.index)
    counts: dict[str, int] = {}
    for stack, indices in seen.items():
        n = max(indices) + 1
        missing = sorted(set(range(n)) - indices)
        if missing:
            raise InputError(
                f"model {model.ref!r} ({model.path}) has tensors of {stack}.{n - 1} but none of layer(s) "
                f"{', '.join(f'{stack}.{i}' for i in missing[:5])}{' ...' if len(missing) > 5 else ''}"
            )
        counts[stack] = n
    declared = declared_layers(read_model_config(model)) if check_declared else None
    if declared is not None and len(counts) == 1:
        key, value = declared
        ((stack, n),) = counts.items()
        if value != n:
            raise InputError(
                f"model {model.ref!r}: {model.path / 'config.json'} says {key}: {value}, but its tensors have "
                f"{n} layers ({stack}.0 to {stack}.{n - 1})"
            )
    return counts
