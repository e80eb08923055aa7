"""Every tensor-name convention ferromerge relies on, in one place: which tensors hold the vocabulary, the input
embeddings and the output head, which ones mergekit plans before the layers, how layers and multi-module
containers are named, which config.json keys count layers, and PEFT's key prefix.

ferromerge recognises architectures from tensor names (generic regexes) instead of mergekit's per-architecture
JSON files (``mergekit/_data/architectures``): the patterns below cover the names transformers models use.
"""

from __future__ import annotations

import re

#: tensors whose first axis is the vocabulary
VOCAB_TENSOR = re.compile(r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|embed_in|embed_out)(\.|$)")


def is_vocab_tensor(name: str) -> bool:
    return VOCAB_TENSOR.search(name) is not None


#: output heads that may be tied to the input embedding
HEAD_WEIGHT = re.compile(r"(^|\.)lm_head\.weight$")


#: input embeddings an untied head can be fed from
INPUT_EMBEDDING_WEIGHT = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|tok_embeddings|embed_in)\.weight$")


#: non-layer tensors that mergekit plans before the layers (from the first slice); the rest come after
PRE_LAYER_TENSOR = re.compile(r"(^|\.)(embed_tokens|embed_in|embed_positions|wte|wpe|tok_embeddings|embeddings)(\.|$)")


#: keys of input embeddings (nn.Embedding in transformers): full rank, or factorised transposed with embed_lora
INPUT_EMBEDDINGS = frozenset({
    "embed_tokens", "embed_in", "wte", "wpe", "word_embeddings", "tok_embeddings", "embed_positions",
    "position_embeddings", "token_type_embeddings",
})


#: keys of output heads (nn.Linear over the vocabulary): full rank, or factorised like linear layers with embed_lora
HEADS = frozenset({"lm_head", "embed_out"})


#: model types whose linear layers are transformers' Conv1D, stored in × out: PEFT needs fan_in_fan_out for them
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})


#: a tensor of a repeated block: its stack (``model.layers``, ``transformer.h``, ...), index and the rest
LAYER_TENSOR = re.compile(r"^(?P<stack>(?:[^.]+\.)*?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$")


#: config.json keys that hold the number of layers, as transformers' configs name it
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


#: containers of the modules mergekit's multi-module architectures name (module name -> dotted markers)
KNOWN_MARKERS: dict[str, tuple[str, ...]] = {
    "vision_tower": ("vision_tower", "vision_model", "visual"),
    "vision_model": ("vision_tower", "vision_model", "visual"),
    "multi_modal_projector": (
        "multi_modal_projector",
        "mm_projector",
        "visual.merger",
        "visual.deepstack_merger_list",
    ),
    "text_decoder": ("language_model",),
    "language_model": ("language_model",),
}


#: module names that take the tensors no marker names (the text decoder of models that do not nest it)
REMAINDER_NAMES = ("text_decoder", "language_model", "decoder", "default")


#: config.json keys that hold a layer count in a multi-module model's sub-configs
MODULE_LAYER_COUNT_KEYS = (*LAYER_COUNT_KEYS, "depth", "encoder_layers", "decoder_layers", "num_decoder_layers")


#: sub-config names preferred for a module whose name contains the key word, when several keys fit
SUBCONFIG_HINTS = {"vision": "vision_config", "visual": "vision_config", "text": "text_config",
                    "language": "text_config", "audio": "audio_config"}


#: PEFT saves adapter tensors under the wrapped model's attribute path
PEFT_PREFIX = "base_model.model."
