"""End to end: the ``ferromerge`` CLI and ``ferromerge.run`` merge synthetic families into loadable models."""

from __future__ import annotations

import json
import shutil
from collections import namedtuple
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from safetensors.numpy import load_file

import ferromerge
from ferromerge import _engine
from ferromerge.cli import main
from ferromerge.config.resolve import load_config
from ferromerge._run import prepare
from ferromerge.synth import Family, make_family
from ferromerge.io.dtypes import from_f32

from helpers.cli import read_model, read_safetensors, run_cli, ties_config, write_config

DiskUsage = namedtuple("DiskUsage", "total used free")

WEIGHTS = [1.0, 0.5, 0.5]
DENSITIES = [0.5, 0.6, 0.9]


def method_config(family: Family, method: str) -> dict[str, Any]:
    models = [{"model": str(ft), "parameters": {"weight": w}} for ft, w in zip(family.finetunes, WEIGHTS, strict=False)]
    cfg: dict[str, Any] = {"merge_method": method, "base_model": str(family.base), "models": models}
    if method == "linear":
        cfg["parameters"] = {"weight": 0.25}  # the base joins a linear merge (as in mergekit) with this weight
    else:
        for m, d in zip(models, DENSITIES, strict=False):
            if method != "task_arithmetic":
                m["parameters"]["density"] = d
        cfg["parameters"] = {"lambda": 0.9}
    return cfg


def expected_in_memory(family: Family, method: str, seed: int) -> dict[str, np.ndarray]:
    """The same merge through the in-memory API (same kernels): the file pipeline must route every model,
    weight, density, model id, seed and tensor name exactly as it does."""
    models = [read_model(ft) for ft in family.finetunes]
    base = read_model(family.base)
    out = {}
    for name, (_, b) in base.items():
        arrays = [from_f32(m[name][1], "BF16") for m in models] + [from_f32(b, "BF16")]
        if method == "linear":
            merged = ferromerge.merge_tensors(arrays, "linear", {"weight": [*WEIGHTS, 0.25]}, name=name)
        else:
            params: dict[str, Any] = {"weight": WEIGHTS, "lambda": 0.9}
            if method != "task_arithmetic":
                params["density"] = DENSITIES
            merged = ferromerge.merge_tensors(arrays, method, params, base_index=3, seed=seed, name=name)
        out[name] = (np.asarray(merged).astype(np.uint32) << 16).view(np.float32)
    return out


@pytest.mark.parametrize("method", ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"])
def test_cli_merges_each_method_like_the_in_memory_api(family_bf16: Family, tmp_path: Path, method: str) -> None:
    config = write_config(tmp_path / "merge.yml", method_config(family_bf16, method))
    result = run_cli("run", config, tmp_path / "out", "--seed", "7")
    assert result.returncode == 0, result.stderr
    assert "merged 21 tensors" in result.stdout
    merged = read_model(tmp_path / "out")
    expected = expected_in_memory(family_bf16, method, seed=7)
    assert merged.keys() == expected.keys()
    for name, (dtype, values) in merged.items():
        assert dtype == "BF16"
        np.testing.assert_array_equal(values, expected[name], err_msg=name)
    base = read_model(family_bf16.base)
    changed = [n for n in merged if not np.array_equal(merged[n][1], base[n][1])]
    assert len(changed) == len(merged)


def test_linear_f32_matches_numpy_and_loads_with_safetensors(family_f32: Family, tmp_path: Path) -> None:
    config = write_config(
        tmp_path / "linear.yml",
        {
            "merge_method": "linear",
            "models": [
                {"model": str(p), "parameters": {"weight": w}}
                for p, w in zip([family_f32.base, *family_f32.finetunes], [1.0, 2.0, 3.0, 4.0], strict=False)
            ],
        },
    )
    assert run_cli("run", config, tmp_path / "out", "--quiet").returncode == 0
    loaded = load_file(tmp_path / "out" / "model.safetensors")
    sources = [load_file(p / "model.safetensors") for p in [family_f32.base, *family_f32.finetunes]]
    for name, got in loaded.items():
        assert got.dtype == np.float32
        want = sum(w * s[name].astype(np.float64) for w, s in zip([1, 2, 3, 4], sources, strict=False)) / 10
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7, err_msg=name)


