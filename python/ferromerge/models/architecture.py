"""Every tensor-name convention ferromerge relies on, in one place: which tensors hold the vocabulary, the input
embeddings and the output head, which ones mergekit plans before the layers, how layers and multi-module
containers are named, which config.json keys count layers, and PEFT's key prefix.

ferromerge recognises architectures from tensor names (generic regexes) instead of mergekit's per-architecture
JSON files (``mergekit/_data/architectures``): the patterns below cover the names transformers models use.
"""

from __future__ import annotations

import re


def _components(names: tuple[str, ...] | frozenset[str], end: str = r"(\.|$)") -> str:
    """A regex matching any of ``names`` as a whole dotted component of a tensor name (followed by ``end``)."""
    return r"(^|\.)(" + "|".join(sorted(map(re.escape, names))) + ")" + end


# The non-layer tensors, by the name of their module. One row per fact: the regexes and sets below derive from
# these four tuples.

#: token embeddings (nn.Embedding over the vocabulary): Llama/Mistral/Qwen/Gemma ``embed_tokens``, GPT-2 ``wte``,
#: Falcon/BLOOM/BERT ``word_embeddings``, InternLM ``tok_embeddings``, GPT-NeoX ``embed_in``
TOKEN_EMBEDDINGS = ("embed_tokens", "wte", "word_embeddings", "tok_embeddings", "embed_in")

#: the other input embeddings (positions, token types): no vocabulary axis
OTHER_EMBEDDINGS = ("wpe", "embed_positions", "position_embeddings", "token_type_embeddings")

#: containers of the embedding side's other tensors (BERT's ``embeddings.LayerNorm``)
EMBEDDING_CONTAINERS = ("embeddings",)

#: keys of output heads (nn.Linear over the vocabulary): full rank, or factorised like linear layers with embed_lora
HEADS = frozenset({"lm_head", "embed_out"})


#: tensors whose first axis is the vocabulary
VOCAB_TENSOR = re.compile(_components((*TOKEN_EMBEDDINGS, *HEADS)))


def is_vocab_tensor(name: str) -> bool:
    return VOCAB_TENSOR.search(name) is not None


#: output heads that may be tied to the input embedding
HEAD_WEIGHT = re.compile(r"(^|\.)lm_head\.weight$")


#: input embeddings an untied head can be fed from
INPUT_EMBEDDING_WEIGHT = re.compile(_components(TOKEN_EMBEDDINGS, end=r"\.weight$"))


#: keys of input embeddings (nn.Embedding in transformers): full rank, or factorised transposed with embed_lora
INPUT_EMBEDDINGS = frozenset(TOKEN_EMBEDDINGS + OTHER_EMBEDDINGS)


#: non-layer tensors that mergekit plans before the layers (from the first slice): the embedding side; the rest
#: (final norm, head) come after the layers (from the last slice)
PRE_LAYER_TENSOR = re.compile(_components(INPUT_EMBEDDINGS | frozenset(EMBEDDING_CONTAINERS)))


#: model types whose linear layers are transformers' Conv1D, stored in × out: PEFT needs fan_in_fan_out for them
CONV1D_MODEL_TYPES = frozenset({"gpt2", "openai-gpt"})


#: a tensor of a repeated block: its stack (``model.layers``, ``transformer.h``, ...), index and the rest
LAYER_TENSOR = re.compile(r"^(?P<stack>(?:[^.]+\.)*?(?:layers|layer|h|blocks|block))\.(?P<index>\d+)\.(?P<rest>.+)$")


#: config.json keys that hold the number of layers, as transformers' configs name it (Llama and most:
#: num_hidden_layers; GPT-2: n_layer; T5, ChatGLM: num_layers): a single stack's output sets every one of them that
#: holds its old count
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers")


#: config.json lists that are not per-layer whatever their length: class names and token ids (Llama 3's
#: ``eos_token_id`` list, Whisper's ``suppress_tokens``), besides every ``*_token_id(s)`` key; the other lists with
#: one entry per layer (Qwen2's and Gemma 2/3's ``layer_types``, SmolLM3's ``no_rope_layers``) follow the slices
NOT_PER_LAYER = frozenset({"architectures", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens",
                           "forced_decoder_ids"})
TOKEN_ID_SUFFIXES = ("_token_id", "_token_ids")


#: config.json lists of layer indices (Qwen2-MoE's ``mlp_only_layers``, Llama 4's ``moe_layers``): after slices,
#: the output layers whose source layer is listed
LAYER_INDEX_LISTS = frozenset({"mlp_only_layers", "moe_layers"})


def per_layer_list(key: str) -> bool:
    """Whether a config.json list under ``key`` with one entry per layer is per-layer (not a list of ids)."""
    return key not in NOT_PER_LAYER and key not in LAYER_INDEX_LISTS and not key.endswith(TOKEN_ID_SUFFIXES)


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


#: keys preferred for a module whose name contains the key word, when several keys hold its count (T5's
#: num_layers and num_decoder_layers, BART's and Whisper's encoder_layers and decoder_layers)
MODULE_COUNT_KEY_HINTS = {"encoder": ("num_layers", "encoder_layers", "num_hidden_layers"),
                          "decoder": ("num_decoder_layers", "decoder_layers")}


#: sub-config names preferred for a module whose name contains the key word, when several keys fit
SUBCONFIG_HINTS = {"vision": "vision_config", "visual": "vision_config", "text": "text_config",
                    "language": "text_config", "audio": "audio_config"}


#: PEFT saves adapter tensors under the wrapped model's attribute path
PEFT_PREFIX = "base_model.model."
