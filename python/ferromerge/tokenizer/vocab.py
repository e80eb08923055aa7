"""The output tokenizer of a merge with vocabulary alignment: the merged vocabulary, each model's permutation
``new id -> old id`` (the chat template is ``chat_template``'s).

mergekit 0.1.5 semantics (``mergekit/tokenizer/build.py``, ``merge.py``), reproduced on the files themselves
(``tokenizer.json``: ``model.vocab`` plus ``added_tokens``, which is what a fast tokenizer's ``get_vocab()``
returns), so neither transformers nor tokenizers is needed:

* a model's vocabulary size is its config.json ``vocab_size`` (else the number of tokens); tokens with ids at or
  beyond it are unused. The tokenizer base (base model, else the first model) is *stripped* of its unused tokens
  (BPE only, as in mergekit): they leave ``added_tokens``, ``model.vocab`` and every merge that uses them.
* ``source: base``: the stripped base tokenizer. ``source: <model>``: that model's tokenizer as it is.
  ``source: union``: the base tokenizer plus, as added tokens, every other model's used tokens that it lacks
  (plain tokens as non-special, normalized added tokens, as ``add_tokens`` makes them; added tokens with their
  own settings, the first model's settings winning).
* every key of ``tokens:`` that the vocabulary lacks is added the same way.
* the permutation of a model maps each output id to the id of the same token string in that model, or -1 when the
  model lacks it (or has it only at an unused id).

Ids of added tokens follow the tokenizers library: a token already in the model vocabulary keeps its id, a new one
gets the next id after the vocabulary and the added tokens. mergekit adds the union's tokens in the order of
Python dicts built from Rust hash maps (different between runs); ferromerge adds them in a fixed order: models in
config order (tokenizer base first), each model's tokens by id.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from ..errors import InputError
from ..io.json_file import read_json
from ..models.index import ModelIndex
from ..models.refs import resolve

if TYPE_CHECKING:  # config imports this module to check chat_template
    from ..config.resolve import MergeConfig
    from .config import TokenizerSettings

TOKENIZER_JSON = "tokenizer.json"
#: files that hold a tokenizer in another format (a model with one of them but no tokenizer.json cannot be read)
_OTHER_TOKENIZER_FILES = ("tokenizer.model", "vocab.json", "merges.txt", "vocab.txt", "spiece.model")


@dataclass(frozen=True)
class Tokenizer:
    """One ``tokenizer.json``: its parsed content and ``vocab`` (token -> id, added tokens included)."""

    path: Path
    data: dict[str, Any]
    vocab: dict[str, int]

    @property
    def model_vocab_size(self) -> int:
        """Tokens of the model part (without added tokens), the tokenizers library's ``get_vocab_size(False)``."""
        return len(_model_vocab(self.data, self.path))

    def added(self) -> list[dict[str, Any]]:
        return list(self.data.get("added_tokens") or [])


@dataclass(frozen=True)
class Vocabulary:
    """The output tokenizer and how every model's rows map onto it."""

    #: the output ``tokenizer.json`` content
    tokenizer: dict[str, Any]
    #: token -> output id, in id order
    vocab: dict[str, int]
    #: rows of every vocabulary tensor of the output: ``len(vocab)`` padded to ``pad_to_multiple_of``
    rows: int
    #: model reference -> int64 array of ``len(vocab)`` old ids (-1: the model lacks the token)
    permutations: Mapping[str, npt.NDArray[np.int64]]
    #: model reference -> its own vocabulary (token -> id), for ``{kind: model_token, token: ...}``
    original: Mapping[str, Mapping[str, int]]
    #: the directory whose tokenizer_config.json / special_tokens_map.json go with the output tokenizer
    donor: Path
    settings: TokenizerSettings
    #: remarks for the user (models without a tokenizer, ...)
    notes: tuple[str, ...] = field(default=())