def test_output_directory_contents(family_bf16: Family, tmp_path: Path) -> None:
    cfg = ties_config(family_bf16, out_dtype="float32")
    config = write_config(tmp_path / "ties.yml", cfg)
    result = run_cli("run", config, tmp_path / "out", "--seed", "3")
    assert result.returncode == 0, result.stderr
    out = tmp_path / "out"
    assert {d for d, _ in read_safetensors(out / "model.safetensors").values()} == {"F32"}
    model_config = json.loads((out / "config.json").read_text())
    source_config = json.loads((family_bf16.base / "config.json").read_text())
    assert model_config == {**source_config, "torch_dtype": "float32"}
    for name in ["tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"]:
        assert (out / name).read_bytes() == (family_bf16.base / name).read_bytes()
    assert (out / "mergekit_config.yml").read_text() == config.read_text()
    resolved = yaml.safe_load((out / "ferromerge_config.yml").read_text())
    assert resolved["sources"][str(family_bf16.base)] == str(family_bf16.base.resolve())
    assert resolved["seed"] == 3 and resolved["ferromerge_version"] == ferromerge.__version__
    assert resolved["models"][1]["parameters"] == {"weight": 0.5, "density": 0.5}
    assert resolved["parameters"]["normalize"] is True
    assert not (out / "model.safetensors.index.json").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_small_out_shard_size_writes_shards_and_an_index(family_bf16: Family, tmp_path: Path) -> None:
    config = write_config(tmp_path / "ties.yml", ties_config(family_bf16))
    assert run_cli("run", config, tmp_path / "one", "--quiet").returncode == 0
    assert run_cli("run", config, tmp_path / "many", "--quiet", "--out-shard-size", "40K").returncode == 0
    index = json.loads((tmp_path / "many" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    n = len(shards)
    assert n > 2 and shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(p.name for p in (tmp_path / "many").glob("*.safetensors")) == shards
    for shard in shards:
        assert (tmp_path / "many" / shard).stat().st_size <= 40_000 + 4096
    one = read_model(tmp_path / "one")
    many = read_model(tmp_path / "many")
    assert index["metadata"]["total_size"] == sum(v.size * 2 for _, v in many.values())
    assert all(index["weight_map"][n] in shards for n in one)
    assert one.keys() == many.keys()
    assert all(np.array_equal(one[k][1], many[k][1]) for k in one)


def test_sharded_inputs(tmp_path: Path) -> None:
    family = make_family(tmp_path / "fam", n_finetunes=2, shard_size=30_000, dtype="float16")
    config = write_config(tmp_path / "ties.yml", ties_config(Family(family.base, family.finetunes)))
    result = run_cli("run", config, tmp_path / "out")
    assert result.returncode == 0, result.stderr
    assert {d for d, _ in read_model(tmp_path / "out").values()} == {"F16"}


def test_same_seed_same_bytes_other_seed_other_dare_masks(family_bf16: Family, tmp_path: Path) -> None:
    config = write_config(tmp_path / "dare.yml", method_config(family_bf16, "dare_ties"))
    for out, extra in [("a", ["--seed", "1"]), ("b", ["--seed", "1", "--threads", "1"]), ("c", ["--seed", "2"])]:
        assert run_cli("run", config, tmp_path / out, "--quiet", *extra).returncode == 0
    a, b, c = ((tmp_path / o / "model.safetensors").read_bytes() for o in "abc")
    assert a == b and a != c


def test_python_api_run_returns_a_report(family_bf16: Family, tmp_path: Path) -> None:
    seen: list[tuple[int, int]] = []
    report = ferromerge.run(
        ties_config(family_bf16), tmp_path / "out", quiet=True, on_progress=lambda d, t, _b, _bt: seen.append((d, t))
    )
    assert report.tensors == 21 and report.out_dir == tmp_path / "out"
    assert report.bytes_written == sum(v.size * 2 for _, v in read_model(tmp_path / "out").values())
    assert report.bytes_read >= 3 * report.bytes_written and report.seconds > 0
    assert seen[-1] == (21, 21)
    saved = load_config(tmp_path / "out" / "mergekit_config.yml")
    assert saved.resolved() == load_config(ties_config(family_bf16)).resolved()


def test_plan_prints_a_summary_and_writes_nothing(family_bf16: Family, tmp_path: Path) -> None:
    config = write_config(tmp_path / "ties.yml", ties_config(family_bf16))
    result = run_cli("plan", config, "--out-shard-size", "40K", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "method: ties (seed 0)" in result.stdout and "tensors: 21" in result.stdout
    plan = json.loads(run_cli("plan", config, "--json", "--seed", "9", cwd=tmp_path).stdout)
    tensor = plan["shards"][0]["tensors"][0]
    assert tensor["method"]["seed"] == 9 and [i["model_id"] for i in tensor["inputs"]] == [0, 1, 2]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ties.yml"]


def test_demo(tmp_path: Path) -> None:
    result = run_cli("demo", "--out", tmp_path / "demo", timeout=300)
    assert result.returncode == 0, result.stderr
    assert "all tensors finite and within the fine-tunes' deltas" in result.stdout
    assert (tmp_path / "demo" / "merged" / "model.safetensors").exists()
    assert yaml.safe_load((tmp_path / "demo" / "ties.yml").read_text())["merge_method"] == "ties"
    again = run_cli("demo", "--out", tmp_path / "demo", "--quiet", timeout=300)
    assert again.returncode == 0 and again.stdout == ""


def test_demo_refuses_a_foreign_directory(tmp_path: Path) -> None:
    (tmp_path / "precious.txt").write_text("keep me")
    result = run_cli("demo", "--out", tmp_path)
    assert result.returncode == 1 and "was not made by `ferromerge demo`" in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious.txt"]


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"ferromerge {ferromerge.__version__}"


@pytest.fixture(scope="module")
def family_wide(tmp_path_factory: pytest.TempPathFactory) -> Family:
    """Base + 2 fine-tunes, float32, vocab 32768 x hidden 256: each embedding is 32 MiB per model, so its inputs
    (96 MiB) exceed a quarter of a 64 MiB budget and take the engine's large-tensor path."""
    return make_family(
        tmp_path_factory.mktemp("family_wide"), n_finetunes=2, vocab=32768, hidden=256, intermediate=256, layers=1,
        dtype="float32", seed=4,
    )


def test_memory_limit_never_changes_the_output(family_wide: Family, tmp_path: Path) -> None:
    cfg = ties_config(family_wide)
    _, plan = prepare(cfg)
    assert max(t.bytes_in for t in plan.tensors) > 64 * 2**20 // 4
    config = write_config(tmp_path / "ties.yml", cfg)
    assert run_cli("run", config, tmp_path / "default", "--quiet").returncode == 0
    result = run_cli("run", config, tmp_path / "small", "--quiet", "--memory-limit", "64MiB")
    assert result.returncode == 0, result.stderr
    small = (tmp_path / "small" / "model.safetensors").read_bytes()
    assert small == (tmp_path / "default" / "model.safetensors").read_bytes()


def test_memory_limit_reaches_the_engine_in_bytes(
    family_bf16: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[int | None] = []
    real = _engine.execute

    def execute(
        plan: str, out: str, progress: Any = None, threads: Any = None, memory_limit: Any = None,
        external_merge: Any = None, **kw: Any,
    ) -> Any:
        seen.append(memory_limit)
        return real(plan, out, progress, threads, memory_limit, external_merge, **kw)

    monkeypatch.setattr(_engine, "execute", execute)
    ferromerge.run(ties_config(family_bf16), tmp_path / "a", quiet=True, memory_limit="100M")
    ferromerge.run(ties_config(family_bf16), tmp_path / "b", quiet=True, memory_limit=3 * 2**26)
    ferromerge.run(ties_config(family_bf16), tmp_path / "c", quiet=True)
    assert main(["run", str(write_config(tmp_path / "t.yml", ties_config(family_bf16))), str(tmp_path / "d"),
                 "--quiet", "--memory-limit", "1GiB"]) == 0
    assert seen == [100_000_000, 3 * 2**26, None, 2**30]


def test_plan_predicts_disk_memory_and_time(family_bf16: Family, tmp_path: Path) -> None:
    config = write_config(tmp_path / "ties.yml", ties_config(family_bf16))
    result = run_cli("plan", config, tmp_path / "merged", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "disk needed: " in out and f"at {tmp_path / 'merged'} (" in out and f"free at {tmp_path}: enough)" in out
    assert "peak memory: at most " in out and "page cache not counted" in out
    assert "predicted time: " in out and "GB/s, read " in out and "bounded by " in out

    result = run_cli("plan", config, "--json", "--memory-limit", "64MiB", "--threads", "1", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    doc = json.loads(result.stdout)
    s = doc["summary"]
    _, plan = prepare(ties_config(family_bf16))
    assert doc["shards"] == json.loads(plan.to_json())["shards"]  # still the engine's plan, with the summary added
    assert (s["bytes_in"], s["bytes_out"], s["tensors"]) == (plan.bytes_in, plan.bytes_out, 21)
    assert s["out_dir"] == str(tmp_path) and s["disk_path"] == str(tmp_path) and s["disk_ok"] is True
    assert s["memory_limit"] == 64 * 2**20 and s["threads"] == 1 and s["read_ahead_bytes"] == 16 * 2**20
    largest = max(plan.tensors, key=lambda t: t.bytes_in)
    assert (s["largest_tensor"], s["largest_tensor_bytes"]) == (largest.name, largest.bytes_in)
    # one worker, 4 models + 5 scratch buffers of a 64 Ki-element f32 chunk, and its read buffer (8 bytes an element)
    assert s["scratch_bytes"] == 1 * ((4 + 5) * 4 + 8) * 65536
    # two output staging buffers of a sixteenth of the budget each
    assert s["staging_bytes"] == 2 * 4 * 2**20
    assert s["peak_memory"] == min(64 * 2**20, s["scratch_bytes"] + s["staging_bytes"])
    assert s["compute_rate"] > 0 and s["read_rate"] > 0 and s["read_file"].endswith("model.safetensors")
    assert s["bound_by"] == ("compute" if s["compute_rate"] <= s["read_rate"] else "read")
    assert s["factor_seconds"] == 0  # no spectral method
    # the plan command's own start-up and planning, which a run repeats, is part of the prediction
    assert s["startup_seconds"] > 0
    assert s["seconds"] == pytest.approx(plan.bytes_in / min(s["compute_rate"], s["read_rate"]) + s["startup_seconds"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ties.yml"]


def test_plan_says_when_the_disk_is_too_small(
    family_bf16: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(shutil, "disk_usage", lambda _: DiskUsage(10**12, 10**12 - 1000, 1000))
    config = write_config(tmp_path / "ties.yml", ties_config(family_bf16))
    assert main(["plan", str(config), str(tmp_path / "out")]) == 0
    assert f"(0.0 MB free at {tmp_path}: NOT ENOUGH)" in capsys.readouterr().out
