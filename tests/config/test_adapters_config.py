"""A YAML config with ``adapters:`` (``ferromerge.config.adapters``): its schema, its errors and compat warnings, and
its route: ``ferromerge run CONFIG OUT`` (and ``ferromerge.run``) write the same bytes as the ``merge_adapters``
call with the same arguments."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import yaml

from adapters.make import write_adapter
from ferromerge import CompatWarning, ConfigError
from ferromerge import run as run_config
from ferromerge.adapters import COMBINATIONS, merge_adapters
from ferromerge.config.adapters import parse_adapters_config
from ferromerge.config.resolve import load_config
from helpers.cli import run_cli


def parse(data, strict=False):
    return parse_adapters_config(data, COMBINATIONS, strict=strict)


def warned(data, strict=False):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        cfg = parse(data, strict)
    return [str(w.message) for w in record if issubclass(w.category, CompatWarning)], cfg


BASIC = {"merge_method": "knots_ties", "adapters": [{"adapter": "a1", "weight": 0.6}, {"adapter": "a2"}]}


def test_the_schema_and_its_defaults():
    cfg = parse({
        "merge_method": "dare_ties_svd",
        "base_model": "org/base",
        "adapters": [{"adapter": "a1", "weight": -0.5}, {"adapter": "org/lora", "parameters": {"weight": 2}}],
        "parameters": {"rank": 8, "density": 0.3, "majority_sign": "frequency", "svd_clamp": 0.99, "exact": True},
        "out_dtype": "bfloat16",
    })
    assert cfg.arguments() == {
        "adapters": [("a1", -0.5), ("org/lora", 2.0)], "combination": "dare_ties_svd", "rank": 8, "density": 0.3,
        "majority_sign": "frequency", "svd_clamp": 0.99, "exact": True, "dtype": "bfloat16", "base_model": "org/base",
    }
    cfg = parse(BASIC)
    assert cfg.arguments() == {
        "adapters": [("a1", 0.6), ("a2", 1.0)], "combination": "knots_ties", "rank": None, "density": None,
        "majority_sign": "total", "svd_clamp": None, "exact": False, "dtype": None, "base_model": None,
    }
    assert parse({**BASIC, "dtype": "torch.float16"}).dtype == "float16"
    assert parse({**BASIC, "dtype": "float16", "out_dtype": "float32"}).dtype == "float32"


@pytest.mark.parametrize("change, message", [
    ({"models": [{"model": "m"}]}, "adapters: and models: give one of them"),
    ({"slices": [{"sources": []}]}, "adapters: and slices: give one of them"),
    ({"merge_method": "tie"}, "'tie' is no adapter merge type \\(did you mean 'ties'"),
    ({"merge_method": "task_arithmetic"}, "no adapter merge type"),
    ({"adapters": []}, "adapters: empty"),
    ({"adapters": "a1"}, "adapters: input should be a valid list"),
    ({"adapters": ["a1"]}, r"adapters\[0\]: input should be a valid dictionary"),
    ({"adapters": [{"weight": 1}]}, r"adapters\[0\]\.adapter: missing"),
    ({"adapters": [{"adapter": " "}]}, r"adapters\[0\]\.adapter: empty"),
    ({"adapters": [{"adapter": "a", "weight": "x"}]}, r"adapters\[0\]\.weight: expected a finite number"),
    ({"adapters": [{"adapter": "a", "weight": True}]}, r"adapters\[0\]\.weight: expected a finite number"),
    ({"adapters": [{"adapter": "a", "parameters": {"weight": float("nan")}}]},
     r"adapters\[0\]\.parameters\.weight: expected a finite number"),
    ({"adapters": [{"adapter": "a", "weight": 1, "parameters": {"weight": 2}}]}, "weight given twice"),
    ({"parameters": {"rank": 0}}, "parameters.rank: expected a positive integer"),
    ({"parameters": {"rank": 4.0}}, "parameters.rank: expected a positive integer"),
    ({"parameters": {"density": 1.5}}, r"parameters.density: expected a number in \[0, 1\]"),
    ({"parameters": {"svd_clamp": -0.1}}, r"parameters.svd_clamp: expected a number in \[0, 1\]"),
    ({"parameters": {"majority_sign": "sum"}}, "parameters.majority_sign: expected total or frequency"),
    ({"parameters": {"exact": "yes"}}, "parameters.exact: expected true or false"),
    ({"out_dtype": "float64"}, "out_dtype: unsupported dtype 'float64'"),
    ({"base_model": ""}, "base_model: empty"),
])
def test_schema_errors_name_the_place(change, message):
    with pytest.raises(ConfigError, match=message):
        parse({**BASIC, **change})


def test_merge_method_missing():
    with pytest.raises(ConfigError, match="merge_method: missing"):
        parse({"adapters": BASIC["adapters"]})


def test_unknown_keys_and_parameters_are_compat_warnings():
    messages, cfg = warned({
        **BASIC,
        "adapters": [{"adapter": "a1", "wieght": 0.5}, {"adapter": "a2", "parameters": {"density": 0.2}}],
        "paramters": {"rank": 4},
        "tokenizer_source": "base",
        "parameters": {"rnak": 4, "weight": 2, "lambda": 1},
    })
    assert cfg.adapters == (("a1", 1.0), ("a2", 1.0)) and cfg.rank is None
    assert messages == [
        "paramters: unknown key of an adapter merge (did you mean 'parameters'?); ignored",
        "tokenizer_source: unknown key of an adapter merge (known: adapters, base_model, dtype, merge_method, "
        "out_dtype, parameters); ignored",
        "adapters[0].wieght: unknown key of an adapter merge (did you mean 'weight'?); ignored",
        "adapters[1].parameters.density: adapter merges take only a weight per adapter (set density in the "
        "top-level parameters); ignored",
        "parameters.rnak: adapter merges have no parameter 'rnak' (did you mean 'rank'?); ignored",
        "parameters.weight: adapter merges have no parameter 'weight' (a weight belongs to one adapter: "
        "adapters[i].weight); ignored",
        "parameters.lambda: adapter merges have no parameter 'lambda' (known: rank, density, majority_sign, "
        "svd_clamp, exact); ignored",
    ]
    with pytest.raises(ConfigError, match="paramters: unknown key.*strict mode"):
        parse({**BASIC, "paramters": {}}, strict=True)


def test_a_model_merge_reader_refuses_adapters(tmp_path):
    with pytest.raises(ConfigError, match="adapters: and models: give one of them"):
        load_config({**BASIC, "models": [{"model": "m"}]})
    with pytest.raises(ConfigError, match="adapters: this config merges LoRA adapters"):
        load_config(BASIC)
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump({**BASIC, "models": [{"model": "m"}]}))
    with pytest.raises(ConfigError, match="adapters: and models: give one of them"):
        run_config(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    write_adapter(root / "a1", 4, seed=1)
    write_adapter(root / "a2", 8, seed=2, alpha=8.0)
    write_adapter(root / "a3", 4, seed=3, dtype="BF16")
    return root


def _files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir())}


@pytest.mark.parametrize("combination, names, params", [
    ("knots_ties", ["a1", "a2"], {"density": 0.5}),
    ("knots_dare_ties", ["a1", "a2", "a3"], {"density": 0.7, "rank": 6}),
    ("cat", ["a1", "a2"], {}),
    ("ties", ["a1", "a3"], {"density": 0.4, "majority_sign": "frequency"}),
    ("dare_linear_svd", ["a1", "a2"], {"density": 0.5, "rank": 4, "svd_clamp": 0.95}),
])
def test_run_gives_the_bytes_of_the_api_call(adapters, tmp_path, combination, names, params):
    weights = [0.7, -0.4, 1.2][: len(names)]
    config = {
        "merge_method": combination,
        "base_model": "toy/other-base",
        "adapters": [{"adapter": str(adapters / n), "weight": w} for n, w in zip(names, weights, strict=True)],
        "parameters": params,
    }
    path = tmp_path / "adapters.yml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    api = tmp_path / "api"
    merge_adapters(api, [(str(adapters / n), w) for n, w in zip(names, weights, strict=True)],
                   combination=combination, base_model="toy/other-base", seed=5, **params)
    report = run_config(path, tmp_path / "run", seed=5, quiet=True)
    assert report.adapters is not None and report.adapters["combination"] == combination
    assert report.tensors == 2 * report.adapters["modules"]
    assert _files(tmp_path / "run") == _files(api)
    done = run_cli("run", path, tmp_path / "cli", "--random-seed", "5")
    assert done.returncode == 0, done.stderr
    assert f"by {combination} into a rank-" in done.stdout
    assert _files(tmp_path / "cli") == _files(api)
    # another seed changes the DARE masks: the seed does reach merge_adapters
    if "dare" in combination:
        run_config(path, tmp_path / "seed6", seed=6, quiet=True)
        assert _files(tmp_path / "seed6") != _files(api)


def test_cli_errors_of_an_adapters_config(adapters, tmp_path):
    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump({"merge_method": "knots_ties", "adapters": [{"adapter": str(adapters / "a1")}],
                                    "parameters": {"density": 2}}))
    done = run_cli("run", path, tmp_path / "out")
    assert done.returncode == 2 and "parameters.density: expected a number in [0, 1]" in done.stderr
    assert "Traceback" not in done.stderr and not (tmp_path / "out").exists()
    path.write_text(yaml.safe_dump({"merge_method": "knots_ties", "adapters": [{"adapter": str(tmp_path / "nope")}]}))
    done = run_cli("run", path, tmp_path / "out")
    assert done.returncode != 0 and "nope" in done.stderr and "Traceback" not in done.stderr
    path.write_text(yaml.safe_dump({"merge_method": "knots_ties", "adapters": [{"adapter": str(adapters / "a1")}],
                                    "paramters": {}}))
    done = run_cli("run", path, tmp_path / "out", "--strict")
    assert done.returncode == 2 and "paramters: unknown key" in done.stderr
    done = run_cli("plan", path)
    assert done.returncode == 2 and "this config merges LoRA adapters" in done.stderr
