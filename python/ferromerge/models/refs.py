"""Model references: a local directory, or ``org/name[@revision]`` looked up in the local Hugging Face cache only
(ferromerge never downloads), and the ``model+lora`` form (``split_ref``; the adapter is merged by ``lora``).

Relative local paths resolve against the current working directory, as in mergekit (not against the config
file's directory).
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path

from ..errors import ConfigError, InputError

_HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")
_COMMIT = re.compile(r"[0-9a-f]{40}")


def hf_cache_dir() -> Path:
    """The Hugging Face hub cache: ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def resolve(ref: str) -> Path:
    """The absolute directory of a model reference; ``InputError`` naming every place looked at if absent."""
    local = Path(ref).expanduser()
    try:
        local.stat()
    except OSError as e:
        # a symlink loop (or a path too long, a component that is a file) is no directory, and Path.resolve()
        # would raise RuntimeError on the loop: say what it is, naming the path
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            raise InputError(f"model {ref!r}: cannot open {os.path.abspath(local)}: {e.strerror}") from None
    if local.is_dir():
        return local.resolve()
    if local.exists():
        raise InputError(f"model {ref!r}: {local.resolve()} is not a directory")
    name, _, revision = ref.partition("@")
    absolute = Path(os.path.abspath(local))
    if not _HUB_ID.fullmatch(name) or (revision == "" and "@" in ref):
        raise InputError(f"model {ref!r}: directory not found: {absolute}")
    return _from_hf_cache(ref, name, revision or "main", absolute)


def _from_hf_cache(ref: str, name: str, revision: str, local: Path) -> Path:
    repo = hf_cache_dir() / ("models--" + name.replace("/", "--"))
    absent = (
        f"model {ref!r}: not a local directory ({local}) and not in the Hugging Face cache"
        " (ferromerge never downloads; fetch it first, e.g. `huggingface-cli download "
        f"{name}{'' if revision == 'main' else ' --revision ' + revision}`)"
    )
    ref_file = repo / "refs" / revision
    if ref_file.is_file():
        commit = ref_file.read_text(encoding="utf-8").strip()
        snapshot = repo / "snapshots" / commit
        if snapshot.is_dir():
            return snapshot.resolve()
        raise InputError(f"{absent}: {ref_file} points to commit {commit}, but {snapshot} does not exist")
    if _COMMIT.fullmatch(revision):
        snapshot = repo / "snapshots" / revision
        if snapshot.is_dir():
            return snapshot.resolve()
        raise InputError(f"{absent}: looked for {snapshot}")
    raise InputError(f"{absent}: looked for {ref_file}")


def check_ref(value: str, where: str) -> str:
    """``value`` as a model reference of a config (``where`` names its place): not empty, and a well-formed
    ``model+lora`` if it has a ``+``; the adapter is merged into the model later (``lora``)."""
    if not value.strip():
        raise ConfigError(f"{where}: empty model reference")
    split_ref(value, where)
    return value


def split_ref(ref: str, where: str) -> tuple[str, str] | None:
    """``(model, adapter)`` of a ``model+lora`` reference, None for a plain one (``where`` names it in errors)."""
    if "+" not in ref:
        return None
    parts = ref.split("+")
    # mergekit splits the same way and rejects more than one "+"
    if len(parts) != 2 or not parts[0].strip() or not parts[1].strip():
        raise ConfigError(f"{where}: {ref!r}: expected MODEL+LORA (one '+' between a model and a LoRA adapter)")
    return parts[0], parts[1]
