"""Vocabulary alignment (``tokenizer_source`` / ``tokenizer``) and ``chat_template``.

The permuted embeddings are checked against ``reference_permute``, a plain per-token loop written from mergekit
0.1.5's rules (docs/compat.md): own row unless forced; else the ``tokens:`` entry, the only owner's row, the
base's row, the owners' mean (float32 running sum in model order), zero; padding rows = the mean row. Every
comparison is exact for float32 models (the same float32 operations in the same order), and for bfloat16 after
the one rounding both sides do.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

import ferromerge
from ferromerge.tokenizer import chat_template as chat_template_mod
from ferromerge.tokenizer import vocab as vocab_mod
from ferromerge.config.resolve import parse_config
from ferromerge.io.dtypes import round_to
from ferromerge.tokenizer.embed import Aligner, write_permuted
from ferromerge.errors import ConfigError, InputError
from ferromerge.models.index import index_model, read_tensors
from ferromerge._plan.build import build_plan
from ferromerge.synth import Shape, bpe_tokenizer, llama_config, random_weights, save_model

H = 8
WORDS = {
    "base": (["the", "cat", "sat", "on"], None, []),
    "a": (["the", "dog", "sat", "mat", "on"], 1, ["<x>"]),
    "b": (["cat", "hat", "dog", "in"], 2, ["<y>", "<x>"]),
}


def tokenizer_vocab(files: dict[str, str]) -> dict[str, int]:
    data = json.loads(files["tokenizer.json"])
    out = dict(data["model"]["vocab"])
    out.update({e["content"]: e["id"] for e in data["added_tokens"]})
    return out


def make_model(root: Path, name: str, words, seed, added, *, dtype="float32", tied=False, vocab_size=None,
               chat_template=None) -> Path:
    files = bpe_tokenizer(words, seed=seed, added=added, chat_template=chat_template)
    n = len(tokenizer_vocab(files))
    shape = Shape(hidden=H, intermediate=16, layers=1, vocab=n if vocab_size is None else vocab_size, heads=2,
                  kv_heads=1)
    rng = np.random.default_rng(list(name.encode()))
    weights = {k: rng.normal(0, 1, v.shape).astype(np.float32) for k, v in random_weights(shape, rng).items()}
    config = {**llama_config(shape, dtype), "tie_word_embeddings": tied}
    if tied:
        del weights["lm_head.weight"]
    return save_model(root / name, weights, dtype=dtype, config=config, tokenizer=files)


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("vocab-family")
    for name, (words, seed, added) in WORDS.items():
        make_model(root, name, words, seed, added)
    return root


def full_vocab(model_dir: Path) -> dict[str, int]:
    tok = vocab_mod.read_tokenizer(model_dir)
    assert tok is not None
    return tok.vocab


def out_vocab(out_dir: Path) -> dict[str, int]:
    data = json.loads((out_dir / "tokenizer.json").read_text())
    v = dict(data["model"]["vocab"])
    v.update({e["content"]: e["id"] for e in data["added_tokens"]})
    return v


# ---------------------------------------------------------------------------------------------------------------
# reference
# ---------------------------------------------------------------------------------------------------------------


def reference_permute(tensors: dict[str, np.ndarray], vocabs: dict[str, dict[str, int]], out: dict[str, int],
                      base: str | None, tokens: dict[str, Any], rows: int) -> dict[str, np.ndarray]:
    """Each model's tensor in the output vocabulary, one token at a time (float32)."""
    models = list(tensors)

    def own(m: str, tok: str) -> int:
        i = vocabs[m].get(tok, -1)
        return i if i < tensors[m].shape[0] else -1

    defaults: dict[str, np.ndarray] = {}
    for tok in out:
        cfg = tokens.get(tok)
        owners = [m for m in models if own(m, tok) >= 0]
        if not (cfg and cfg.get("force")) and len(owners) == len(models):
            continue
        if cfg is not None:
            src = cfg["source"]
            if isinstance(src, dict) and src["kind"] == "zero":
                defaults[tok] = np.zeros(tensors[models[0]].shape[1:], np.float32)
            elif isinstance(src, dict):
                row = src["token_id"] if "token_id" in src else vocabs[src["model"]][src["token"]]
                defaults[tok] = tensors[src["model"]][row]
            else:
                defaults[tok] = tensors[src][own(src, tok)]
        elif len(owners) == 1:
            defaults[tok] = tensors[owners[0]][own(owners[0], tok)]
        elif not owners:
            defaults[tok] = np.zeros(tensors[models[0]].shape[1:], np.float32)
        elif base in owners:
            defaults[tok] = tensors[base][own(base, tok)]
        else:
            acc = np.zeros(tensors[models[0]].shape[1:], np.float32)
            for m in owners:
                acc = acc + tensors[m][own(m, tok)]
            defaults[tok] = acc / np.float32(len(owners))
    result = {}
    for m in models:
        new = np.zeros((rows, *tensors[m].shape[1:]), np.float32)
        for tok, i in out.items():
            forced = bool(tokens.get(tok, {}).get("force"))
            new[i] = tensors[m][own(m, tok)] if own(m, tok) >= 0 and not forced else defaults[tok]
        if rows > len(out):
            new[len(out):] = new[: len(out)].astype(np.float64).mean(axis=0).astype(np.float32)
        result[m] = new
    return result


