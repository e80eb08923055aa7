"""``merge_adapters`` / ``ferromerge merge-lora`` against the NumPy restatement of PEFT (``adapters.reference``),
on adapters written with NumPy (``adapters.make``); PEFT itself: ``tests/compat/test_peft_adapters.py``.

Tolerances: float32 math against float64 references, |Δ| ≤ 1e-5 · the largest |entry| (factors) or ≤ 1e-5
relative Frobenius (products of the SVD types, where factors are unique only up to signs).
"""

from __future__ import annotations

import json
import shutil

import ferromerge
import numpy as np
import pytest
from ferromerge import _engine
from ferromerge.adapters import merge as merge_mod
from ferromerge.errors import InputError, OutputError, ParameterError
from helpers.cli import run_cli

from adapters import reference as ref
from adapters.make import PREFIX, SHAPES, read_adapter, write_adapter

M = "model.layers.1.mlp.down_proj"


@pytest.fixture
def trio(tmp_path):
    """Three rank-4 adapters (one with rsLoRA, one with fewer modules) and their factors with scales."""
    f1 = write_adapter(tmp_path / "a1", 4, seed=1, alpha=16)
    f2 = write_adapter(tmp_path / "a2", 4, seed=2, alpha=8, rslora=True)
    few = [m for m in SHAPES if "q_proj" in m or "down" in m]
    f3 = write_adapter(tmp_path / "a3", 4, seed=3, alpha=4, modules=few)
    scales = [16 / 4, 8 / 2, 4 / 4]
    ins = [{m: (a, b, s) for m, (a, b) in f.items()} for f, s in zip((f1, f2, f3), scales)]
    return tmp_path, ins


WEIGHTS = [0.7, -0.4, 0.5]


def _merge(tmp, combination, name=None, **kw):
    out = tmp / (name or f"out_{combination}")
    summary = ferromerge.merge_adapters(out, [(tmp / f"a{i + 1}", w) for i, w in enumerate(WEIGHTS)],
                                        combination=combination, **kw)
    return summary, *read_adapter(out)


def _present(ins, m):
    pairs = [(i[m], w) for i, w in zip(ins, WEIGHTS) if m in i]
    return [p[0] for p in pairs], [p[1] for p in pairs]


def _close(x, y, what):
    scale = max(np.abs(y).max(), 1e-30)
    assert np.abs(x - y).max() <= 1e-5 * scale, f"{what}: worst {np.abs(x - y).max() / scale:.3g} of max"


@pytest.mark.parametrize("kind, density, sign", [("linear", None, "total"), ("ties", 0.5, "total"),
                                                 ("ties", 0.3, "frequency"), ("magnitude_prune", 0.4, "total")])
def test_stack_types_match_reference(trio, kind, density, sign):
    tmp, ins = trio
    summary, config, out = _merge(tmp, kind, density=density, majority_sign=sign)
    assert sorted(out) == sorted(SHAPES), "union of the adapters' modules"
    assert config["r"] == config["lora_alpha"] == 4 and config["rank_pattern"] == {}
    for m in SHAPES:
        facs, ws = _present(ins, m)
        a, b = ref.stacks(kind, facs, ws, density, sign)
        _close(out[m][0], a, f"{m} A")
        _close(out[m][1], b, f"{m} B")


def test_cat_is_exact_and_ranks_add_up(trio):
    tmp, ins = trio
    summary, config, out = _merge(tmp, "cat")
    assert config["r"] == 12
    for m in SHAPES:
        facs, ws = _present(ins, m)
        a, b = ref.cat(facs, ws)
        _close(out[m][0], a, m)
        np.testing.assert_array_equal(out[m][1], b)
        delta = sum(w * s * fb @ fa for (fa, fb, s), w in zip(facs, ws))
        _close(out[m][1] @ out[m][0], delta, m)
    # modules of the adapters without a3 have rank 8: written compactly, named in rank_pattern (alpha = rank)
    v = "model.layers.0.self_attn.v_proj"
    assert out[v][0].shape[0] == 8 and config["rank_pattern"][v] == 8 == config["alpha_pattern"][v]


