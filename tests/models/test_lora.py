"""``model+lora`` references: the adapter merged into its model (``ferromerge.lora``) against a NumPy reference,
the streaming cache (row blocks, untouched tensors read in place, reuse), malformed adapters, and the pipeline
through ``ferromerge run`` / ``ferromerge plan``."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.cli import read_model, run_cli, write_config
from safetensors.numpy import save_file

from ferromerge.models import lora
from ferromerge.errors import ConfigError, InputError
from ferromerge.synth import make_family, make_model
from ferromerge.io.dtypes import from_f32

H, INTER, VOCAB = 64, 128, 256
Q = "model.layers.0.self_attn.q_proj"
DOWN = "model.layers.1.mlp.down_proj"
EMBED = "model.embed_tokens"


def write_adapter(
    path: Path,
    factors: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    r: int = 4,
    alpha: float = 8.0,
    embed: tuple[str, ...] = (),
    extra: dict[str, np.ndarray] | None = None,
    dtype: str = "float32",
    **config: Any,
) -> Path:
    """A PEFT LoRA adapter directory: ``factors`` = {module: (A, B)}; modules in ``embed`` use PEFT's embedding keys."""
    path.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, np.ndarray] = {}
    for module, (a, b) in factors.items():
        if module in embed:
            keys = (f"base_model.model.{module}.lora_embedding_A", f"base_model.model.{module}.lora_embedding_B")
        else:
            keys = (f"base_model.model.{module}.lora_A.weight", f"base_model.model.{module}.lora_B.weight")
        tensors[keys[0]], tensors[keys[1]] = a, b
    for k, v in (extra or {}).items():
        tensors[f"base_model.model.{k}"] = v
    if dtype == "bfloat16":
        # safetensors.numpy has no bfloat16: write the bits through ferromerge's own writer
        from ferromerge import _engine

        _engine.save_file(str(path / lora.ADAPTER_WEIGHTS), {k: (from_f32(v, "BF16"), "bfloat16") for k, v in tensors.items()})
    else:
        save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in tensors.items()},
                  str(path / lora.ADAPTER_WEIGHTS))
    cfg = {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": ["q_proj", "down_proj", "embed_tokens"],
           "fan_in_fan_out": False, "use_rslora": False, "bias": "none", **config}
    (path / lora.ADAPTER_CONFIG).write_text(json.dumps(cfg), encoding="utf-8")
    return path


def factors(rng: np.random.Generator, out: int, inp: int, r: int = 4) -> tuple[np.ndarray, np.ndarray]:
    """A (r × in), B (out × r), large enough that the update is far above float rounding."""
    return (rng.standard_normal((r, inp)).astype(np.float32) * 0.3,
            rng.standard_normal((out, r)).astype(np.float32) * 0.3)


def reference(w: np.ndarray, a: np.ndarray, b: np.ndarray, scale: float, transposed: bool = False) -> np.ndarray:
    """PEFT's merge in float64: W + (B·A)·s, transposed for fan_in_fan_out and embeddings."""
    delta = b.astype(np.float64) @ a.astype(np.float64)
    return w.astype(np.float64) + (delta.T if transposed else delta) * scale


@pytest.fixture(scope="module")
def model_f32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_model(tmp_path_factory.mktemp("lora_model") / "m", dtype="float32", seed=5, shard_size=200_000)


def merged(ref: str, cache: Path) -> dict[str, tuple[str, np.ndarray]]:
    """Index and materialise ``ref``; every tensor of the merged view, read back independently."""
    index = lora.index_lora_model(ref, cache)
    index.materialise()
    out: dict[str, tuple[str, np.ndarray]] = {}
    for f in {info.file for info in index.tensors.values()}:
        from helpers.cli import read_safetensors

        part = read_safetensors(f)
        out |= {n: v for n, v in part.items() if index.tensors[n].file == f}
    assert set(out) == set(index.tensors)
    return out