def run_merge(tmp_path: Path, cfg: dict[str, Any], name: str = "out") -> Path:
    path = tmp_path / f"{name}.yml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    out = tmp_path / name
    ferromerge.run(str(path), str(out), quiet=True)
    return out


def permuted_inputs(family: Path, tmp_path: Path, cfg: dict[str, Any], tensor: str, block_bytes: int):
    """(plan, {model: permuted tensor as written}) without running the merge."""
    config = parse_config(cfg)
    models = {ref: index_model(ref) for ref in config.model_refs()}
    scratch = tmp_path / f"scratch-{block_bytes}"
    scratch.mkdir()
    plan = build_plan(config, models, scratch=scratch)
    write_permuted(plan.permuted, block_bytes=block_bytes)
    (job,) = [p for p in plan.permuted if p.name == tensor]
    return plan, {m.ref: read_tensors(m.out)[tensor] for m in job.members}, job


def linear_cfg(family: Path, **extra: Any) -> dict[str, Any]:
    return {
        "merge_method": "linear",
        "base_model": str(family / "base"),
        "models": [{"model": str(family / m), "parameters": {"weight": w}} for m, w in
                   (("a", 1.0), ("b", 2.0), ("base", 1.0))],
        "dtype": "float32",
        **extra,
    }


# ---------------------------------------------------------------------------------------------------------------
# vocabulary
# ---------------------------------------------------------------------------------------------------------------


def test_union_vocabulary_and_permutations(family):
    config = parse_config(linear_cfg(family, tokenizer_source="union"))
    models = {ref: index_model(ref) for ref in config.model_refs()}
    v = vocab_mod.build_vocabulary(config, models)
    assert v is not None
    vocabs = {ref: full_vocab(models[ref].path) for ref in config.model_refs()}
    expected = set().union(*vocabs.values())
    assert set(v.vocab) == expected
    assert sorted(v.vocab.values()) == list(range(len(expected)))
    # the base keeps its ids; the rest are appended as added tokens
    base = vocabs[str(family / "base")]
    assert all(v.vocab[t] == i for t, i in base.items())
    added = {e["content"]: e for e in v.tokenizer["added_tokens"]}
    for t in expected - set(base):
        assert v.vocab[t] >= len(base) and t in added
        if t not in ("<x>", "<y>"):
            assert added[t]["normalized"] is True and added[t]["special"] is False
    # permutations map each output id to the same string
    for ref, perm in v.permutations.items():
        inv = {i: t for t, i in vocabs[ref].items()}
        for t, new in v.vocab.items():
            assert (inv.get(int(perm[new])) == t) if perm[new] >= 0 else (t not in vocabs[ref])