@pytest.mark.parametrize("kind, density", [("svd", None), ("ties_svd", 0.5), ("magnitude_prune_svd", 0.4)])
@pytest.mark.parametrize("rank", [None, 3, 100])
def test_svd_types_match_reference(trio, kind, density, rank):
    tmp, ins = trio
    summary, config, out = _merge(tmp, kind, density=density, rank=rank, exact=True)
    assert config["r"] == (rank or 4)
    for m in SHAPES:
        facs, ws = _present(ins, m)
        delta = ref.full_delta(kind, facs, ws, density)
        k = min(rank or 4, *delta.shape, *([sum(f[0].shape[0] for f in facs)] if kind == "svd" else []))
        a, b = ref.svd_factors(delta, k)
        assert out[m][0].shape == (k, delta.shape[1])
        got, want = out[m][1] @ out[m][0], b @ a
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(delta), m


def test_svd_never_builds_the_delta(trio, monkeypatch):
    """Plain svd works through the factors only: Factors.delta is never called."""
    tmp, _ = trio

    def boom(self):
        raise AssertionError("ΔW built")

    monkeypatch.setattr(merge_mod.Factors, "delta", boom)
    _merge(tmp, "svd", rank=6)


def test_randomized_svd_near_optimal(trio):
    tmp, ins = trio
    _, _, out = _merge(tmp, "ties_svd", density=0.5, rank=3)
    for m in SHAPES:
        facs, ws = _present(ins, m)
        delta = ref.full_delta("ties_svd", facs, ws, 0.5)
        a, b = ref.svd_factors(delta, 3)
        best = np.linalg.norm(delta - b @ a)
        assert np.linalg.norm(delta - out[m][1] @ out[m][0]) <= 1.02 * best + 1e-6 * np.linalg.norm(delta), m


def test_svd_clamp_clips_at_the_quantile(trio):
    tmp, _ = trio
    _, _, raw = _merge(tmp, "svd", name="raw")
    _, _, out = _merge(tmp, "svd", svd_clamp=0.8)
    for m in SHAPES:
        a, b = raw[m]
        hi = np.quantile(np.concatenate([b.ravel(), a.ravel()]).astype(np.float64), 0.8)
        _close(out[m][0], np.clip(a, -hi, hi), m)
        _close(out[m][1], np.clip(b, -hi, hi), m)


@pytest.mark.parametrize("kind", ["dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"])
def test_dare_is_reproducible_at_any_thread_count(trio, kind):
    tmp, _ = trio
    _merge(tmp, kind, name="t1", density=0.5, seed=3, threads=1, rank=100)
    _merge(tmp, kind, name="t2", density=0.5, seed=3, threads=2, rank=100)
    _merge(tmp, kind, name="s4", density=0.5, seed=4, threads=2, rank=100)
    one, two, other = (tmp / n / "adapter_model.safetensors" for n in ("t1", "t2", "s4"))
    assert one.read_bytes() == two.read_bytes()
    assert one.read_bytes() != other.read_bytes()


def test_dare_linear_structure(trio):
    """Each entry of DARE on the A stack is Σ over a subset of the adapters of w_a,i·A_i/d (PEFT's rule)."""
    tmp, ins = trio
    _, _, out = _merge(tmp, "dare_linear", density=0.5)
    for m in SHAPES:
        facs, ws = _present(ins, m)
        wa = [np.sign(w * s) * np.sqrt(abs(w * s)) for (_, _, s), w in zip(facs, ws)]
        terms = np.stack([w * f[0] / 0.5 for f, w in zip(facs, wa)])
        n = len(facs)
        subsets = np.array([[(k >> i) & 1 for i in range(n)] for k in range(2**n)], np.float64)
        cands = np.einsum("sk,kij->sij", subsets, terms)
        err = np.abs(cands - out[m][0][None]).min(0)
        assert (err <= 1e-5 * np.abs(terms).sum(0) + 1e-30).all(), m


def test_one_adapter_is_linear_with_a_note(tmp_path):
    f = write_adapter(tmp_path / "a", 4, seed=1, alpha=8)
    s = ferromerge.merge_adapters(tmp_path / "o", [(tmp_path / "a", 0.5)], combination="svd")
    assert s["combination"] == "linear" and "linear" in s["notes"][0]
    _, out = read_adapter(tmp_path / "o")
    for m, (a, b) in f.items():
        _close(out[m][1] @ out[m][0], 0.5 * 2 * b @ a, m)


def test_bfloat16_adapters_give_bfloat16(tmp_path):
    write_adapter(tmp_path / "a", 4, seed=1, dtype="BF16")
    write_adapter(tmp_path / "b", 4, seed=2, dtype="BF16")
    ferromerge.merge_adapters(tmp_path / "o", [tmp_path / "a", tmp_path / "b"], combination="cat")
    ferromerge.merge_adapters(tmp_path / "o32", [tmp_path / "a", tmp_path / "b"], combination="cat", dtype="float32")
    assert {d for d, _ in _engine.read_header(str(tmp_path / "o" / "adapter_model.safetensors")).values()} == {"BF16"}
    assert {d for d, _ in _engine.read_header(str(tmp_path / "o32" / "adapter_model.safetensors")).values()} == {"F32"}