def read_tokenizer(model_dir: Path) -> Tokenizer | None:
    """The ``tokenizer.json`` of a model directory; None when the directory has no tokenizer at all.

    ``InputError`` (naming the file) when it is unreadable or malformed, or when the model's tokenizer exists only
    in a format ferromerge does not read (sentencepiece ``tokenizer.model``, ``vocab.json`` + ``merges.txt``).
    """
    path = model_dir / TOKENIZER_JSON
    if not path.is_file():
        other = [f for f in _OTHER_TOKENIZER_FILES if (model_dir / f).is_file()]
        if other:
            raise InputError(
                f"{model_dir}: the tokenizer is in {', '.join(other)} but vocabulary alignment reads "
                f"{TOKENIZER_JSON} (the fast tokenizer format); write one with transformers: "
                "AutoTokenizer.from_pretrained(dir).save_pretrained(dir)"
            )
        return None
    data = read_json(path, "the tokenizer")
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise InputError(f"{path}: not a tokenizer.json (no 'model' object)")
    vocab = dict(_model_vocab(data, path))
    for entry in data.get("added_tokens") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("content"), str) or not _is_id(entry.get("id")):
            raise InputError(f"{path}: malformed added_tokens entry {entry!r}")
        vocab[entry["content"]] = entry["id"]
    return Tokenizer(path, data, dict(sorted(vocab.items(), key=lambda kv: kv[1])))