def test_base_and_model_sources(family):
    for source, donor in (("base", "base"), (str(family / "b"), "b")):
        config = parse_config(linear_cfg(family, tokenizer={"source": source, "pad_to_multiple_of": 8}))
        models = {ref: index_model(ref) for ref in config.model_refs()}
        v = vocab_mod.build_vocabulary(config, models)
        assert v is not None and v.vocab == full_vocab(family / donor)
        assert v.rows % 8 == 0 and v.rows - 8 < len(v.vocab) <= v.rows


def test_strip_unused_removes_tokens_and_merges(tmp_path):
    files = bpe_tokenizer(["the", "cat"])
    (tmp_path / "tokenizer.json").write_text(files["tokenizer.json"])
    tok = vocab_mod.read_tokenizer(tmp_path)
    assert tok is not None
    limit = tok.vocab["th"] + 1  # "the" and "ca", "cat" come later
    stripped = vocab_mod.strip_unused(tok, limit)
    assert max(stripped.vocab.values()) < limit and "th" in stripped.vocab and "the" not in stripped.vocab
    for a, b in stripped.data["model"]["merges"]:
        assert a in stripped.vocab and b in stripped.vocab
    assert vocab_mod.strip_unused(tok, len(tok.vocab)) is tok
    word_level = {"model": {"type": "WordLevel", "vocab": {"a": 0, "b": 1}, "unk_token": "a"}, "added_tokens": []}
    (tmp_path / "tokenizer.json").write_text(json.dumps(word_level))
    wl = vocab_mod.read_tokenizer(tmp_path)
    assert wl is not None
    with pytest.raises(InputError, match="BPE tokenizers only"):
        vocab_mod.strip_unused(wl, 1)


def test_add_token_ids_follow_tokenizers():
    data = {"model": {"type": "BPE", "vocab": {"a": 0, "b": 1, "c": 2}}, "added_tokens": []}
    v = {"a": 0, "b": 1, "c": 2}
    vocab_mod.add_token(data, v, vocab_mod.plain_token("x"))
    vocab_mod.add_token(data, v, vocab_mod.plain_token("b"))  # in the model: becomes added at its own id
    vocab_mod.add_token(data, v, vocab_mod.plain_token("x"))  # already added: nothing
    vocab_mod.add_token(data, v, vocab_mod.plain_token("y"))
    assert v == {"a": 0, "b": 1, "c": 2, "x": 3, "y": 4}
    assert [(e["content"], e["id"]) for e in data["added_tokens"]] == [("b", 1), ("x", 3), ("y", 4)]


# ---------------------------------------------------------------------------------------------------------------
# permuted embeddings against the reference
# ---------------------------------------------------------------------------------------------------------------

TOKEN_CASES = {
    "union": {"tokenizer_source": "union"},
    "base_pad": {"tokenizer": {"source": "base", "pad_to_multiple_of": 16}},
    "model_b": {"tokenizer": {"source": "B"}},
    "overrides": {"tokenizer": {"source": "union", "pad_to_multiple_of": 5, "tokens": {
        "dog": {"source": "B", "force": True},              # forced from b even where a has it
        "hat": {"source": {"kind": "zero"}},                # only b has it: a and base get zero
        "<x>": {"source": {"kind": "model_token", "model": "A", "token": "the"}},
        "new!": {"source": {"kind": "model_token", "model": "BASE", "token_id": 3}},  # added by tokens:
        "the": {"source": "A"},                             # everyone has it and no force: no effect
    }}},
}


def _resolve(obj: Any, family: Path) -> Any:
    names = {"A": "a", "B": "b", "BASE": "base"}
    if isinstance(obj, dict):
        return {k: _resolve(v, family) for k, v in obj.items()}
    if isinstance(obj, str) and obj in names:
        return str(family / names[obj])
    return obj


