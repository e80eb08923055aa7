"""The synthetic model generator: Llama layout, determinism, bfloat16 rounding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ferromerge.synth import Family, make_family, make_model
from ferromerge.io.dtypes import from_f32

from helpers.cli import read_model


def test_bf16_rounding_is_to_nearest_even() -> None:
    one = 1.0
    x = np.array([one, one + 2**-8, one + 3 * 2**-8, one + 2**-8 + 2**-20, -2.5], np.float32)
    bits = from_f32(x, "BF16")
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    assert back.tolist() == [1.0, 1.0, 1.0 + 2**-6, 1.0 + 2**-7, -2.5]


def test_family_layout_and_llama_config(family_bf16: Family) -> None:
    tensors = read_model(family_bf16.base)
    assert tensors["model.embed_tokens.weight"][1].shape == (256, 64)
    assert tensors["model.layers.1.self_attn.v_proj.weight"][1].shape == (32, 64)
    assert tensors["model.layers.0.mlp.down_proj.weight"][1].shape == (64, 128)
    assert {dtype for dtype, _ in tensors.values()} == {"BF16"} and len(tensors) == 21
    config = json.loads((family_bf16.base / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["num_key_value_heads"] == 2
    assert config["torch_dtype"] == "bfloat16" and config["tie_word_embeddings"] is False
    tokenizer = json.loads((family_bf16.base / "tokenizer.json").read_text())
    assert len(tokenizer["model"]["vocab"]) == 256 and tokenizer["model"]["type"] == "WordLevel"


def test_finetunes_are_base_plus_small_deltas(family_f32: Family) -> None:
    base = read_model(family_f32.base)
    ft = read_model(family_f32.finetunes[2])
    delta = ft["model.layers.0.mlp.up_proj.weight"][1] - base["model.layers.0.mlp.up_proj.weight"][1]
    assert 0.008 < float(delta.std()) < 0.012


def test_same_arguments_same_bytes(tmp_path: Path) -> None:
    a = make_family(tmp_path / "a", n_finetunes=1, layers=1, seed=5)
    make_family(tmp_path / "b", n_finetunes=1, layers=1, seed=5)
    c = make_model(tmp_path / "c", layers=1, seed=6)
    files = ["base/model.safetensors", "ft1/model.safetensors"]
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert (c / "model.safetensors").read_bytes() != (a.base / "model.safetensors").read_bytes()


def test_sharded_family_has_an_index(tmp_path: Path) -> None:
    family = make_family(tmp_path, n_finetunes=1, shard_size=50_000)
    index = json.loads((family.finetunes[0] / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    assert read_model(family.finetunes[0]).keys() == read_model(family.base).keys()
