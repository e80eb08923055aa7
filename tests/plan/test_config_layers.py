"""config.json after slices: every layer-count key follows, every per-layer list follows (read from the model each
output layer comes from), a module's count key is found by its name (T5, Whisper), and the non-layer name table
(Falcon's ``word_embeddings`` before the layers). The differential counterpart over real transformers
architectures is tests/compat/test_mergekit_architectures.py."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import ferromerge
from ferromerge._plan import modules
from ferromerge._plan.build import Plan
from ferromerge.models.architecture import INPUT_EMBEDDING_WEIGHT, PRE_LAYER_TENSOR, is_vocab_tensor
from ferromerge.models.index import ModelIndex
from ferromerge.output_files import config_updates
from ferromerge.synth import Family, make_family


@pytest.fixture(scope="module")
def fam(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("fam"), layers=4, hidden=16, intermediate=24, vocab=32,
                       dtype="float32", seed=7)


def _with_config(model: Path, where: Path, **extra: Any) -> Path:
    """A copy of ``model`` (its files linked) whose config.json has ``extra``."""
    where.mkdir()
    for f in model.iterdir():
        if f.name != "config.json":
            (where / f.name).symlink_to(f)
    config = json.loads((model / "config.json").read_text())
    (where / "config.json").write_text(json.dumps({**config, **extra}))
    return where


def test_slices_set_every_count_key_and_per_layer_lists_follow_their_source_models(fam: Family, tmp_path: Path):
    a = _with_config(fam.finetunes[0], tmp_path / "a", n_layer=4, layer_types=["a0", "a1", "a2", "a3"],
                     mlp_only_layers=[1], architectures=["LlamaForCausalLM"], max_window_layers=4,
                     eos_token_id=[1, 2, 3, 4], suppress_tokens=[5, 6, 7, 8])
    b = _with_config(fam.finetunes[1], tmp_path / "b", n_layer=4, layer_types=["b0", "b1", "b2", "b3"],
                     mlp_only_layers=[2, 3])
    cfg = {"merge_method": "passthrough", "slices": [
        {"sources": [{"model": str(a), "layer_range": [0, 2]}]},
        {"sources": [{"model": str(b), "layer_range": [1, 4]}]},
    ]}
    ferromerge.run(cfg, tmp_path / "out", quiet=True)
    out = json.loads((tmp_path / "out" / "config.json").read_text())
    assert (out["num_hidden_layers"], out["n_layer"]) == (5, 5)
    assert out["layer_types"] == ["a0", "a1", "b1", "b2", "b3"]
    # layer indices: output layer 1 is a's layer 1, output layers 3 and 4 are b's layers 2 and 3
    assert out["mlp_only_layers"] == [1, 3, 4]
    # token ids and class names are not per-layer, numbers that merely equal the count are not layer counts
    assert (out["eos_token_id"], out["suppress_tokens"]) == ([1, 2, 3, 4], [5, 6, 7, 8])
    assert (out["architectures"], out["max_window_layers"]) == (["LlamaForCausalLM"], 4)


def _plan(models: list[ModelIndex], config_layers: dict[str, Any], vocabulary: Any = None) -> Plan:
    return Plan(method={"name": "passthrough"}, cast_dtype=None, shards=(), models=tuple(models),
                config_layers=config_layers, vocabulary=vocabulary)


def _model(tmp_path: Path, ref: str, config: dict[str, Any]) -> ModelIndex:
    (tmp_path / ref).mkdir()
    (tmp_path / ref / "config.json").write_text(json.dumps(config))
    return ModelIndex(ref, tmp_path / ref, (), {})


def test_sub_config_lists_follow_and_a_vocabulary_update_keeps_them(tmp_path: Path) -> None:
    vlm = {"text_config": {"num_hidden_layers": 3, "layer_types": ["s", "f", "s"], "vocab_size": 8},
           "vision_config": {"num_hidden_layers": 3, "layer_types": ["v", "v", "v"]}}
    ref = _model(tmp_path, "ref", vlm)
    sources = (("ref", 2), ("ref", 0), ("ref", 1), ("ref", 2))
    updates, remarks = config_updates(ref, _plan([ref], {"text_config.num_hidden_layers": sources}))
    text = {"num_hidden_layers": 4, "layer_types": ["s", "s", "f", "s"], "vocab_size": 8}
    assert updates == {"text_config": text}
    assert remarks == []
    # an aligned vocabulary's size goes into the same sub-config, beside the new count
    plan = _plan([ref], {"text_config.num_hidden_layers": sources}, vocabulary=SimpleNamespace(rows=16))
    assert config_updates(ref, plan)[0] == {"text_config": {**text, "vocab_size": 16}}


def test_a_list_two_sliced_stacks_could_own_is_left_with_a_remark(tmp_path: Path) -> None:
    t5 = {"num_layers": 2, "num_decoder_layers": 2, "per_layer": ["x", "y"]}
    ref = _model(tmp_path, "ref", t5)
    plan = _plan([ref], {"num_layers": (("ref", 0), ("ref", 0), ("ref", 1)),
                         "num_decoder_layers": (("ref", 1), ("ref", 1), ("ref", 0))})
    updates, remarks = config_updates(ref, plan)
    assert updates == {"num_layers": 3, "num_decoder_layers": 3}
    assert len(remarks) == 1 and "'per_layer' lists layers of several stacks" in remarks[0]


def test_module_layer_key_by_module_name_when_several_keys_hold_the_count() -> None:
    t5 = {"num_layers": 4, "num_decoder_layers": 4, "num_heads": 4}
    assert modules.layer_key(t5, "encoder", 4) == "num_layers"
    assert modules.layer_key(t5, "decoder", 4) == "num_decoder_layers"
    whisper = {"encoder_layers": 2, "decoder_layers": 2}
    assert modules.layer_key(whisper, "encoder", 2) == "encoder_layers"
    assert modules.layer_key(whisper, "decoder", 2) == "decoder_layers"
    assert modules.layer_key(t5, "shared", 4) is None  # no hint: unclear, left to a remark


@pytest.mark.parametrize(("name", "pre", "vocab", "embedding"), [
    ("transformer.word_embeddings.weight", True, True, True),  # Falcon, BLOOM
    ("bert.embeddings.word_embeddings.weight", True, True, True),
    ("bert.embeddings.LayerNorm.weight", True, False, False),
    ("bert.embeddings.position_embeddings.weight", True, False, False),
    ("model.tok_embeddings.weight", True, True, True),  # InternLM
    ("gpt_neox.embed_in.weight", True, True, True),
    ("transformer.wpe.weight", True, False, False),
    ("embed_out.weight", False, True, False),
    ("lm_head.weight", False, True, False),
    ("transformer.ln_f.weight", False, False, False),
    ("model.norm.weight", False, False, False),
])
def test_non_layer_name_table(name: str, pre: bool, vocab: bool, embedding: bool) -> None:
    assert (PRE_LAYER_TENSOR.search(name) is not None) == pre
    assert is_vocab_tensor(name) == vocab
    assert (INPUT_EMBEDDING_WEIGHT.search(name) is not None) == embedding
