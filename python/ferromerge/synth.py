"""Synthetic Llama-shaped models for the demo, tests and benchmarks: NumPy only, no network, deterministic.

``make_family`` writes a base model and fine-tunes (base + small random deltas) in the Hugging Face layout:
safetensors weights (optionally sharded, with an index), a LlamaForCausalLM ``config.json``, and a tiny
word-level tokenizer. The same arguments always give the same bytes.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from . import _engine
from .io.dtypes import ST_NAME, from_f32

Array = npt.NDArray[np.float32]
#: the storage dtype of the models written here unless told otherwise (mergekit's name)
DTYPE = "bfloat16"


@dataclass(frozen=True)
class Shape:
    """Llama dimensions."""

    hidden: int = 64
    intermediate: int = 128
    layers: int = 2
    vocab: int = 256
    heads: int = 4
    kv_heads: int = 2

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class Family:
    base: Path
    finetunes: list[Path]


def _encode(x: Array, dtype: str) -> npt.NDArray[Any]:
    """float32 values stored as ``dtype`` (a mergekit name), rounded by ``io.dtypes``' codec (bfloat16 as bits)."""
    if dtype not in ST_NAME:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype!r}")
    # ascontiguousarray makes a 0-d value a 1-element vector, as synthetic models have always stored it
    return from_f32(np.ascontiguousarray(x, dtype=np.float32), ST_NAME[dtype])


def llama_shapes(shape: Shape) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes of LlamaForCausalLM (untied lm_head), in the order transformers saves them."""
    h, i, kv = shape.hidden, shape.intermediate, shape.kv_heads * shape.head_dim
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (shape.vocab, h)}
    for n in range(shape.layers):
        p = f"model.layers.{n}."
        out |= {
            p + "self_attn.q_proj.weight": (h, h),
            p + "self_attn.k_proj.weight": (kv, h),
            p + "self_attn.v_proj.weight": (kv, h),
            p + "self_attn.o_proj.weight": (h, h),
            p + "mlp.gate_proj.weight": (i, h),
            p + "mlp.up_proj.weight": (i, h),
            p + "mlp.down_proj.weight": (h, i),
            p + "input_layernorm.weight": (h,),
            p + "post_attention_layernorm.weight": (h,),
        }
    out["model.norm.weight"] = (h,)
    out["lm_head.weight"] = (shape.vocab, h)
    return out


def random_weights(shape: Shape, rng: np.random.Generator) -> dict[str, Array]:
    """Base weights: matrices ~ N(0, 1/fan_in), norm weights = 1."""
    out = {}
    for name, dims in llama_shapes(shape).items():
        if len(dims) == 1:
            out[name] = np.ones(dims, np.float32)
        else:
            out[name] = (rng.standard_normal(dims, dtype=np.float32) / np.sqrt(dims[1])).astype(np.float32)
    return out


def llama_config(shape: Shape, dtype: str) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.head_dim,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "use_cache": True,
        "torch_dtype": dtype,
    }


def _tokenizer_files(vocab: int) -> dict[str, str]:
    """A word-level ``tokenizer.json`` over ``vocab`` tokens (<unk>, <s>, </s>, then tok3, tok4, ...)."""
    specials = ["<unk>", "<s>", "</s>"]
    words = specials + [f"tok{i}" for i in range(len(specials), vocab)]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(words)}, "unk_token": "<unk>"},
    }
    tokenizer_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 2048,
    }
    special_tokens_map = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
    generation_config = {"bos_token_id": 1, "eos_token_id": 2}
    return {
        "tokenizer.json": json.dumps(tokenizer, indent=1),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
        "special_tokens_map.json": json.dumps(special_tokens_map, indent=2),
        "generation_config.json": json.dumps(generation_config, indent=2),
    }


def bpe_tokenizer(
    words: Sequence[str],
    *,
    seed: int | None = None,
    specials: Sequence[str] = ("<unk>", "<s>", "</s>"),
    added: Sequence[str] = (),
    chat_template: str | None = None,
) -> dict[str, str]:
    """Files of a BPE ``tokenizer.json`` tokenizer (whitespace pre-tokenizer) that has a token for each of
    ``words``, for tests of vocabulary alignment: ``specials`` first (ids 0.., special added tokens, as Llama has
    them), then every character of the words and the merge products that build each word left to right; ``seed``
    shuffles the ids of those (so that models share tokens under different ids); ``added`` become non-special
    added tokens after the model vocabulary. Returns {file name: text}."""
    tokens: list[str] = []
    merges: list[list[str]] = []
    for ch in sorted({c for w in words for c in w}):
        tokens.append(ch)
    for w in words:
        for k in range(2, len(w) + 1):
            if w[:k] not in tokens:
                tokens.append(w[:k])
                merges.append([w[: k - 1], w[k - 1]])
    if seed is not None:
        tokens = [tokens[i] for i in np.random.default_rng(seed).permutation(len(tokens))]
    vocab = {t: i for i, t in enumerate([*specials, *tokens])}
    entries = [(t, i, True) for i, t in enumerate(specials)]
    entries += [(t, len(vocab) + k, False) for k, t in enumerate(added)]
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": not special, "special": special}
            for t, i, special in entries
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "BPE", "dropout": None, "unk_token": specials[0], "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": specials[1],
        "eos_token": specials[2],
        "unk_token": specials[0],
        "model_max_length": 2048,
    }
    if chat_template is not None:
        tokenizer_config["chat_template"] = chat_template
    return {
        "tokenizer.json": json.dumps(tokenizer, indent=1, ensure_ascii=False),
        "tokenizer_config.json": json.dumps(tokenizer_config, indent=2),
    }


def save_model(
    out_dir: str | os.PathLike[str],
    tensors: Mapping[str, Array],
    *,
    dtype: str = DTYPE,
    shard_size: int | None = None,
    config: Mapping[str, Any] | None = None,
    vocab: int | None = None,
    tokenizer: Mapping[str, str] | None = None,
) -> Path:
    """Write ``tensors`` (float32, rounded to ``dtype``) as a model directory; with ``shard_size`` (bytes),
    greedily into ``model-0000k-of-0000N.safetensors`` shards plus an index. ``config`` becomes config.json,
    ``vocab`` adds a word-level tokenizer of that many tokens, ``tokenizer`` ({file name: text}, e.g.
    ``bpe_tokenizer(...)``) writes those tokenizer files instead."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    encoded = {name: _encode(x, dtype) for name, x in tensors.items()}
    groups: list[dict[str, npt.NDArray[Any]]] = [{}]
    size = 0
    for name, x in encoded.items():
        if shard_size is not None and groups[-1] and size + x.nbytes > shard_size:
            groups.append({})
            size = 0
        groups[-1][name] = x
        size += x.nbytes
    if len(groups) == 1:
        names = ["model.safetensors"]
    else:
        names = [f"model-{k:05d}-of-{len(groups):05d}.safetensors" for k in range(1, len(groups) + 1)]
        index = {
            "metadata": {"total_size": sum(x.nbytes for x in encoded.values())},
            "weight_map": {t: f for f, g in zip(names, groups, strict=False) for t in g},
        }
        (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2), encoding="utf-8")
    for file, group in zip(names, groups, strict=False):
        _engine.save_file(str(out / file), {t: (x, dtype) for t, x in group.items()}, {"format": "pt"})
    if config is not None:
        (out / "config.json").write_text(json.dumps(dict(config), indent=2), encoding="utf-8")
    if tokenizer is not None:
        for name, text in tokenizer.items():
            (out / name).write_text(text, encoding="utf-8")
    elif vocab is not None:
        for name, text in _tokenizer_files(vocab).items():
            (out / name).write_text(text, encoding="utf-8")
    return out