def test_linear_lora_matches_numpy_and_leaves_other_tensors_in_place(model_f32: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    fq, fd = factors(rng, H, H), factors(rng, H, INTER)
    adapter = write_adapter(tmp_path / "ad", {Q: fq, DOWN: fd}, r=4, alpha=8.0)
    ref = f"{model_f32}+{adapter}"
    index = lora.index_lora_model(ref, tmp_path / "cache")
    original = read_model(model_f32)
    updated = {f"{Q}.weight", f"{DOWN}.weight"}
    for name, info in index.tensors.items():
        if name in updated:
            assert info.file.is_relative_to(tmp_path / "cache"), name
        else:
            assert info.file.parent == model_f32, name  # read from the model's own shard, no copy
    assert not any(f.exists() for f in index.cache_files)  # indexing writes nothing
    out = merged(ref, tmp_path / "cache")
    np.testing.assert_allclose(out[f"{Q}.weight"][1], reference(original[f"{Q}.weight"][1], *fq, 2.0),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[f"{DOWN}.weight"][1], reference(original[f"{DOWN}.weight"][1], *fd, 2.0),
                               rtol=1e-6, atol=1e-6)
    assert not np.allclose(out[f"{Q}.weight"][1], original[f"{Q}.weight"][1], atol=1e-3)
    for name in set(original) - updated:
        np.testing.assert_array_equal(out[name][1], original[name][1])
    cached = {n for f in index.cache_files for n in read_model_file(f)}
    assert cached == updated


def read_model_file(f: Path) -> dict[str, Any]:
    from helpers.cli import read_safetensors

    return read_safetensors(f)


def test_rslora_patterns_fan_in_fan_out_embedding_and_modules_to_save(model_f32: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    original = read_model(model_f32)
    fq = factors(rng, H, H, r=8)           # rank_pattern gives q_proj rank 8, alpha_pattern alpha 4
    fe = factors(rng, H, VOCAB, r=4)       # embedding: A is r × vocab, B is dim × r
    norm = rng.standard_normal(H).astype(np.float32)
    adapter = write_adapter(
        tmp_path / "ad", {Q: fq, EMBED: fe}, r=4, alpha=16.0, embed=(EMBED,), use_rslora=True,
        rank_pattern={"q_proj": 8}, alpha_pattern={r"layers\.0\.self_attn\.q_proj": 4.0},
        extra={"model.norm.modules_to_save.default.weight": norm},
    )
    out = merged(f"{model_f32}+{adapter}", tmp_path / "cache")
    np.testing.assert_allclose(out[f"{Q}.weight"][1], reference(original[f"{Q}.weight"][1], *fq, 4.0 / np.sqrt(8)),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(out[f"{EMBED}.weight"][1],
                               reference(original[f"{EMBED}.weight"][1], *fe, 16.0 / np.sqrt(4), transposed=True),
                               rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(out["model.norm.weight"][1], norm)


def test_fan_in_fan_out_transposes(tmp_path: Path) -> None:
    # GPT-2's Conv1D stores W as in × out
    rng = np.random.default_rng(2)
    w = rng.standard_normal((16, 24)).astype(np.float32)
    model = tmp_path / "m"
    model.mkdir()
    save_file({"h.0.attn.c_attn.weight": w}, str(model / "model.safetensors"))
    f = factors(rng, 24, 16)
    adapter = write_adapter(tmp_path / "ad", {"h.0.attn.c_attn": f}, fan_in_fan_out=True, target_modules=["c_attn"])
    out = merged(f"{model}+{adapter}", tmp_path / "cache")
    np.testing.assert_allclose(out["h.0.attn.c_attn.weight"][1], reference(w, *f, 2.0, transposed=True),
                               rtol=1e-6, atol=1e-6)


def test_bfloat16_model_rounds_once(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", dtype="bfloat16", seed=3)
    original = read_model(model)
    rng = np.random.default_rng(3)
    fq = factors(rng, H, H)
    adapter = write_adapter(tmp_path / "ad", {Q: fq}, dtype="bfloat16")
    a, b = (to_bf16_f32(x) for x in fq)  # the adapter stores bfloat16 factors
    out = merged(f"{model}+{adapter}", tmp_path / "cache")
    dtype, got = out[f"{Q}.weight"]
    assert dtype == "BF16"
    exact = reference(original[f"{Q}.weight"][1], a, b, 2.0)
    # one rounding of the float32 result: within half a bfloat16 ulp of the exact value (plus float32 noise)
    half_ulp = np.exp2(np.floor(np.log2(np.abs(exact))) - 8)
    assert np.all(np.abs(got - exact) <= half_ulp * (1 + 1e-4))
    assert not np.array_equal(got, original[f"{Q}.weight"][1])


def to_bf16_f32(x: np.ndarray) -> np.ndarray:
    return (from_f32(x, "BF16").astype(np.uint32) << 16).view(np.float32)


def test_row_blocks_do_not_change_the_bytes(model_f32: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    rng = np.random.default_rng(4)
    adapter = write_adapter(tmp_path / "ad", {Q: factors(rng, H, H), EMBED: factors(rng, H, VOCAB)}, embed=(EMBED,))
    ref = f"{model_f32}+{adapter}"
    whole = merged(ref, tmp_path / "c1")
    monkeypatch.setattr(lora, "BLOCK_BYTES", 4 * H * 3)  # 3 rows per block: many blocks, a short last one
    blocked = merged(ref, tmp_path / "c2")
    for name in whole:
        assert whole[name][1].tobytes() == blocked[name][1].tobytes(), name


def test_cache_is_reused_and_rebuilt_when_the_adapter_changes(model_f32: Path, tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    adapter = write_adapter(tmp_path / "ad", {Q: factors(rng, H, H)})
    index = lora.index_lora_model(f"{model_f32}+{adapter}", tmp_path / "cache")
    index.materialise()
    (file,) = index.cache_files
    stamp = file.stat().st_mtime_ns
    again = lora.index_lora_model(f"{model_f32}+{adapter}", tmp_path / "cache")
    assert list(again.cache_files) == [file] and again.cache_bytes == 0
    again.materialise()
    assert file.stat().st_mtime_ns == stamp
    os.utime(adapter / lora.ADAPTER_WEIGHTS, ns=(stamp + 10**9, stamp + 10**9))
    changed = lora.index_lora_model(f"{model_f32}+{adapter}", tmp_path / "cache")
    assert list(changed.cache_files) != [file] and changed.cache_bytes > 0


# --- malformed adapters: InputError naming the adapter file and the tensor -----------------------------------


def _err(model: Path, adapter: Path, tmp_path: Path) -> str:
    with pytest.raises(InputError) as e:
        lora.index_lora_model(f"{model}+{adapter}", tmp_path / "cache")
    return str(e.value)


def test_missing_b(model_f32: Path, tmp_path: Path) -> None:
    a, _ = factors(np.random.default_rng(6), H, H)
    adapter = write_adapter(tmp_path / "ad", {}, extra={f"{Q}.lora_A.weight": a})
    msg = _err(model_f32, adapter, tmp_path)
    assert str(adapter / lora.ADAPTER_WEIGHTS) in msg and f"{Q}.lora_A.weight" in msg and "lora_B" in msg


def test_rank_mismatch(model_f32: Path, tmp_path: Path) -> None:
    a, b = factors(np.random.default_rng(7), H, H, r=4)
    adapter = write_adapter(tmp_path / "ad", {Q: (a, b[:, :3])}, r=4)
    msg = _err(model_f32, adapter, tmp_path)
    assert "rank mismatch" in msg and str(adapter / lora.ADAPTER_WEIGHTS) in msg and f"{Q}.lora_B.weight" in msg


def test_r_in_config_disagrees_with_factors(model_f32: Path, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "ad", {Q: factors(np.random.default_rng(8), H, H, r=4)}, r=8)
    assert "rank mismatch" in _err(model_f32, adapter, tmp_path)


def test_target_not_in_model(model_f32: Path, tmp_path: Path) -> None:
    module = "model.layers.7.self_attn.q_proj"
    adapter = write_adapter(tmp_path / "ad", {module: factors(np.random.default_rng(9), H, H)})
    msg = _err(model_f32, adapter, tmp_path)
    assert f"{module}.weight" in msg and "does not have" in msg and str(adapter / lora.ADAPTER_WEIGHTS) in msg


def test_factor_shapes_that_do_not_fit_the_weight(model_f32: Path, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "ad", {Q: factors(np.random.default_rng(10), H, INTER)})
    msg = _err(model_f32, adapter, tmp_path)
    assert f"{Q}.weight" in msg and f"[{H}, {INTER}]" in msg


def test_module_outside_target_modules(model_f32: Path, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "ad", {Q: factors(np.random.default_rng(11), H, H)}, target_modules=["v_proj"])
    assert "target_modules" in _err(model_f32, adapter, tmp_path)


def test_dora_and_bad_configs(model_f32: Path, tmp_path: Path) -> None:
    f = factors(np.random.default_rng(12), H, H)
    assert "DoRA" in _err(model_f32, write_adapter(tmp_path / "d1", {Q: f}, use_dora=True), tmp_path)
    assert "r must be" in _err(model_f32, write_adapter(tmp_path / "d2", {Q: f}, r=0), tmp_path)
    no_cfg = write_adapter(tmp_path / "d3", {Q: f})
    (no_cfg / lora.ADAPTER_CONFIG).unlink()
    assert lora.ADAPTER_CONFIG in _err(model_f32, no_cfg, tmp_path)
    no_weights = write_adapter(tmp_path / "d4", {Q: f})
    (no_weights / lora.ADAPTER_WEIGHTS).unlink()
    assert lora.ADAPTER_WEIGHTS in _err(model_f32, no_weights, tmp_path)
    stray = write_adapter(tmp_path / "d5", {Q: f}, extra={"model.nothing.weight": np.zeros(3, np.float32)})
    msg = _err(model_f32, stray, tmp_path)
    assert "base_model.model.model.nothing.weight" in msg and "neither a LoRA factor" in msg


def test_reference_form_is_checked_by_the_config(tmp_path: Path) -> None:
    from ferromerge.config.resolve import parse_config

    with pytest.raises(ConfigError, match=r"models\[0\]\.model: 'a\+b\+c'"):
        parse_config({"merge_method": "linear", "models": [{"model": "a+b+c", "parameters": {"weight": 1}}]})
    config = parse_config({"merge_method": "linear", "models": [{"model": "a+b", "parameters": {"weight": 1}}]})
    assert config.model_refs() == ["a+b"]


# --- the pipeline -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def family(tmp_path_factory: pytest.TempPathFactory):
    return make_family(tmp_path_factory.mktemp("lora_family"), dtype="float32", seed=9, n_finetunes=2)


def test_run_linear_of_a_lora_model_matches_numpy(family, tmp_path: Path) -> None:
    rng = np.random.default_rng(13)
    fq, fd = factors(rng, H, H), factors(rng, H, INTER)
    adapter = write_adapter(tmp_path / "ad", {Q: fq, DOWN: fd}, alpha=4.0)
    config = write_config(tmp_path / "c.yml", {
        "merge_method": "linear",
        "models": [{"model": f"{family.finetunes[0]}+{adapter}", "parameters": {"weight": 0.7}},
                   {"model": str(family.finetunes[1]), "parameters": {"weight": 0.3}}],
        "dtype": "float32",
    })
    plan = run_cli("plan", config, tmp_path / "out")
    assert plan.returncode == 0, plan.stderr
    assert not (tmp_path / "out").exists()
    res = run_cli("run", config, tmp_path / "out", "--quiet")
    assert res.returncode == 0, res.stderr
    out = read_model(tmp_path / "out")
    a, b = read_model(family.finetunes[0]), read_model(family.finetunes[1])
    for name, (_, got) in out.items():
        x = a[name][1].astype(np.float64)
        if name == f"{Q}.weight":
            x = reference(x, *fq, 1.0)
        elif name == f"{DOWN}.weight":
            x = reference(x, *fd, 1.0)
        np.testing.assert_allclose(got, 0.7 * x + 0.3 * b[name][1], rtol=1e-5, atol=1e-6, err_msg=name)
    # the default cache lives in the output's temporary directory and is gone with it
    assert not any("lora" in p.name for p in (tmp_path / "out").iterdir())
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_run_keeps_and_reuses_a_given_cache(family, tmp_path: Path) -> None:
    adapter = write_adapter(tmp_path / "ad", {Q: factors(np.random.default_rng(14), H, H)})
    config = write_config(tmp_path / "c.yml", {
        "merge_method": "task_arithmetic", "base_model": str(family.base),
        "models": [{"model": f"{family.finetunes[0]}+{adapter}", "parameters": {"weight": 1.0}}],
    })
    cache = tmp_path / "cache"
    first = run_cli("run", config, tmp_path / "o1", "--quiet", "--lora-merge-cache", cache)
    assert first.returncode == 0, first.stderr
    (file,) = list(cache.rglob("*.safetensors"))
    stamp = file.stat().st_mtime_ns
    second = run_cli("run", config, tmp_path / "o2", "--quiet", "--lora-merge-cache", cache)
    assert second.returncode == 0, second.stderr
    assert file.stat().st_mtime_ns == stamp
    assert read_model(tmp_path / "o1")[f"{Q}.weight"][1].tobytes() == read_model(tmp_path / "o2")[f"{Q}.weight"][1].tobytes()


def test_run_reports_a_malformed_adapter_and_writes_nothing(family, tmp_path: Path) -> None:
    a, b = factors(np.random.default_rng(15), H, H)
    adapter = write_adapter(tmp_path / "ad", {Q: (a, b[:, :2])})
    config = write_config(tmp_path / "c.yml", {
        "merge_method": "linear", "models": [{"model": f"{family.finetunes[0]}+{adapter}",
                                              "parameters": {"weight": 1.0}}]})
    res = run_cli("run", config, tmp_path / "out")
    assert res.returncode == 1 and "rank mismatch" in res.stderr and lora.ADAPTER_WEIGHTS in res.stderr
    assert not (tmp_path / "out").exists()
