"""``ferromerge extract-lora``: the adapter against the NumPy reference (``reference.extract_lora.lora_factors``), the rank
rules, bfloat16/float16 models, the PEFT round trip through ferromerge's own LoRA merge (``lora``), what goes where
(embeddings, norms, biases, 3-D tensors, include/exclude), determinism, and broken inputs leaving nothing behind."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from helpers.cli import read_safetensors
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from reference import extract_lora as extract_lora_ref
from reference import linalg
from ferromerge import extract_lora
from ferromerge.models import lora
from ferromerge.cli import main as cli_main
from ferromerge.errors import InputError, OutputError, ParameterError
from ferromerge.synth import Shape, llama_config, random_weights, save_model
from ferromerge.io.dtypes import from_f32

PREFIX = "base_model.model."
#: hidden 64 and 2 kv heads: k/v are 32 × 64, so rank 4 + oversample 10 < 32 really runs the randomized solver
SHAPE = Shape(hidden=64, intermediate=96, layers=2, vocab=80, heads=4, kv_heads=2)
LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: unit roundoff of each dtype's factors (what rounding the stored A and B can add to the error)
UNIT = {"float32": 2.0**-24, "float16": 2.0**-11, "bfloat16": 2.0**-8}
#: B·A of the float32 SVD against the float64 truncation, relative: faer's float32 thin SVD was measured at up to
#: 2e-5 on these shapes (singular values to ~5e-6·s_max), LAPACK's float64 is the reference
PRODUCT_RTOL = 1e-4


def flat_spectrum(k: int) -> np.ndarray:
    """A spectrum far above float32 resolution over 64 values (0.9^63 ≈ 1e-3), for full-rank tests: a faster
    decay reaches singular values float32 cannot hold, which the SVD returns as exact zeros (then dropped)."""
    return linalg.decaying(k, 0.9, 0.3)

ST = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


def decode(x: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values as a model of ``dtype`` stores them."""
    if dtype == "bfloat16":
        return (from_f32(x, "BF16").astype(np.uint32) << 16).view(np.float32)
    return np.asarray(x, dtype=np.float16 if dtype == "float16" else np.float32).astype(np.float32)


