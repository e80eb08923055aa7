"""The config loader under hypothesis (issue 13): arbitrary YAML text, arbitrary YAML-able structures, and
config-shaped structures with arbitrary values, given as text and as a mapping, either load or raise
``ConfigError``/``ParameterError``, never another exception; bounded (about 20 s in all, ``max_examples``).
Every crash found becomes a regression test at the end of this file; a hunt of 4000 examples per test
(``FERROMERGE_FUZZ_EXAMPLES=4000``, 3 min 40 s) found none, so what is there are hand-picked edge cases."""

from __future__ import annotations

import contextlib
import math
import os
import warnings
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from ferromerge import ParameterError
from ferromerge.config.resolve import load_config
from ferromerge.methods import REGISTRY

#: examples per test (FERROMERGE_FUZZ_EXAMPLES for a longer hunt); 300 each is about 20 s in all
FUZZ = settings(
    max_examples=int(os.environ.get("FERROMERGE_FUZZ_EXAMPLES", "300")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)

#: the scalars YAML (safe_dump) can write
scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
#: YAML-able trees
trees = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)

KEYS = ["merge_method", "models", "slices", "modules", "base_model", "parameters", "dtype", "out_dtype",
        "tokenizer_source", "tokenizer", "chat_template", "name", "device"]
PARAMS = ["weight", "density", "epsilon", "lambda", "gamma", "t", "normalize", "int8_mask", "rescale", "select_topk",
          "filter_wise", "k", "alpha", "beta", "select_threshold", "exclude", "sv_reduction", "rank"]
METHODS = sorted(REGISTRY) + ["passthrough", "linear", "not_a_method"]
values = scalars | st.lists(scalars, max_size=3) | st.dictionaries(
    st.sampled_from(["filter", "value"]), scalars | st.lists(scalars, max_size=3), max_size=2
)
parameters = st.dictionaries(st.sampled_from(PARAMS) | st.text(max_size=8), values, max_size=4)
model_entry = st.fixed_dictionaries(
    {"model": st.sampled_from(["org/a", "org/b", "org/a+org/lora", "", "a+b+c", "x"]) | st.text(max_size=10)},
    optional={"parameters": parameters | trees},
)
layer_range = st.lists(st.integers(-3, 40) | st.floats() | st.text(max_size=3), min_size=0, max_size=3)
slice_entry = st.fixed_dictionaries(
    {"sources": st.lists(st.fixed_dictionaries({"model": st.sampled_from(["org/a", "org/b"])},
                                               optional={"layer_range": layer_range, "parameters": parameters}),
                         max_size=3)},
    optional={"parameters": parameters},
)
configs = st.fixed_dictionaries(
    {"merge_method": st.sampled_from(METHODS) | scalars},
    optional={
        "models": st.lists(model_entry, max_size=4) | trees,
        "slices": st.lists(slice_entry, max_size=3) | trees,
        "base_model": st.sampled_from(["org/a", "org/b", ""]) | scalars,
        "parameters": parameters | trees,
        "dtype": st.sampled_from(["float32", "bfloat16", "float16", "int8", "bf16"]) | scalars,
        "out_dtype": st.sampled_from(["float32", "bfloat16"]) | scalars,
        "tokenizer_source": st.sampled_from(["base", "union", "model:org/a", "org/b"]) | scalars,
        "tokenizer": trees,
        "chat_template": st.sampled_from(["auto", "chatml", "{{ x }}", "{% if %}"]) | scalars,
        "name": scalars,
        "device": st.sampled_from(["cpu", "cuda", "cuda:0", "torch:cpu", "tpu"]) | scalars,
        "modules": trees,
        "unknown_key": trees,
    },
)


def loads_or_refuses(source: Any) -> None:
    """``load_config`` returns or raises a ParameterError (ConfigError is one); anything else fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # compat warnings: the loader's remarks, not failures
        with contextlib.suppress(ParameterError):
            load_config(source)


def as_yaml(data: Any) -> str | None:
    try:
        return yaml.safe_dump(data, allow_unicode=True) + "\n"
    except (yaml.YAMLError, ValueError):
        return None


@FUZZ
@given(st.text(max_size=300))
@example("merge_method: ties\nmodels: !!python/object:os.system {}\n")
@example("a: &x [*x]\n")
@example("merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: .nan}\n")
@example("%YAML 1.1\n---\nmerge_method: ties\n")
@example("merge_method: ties\n---\nmerge_method: linear\n")
@example("? [a, b]\n: c\n")
@example("merge_method: 1e400\n")
@example("\x00:\n")
def test_arbitrary_yaml_text(text: str) -> None:
    # a newline makes the loader read it as YAML text, never as a path
    loads_or_refuses(text + "\n")


@FUZZ
@given(trees)
def test_arbitrary_yaml_structures(data: Any) -> None:
    if isinstance(data, dict):
        loads_or_refuses(data)
    text = as_yaml(data)
    if text is not None:
        loads_or_refuses(text)


@FUZZ
@given(configs)
def test_config_shaped_structures_with_arbitrary_values(data: dict[str, Any]) -> None:
    loads_or_refuses(data)
    text = as_yaml(data)
    if text is not None:
        loads_or_refuses(text)


# ---------------------------------------------------------------- hand-picked edge cases (and regressions, once found)


@pytest.mark.parametrize(
    "data",
    [
        {"merge_method": "linear", "models": [{"model": "org/a", "parameters": {"weight": math.inf}}]},
        {"merge_method": "ties", "base_model": "org/a", "models": [{"model": "org/b"}], "parameters": {"k": []}},
    ],
)
def test_edge_cases(data: dict[str, Any]) -> None:
    loads_or_refuses(data)
