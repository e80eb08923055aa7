"""The JSON side files of a model or archive (config.json, tokenizer files, shard indexes, adapter configs,
manifests) read in one way: an unreadable or malformed file is an ``InputError`` naming the file and what it is."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .._validate import check_text_file
from ..errors import InputError

__all__ = ["read_json"]


def read_json(path: Path, what: str) -> Any:
    """The parsed content of ``path``; ``what`` names the file in the error ("the shard index")."""
    check_text_file(path, what, InputError)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(f"{path}: cannot read {what}: {e}") from None