def write_pair(
    root: Path,
    *,
    dtype: str = "float32",
    spectrum: Any = lambda k: linalg.decaying(k, 0.6, 0.3),
    seed: int = 0,
    shape: Shape = SHAPE,
    ft_dtype: str | None = None,
    edit: Any = None,
) -> tuple[Path, Path, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """A Llama-shaped base and fine-tune: each linear ΔW = U·diag(spectrum(min(m, n)))·Vᵀ (well separated singular
    values by default), norms and embeddings plus small noise. Returns the dirs and the stored float32 values.
    ``edit(base, ft)`` may change the tensors before they are written."""
    rng = np.random.default_rng(seed)
    base = random_weights(shape, rng)
    ft = {}
    for name, x in base.items():
        if x.ndim == 2 and name.rsplit(".", 2)[-2] in LINEAR:
            m, n = x.shape
            ft[name] = (x + linalg.with_spectrum(rng, m, n, spectrum(min(m, n)))).astype(np.float32)
        else:
            ft[name] = (x + 0.01 * rng.standard_normal(x.shape)).astype(np.float32)
    if edit is not None:
        edit(base, ft)
    ft_dtype = ft_dtype or dtype
    b = save_model(root / "base", base, dtype=dtype, config=llama_config(shape, dtype))
    f = save_model(root / "ft", ft, dtype=ft_dtype, config=llama_config(shape, ft_dtype))
    return b, f, {k: decode(v, dtype) for k, v in base.items()}, {k: decode(v, ft_dtype) for k, v in ft.items()}


def adapter(out: Path) -> tuple[dict[str, tuple[str, np.ndarray]], dict[str, Any]]:
    """The adapter's tensors (read by the spec, independently of ferromerge) and its adapter_config.json."""
    return read_safetensors(out / "adapter_model.safetensors"), json.loads((out / "adapter_config.json").read_text())


def product(tensors: dict[str, tuple[str, np.ndarray]], module: str) -> np.ndarray:
    a = tensors[f"{PREFIX}{module}.lora_A.weight"][1].astype(np.float64)
    b = tensors[f"{PREFIX}{module}.lora_B.weight"][1].astype(np.float64)
    return b @ a


def rel(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.linalg.norm(x - y) / np.linalg.norm(y))


def linear_modules(tensors: dict[str, np.ndarray]) -> list[str]:
    return [n.removesuffix(".weight") for n in tensors if n.rsplit(".", 2)[-2] in LINEAR]


def merged_model(base_dir: Path, adapter_dir: Path, cache: Path) -> dict[str, np.ndarray]:
    """The base with the adapter merged by ferromerge's PEFT LoRA merge (``model+lora``), as float32 values."""
    model = lora.index_lora_model(f"{base_dir}+{adapter_dir}", cache)
    model.materialise()
    files = {info.file for info in model.tensors.values()}
    read = {f: read_safetensors(f) for f in files}
    return {name: read[info.file][name][1] for name, info in model.tensors.items()}


def no_output(out: Path) -> bool:
    """Neither the target nor a partial or trash directory of it exists."""
    return not out.exists() and not list(out.parent.glob(f".{out.name}*"))


# --- the factors against the reference -----------------------------------------------------------------------------


@pytest.mark.parametrize("distribute_scale", [True, False])
def test_exact_factors_are_the_truncated_svd(tmp_path: Path, distribute_scale: bool) -> None:
    b, f, base, ft = write_pair(tmp_path)
    out = tmp_path / "adapter"
    summary = extract_lora(b, f, out, rank=6, exact=True, distribute_scale=distribute_scale)
    tensors, config = adapter(out)
    modules = linear_modules(ft)
    for module in modules:
        w = f"{module}.weight"
        delta = ft[w] - base[w]
        a_ref, b_ref = extract_lora_ref.lora_factors(delta, 6, distribute_scale)
        a = tensors[f"{PREFIX}{module}.lora_A.weight"][1].astype(np.float64)
        bb = tensors[f"{PREFIX}{module}.lora_B.weight"][1].astype(np.float64)
        assert a.shape == a_ref.shape and bb.shape == b_ref.shape, module
        assert rel(bb @ a, b_ref @ a_ref) < PRODUCT_RTOL, module
        if distribute_scale:
            # A = √S·Vᵀ and B = U·√S: A·Aᵀ = Bᵀ·B = diag(S)
            np.testing.assert_allclose(a @ a.T, bb.T @ bb, atol=1e-5 * np.abs(a @ a.T).max(), err_msg=module)
        else:
            # B = U: orthonormal columns
            np.testing.assert_allclose(bb.T @ bb, np.eye(6), atol=1e-5, err_msg=module)
        optimal = np.linalg.norm(delta - b_ref @ a_ref) / np.linalg.norm(delta)
        assert summary["errors"][module] == pytest.approx(optimal, rel=1e-4, abs=1e-6)
    assert config["r"] == config["lora_alpha"] == 6
    assert config["rank_pattern"] == config["alpha_pattern"] == {}
    assert config["target_modules"] == sorted(LINEAR)
    assert set(summary["ranks"]) == set(modules)
    assert summary["max_error"] == max(summary["errors"].values())
    assert set(summary["modules_to_save"]) == {"embed_tokens", "lm_head", "input_layernorm",
                                               "post_attention_layernorm", "norm"}


def test_randomized_is_close_to_the_best_rank_r_approximation(tmp_path: Path) -> None:
    """The default solver (sketch of r + 10 columns, 2 power iterations) on ΔW with singular values decaying by 0.6:
    its error is within 1% of Eckart–Young's optimum, and its product within 1e-3 of the exact truncation."""
    b, f, base, ft = write_pair(tmp_path)
    summary = extract_lora(b, f, tmp_path / "adapter", rank=4)
    tensors, _ = adapter(tmp_path / "adapter")
    for module in linear_modules(ft):
        delta = (ft[f"{module}.weight"] - base[f"{module}.weight"]).astype(np.float64)
        a_ref, b_ref = extract_lora_ref.lora_factors(delta, 4)
        optimal = np.linalg.norm(delta - b_ref @ a_ref) / np.linalg.norm(delta)
        got = np.linalg.norm(delta - product(tensors, module)) / np.linalg.norm(delta)
        assert optimal <= got + 1e-7 and got <= optimal * 1.01, module
        assert summary["errors"][module] == pytest.approx(got, rel=1e-5)
        assert rel(product(tensors, module), b_ref @ a_ref) < 1e-3, module


def test_sharded_models_give_the_same_adapter(tmp_path: Path) -> None:
    """Shards (model.safetensors.index.json) are read tensor by tensor like a single file: same bytes."""
    from ferromerge.synth import make_family

    outs = []
    for shard_size in (None, 4_000):
        fam = make_family(tmp_path / f"fam{shard_size}", n_finetunes=1, hidden=32, intermediate=48, vocab=40,
                          dtype="bfloat16", seed=9, shard_size=shard_size)
        extract_lora(fam.base, fam.finetunes[0], tmp_path / f"a{shard_size}", rank=4)
        outs.append((tmp_path / f"a{shard_size}" / "adapter_model.safetensors").read_bytes())
    assert (tmp_path / "fam4000" / "base" / "model.safetensors.index.json").is_file()
    assert outs[0] == outs[1]


def test_randomized_does_not_depend_on_threads_and_repeats(tmp_path: Path) -> None:
    b, f, _, _ = write_pair(tmp_path)
    outs = []
    for k, threads in enumerate([1, 2, 2]):
        out = tmp_path / f"a{k}"
        extract_lora(b, f, out, rank=5, threads=threads, seed=7)
        outs.append((out / "adapter_model.safetensors").read_bytes())
    assert outs[0] == outs[1] == outs[2]


def test_rank_caps_at_the_matrix_and_full_rank_reproduces_the_delta(tmp_path: Path) -> None:
    b, f, base, ft = write_pair(tmp_path, spectrum=flat_spectrum)
    summary = extract_lora(b, f, tmp_path / "adapter", rank=1000, exact=True)
    tensors, config = adapter(tmp_path / "adapter")
    kv = SHAPE.kv_heads * SHAPE.head_dim
    assert config["r"] == SHAPE.hidden
    assert config["rank_pattern"] == {
        f"model.layers.{i}.self_attn.{p}": kv for i in range(SHAPE.layers) for p in ("k_proj", "v_proj")
    }
    assert config["alpha_pattern"] == config["rank_pattern"]
    for module in linear_modules(ft):
        delta = ft[f"{module}.weight"] - base[f"{module}.weight"]
        assert rel(product(tensors, module), delta) < 1e-5, module
    assert summary["max_error"] < 1e-5


@pytest.mark.parametrize("exact", [True, False])
@pytest.mark.parametrize(("eps", "kept"), [(0.07, 4), (0.2, 3), (0.6, 1)])
def test_sv_epsilon_drops_small_singular_values(tmp_path: Path, exact: bool, eps: float, kept: int) -> None:
    spectrum = np.array([1.0, 0.5, 0.25, 0.1, 0.05])
    b, f, base, ft = write_pair(tmp_path, spectrum=lambda k: spectrum)
    summary = extract_lora(b, f, tmp_path / "adapter", rank=8, sv_epsilon=eps, exact=exact)
    _, config = adapter(tmp_path / "adapter")
    for module in linear_modules(ft):
        delta = ft[f"{module}.weight"] - base[f"{module}.weight"]
        s = np.linalg.svd(delta.astype(np.float64), compute_uv=False)
        # exactly rank 5 up to float32 rounding of the stored weights: tiny singular values beyond the fifth
        assert s[4] > 0.04 and s[5] < 1e-5
        assert summary["ranks"][module] == kept == linalg.svd_rank(s, delta.shape, rank=8, sv_epsilon=eps), module
    assert config["r"] == max(summary["ranks"].values())


@pytest.mark.parametrize("exact", [True, False])
def test_sv_epsilon_zero_drops_only_exact_zeros(tmp_path: Path, exact: bool) -> None:
    """ΔW of rank 5 (plus float32 rounding of the stored weights): every real singular value is kept; the
    rounding-level ones beyond the fifth are kept too unless the SVD returns them as exact zeros (mergekit would
    keep those as well, as zero-filled factors)."""
    spectrum = np.array([1.0, 0.5, 0.25, 0.1, 0.05])
    b, f, base, ft = write_pair(tmp_path, spectrum=lambda k: spectrum)
    summary = extract_lora(b, f, tmp_path / "adapter", rank=8, exact=exact)
    tensors, _ = adapter(tmp_path / "adapter")
    for module in linear_modules(ft):
        assert 5 <= summary["ranks"][module] <= 8, module
        delta = ft[f"{module}.weight"] - base[f"{module}.weight"]
        assert rel(product(tensors, module), delta) < PRODUCT_RTOL, module


# --- dtypes ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_models(tmp_path: Path, dtype: str) -> None:
    """Factors have the models' dtype; ΔW comes from the exact stored values; B·A is the truncation up to the
    factors' rounding; the full-rank adapter merged into the base gives the fine-tune to within its rounding."""
    b, f, base, ft = write_pair(tmp_path, dtype=dtype)
    summary = extract_lora(b, f, tmp_path / "r6", rank=6, exact=True)
    tensors, _ = adapter(tmp_path / "r6")
    for module in linear_modules(ft):
        delta = ft[f"{module}.weight"] - base[f"{module}.weight"]
        a_ref, b_ref = extract_lora_ref.lora_factors(delta, 6)
        assert tensors[f"{PREFIX}{module}.lora_A.weight"][0] == ST[dtype]
        assert rel(product(tensors, module), b_ref @ a_ref) < 8 * UNIT[dtype] + PRODUCT_RTOL, module
        optimal = np.linalg.norm(delta - b_ref @ a_ref) / np.linalg.norm(delta)
        assert abs(summary["errors"][module] - optimal) < 8 * UNIT[dtype], module

    b, f, base, ft = write_pair(tmp_path / "flat", dtype=dtype, spectrum=flat_spectrum)
    extract_lora(b, f, tmp_path / "full", rank=1000, exact=True)
    merged = merged_model(b, tmp_path / "full", tmp_path / "cache")
    assert set(merged) == set(ft)
    for name, x in ft.items():
        # B·A = ΔW up to the factors' rounding (relative to ΔW's magnitude), then W_base + B·A rounded once to the
        # dtype (at most one unit in the last place of the fine-tune's value)
        slack = 4 * UNIT[dtype] * float(np.abs(x - base[name]).max())
        np.testing.assert_allclose(merged[name], x, rtol=2 * UNIT[dtype], atol=slack + 1e-7, err_msg=name)


def test_mixed_dtypes_give_float32_factors(tmp_path: Path) -> None:
    b, f, base, ft = write_pair(tmp_path, dtype="float32", ft_dtype="bfloat16")
    extract_lora(b, f, tmp_path / "adapter", rank=3, exact=True)
    tensors, _ = adapter(tmp_path / "adapter")
    q = "model.layers.0.self_attn.q_proj"
    assert tensors[f"{PREFIX}{q}.lora_A.weight"][0] == "F32"
    a_ref, b_ref = extract_lora_ref.lora_factors(ft[f"{q}.weight"] - base[f"{q}.weight"], 3)
    assert rel(product(tensors, q), b_ref @ a_ref) < 1e-5
    # modules to save are the fine-tune's tensors as stored
    assert tensors[f"{PREFIX}model.norm.weight"][0] == "BF16"


@st.composite
def single_module(draw: Any) -> dict[str, Any]:
    return dict(
        m=draw(st.integers(1, 23)), n=draw(st.integers(1, 23)), rank=draw(st.integers(1, 25)),
        dtype=draw(st.sampled_from(["float32", "float16", "bfloat16"])), distribute_scale=draw(st.booleans()),
        exact=draw(st.booleans()), seed=draw(st.integers(0, 2**32 - 1)), scale=draw(st.sampled_from([1e-3, 0.05, 2.0])),
    )


@settings(deadline=None, max_examples=40, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(c=single_module())
def test_any_shape_and_dtype_is_within_rounding_of_eckart_young(tmp_path_factory: pytest.TempPathFactory,
                                                                  c: dict[str, Any]) -> None:
    """Odd shapes (1 × n, m × 1, wide, tall), every dtype, both splits, both solvers: the stored factors' error is
    the optimal rank-r error up to the factors' rounding (Eckart–Young: never below it), r = min(rank, m, n) but
    for singular values that are exactly zero (a half-precision ΔW can be exactly rank-deficient): those are
    dropped."""
    root = tmp_path_factory.mktemp("one")
    rng = np.random.default_rng(c["seed"])
    m, n, dtype = c["m"], c["n"], c["dtype"]
    base = {"block.proj.weight": rng.standard_normal((m, n)).astype(np.float32)}
    ft = {"block.proj.weight": base["block.proj.weight"] + c["scale"] * rng.standard_normal((m, n)).astype(np.float32)}
    save_model(root / "base", base, dtype=dtype)
    save_model(root / "ft", ft, dtype=dtype)
    delta = (decode(ft["block.proj.weight"], dtype) - decode(base["block.proj.weight"], dtype)).astype(np.float64)
    run = dict(rank=c["rank"], exact=c["exact"], distribute_scale=c["distribute_scale"], seed=c["seed"])
    if not delta.any():
        # a small change can round away in half precision: the models are then the same
        with pytest.raises(InputError, match="equals the base"):
            extract_lora(root / "base", root / "ft", root / "out", **run)
        return
    summary = extract_lora(root / "base", root / "ft", root / "out", **run)
    tensors, config = adapter(root / "out")
    a = tensors[f"{PREFIX}block.proj.lora_A.weight"][1].astype(np.float64)
    b = tensors[f"{PREFIX}block.proj.lora_B.weight"][1].astype(np.float64)
    r = config["r"]
    assert a.shape == (r, n) and b.shape == (m, r)
    assert min(c["rank"], np.linalg.matrix_rank(delta)) <= r <= min(c["rank"], m, n)
    a_ref, b_ref = extract_lora_ref.lora_factors(delta, r)
    norm = np.linalg.norm(delta)
    optimal = np.linalg.norm(delta - b_ref @ a_ref)
    got = np.linalg.norm(delta - b @ a)
    # the randomized solver on a flat spectrum is not optimal: it gets a looser (but still small) margin
    slack = 16 * max(UNIT[dtype], 1e-6) * norm + (0.0 if c["exact"] or r == min(m, n) else 0.25 * optimal)
    assert optimal - 1e-6 * norm <= got <= optimal + slack
    assert summary["errors"]["block.proj"] == pytest.approx(got / norm, rel=1e-4, abs=1e-6)


# --- the PEFT round trip -------------------------------------------------------------------------------------------


def test_full_rank_adapter_merged_by_peft_rules_is_the_finetune(tmp_path: Path) -> None:
    b, f, _, ft = write_pair(tmp_path, spectrum=flat_spectrum)
    summary = extract_lora(b, f, tmp_path / "adapter", rank=128, exact=True)
    _, config = adapter(tmp_path / "adapter")
    assert set(config["modules_to_save"]) == {"embed_tokens", "lm_head", "input_layernorm",
                                              "post_attention_layernorm", "norm"}
    assert summary["modules_to_save"] == config["modules_to_save"]
    merged = merged_model(b, tmp_path / "adapter", tmp_path / "cache")
    assert set(merged) == set(ft)
    for name, x in ft.items():
        if name.rsplit(".", 2)[-2] in LINEAR:
            np.testing.assert_allclose(merged[name], x, rtol=1e-5, atol=2e-6, err_msg=name)
        else:
            assert merged[name].tobytes() == x.tobytes(), name


def test_embed_lora_factorises_embeddings_transposed(tmp_path: Path) -> None:
    b, f, base, ft = write_pair(tmp_path, spectrum=flat_spectrum)
    extract_lora(b, f, tmp_path / "adapter", rank=128, exact=True, embed_lora=True)
    tensors, config = adapter(tmp_path / "adapter")
    emb = "model.embed_tokens"
    a = tensors[f"{PREFIX}{emb}.lora_embedding_A"][1]
    bb = tensors[f"{PREFIX}{emb}.lora_embedding_B"][1]
    assert a.shape == (SHAPE.hidden, SHAPE.vocab) and bb.shape == (SHAPE.hidden, SHAPE.hidden)
    delta = ft[f"{emb}.weight"] - base[f"{emb}.weight"]
    assert rel((bb.astype(np.float64) @ a).T, delta) < 1e-5
    assert rel(product(tensors, "lm_head"), ft["lm_head.weight"] - base["lm_head.weight"]) < 1e-5
    assert "embed_tokens" in config["target_modules"] and "lm_head" in config["target_modules"]
    assert set(config["modules_to_save"]) == {"input_layernorm", "post_attention_layernorm", "norm"}
    merged = merged_model(b, tmp_path / "adapter", tmp_path / "cache")
    for name in (f"{emb}.weight", "lm_head.weight"):
        np.testing.assert_allclose(merged[name], ft[name], rtol=1e-5, atol=2e-6, err_msg=name)


def test_other_vocabulary_saves_embeddings_at_full_rank(tmp_path: Path) -> None:
    """mergekit's rule: with vocabularies of different sizes embed_lora is off; the fine-tune's rows are saved."""
    rng = np.random.default_rng(3)

    def grow(base: dict[str, np.ndarray], ft: dict[str, np.ndarray]) -> None:
        for name in ("model.embed_tokens.weight", "lm_head.weight"):
            ft[name] = np.concatenate([ft[name], rng.standard_normal((8, SHAPE.hidden)).astype(np.float32)])

    b, f, _, ft = write_pair(tmp_path, edit=grow)
    summary = extract_lora(b, f, tmp_path / "adapter", rank=4, exact=True, embed_lora=True)
    tensors, config = adapter(tmp_path / "adapter")
    assert {"embed_tokens", "lm_head"} <= set(config["modules_to_save"])
    assert "embed_tokens" not in config["target_modules"]
    assert tensors[f"{PREFIX}model.embed_tokens.weight"][1].tobytes() == ft["model.embed_tokens.weight"].tobytes()
    assert any("vocabularies differ" in n and "embed_lora is turned off" in n for n in summary["notes"])
    assert "resize" in (tmp_path / "adapter" / "README.md").read_text()


# --- what goes where -------------------------------------------------------------------------------------------------


def test_include_exclude_and_skip_follow_mergekit(tmp_path: Path) -> None:
    b, f, _, ft = write_pair(tmp_path)
    s = extract_lora(b, f, tmp_path / "inc", rank=2, exact=True, include=r"self_attn\.[qk]_proj")
    assert set(s["ranks"]) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "k_proj")}
    # include applies to norms (undecomposable, filtered out) but not to embeddings (as in mergekit)
    assert set(s["modules_to_save"]) == {"embed_tokens", "lm_head"}

    s = extract_lora(b, f, tmp_path / "exc", rank=2, exact=True, exclude=[r"layers\.1\.", "lm_head"])
    assert all(not m.startswith("model.layers.1.") for m in s["ranks"]) and len(s["ranks"]) == len(LINEAR)
    # layer 1's norms are saved anyway: PEFT's modules_to_save names a key, which layer 0's norms put there
    tensors, _ = adapter(tmp_path / "exc")
    assert f"{PREFIX}model.layers.1.input_layernorm.weight" in tensors
    assert f"{PREFIX}lm_head.weight" not in tensors and "lm_head" not in s["modules_to_save"]

    s = extract_lora(b, f, tmp_path / "skip", rank=2, exact=True, skip_undecomposable=True)
    assert set(s["modules_to_save"]) == {"embed_tokens", "lm_head"}
    tensors, _ = adapter(tmp_path / "skip")
    assert not any("norm" in k for k in tensors)

    s = extract_lora(b, f, tmp_path / "save", rank=2, exact=True, save_modules=["o_proj"])
    tensors, config = adapter(tmp_path / "save")
    assert "o_proj" in config["modules_to_save"] and "o_proj" not in config["target_modules"]
    name = "model.layers.0.self_attn.o_proj.weight"
    assert tensors[PREFIX + name][1].tobytes() == ft[name].tobytes()


