"""Chat templates: the built-in ones (package data, templates/*.jinja), a model's own, and the config's setting."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

from ..errors import ConfigError, InputError
from ..io.json_file import read_json

#: built-in templates, by mergekit's names (package data: templates/<name>.jinja, as mergekit keeps its own);
#: written for ferromerge from each format's published layout. llama3 ends every message with a newline after
#: <|eot_id|> as mergekit's does, so both tools' outputs agree; alpaca writes the last system message, then
#: "### Instruction:" / "### Input:" / "### Response:" blocks, blank-line separated.
BUILTIN_CHAT_TEMPLATES = {
    name: (resources.files(__package__) / "templates" / f"{name}.jinja").read_text(encoding="utf-8")
    for name in ("chatml", "llama3", "mistral", "alpaca", "exaone")
}


def model_chat_template(model_dir: Path) -> str | None:
    """The chat template a model's tokenizer carries (``chat_template.jinja``, else tokenizer_config.json's
    ``chat_template``, whose list form contributes its ``default`` entry), stripped; None when it has none."""
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        try:
            text = jinja.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{jinja}: cannot read the chat template: {e}") from None
        return text.strip() or None
    path = model_dir / "tokenizer_config.json"
    if not path.is_file():
        return None
    config = read_json(path, "the tokenizer config")
    template = config.get("chat_template") if isinstance(config, dict) else None
    if isinstance(template, list):
        template = next((t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None)
    return template.strip() if isinstance(template, str) and template.strip() else None


def chat_template(setting: str, model_dirs: Sequence[os.PathLike[str] | str]) -> str | None:
    """The template that ``chat_template: <setting>`` writes, mergekit's rules: ``auto`` is the most common
    template among the models (first in config order on a tie; None when no model has one), a built-in name
    (alpaca, chatml, exaone, llama3, mistral) its template, anything else a literal Jinja template, which must
    contain ``{`` and be at least 20 characters (``ConfigError`` otherwise)."""
    check_chat_template(setting)
    if setting == "auto":
        found = [t for t in (model_chat_template(Path(d)) for d in model_dirs) if t is not None]
        return Counter(found).most_common(1)[0][0] if found else None
    return BUILTIN_CHAT_TEMPLATES.get(setting, setting)


def check_chat_template(setting: str) -> None:
    """``ConfigError`` unless ``setting`` is auto, a built-in name or looks like a Jinja template."""
    if setting != "auto" and setting not in BUILTIN_CHAT_TEMPLATES and (len(setting) < 20 or "{" not in setting):
        names = ", ".join(sorted(BUILTIN_CHAT_TEMPLATES))
        raise ConfigError(
            f"chat_template: {setting!r} is neither auto, a built-in template ({names}) nor a Jinja template "
            "(at least 20 characters with a '{')"
        )
