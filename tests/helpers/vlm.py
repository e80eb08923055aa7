"""A tiny Mistral3-shaped vision-language model family (text decoder, vision tower, projector), for the
``modules:`` tests (tests/plan/test_modules.py) and their mergekit differential twin."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from ferromerge.synth import save_model

H, V_H, INTER, VOCAB, TEXT_LAYERS, VISION_LAYERS = 16, 8, 24, 32, 4, 2


def vlm_shapes() -> dict[str, tuple[int, ...]]:
    """A tiny Mistral3-shaped VLM (transformers' names): text decoder, vision tower, projector."""
    s: dict[str, tuple[int, ...]] = {"language_model.model.embed_tokens.weight": (VOCAB, H)}
    for i in range(TEXT_LAYERS):
        p = f"language_model.model.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            s[p + f"self_attn.{proj}_proj.weight"] = (H, H)
        s[p + "mlp.gate_proj.weight"] = (INTER, H)
        s[p + "mlp.up_proj.weight"] = (INTER, H)
        s[p + "mlp.down_proj.weight"] = (H, INTER)
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "post_attention_layernorm.weight"] = (H,)
    s["language_model.model.norm.weight"] = (H,)
    s["language_model.lm_head.weight"] = (VOCAB, H)
    s["vision_tower.patch_conv.weight"] = (V_H, 3, 2, 2)
    s["vision_tower.ln_pre.weight"] = (V_H,)
    for i in range(VISION_LAYERS):
        p = f"vision_tower.transformer.layers.{i}."
        for proj in ("q", "k", "v", "o"):
            s[p + f"attention.{proj}_proj.weight"] = (V_H, V_H)
        s[p + "feed_forward.gate_proj.weight"] = (V_H * 2, V_H)
        s[p + "feed_forward.up_proj.weight"] = (V_H * 2, V_H)
        s[p + "feed_forward.down_proj.weight"] = (V_H, V_H * 2)
        s[p + "attention_norm.weight"] = (V_H,)
        s[p + "ffn_norm.weight"] = (V_H,)
    s["multi_modal_projector.norm.weight"] = (V_H,)
    s["multi_modal_projector.patch_merger.merging_layer.weight"] = (V_H, V_H * 4)
    s["multi_modal_projector.linear_1.weight"] = (H, V_H)
    s["multi_modal_projector.linear_2.weight"] = (H, H)
    return s


def vlm_config() -> dict[str, Any]:
    return {
        "architectures": ["Mistral3ForConditionalGeneration"],
        "model_type": "mistral3",
        "text_config": {"model_type": "mistral", "hidden_size": H, "intermediate_size": INTER,
                        "num_hidden_layers": TEXT_LAYERS, "num_attention_heads": 4, "num_key_value_heads": 4,
                        "head_dim": H // 4, "vocab_size": VOCAB, "tie_word_embeddings": False},
        "vision_config": {"model_type": "pixtral", "hidden_size": V_H, "intermediate_size": V_H * 2,
                          "num_hidden_layers": VISION_LAYERS, "num_attention_heads": 2, "head_dim": V_H // 2,
                          "patch_size": 2, "image_size": 8, "num_channels": 3},
        "projector_hidden_act": "gelu", "spatial_merge_size": 2, "vision_feature_layer": -1,
        "multimodal_projector_bias": False, "image_token_index": 10, "torch_dtype": "float32",
    }


def make_vlms(root: Path, names: tuple[str, ...] = ("base", "a", "b"), seed: int = 0) -> dict[str, Path]:
    rng = np.random.default_rng(seed)
    base = {n: rng.normal(0, 0.1, s).astype(np.float32) for n, s in vlm_shapes().items()}
    out = {}
    for k, name in enumerate(names):
        t = base if k == 0 else {n: (x + rng.normal(0, 0.02, x.shape)).astype(np.float32) for n, x in base.items()}
        out[name] = save_model(root / name, t, dtype="float32", config=vlm_config())
    return out