def custom_pair(root: Path, base: dict[str, np.ndarray], ft: dict[str, np.ndarray]) -> tuple[Path, Path]:
    return save_model(root / "base", base, dtype="float32"), save_model(root / "ft", ft, dtype="float32")


def test_biases_3d_tensors_and_unchanged_modules(tmp_path: Path) -> None:
    rng = np.random.default_rng(5)
    base = {
        "blocks.0.fc.weight": rng.standard_normal((12, 8)).astype(np.float32),
        "blocks.0.fc.bias": rng.standard_normal(12).astype(np.float32),
        "blocks.0.proj.weight": rng.standard_normal((8, 12)).astype(np.float32),
        "blocks.0.same.weight": rng.standard_normal((6, 8)).astype(np.float32),
        "blocks.0.experts.w": rng.standard_normal((3, 4, 5)).astype(np.float32),
        "blocks.0.ln.weight": np.ones(8, np.float32),
        "blocks.0.ln.bias": np.zeros(8, np.float32),
    }
    ft = {k: (v + 0.1 * rng.standard_normal(v.shape)).astype(np.float32) for k, v in base.items()}
    ft["blocks.0.same.weight"] = base["blocks.0.same.weight"]
    b, f = custom_pair(tmp_path, base, ft)
    s = extract_lora(b, f, tmp_path / "adapter", rank=64, exact=True)
    tensors, config = adapter(tmp_path / "adapter")
    assert s["unchanged"] == ["blocks.0.same"] and set(s["ranks"]) == {"blocks.0.fc", "blocks.0.proj"}
    assert not any(".same." in k for k in tensors)
    bias = tensors[f"{PREFIX}blocks.0.fc.lora_B.bias"][1]
    assert bias.tobytes() == (ft["blocks.0.fc.bias"] - base["blocks.0.fc.bias"]).tobytes()
    assert f"{PREFIX}blocks.0.proj.lora_B.bias" not in tensors
    assert "lora_bias" not in config  # proj has no bias: PEFT's lora_bias would break its merge
    assert set(config["modules_to_save"]) == {"experts", "ln"}
    for name in ("blocks.0.experts.w", "blocks.0.ln.weight", "blocks.0.ln.bias"):
        assert tensors[PREFIX + name][1].tobytes() == ft[name].tobytes()

    # every factorised module with a bias: lora_bias tells PEFT to load lora_B.bias
    del base["blocks.0.proj.weight"], ft["blocks.0.proj.weight"]
    b, f = custom_pair(tmp_path / "all", base, ft)
    extract_lora(b, f, tmp_path / "all" / "adapter", rank=64, exact=True)
    assert adapter(tmp_path / "all" / "adapter")[1]["lora_bias"] is True