@pytest.mark.parametrize("case", sorted(TOKEN_CASES))
@pytest.mark.parametrize("tensor", ["model.embed_tokens.weight", "lm_head.weight"])
def test_permuted_rows_match_reference(family, tmp_path, case, tensor):
    cfg = linear_cfg(family, **_resolve(TOKEN_CASES[case], family))
    plan, got, job = permuted_inputs(family, tmp_path, cfg, tensor, block_bytes=3 * 4 * H)  # 3 rows per block
    v = plan.vocabulary
    assert v is not None
    tensors = {ref: read_tensors(index_model(ref).tensors[tensor].file)[tensor] for ref in got}
    vocabs = {ref: dict(full_vocab(Path(ref))) for ref in got}
    vocabs[str(family / "base")] = dict(v.original[str(family / "base")])
    tokens = (_resolve(TOKEN_CASES[case], family).get("tokenizer") or {}).get("tokens") or {}
    want = reference_permute(tensors, vocabs, v.vocab, str(family / "base"), tokens, v.rows)
    for ref in got:
        np.testing.assert_array_equal(got[ref], want[ref], err_msg=f"{case} {tensor} {ref}")
    # the block size never changes the bytes
    _, again, _ = permuted_inputs(family, tmp_path, cfg, tensor, block_bytes=1 << 20)
    for ref in got:
        assert got[ref].tobytes() == again[ref].tobytes()


def test_merged_embeddings_and_outputs(family, tmp_path):
    cfg = linear_cfg(family, tokenizer_source="union")
    out = run_merge(tmp_path, cfg)
    merged = read_tensors(out / "model.safetensors")
    plan, got, _ = permuted_inputs(family, tmp_path, cfg, "model.embed_tokens.weight", 1 << 20)
    weights = {str(family / "a"): 1.0, str(family / "b"): 2.0, str(family / "base"): 1.0}
    want = sum(np.float32(w) * got[r] for r, w in weights.items()) / np.float32(4.0)
    np.testing.assert_allclose(merged["model.embed_tokens.weight"], want, rtol=1e-6, atol=1e-7)
    assert plan.vocabulary is not None
    assert out_vocab(out) == plan.vocabulary.vocab
    assert json.loads((out / "config.json").read_text())["vocab_size"] == plan.vocabulary.rows
    assert merged["lm_head.weight"].shape == (plan.vocabulary.rows, H)
    assert not any(p.name.startswith(".vocab") or p.name.startswith("vocab-") for p in out.iterdir())
    assert not (out / "tokenizer.model").exists()
    # layers are untouched by the alignment
    base = read_tensors(family / "base" / "model.safetensors")
    name = "model.layers.0.mlp.up_proj.weight"
    ins = [read_tensors(family / m / "model.safetensors")[name] for m in ("a", "b", "base")]
    np.testing.assert_allclose(merged[name], (ins[0] + 2 * ins[1] + ins[2]) / 4, rtol=1e-6, atol=1e-7)
    assert base[name].shape == merged[name].shape


def test_bf16_models_and_cast_dtype(tmp_path):
    root = tmp_path / "bf16"
    for name, (words, seed, added) in WORDS.items():
        make_model(root, name, words, seed, added, dtype="bfloat16")
    for dtype in (None, "float16"):
        cfg = {**linear_cfg(root, tokenizer_source="union"), "dtype": dtype}
        if dtype is None:
            del cfg["dtype"]
        work = tmp_path / str(dtype)
        work.mkdir()
        plan, got, job = permuted_inputs(root, work, cfg, "model.embed_tokens.weight", 64)
        assert job.dtype == ("BF16" if dtype is None else "F16")
        tensors = {ref: read_tensors(index_model(ref).tensors["model.embed_tokens.weight"].file)[
            "model.embed_tokens.weight"] for ref in got}
        if dtype is not None:  # mergekit casts before permuting
            tensors = {r: t.astype(np.float16).astype(np.float32) for r, t in tensors.items()}
        assert plan.vocabulary is not None
        vocabs = {ref: dict(plan.vocabulary.original[ref]) for ref in got}
        want = reference_permute(tensors, vocabs, plan.vocabulary.vocab, str(root / "base"), {}, plan.vocabulary.rows)
        for ref in got:
            expect = round_to(want[ref], job.dtype)
            np.testing.assert_array_equal(got[ref], expect)