def test_embedding_keys_and_base_layer_copies(tmp_path):
    emb = {"model.embed_tokens": (16, 50)}
    SHAPES_E = ["model.embed_tokens", "model.layers.0.self_attn.q_proj"]
    for i, name in enumerate(("a", "b")):
        write_adapter(tmp_path / name, 4, seed=i, modules=SHAPES_E, embed=emb)
        # PEFT saves the embedding's base weight beside an embedding LoRA: carried over unchanged
        f = tmp_path / name / "adapter_model.safetensors"
        tensors = {k: (np.asarray(_read(f, k)), d) for k, (d, _) in _engine.read_header(str(f)).items()}
        tensors[f"{PREFIX}model.embed_tokens.base_layer.weight"] = (np.arange(800, dtype=np.float32).reshape(50, 16),
                                                                    "F32")
        _engine.save_file(str(f), tensors)
    ferromerge.merge_adapters(tmp_path / "o", [tmp_path / "a", tmp_path / "b"], combination="svd")
    header = _engine.read_header(str(tmp_path / "o" / "adapter_model.safetensors"))
    assert f"{PREFIX}model.embed_tokens.lora_embedding_A" in header
    assert header[f"{PREFIX}model.embed_tokens.base_layer.weight"] == ("F32", [50, 16])
    np.testing.assert_array_equal(_read(tmp_path / "o" / "adapter_model.safetensors",
                                        f"{PREFIX}model.embed_tokens.base_layer.weight").reshape(-1), np.arange(800))
    # different base layers: adapters of different models
    f = tmp_path / "b" / "adapter_model.safetensors"
    tensors = {k: (np.asarray(_read(f, k)), d) for k, (d, _) in _engine.read_header(str(f)).items()}
    tensors[f"{PREFIX}model.embed_tokens.base_layer.weight"] = (np.zeros((50, 16), np.float32), "F32")
    _engine.save_file(str(f), tensors)
    with pytest.raises(InputError, match="base_layer.weight differs"):
        ferromerge.merge_adapters(tmp_path / "o2", [tmp_path / "a", tmp_path / "b"], combination="svd")


def _read(file, key):
    from ferromerge.io.reader import read_header

    dtype, shape, start, end = read_header(file).tensors[key]
    assert dtype == "F32"
    return np.frombuffer(file.read_bytes()[start:end], np.float32).reshape(shape)


def test_errors(tmp_path):
    write_adapter(tmp_path / "a", 4, seed=1)
    write_adapter(tmp_path / "b8", 8, seed=2)
    pairs = [tmp_path / "a", tmp_path / "b8"]
    with pytest.raises(ParameterError, match="one rank"):
        ferromerge.merge_adapters(tmp_path / "o", pairs, combination="ties", density=0.5)
    with pytest.raises(ParameterError, match="needs a density"):
        ferromerge.merge_adapters(tmp_path / "o", [tmp_path / "a", tmp_path / "a"], combination="ties")
    with pytest.raises(ParameterError, match="combination"):
        ferromerge.merge_adapters(tmp_path / "o", pairs, combination="slerp")
    with pytest.raises(InputError, match="not found"):
        ferromerge.merge_adapters(tmp_path / "o", [tmp_path / "nope"], combination="svd")
    ferromerge.merge_adapters(tmp_path / "o", pairs, combination="cat")
    with pytest.raises(OutputError, match="already exists"):
        ferromerge.merge_adapters(tmp_path / "o", pairs, combination="cat")
    ferromerge.merge_adapters(tmp_path / "o", pairs, combination="svd", overwrite=True)
    # a full tensor (modules_to_save) is refused, naming the file and tensor
    f = tmp_path / "a" / "adapter_model.safetensors"
    tensors = {k: (np.asarray(_read(f, k)), d) for k, (d, _) in _engine.read_header(str(f)).items()}
    tensors[f"{PREFIX}lm_head.modules_to_save.default.weight"] = (np.zeros((4, 4), np.float32), "F32")
    _engine.save_file(str(f), tensors)
    with pytest.raises(InputError, match="lm_head.modules_to_save.default.weight is not a LoRA factor"):
        ferromerge.merge_adapters(tmp_path / "o3", pairs, combination="cat")
    assert not (tmp_path / "o3").exists()
    # another model's adapter: the same module with another shape
    write_adapter(tmp_path / "c", 4, seed=3)
    cfg = json.loads((tmp_path / "c" / "adapter_config.json").read_text())
    shutil.rmtree(tmp_path / "c")
    other = dict(SHAPES)
    other[M] = (16, 41)
    import adapters.make as mk

    mk_shapes, mk.SHAPES = mk.SHAPES, other
    try:
        write_adapter(tmp_path / "c", 4, seed=3)
    finally:
        mk.SHAPES = mk_shapes
    assert cfg["r"] == 4
    with pytest.raises(InputError, match=M):
        ferromerge.merge_adapters(tmp_path / "o4", [tmp_path / "b8", tmp_path / "c"], combination="svd")