def test_zero_delta_with_a_bias_keeps_a_zero_triplet(tmp_path: Path) -> None:
    rng = np.random.default_rng(6)
    base = {"m.fc.weight": rng.standard_normal((5, 4)).astype(np.float32), "m.fc.bias": np.zeros(5, np.float32),
            "m.out.weight": rng.standard_normal((4, 5)).astype(np.float32)}
    ft = dict(base, **{"m.fc.bias": np.ones(5, np.float32),
                       "m.out.weight": base["m.out.weight"] + rng.standard_normal((4, 5)).astype(np.float32)})
    b, f = custom_pair(tmp_path, base, ft)
    s = extract_lora(b, f, tmp_path / "adapter", rank=3, exact=True)
    tensors, config = adapter(tmp_path / "adapter")
    assert s["ranks"]["m.fc"] == 1 and config["rank_pattern"] == {"m.fc": 1}
    assert not tensors[f"{PREFIX}m.fc.lora_A.weight"][1].any() and not tensors[f"{PREFIX}m.fc.lora_B.weight"][1].any()
    assert tensors[f"{PREFIX}m.fc.lora_B.bias"][1].tolist() == [1.0] * 5


# --- the command line ------------------------------------------------------------------------------------------------


def test_cli_extracts_and_reports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    b, f, _, _ = write_pair(tmp_path)
    assert cli_main(["extract-lora", str(b), str(f), str(tmp_path / "a"), "--max-rank", "3", "--exact"]) == 0
    out = capsys.readouterr().out
    assert "rank-3 LoRA of 14 modules" in out and "max " in out and "mean " in out
    assert adapter(tmp_path / "a")[1]["r"] == 3
    assert cli_main(["extract-lora", str(b), str(f), str(tmp_path / "b"), "--rank", "2", "-i", "q_proj",
                     "-e", r"layers\.1", "--no-distribute-scale", "--skip-undecomposable", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert list(adapter(tmp_path / "b")[1]["target_modules"]) == ["q_proj"]


@pytest.mark.parametrize(("argv", "code", "says"), [
    (["--rank", "0"], 2, "rank must be an integer ≥ 1, got 0"),
    (["--sv-epsilon", "-1"], 2, "sv_epsilon must be a finite number ≥ 0"),
    (["-i", "("], 2, "include regex '('"),
    (["--seed", "-1"], 2, "seed must be an integer in [0, "),
    (["-i", "nothing-matches"], 2, "no module of"),
])
def test_cli_bad_parameters_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], code: int,
                                   says: str) -> None:
    b, f, _, _ = write_pair(tmp_path)
    out = tmp_path / "a"
    assert cli_main(["extract-lora", str(b), str(f), str(out), *argv]) == code
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ferromerge: error: ") and says in err
    assert no_output(out)