def test_tied_models(tmp_path):
    root = tmp_path / "tied"
    make_model(root, "base", *WORDS["base"], tied=True)
    make_model(root, "a", *WORDS["a"], tied=True)
    make_model(root, "b", *WORDS["b"])  # has lm_head: the tied ones feed theirs from embed_tokens
    cfg = {"merge_method": "linear", "models": [{"model": str(root / m), "parameters": {"weight": 1.0}}
                                                 for m in ("base", "a")], "tokenizer_source": "union"}
    out = run_merge(tmp_path, cfg, "tied-out")
    merged = read_tensors(out / "model.safetensors")
    assert "lm_head.weight" not in merged  # stays tied
    assert merged["model.embed_tokens.weight"].shape[0] == len(out_vocab(out))
    cfg["models"].append({"model": str(root / "b"), "parameters": {"weight": 1.0}})
    plan, got, _ = permuted_inputs(root, tmp_path, cfg, "lm_head.weight", 1 << 20)
    tensors = {}
    for ref in got:
        idx = index_model(ref)
        name = "lm_head.weight" if "lm_head.weight" in idx.tensors else "model.embed_tokens.weight"
        tensors[ref] = read_tensors(idx.tensors[name].file)[name]
    assert plan.vocabulary is not None
    vocabs = {ref: dict(plan.vocabulary.original[ref]) for ref in got}
    want = reference_permute(tensors, vocabs, plan.vocabulary.vocab, None, {}, plan.vocabulary.rows)
    for ref in got:
        np.testing.assert_array_equal(got[ref], want[ref])


def test_unused_base_tokens_are_stripped(tmp_path):
    root = tmp_path / "unused"
    words, seed, added = WORDS["base"]
    n = len(tokenizer_vocab(bpe_tokenizer(words, seed=seed, added=added)))
    make_model(root, "base", words, seed, added, vocab_size=n - 2)  # the last two tokens are unused
    make_model(root, "a", *WORDS["a"])
    cfg = {"merge_method": "linear", "base_model": str(root / "base"), "tokenizer_source": "base",
           "models": [{"model": str(root / m), "parameters": {"weight": 1.0}} for m in ("base", "a")]}
    out = run_merge(tmp_path, cfg, "unused-out")
    v = out_vocab(out)
    assert len(v) == n - 2 and max(v.values()) == n - 3
    assert json.loads((out / "config.json").read_text())["vocab_size"] == n - 2


# ---------------------------------------------------------------------------------------------------------------
# config and input errors
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, match",
    [
        ({"tokenizer_source": "union", "tokenizer": {"source": "base"}}, "give one of them"),
        ({"tokenizer": {"source": "base", "pad_to_multiple_of": 0}}, "pad_to_multiple_of"),
        ({"tokenizer": {"tokens": {"x": {"source": "/nowhere"}}}}, "not one of the merged models"),
        ({"tokenizer": {"tokens": {"x": {"source": {"kind": "model_token", "model": "BASE", "token": "a",
                                                    "token_id": 1}}}}}, "exactly one of token and token_id"),
        ({"tokenizer": {"tokens": {"x": {"force": True}}}}, "source"),
        ({"chat_template": "chatm"}, "neither auto, a built-in template"),
    ],
)
def test_config_errors(family, extra, match):
    with pytest.raises(ConfigError, match=match):
        parse_config(linear_cfg(family, **_resolve(extra, family)))


def test_a_misspelled_tokenizer_key_is_ignored_as_mergekit_ignores_it(family):
    # mergekit's TokenizerConfig ignores undeclared keys: a compat warning (an error with strict=True)
    cfg = linear_cfg(family, tokenizer={"sorce": "base"})
    with pytest.warns(ferromerge.CompatWarning, match=r"^tokenizer\.sorce: unknown key \(did you mean 'source'\?\)"):
        assert parse_config(cfg).tokenizer.source == "union"  # the default, as in mergekit
    with pytest.raises(ConfigError, match=r"tokenizer\.sorce: unknown key"):
        parse_config(cfg, strict=True)


def test_token_source_without_the_token(family, tmp_path):
    cfg = linear_cfg(family, tokenizer={"tokens": {"hat": {"source": str(family / "a")}}})
    with pytest.raises(ConfigError, match="has no token 'hat'"):
        permuted_inputs(family, tmp_path, cfg, "lm_head.weight", 1 << 20)


