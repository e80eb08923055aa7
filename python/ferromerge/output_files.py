"""The output model's side files, besides the shards: the shard index, the reference model's ``config.json``
(dtype, and for slices the layer counts and per-layer lists, updated), its tokenizer files (or the aligned vocabulary's), the chat
template, the config as given (``mergekit_config.yml``, as mergekit names it) and the resolved merge
(``ferromerge_config.yml``). The directory they go into is ``io.output_dir.OutputDir``'s.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import yaml

from ._plan.build import Plan
from ._plan.layout import LayerSources
from .errors import OutputError
from .models.architecture import LAYER_INDEX_LISTS, per_layer_list
from .models.index import ModelIndex
from .models.layers import read_model_config
from .tokenizer.vocab import Vocabulary

#: copied from the reference model when present (mergekit copies the tokenizer of the base or first model too)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "chat_template.jinja",
)

#: what goes with a rebuilt tokenizer.json (vocabulary alignment): files in other formats (tokenizer.model,
#: vocab.json, ...) would describe the old vocabulary, so they are left out, as mergekit does
ALIGNED_TOKENIZER_FILES = ("special_tokens_map.json", "generation_config.json")


def _write(path: Path, text: str) -> None:
    try:
        path.write_text(text, encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write {path}: {e}") from None


def write_index(out: Path, weight_map: dict[str, str], total_size: int) -> None:
    """``model.safetensors.index.json``, as transformers reads it (only written for more than one shard)."""
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    _write(out / "model.safetensors.index.json", json.dumps(index, indent=2) + "\n")


def config_updates(reference: ModelIndex, plan: Plan) -> tuple[dict[str, Any], list[str]]:
    """The ``config.json`` keys the merge changes besides the dtype, and remarks for the user.

    Slices set the layer count (every key the layout names: ``num_hidden_layers``, T5's ``num_decoder_layers``,
    a sub-config's ``text_config.num_hidden_layers``), and every list beside such a key with one entry per old
    layer (``layer_types``, ...) follows the slices: output layer j gets the entry of the layer it is taken from,
    read from that model's config.json (transformers refuses a config whose per-layer lists miss layers); token-id
    lists are not per-layer (``models.architecture.per_layer_list``), and lists of layer indices (``mlp_only_layers``)
    name the output layers whose source layer they list. An output lm_head that some input had tied sets
    ``tie_word_embeddings: false``, or transformers would ignore the merged head.
    """
    config = read_model_config(reference)
    updates: dict[str, Any] = {}
    remarks: list[str] = []
    if config is None:
        return updates, remarks
    remarks += plan.remarks
    # scope ("" = the top level, else a sub-config's key) -> its updated copy
    scopes: dict[str, dict[str, Any]] = {}
    # (scope, old count) -> the layer sources of the stacks that had that count there
    per_layer: dict[tuple[str, int], set[LayerSources]] = {}
    for key, sources in plan.config_layers.items():
        scope, _, name = key.rpartition(".")
        here = _scope(config, scope)
        old = here.get(name)
        scopes.setdefault(scope, dict(here))[name] = len(sources)
        if isinstance(old, int):
            per_layer.setdefault((scope, old), set()).add(sources)
    configs: dict[str, dict[str, Any] | None] = {}

    def theirs(ref: str, scope: str, name: str) -> Any:
        """``name`` in the config of the model ``ref`` (its scope)."""
        if ref not in configs:
            configs[ref] = next((read_model_config(m) for m in plan.models if m.ref == ref), None)
        return _scope(configs[ref] or {}, scope).get(name)

    for (scope, old), found in per_layer.items():
        for name, value in _scope(config, scope).items():
            index_list = name in LAYER_INDEX_LISTS
            if not isinstance(value, list) or not (index_list or len(value) == old and per_layer_list(name)):
                continue
            if len(found) > 1:
                remarks.append(f"{reference.path / 'config.json'}: {name!r} lists layers of several stacks that "
                               "slices changed; it is left as it is")
                continue
            (sources,) = found
            if index_list:
                # the output layers whose source layer is listed in its model's config
                scopes[scope][name] = [j for j, (ref, i) in enumerate(sources)
                                       if i in _list_or(theirs(ref, scope, name), value)]
                continue
            entries = []
            for ref, i in sources:
                mine = theirs(ref, scope, name)
                entries.append(mine[i] if isinstance(mine, list) and i < len(mine) else value[min(i, old - 1)])
            scopes[scope][name] = entries
    for scope, values in scopes.items():
        if scope:
            updates[scope] = values
        else:
            updates.update({k: v for k, v in values.items() if v != config.get(k)})
    if plan.untied_head and config.get("tie_word_embeddings") is not False:
        updates["tie_word_embeddings"] = False
    if plan.vocabulary is not None:
        # mergekit's _update_config_vocab: the padded size; under text_config for models that keep it there
        text = updates.get("text_config", config.get("text_config"))
        if "vocab_size" not in config and isinstance(text, dict) and "vocab_size" in text:
            updates["text_config"] = {**text, "vocab_size": plan.vocabulary.rows}
        else:
            updates["vocab_size"] = plan.vocabulary.rows
    return updates, remarks


def _list_or(value: Any, default: list[Any]) -> list[Any]:
    return value if isinstance(value, list) else default


def _scope(config: dict[str, Any], scope: str) -> dict[str, Any]:
    """The top level of ``config`` (scope ``""``) or its sub-config ``scope``."""
    if not scope:
        return config
    sub = config.get(scope)
    return sub if isinstance(sub, dict) else {}


def write_model_config(out: Path, source: Path, dtype: str, updates: dict[str, Any] | None = None) -> None:
    """``config.json`` of ``source`` with its dtype keys set to ``dtype`` and ``updates`` applied (nothing when
    ``source`` has none)."""
    src = source / "config.json"
    if not src.is_file():
        return
    try:
        config = json.loads(src.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f"cannot read {src} to copy it into the output: {e}") from None
    if isinstance(config, dict):
        config["torch_dtype"] = dtype
        if "dtype" in config:  # newer transformers write "dtype" instead of (or besides) "torch_dtype"
            config["dtype"] = dtype
        config.update(updates or {})
    _write(out / "config.json", json.dumps(config, indent=2) + "\n")


def copy_tokenizer(out: Path, source: Path) -> list[str]:
    """Copy the tokenizer (and generation config) files that ``source`` has; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        src = source / name
        if src.is_file():
            try:
                shutil.copyfile(src, out / name)
            except OSError as e:
                raise OutputError(f"cannot copy {src} into the output: {e}") from None
            copied.append(name)
    return copied


def write_tokenizer(out: Path, vocabulary: Vocabulary) -> None:
    """The merged vocabulary's ``tokenizer.json``, and the donor's ``tokenizer_config.json`` (its
    ``added_tokens_decoder``, when it has one, lists the new added tokens too) and special-token files."""
    _write(out / "tokenizer.json", json.dumps(vocabulary.tokenizer, indent=2, ensure_ascii=False) + "\n")
    src = vocabulary.donor / "tokenizer_config.json"
    config: dict[str, Any] = {}
    if src.is_file():
        config = _read_json(src, "tokenizer config")
    decoder = config.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        for entry in vocabulary.tokenizer.get("added_tokens") or []:
            decoder.setdefault(str(entry["id"]), {k: v for k, v in entry.items() if k != "id"})
    _write(out / "tokenizer_config.json", json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    for name in ALIGNED_TOKENIZER_FILES:
        if (vocabulary.donor / name).is_file():
            try:
                shutil.copyfile(vocabulary.donor / name, out / name)
            except OSError as e:
                raise OutputError(f"cannot copy {vocabulary.donor / name} into the output: {e}") from None
    if (vocabulary.donor / "chat_template.jinja").is_file():
        shutil.copyfile(vocabulary.donor / "chat_template.jinja", out / "chat_template.jinja")


def set_chat_template(out: Path, template: str) -> bool:
    """Put ``template`` into the output's ``tokenizer_config.json`` (``chat_template``, where transformers reads
    it); a copied ``chat_template.jinja`` is removed, since transformers would prefer it. False when the output
    has no tokenizer to carry it."""
    path = out / "tokenizer_config.json"
    if not path.is_file() and not (out / "tokenizer.json").is_file():
        return False
    config = _read_json(path, "tokenizer config") if path.is_file() else {}
    config["chat_template"] = template
    _write(path, json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").unlink(missing_ok=True)
    return True


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise OutputError(f"cannot read {path} ({what}) to write the output's: {e}") from None
    if not isinstance(data, dict):
        raise OutputError(f"{path}: the {what} is not a JSON object")
    return data


def write_configs(out: Path, text: str, resolved: dict[str, Any]) -> None:
    """The config as given (``mergekit_config.yml``) and the resolved merge (``ferromerge_config.yml``)."""
    _write(out / "mergekit_config.yml", text if text.endswith("\n") else text + "\n")
    _write(out / "ferromerge_config.yml", yaml.safe_dump(resolved, sort_keys=False))