def test_cli_existing_output_exits_1_and_overwrite_replaces_it(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    b, f, _, _ = write_pair(tmp_path)
    out = tmp_path / "a"
    out.mkdir()
    (out / "keep").write_text("x")
    assert cli_main(["extract-lora", str(b), str(f), str(out), "--quiet"]) == 1
    assert "already exists; use --overwrite" in capsys.readouterr().err
    assert (out / "keep").exists()
    assert cli_main(["extract-lora", str(b), str(f), str(out), "--quiet", "--overwrite", "--rank", "2"]) == 0
    assert not (out / "keep").exists() and adapter(out)[1]["r"] == 2


# --- broken inputs -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs", [
    dict(rank=0), dict(rank=-3), dict(rank=True), dict(rank=2.5), dict(sv_epsilon=-0.1), dict(sv_epsilon=math.nan),
    dict(sv_epsilon=math.inf), dict(oversample=-1), dict(power_iters=-1), dict(seed=2**64), dict(threads=0),
    dict(exclude=["ok", "["]), dict(include=[3]), dict(save_modules=["no_such_module"]), dict(include="zzz"),
])
def test_bad_parameters(tmp_path: Path, kwargs: dict[str, Any]) -> None:
    b, f, _, _ = write_pair(tmp_path)
    with pytest.raises(ParameterError):
        extract_lora(b, f, tmp_path / "out", **kwargs)
    assert no_output(tmp_path / "out")