def _base_weights(shape: Shape, seed: int) -> dict[str, Array]:
    """The random weights of the model ``seed`` names (``make_model``'s, and ``make_family``'s base)."""
    return random_weights(shape, np.random.default_rng([seed, 0]))


def _save_llama(
    out_dir: str | os.PathLike[str], weights: Mapping[str, Array], shape: Shape, dtype: str, shard_size: int | None
) -> Path:
    return save_model(
        out_dir, weights, dtype=dtype, shard_size=shard_size, config=llama_config(shape, dtype), vocab=shape.vocab
    )


def make_model(
    out_dir: str | os.PathLike[str],
    *,
    hidden: int = Shape.hidden,
    intermediate: int = Shape.intermediate,
    layers: int = Shape.layers,
    vocab: int = Shape.vocab,
    heads: int = Shape.heads,
    kv_heads: int = Shape.kv_heads,
    dtype: str = DTYPE,
    seed: int = 0,
    shard_size: int | None = None,
) -> Path:
    """One random Llama-shaped model (weights, config.json, tokenizer) in ``out_dir``."""
    shape = Shape(hidden, intermediate, layers, vocab, heads, kv_heads)
    return _save_llama(out_dir, _base_weights(shape, seed), shape, dtype, shard_size)


def make_family(
    out_dir: str | os.PathLike[str],
    *,
    n_finetunes: int = 3,
    hidden: int = Shape.hidden,
    intermediate: int = Shape.intermediate,
    layers: int = Shape.layers,
    vocab: int = Shape.vocab,
    heads: int = Shape.heads,
    kv_heads: int = Shape.kv_heads,
    dtype: str = DTYPE,
    seed: int = 0,
    shard_size: int | None = None,
    delta_scale: float = 0.01,
) -> Family:
    """``out_dir/base`` (``make_model``'s model of ``seed``) and ``out_dir/ft{1..n}``: fine-tune k = base +
    N(0, delta_scale²) noise (per element)."""
    if hidden % heads or heads % kv_heads:
        raise ValueError("hidden must be a multiple of heads, and heads a multiple of kv_heads")
    shape = Shape(hidden, intermediate, layers, vocab, heads, kv_heads)
    root = Path(out_dir)
    base = _base_weights(shape, seed)
    base_dir = _save_llama(root / "base", base, shape, dtype, shard_size)
    finetunes = []
    for k in range(1, n_finetunes + 1):
        rng = np.random.default_rng([seed, k])
        tuned = {
            n: x + np.float32(delta_scale) * rng.standard_normal(x.shape, dtype=np.float32) for n, x in base.items()
        }
        finetunes.append(_save_llama(root / f"ft{k}", tuned, shape, dtype, shard_size))
    return Family(base_dir, finetunes)
