"""ferromerge vs mergekit 0.1.5 on vocabulary alignment (``tokenizer_source`` / ``tokenizer``) and chat templates.

The family: tiny Llama-shaped float32 models (hidden 8, 1 layer) with BPE ``tokenizer.json`` files of different
vocabularies (``synth.bpe_tokenizer``: shared words under different ids, words of their own, added tokens), one
of them with a tied lm_head. Both tools run the same YAML. Compared:

* the output vocabulary (the same set of token strings, dense ids) and config.json ``vocab_size``;
* every row of embed_tokens / lm_head, matched by token string, because mergekit numbers the tokens a union adds
  in hash-map order (different between runs) while ferromerge uses config order:
  ``assert_allclose(rtol=1e-6, atol=1e-7)`` (float32 on both sides; the mean of owners and the padding mean may
  differ in summation order);
* the output tokenizers encode a set of sentences to the same token strings (``tokenizers`` in mergekit's
  virtualenv loads both files);
* built-in chat templates render the same conversations (Jinja in mergekit's virtualenv, with transformers'
  settings); ``alpaca`` and ``exaone`` modulo whitespace: mergekit's files render stray indentation (exaone) and
  no blank line before the generation prompt (alpaca), ferromerge's render the formats' own layout.
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from ferromerge.synth import Shape, bpe_tokenizer, llama_config, random_weights, save_model
from helpers.mergekit import read_safetensors_dir, run_mergekit

pytestmark = pytest.mark.mergekit

H = 8
FAMILY = {
    # name: (words, id shuffle seed, added tokens, tied)
    "base": (["the", "cat", "sat", "on", "mat"], None, [], False),
    "a": (["the", "dog", "sat", "mat", "on", "rug"], 1, ["<x>"], False),
    "b": (["cat", "hat", "dog", "in", "rug"], 2, ["<y>", "<x>"], False),
    "t": (["the", "cow", "in", "hat"], 3, [], True),
}
SENTENCES = ["the cat sat on the mat", "the dog in a hat", "rug cow <x> <y> zebra", "hat the"]


@pytest.fixture(scope="module")
def family(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok-family")
    for name, (words, seed, added, tied) in FAMILY.items():
        files = bpe_tokenizer(words, seed=seed, added=added)
        data = json.loads(files["tokenizer.json"])
        vocab = len(data["model"]["vocab"]) + len(added)
        shape = Shape(hidden=H, intermediate=16, layers=1, vocab=vocab, heads=2, kv_heads=2)
        rng = np.random.default_rng(list(name.encode()))
        w = {k: rng.normal(0, 0.5, v.shape).astype(np.float32) for k, v in random_weights(shape, rng).items()}
        if tied:
            del w["lm_head.weight"]
        save_model(root / name, w, dtype="float32", config={**llama_config(shape, "float32"),
                                                             "tie_word_embeddings": tied}, tokenizer=files)
    return root


def case_configs(root: Path) -> dict[str, dict[str, Any]]:
    m = {n: str(root / n) for n in FAMILY}

    def linear(models, **kw):
        return {"merge_method": "linear", "base_model": m["base"],
                "models": [{"model": m[n], "parameters": {"weight": w}} for n, w in models], "dtype": "float32", **kw}

    three = [("base", 1.0), ("a", 0.5), ("b", 2.0)]
    return {
        "union": linear(three, tokenizer_source="union"),
        "union_tied_pad": linear([*three, ("t", 1.0)], tokenizer={"source": "union", "pad_to_multiple_of": 8}),
        "base_pad": linear(three, tokenizer={"source": "base", "pad_to_multiple_of": 16}),
        "model_b": linear(three, tokenizer_source=m["b"]),
        "tokens": linear(three, tokenizer={"source": "union", "tokens": {
            "dog": {"source": m["b"], "force": True},
            "hat": {"source": {"kind": "zero"}},
            "<x>": {"source": {"kind": "model_token", "model": m["a"], "token": "the"}},
            "sat": {"source": {"kind": "model_token", "model": m["base"], "token_id": 4}, "force": True},
            "new": {"source": {"kind": "model_token", "model": m["a"], "token": "rug"}},
        }}),
        "ties_union": {"merge_method": "ties", "base_model": m["base"], "dtype": "float32",
                       "models": [{"model": m[n], "parameters": {"weight": 1.0, "density": 0.5}} for n in ("a", "b")],
                       "tokenizer_source": "union"},
        "chatml": linear(three, tokenizer_source="union", chat_template="chatml"),
        "llama3": linear(three, tokenizer_source="base", chat_template="llama3"),
        "mistral": linear(three, tokenizer_source="union", chat_template="mistral"),
        "alpaca": linear(three, tokenizer_source="union", chat_template="alpaca"),
        "exaone": linear(three, tokenizer_source="union", chat_template="exaone"),
    }


@pytest.fixture(scope="module")
def runs(family, mergekit_python_path, tmp_path_factory):
    import ferromerge

    configs = case_configs(family)
    done = run_mergekit(configs, mergekit_python_path, tmp_path_factory.mktemp("mk-tok"))
    work = tmp_path_factory.mktemp("fm-tok")
    out = {}
    for name, (cfg_path, mk_dir, err) in done.items():
        assert err is None, f"mergekit failed on {name}:\n{err}"
        fm_dir = work / name
        ferromerge.run(str(cfg_path), str(fm_dir), quiet=True)
        out[name] = (mk_dir, fm_dir, configs[name])
    return out


def vocab_of(d: Path) -> dict[str, int]:
    data = json.loads((d / "tokenizer.json").read_text())
    v = dict(data["model"]["vocab"])
    v.update({e["content"]: e["id"] for e in data["added_tokens"]})
    return v


@pytest.mark.parametrize("case", sorted(case_configs(Path("/x"))))
def test_vocabulary_and_rows_agree(runs, case):
    mk_dir, fm_dir, _ = runs[case]
    mk_v, fm_v = vocab_of(mk_dir), vocab_of(fm_dir)
    assert set(mk_v) == set(fm_v)
    assert sorted(fm_v.values()) == list(range(len(fm_v)))
    mk_cfg, fm_cfg = (json.loads((d / "config.json").read_text()) for d in (mk_dir, fm_dir))
    assert mk_cfg["vocab_size"] == fm_cfg["vocab_size"]
    mk, fm = read_safetensors_dir(mk_dir), read_safetensors_dir(fm_dir)
    assert set(mk) == set(fm)
    worst = 0.0
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        a, b = mk[name], fm[name]
        assert a.shape == b.shape == (fm_cfg["vocab_size"], H)
        mk_rows = np.stack([a[mk_v[t]] for t in fm_v])
        fm_rows = np.stack([b[fm_v[t]] for t in fm_v])
        np.testing.assert_allclose(fm_rows, mk_rows, rtol=1e-6, atol=1e-7, err_msg=f"{case} {name}")
        np.testing.assert_allclose(b[len(fm_v):], a[len(mk_v):], rtol=1e-6, atol=1e-7)  # padding rows
        worst = max(worst, float(np.abs(fm_rows - mk_rows).max()))
    for name in mk:
        if name not in ("model.embed_tokens.weight", "lm_head.weight"):
            np.testing.assert_allclose(fm[name], mk[name], rtol=1e-6, atol=1e-7, err_msg=f"{case} {name}")
    print(f"{case}: {len(fm_v)} tokens, {fm_cfg['vocab_size']} rows, max |diff| of vocabulary rows {worst:.2e}")


PROBE = textwrap.dedent(
    """
    import json, sys
    import jinja2, tokenizers
    out = {}
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    def fail(msg):
        raise jinja2.exceptions.TemplateError(msg)
    env.globals["raise_exception"] = fail
    chats = [
        [{"role": "user", "content": "hi there"}, {"role": "assistant", "content": " hello "},
         {"role": "user", "content": "more"}],
        [{"role": "system", "content": "be brief"}, {"role": "user", "content": "q"},
         {"role": "assistant", "content": "a"}],
        [{"role": "system", "content": "s1"}, {"role": "user_context", "content": "ctx"},
         {"role": "user", "content": "q"}],
    ]
    for d in sys.argv[2:]:
        tok = tokenizers.Tokenizer.from_file(d + "/tokenizer.json")
        enc = [tok.encode(s).tokens for s in json.loads(sys.argv[1])]
        cfg = json.load(open(d + "/tokenizer_config.json"))
        tpl = cfg.get("chat_template")
        if tpl is None:
            try:
                tpl = open(d + "/chat_template.jinja").read()
            except OSError:
                pass
        rendered = None
        if tpl is not None:
            rendered = []
            for chat in chats:
                for gen in (False, True):
                    try:
                        rendered.append(env.from_string(tpl).render(messages=chat, add_generation_prompt=gen,
                                                                    bos_token="<s>", eos_token="</s>"))
                    except jinja2.exceptions.TemplateError as e:
                        rendered.append("error")
        out[d] = {"tokens": enc, "chat": rendered}
    print(json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def probes(runs, mergekit_python_path):
    dirs = [str(d) for mk_dir, fm_dir, _ in runs.values() for d in (mk_dir, fm_dir)]
    proc = subprocess.run([str(mergekit_python_path), "-c", PROBE, json.dumps(SENTENCES), *dirs],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)


@pytest.mark.parametrize("case", sorted(case_configs(Path("/x"))))
def test_tokenizers_encode_the_same(runs, probes, case):
    mk_dir, fm_dir, _ = runs[case]
    mk, fm = probes[str(mk_dir)], probes[str(fm_dir)]
    assert fm["tokens"] == mk["tokens"]
    assert any(len(t) > 1 for t in fm["tokens"])


@pytest.mark.parametrize("case", ["chatml", "llama3", "mistral", "alpaca", "exaone"])
def test_chat_templates_render_the_same(runs, probes, case):
    mk_dir, fm_dir, _ = runs[case]
    mk, fm = probes[str(mk_dir)]["chat"], probes[str(fm_dir)]["chat"]
    assert mk is not None and fm is not None
    if case in ("alpaca", "exaone"):
        squash = lambda xs: ["".join(x.split()) for x in xs]  # noqa: E731
        assert squash(fm) == squash(mk)
    else:
        assert fm == mk
    assert any(r not in ("", "error") for r in fm)