def _is_id(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _model_vocab(data: Mapping[str, Any], path: Path) -> dict[str, int]:
    model = data["model"]
    vocab = model.get("vocab")
    kind = model.get("type")
    if isinstance(vocab, dict) and all(isinstance(k, str) and _is_id(v) for k, v in vocab.items()):
        return vocab
    if kind == "Unigram" and isinstance(vocab, list):  # [[piece, score], ...]: the id is the position
        try:
            return {str(piece[0]): i for i, piece in enumerate(vocab)}
        except (TypeError, IndexError, KeyError):
            pass
    raise InputError(f"{path}: model.vocab of a {kind} tokenizer is not a token -> id map ferromerge can read")


def config_vocab_size(model_dir: Path) -> int | None:
    """``vocab_size`` of the model's config.json (top level, else ``text_config``), None when it has none."""
    path = model_dir / "config.json"
    if not path.is_file():
        return None
    config = read_json(path, "the model config")
    for scope in (config, config.get("text_config") if isinstance(config, dict) else None):
        if isinstance(scope, dict) and _is_id(scope.get("vocab_size")):
            return int(scope["vocab_size"])
    return None


def strip_unused(tok: Tokenizer, vocab_size: int) -> Tokenizer:
    """``tok`` without the tokens whose ids are ``>= vocab_size`` (mergekit's ``get_stripped_tokenizer``)."""
    unused = {t for t, i in tok.vocab.items() if i >= vocab_size}
    if not unused:
        return tok
    kind = tok.data["model"].get("type")
    if kind != "BPE":
        raise InputError(
            f"{tok.path}: {len(unused)} token(s) have ids >= the model's vocab_size {vocab_size} (e.g. "
            f"{sorted(unused, key=tok.vocab.__getitem__)[0]!r}); removing them is supported for BPE tokenizers "
            f"only (as in mergekit), this one is {kind}"
        )
    data = copy.deepcopy(tok.data)
    data["added_tokens"] = [e for e in data.get("added_tokens") or [] if e["id"] < vocab_size]
    model = data["model"]
    model["vocab"] = {t: i for t, i in model["vocab"].items() if t not in unused}

    def keep(merge: Any) -> bool:
        parts = merge.split(" ") if isinstance(merge, str) else merge
        if not isinstance(parts, list) or len(parts) != 2:
            raise InputError(f"{tok.path}: unexpected merge {merge!r} in model.merges")
        return not any(p in unused for p in parts)

    model["merges"] = [m for m in model.get("merges") or [] if keep(m)]
    vocab = {t: i for t, i in tok.vocab.items() if t not in unused}
    return Tokenizer(tok.path, data, vocab)


def add_token(data: dict[str, Any], vocab: dict[str, int], entry: Mapping[str, Any]) -> None:
    """Add one token to a tokenizer.json's ``added_tokens`` as the tokenizers library's ``add_tokens`` does: an
    existing added token of that content is left alone; a token of the model vocabulary becomes an added token at
    its id; a new token gets the next id after the model vocabulary and the added tokens. ``vocab`` (token -> id,
    added included) is updated."""
    content = entry["content"]
    added = data.setdefault("added_tokens", [])
    if content == "" or any(e["content"] == content for e in added):
        return
    if content in vocab:
        new_id = vocab[content]
    else:
        model_size = len(data["model"]["vocab"])
        top = max((e["id"] for e in added), default=None)
        new_id = model_size if top is None or (top < model_size and model_size > 0) else top + 1
    added.append({**entry, "id": new_id})
    added.sort(key=lambda e: e["id"])
    vocab[content] = new_id


def plain_token(content: str) -> dict[str, Any]:
    """The added-token entry of ``add_tokens("...")``: not special, normalized."""
    return {
        "id": -1,
        "content": content,
        "single_word": False,
        "lstrip": False,
        "rstrip": False,
        "normalized": True,
        "special": False,
    }


def build_vocabulary(config: MergeConfig, models: Mapping[str, ModelIndex]) -> Vocabulary | None:
    """The output vocabulary of ``config`` (None without ``tokenizer`` / ``tokenizer_source``)."""
    settings = config.tokenizer
    if settings is None:
        return None
    refs = config.model_refs()
    reference = config.reference
    notes: list[str] = []
    base_tok = read_tokenizer(models[reference].path)
    if base_tok is None:
        raise InputError(
            f"model {reference!r} ({models[reference].path}) has no {TOKENIZER_JSON}; vocabulary alignment takes "
            "the tokenizer base from it (the base model, else the first model)"
        )
    sizes = {ref: config_vocab_size(models[ref].path) for ref in refs}
    base_tok = strip_unused(base_tok, sizes[reference] or len(base_tok.vocab))
    tokenizers: dict[str, Tokenizer] = {reference: base_tok}
    for ref in refs[1:]:
        tok = read_tokenizer(models[ref].path)
        if tok is None:
            # mergekit: "Unable to load tokenizer ... Assuming same as <base>"
            notes.append(f"model {ref!r} has no tokenizer; its vocabulary is taken to be that of {reference!r}")
            continue
        tokenizers[ref] = tok

    if settings.source == "base":
        out, donor = copy.deepcopy(base_tok.data), models[reference].path
        vocab = dict(base_tok.vocab)
    elif settings.source == "union":
        out, vocab = _union(base_tok, tokenizers, sizes)
        donor = models[reference].path
    else:
        donor = models[settings.source].path if settings.source in models else resolve(settings.source)
        source_tok = read_tokenizer(donor)
        if source_tok is None:
            raise InputError(f"tokenizer source {settings.source!r} ({donor}) has no {TOKENIZER_JSON}")
        out, vocab = copy.deepcopy(source_tok.data), dict(source_tok.vocab)
    for token in settings.tokens or {}:
        add_token(out, vocab, plain_token(token))
    vocab = dict(sorted(vocab.items(), key=lambda kv: kv[1]))
    _check_dense(vocab, donor)

    rows = len(vocab)
    pad = settings.pad_to_multiple_of
    if pad and rows % pad:
        rows += pad - rows % pad
    tokens = list(vocab)
    permutations: dict[str, npt.NDArray[np.int64]] = {}
    for ref in refs:
        own = tokenizers.get(ref, base_tok).vocab
        limit = sizes[ref] if sizes[ref] is not None else len(own)
        old = np.array([own.get(t, -1) for t in tokens], dtype=np.int64)
        old[old >= limit] = -1
        permutations[ref] = old
    original = {ref: tokenizers.get(ref, base_tok).vocab for ref in refs}
    return Vocabulary(out, vocab, rows, permutations, original, donor, settings, tuple(notes))


def _union(
    base: Tokenizer, tokenizers: Mapping[str, Tokenizer], sizes: Mapping[str, int | None]
) -> tuple[dict[str, Any], dict[str, int]]:
    """The base tokenizer plus every used token of the others that it lacks (mergekit's ``build_union_tokenizer``)."""
    plain: dict[str, None] = {}
    added: dict[str, dict[str, Any]] = {}
    for ref, tok in tokenizers.items():
        limit = sizes[ref] if sizes[ref] is not None else tok.model_vocab_size
        for t, i in tok.vocab.items():  # id order
            if i < limit:
                plain.setdefault(t, None)
        for entry in sorted(tok.added(), key=lambda e: e["id"]):
            if entry["id"] < limit:
                added.setdefault(entry["content"], entry)
    out = copy.deepcopy(base.data)
    vocab = dict(base.vocab)
    for t in plain:
        if t not in added and t not in base.vocab:
            add_token(out, vocab, plain_token(t))
    for entry in added.values():
        add_token(out, vocab, {k: v for k, v in entry.items() if k != "id"})
    return out, vocab


def _check_dense(vocab: Mapping[str, int], where: Path) -> None:
    """Output ids must be 0..n-1, each once: they index the rows of the merged embeddings."""
    ids = sorted(vocab.values())
    if ids != list(range(len(ids))):
        gap = next(i for i, x in enumerate(ids) if x != i)
        raise InputError(
            f"{where / TOKENIZER_JSON}: the output vocabulary's ids are not 0..{len(ids) - 1} (first gap or "
            f"duplicate at id {gap}); its embedding rows cannot be laid out"
        )