def test_hf_cache_id(tmp_path, monkeypatch):
    repo = tmp_path / "hub" / "models--org--lora"
    snap = repo / "snapshots" / ("a" * 40)
    write_adapter(snap, 4, seed=1)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    write_adapter(tmp_path / "b", 4, seed=2)
    s = ferromerge.merge_adapters(tmp_path / "o", [("org/lora", 1.0), (tmp_path / "b", 1.0)], combination="cat")
    assert s["r"] == 8


def test_cli(tmp_path):
    write_adapter(tmp_path / "a", 4, seed=1, alpha=16)
    write_adapter(tmp_path / "b", 4, seed=2, alpha=8)
    proc = run_cli("merge-lora", tmp_path / "o", "--adapter", f"{tmp_path / 'a'}:0.7", "--adapter",
                   f"{tmp_path / 'b'}:-0.4", "--combination", "ties_svd", "--density", "0.5", "--rank", "3",
                   "--seed", "2", "--exact")
    assert proc.returncode == 0, proc.stderr
    assert "rank-3" in proc.stdout
    api = ferromerge.merge_adapters(tmp_path / "api", [(tmp_path / "a", 0.7), (tmp_path / "b", -0.4)],
                                    combination="ties_svd", density=0.5, rank=3, seed=2, exact=True)
    assert api["r"] == 3
    assert (tmp_path / "o" / "adapter_model.safetensors").read_bytes() == \
        (tmp_path / "api" / "adapter_model.safetensors").read_bytes()
    assert json.loads((tmp_path / "o" / "adapter_config.json").read_text())["r"] == 3
    bad = run_cli("merge-lora", tmp_path / "o2", "--adapter", str(tmp_path / "a"), "--adapter", str(tmp_path / "a"),
                  "--combination", "ties")
    assert bad.returncode == 2 and bad.stderr.startswith("ferromerge: error:") and "density" in bad.stderr
    missing = run_cli("merge-lora", tmp_path / "o3", "--adapter", str(tmp_path / "zz"))
    assert missing.returncode == 1 and "not found" in missing.stderr


def test_thread_counts_do_not_change_the_result(trio):
    """The election (``_core.disjoint_mean``) and the trims run on the engine's threads: 1 or 3 give the same bytes."""
    tmp, _ = trio
    for threads in (1, 3):
        _merge(tmp, "ties_svd", name=f"svd{threads}", density=0.5, exact=True, threads=threads)
        _merge(tmp, "ties", name=f"stack{threads}", density=0.5, majority_sign="frequency", threads=threads)
    for a, b in (("svd1", "svd3"), ("stack1", "stack3")):
        assert (tmp / a / "adapter_model.safetensors").read_bytes() == (tmp / b / "adapter_model.safetensors").read_bytes()


@pytest.mark.parametrize("rank", [None, 3])
def test_knots_types_dispatch_to_knots(trio, rank):
    """knots_linear merges in the shared basis without pruning: ΔW is the weighted sum (rank Σ r_i), or its best
    rank-``rank`` approximation."""
    tmp, ins = trio
    summary, config, out = _merge(tmp, "knots_linear", rank=rank)
    assert config["r"] == (rank or 12)
    for m in SHAPES:
        facs, ws = _present(ins, m)
        delta = ref.full_delta("svd", facs, ws)
        got = out[m][1] @ out[m][0]
        if rank is None:
            assert out[m][0].shape[0] == 4 * len(facs)
            assert np.linalg.norm(got - delta) <= 1e-5 * np.linalg.norm(delta), m
        else:
            a, b = ref.svd_factors(delta, 3)
            assert np.linalg.norm(got - b @ a) <= 1e-4 * np.linalg.norm(delta), m