def broken(root: Path, what: str) -> tuple[Path, Path]:
    """A model pair with one defect."""
    def edit(base: dict[str, np.ndarray], ft: dict[str, np.ndarray]) -> None:
        q = "model.layers.1.self_attn.q_proj.weight"
        if what == "missing_in_base":
            del base[q]
        elif what == "missing_in_ft":
            del ft[q]
        elif what == "shape":
            base[q] = base[q][:, :-1].copy()
        elif what == "nan":
            ft[q][3, 4] = np.nan

    b, f, _, _ = write_pair(root, edit=edit)
    if what == "truncated":
        shard = f / "model.safetensors"
        shard.write_bytes(shard.read_bytes()[:-100])
    if what == "gpt2":
        cfg = json.loads((f / "config.json").read_text())
        (f / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    return b, f


@pytest.mark.parametrize(("what", "says"), [
    ("missing_in_base", ["ft/model.safetensors: tensor model.layers.1.self_attn.q_proj.weight", "not in the base"]),
    ("missing_in_ft", ["base/model.safetensors: tensor model.layers.1.self_attn.q_proj.weight", "cannot remove"]),
    ("shape", ["ft/model.safetensors: tensor model.layers.1.self_attn.q_proj.weight has shape [64, 64]",
               "base/model.safetensors has it with shape [64, 63]"]),
    ("nan", ["ft/model.safetensors: tensor model.layers.1.self_attn.q_proj.weight has NaN"]),
    ("truncated", ["ft/model.safetensors"]),
    ("gpt2", ["ft/config.json: model_type 'gpt2'"]),
])
def test_broken_inputs_name_the_file_and_leave_nothing(tmp_path: Path, what: str, says: list[str]) -> None:
    b, f = broken(tmp_path, what)
    out = tmp_path / "out"
    with pytest.raises(InputError) as e:
        extract_lora(b, f, out, rank=4)
    for s in says:
        assert s in str(e.value)
    assert no_output(out)


def test_identical_models_are_an_error_and_leave_nothing(tmp_path: Path) -> None:
    b, _, _, _ = write_pair(tmp_path)
    with pytest.raises(InputError, match="equals the base"):
        extract_lora(b, b, tmp_path / "out")
    assert no_output(tmp_path / "out")


def test_existing_output_is_kept_without_overwrite(tmp_path: Path) -> None:
    b, f, _, _ = write_pair(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(OutputError, match="already exists"):
        extract_lora(b, f, out)
    assert out.is_dir() and not any(out.iterdir())
    with pytest.raises(OutputError, match="contains the input model"):
        extract_lora(b, f, tmp_path, overwrite=True)


def test_adapter_file_reads_with_the_safetensors_package(tmp_path: Path) -> None:
    """The header written into its reserved space (padded with spaces) is valid for the reference reader."""
    from safetensors.numpy import load_file

    b, f, _, _ = write_pair(tmp_path)
    extract_lora(b, f, tmp_path / "adapter", rank=3, sv_epsilon=0.05)
    ours = read_safetensors(tmp_path / "adapter" / "adapter_model.safetensors")
    theirs = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert set(ours) == set(theirs)
    for k, (_, x) in ours.items():
        assert np.array_equal(theirs[k], x), k