def test_tokenizer_in_another_format(family, tmp_path):
    d = tmp_path / "spm"
    d.mkdir()
    for f in (family / "a").iterdir():
        if f.name != "tokenizer.json":
            (d / f.name).write_bytes(f.read_bytes())
    (d / "tokenizer.model").write_bytes(b"\0")
    cfg = {**linear_cfg(family, tokenizer_source="union")}
    cfg["models"][0]["model"] = str(d)
    with pytest.raises(InputError, match=r"spm: the tokenizer is in tokenizer.model"):
        ferromerge.run(cfg, tmp_path / "never", quiet=True)
    assert not (tmp_path / "never").exists()


def test_tokenizer_ids_beyond_the_rows(family, tmp_path):
    d = tmp_path / "short"
    d.mkdir()
    for f in (family / "a").iterdir():
        (d / f.name).write_bytes(f.read_bytes())
    cfgjson = json.loads((d / "config.json").read_text())
    cfgjson["vocab_size"] = 10_000  # the tokenizer is within it, the weights are not
    (d / "config.json").write_text(json.dumps(cfgjson))
    t = read_tensors(d / "model.safetensors")
    t = {k: (v[:5] if v.ndim == 2 and v.shape[0] == t["lm_head.weight"].shape[0] else v) for k, v in t.items()}
    (d / "model.safetensors").unlink()
    save_model(d, t, dtype="float32")
    cfg = linear_cfg(family, tokenizer_source="union")
    cfg["models"][0]["model"] = str(d)
    with pytest.raises(InputError, match=r"short/model.safetensors: tensor (lm_head|model.embed_tokens).weight of model .* has 5 rows, but the tokenizer gives it row"):
        ferromerge.run(cfg, tmp_path / "never", quiet=True)


def test_model_without_tokenizer_takes_the_base_vocabulary(family, tmp_path):
    d = tmp_path / "notok"
    d.mkdir()
    for f in (family / "base").iterdir():
        if not f.name.startswith("tokenizer"):
            (d / f.name).write_bytes(f.read_bytes())
    cfg = linear_cfg(family, tokenizer_source="union")
    cfg["models"][0]["model"] = str(d)
    plan, got, _ = permuted_inputs(family, tmp_path, cfg, "model.embed_tokens.weight", 1 << 20)
    assert plan.vocabulary is not None and any("has no tokenizer" in n for n in plan.vocabulary.notes)
    np.testing.assert_array_equal(plan.vocabulary.permutations[str(d)],
                                  plan.vocabulary.permutations[str(family / "base")])


# ---------------------------------------------------------------------------------------------------------------
# chat template
# ---------------------------------------------------------------------------------------------------------------


def test_chat_template_builtin_literal_and_auto(tmp_path):
    root = tmp_path / "chat"
    t1 = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    t2 = "{% for m in messages %}[{{ m['role'] }}]{% endfor %}"
    for name, tpl in (("base", t1), ("a", t2), ("b", t2)):
        make_model(root, name, *WORDS["base"], chat_template=tpl)  # one vocabulary: merges without alignment too
    cfg = {"merge_method": "linear", "base_model": str(root / "base"),
           "models": [{"model": str(root / m), "parameters": {"weight": 1.0}} for m in ("base", "a", "b")]}
    written = {}
    for setting in ("auto", "chatml", t1 + " "):
        for align in (None, "union"):
            c = {**cfg, "chat_template": setting, **({"tokenizer_source": align} if align else {})}
            out = run_merge(tmp_path, c, f"chat-{len(written)}")
            written[(setting, align)] = json.loads((out / "tokenizer_config.json").read_text())["chat_template"]
    assert written[("auto", None)] == written[("auto", "union")] == t2  # the plurality
    assert written[("chatml", None)] == chat_template_mod.BUILTIN_CHAT_TEMPLATES["chatml"]
    assert written[(t1 + " ", "union")] == t1 + " "  # a literal template as given
    assert chat_template_mod.chat_template("auto", [tmp_path]) is None  # no model has one
