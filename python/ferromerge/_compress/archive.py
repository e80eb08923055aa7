"""The compress archive's bookkeeping: ``manifest.json`` (written, read back and checked), the base model's
fingerprint, the models' config and tokenizer files, and the checksums that make a damaged archive an error
naming the damaged file. The layout itself is described in ``ferromerge.compress``.

It reads top-down: the base model's fingerprint, the config and tokenizer files, then ``manifest.json``.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

from ..errors import InputError, OutputError
from ..io.json_file import read_json
from ..io.reader import read_header
from ..models.index import INDEX_FILE, ModelIndex, index_model

FORMAT = "ferromerge-compress"
VERSION = 1
MANIFEST = "manifest.json"
TAU_FILE = "tau_mtl.safetensors"
MASK_FILE = "masks.safetensors"
FILES_DIR = "files"
SCHEMES = ("lowrank", "tall")
#: what each scheme may record for a (tensor, model); "base": equal to the base, nothing stored
KINDS = {"lowrank": ("lowrank", "full", "base"), "tall": ("masked", "full", "base")}
#: files of a model directory that are weights, not config: never copied into the archive
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx")


def model_file(i: int) -> str:
    """The archive file of model ``i``'s own tensors (low-rank factors, tensors stored whole)."""
    return f"model-{i}.safetensors"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(16 << 20):
                h.update(chunk)
    except OSError as e:
        raise InputError(f"{path}: cannot read: {e}") from None
    return h.hexdigest()


def _header_sha256(file: Path) -> str:
    """sha256 of a shard's 8 length bytes and JSON header: names, dtypes, shapes and offsets of every tensor."""
    return hashlib.sha256(read_header(file).raw).hexdigest()


#: bytes read per sample, and samples per tensor, of the base's content digest (``_sample_sha256``)
SAMPLE_BYTES = 4096
SAMPLES = 4


def _sample_sha256(file: Path) -> str:
    """sha256 of ``SAMPLES`` evenly spaced ranges of ``SAMPLE_BYTES`` of every tensor of a shard (the whole tensor
    when it is smaller). Models of one family share names, shapes and sizes, so the header digest cannot tell
    them apart; a fine-tune changes nearly every value of the tensors it changes, so a few samples of each tensor
    do, for a few KiB read per tensor."""
    try:
        header = read_header(file)
        h = hashlib.sha256()
        with open(file, "rb") as f:
            for _, _, start, end in header.tensors.values():
                length = end - start
                if length <= SAMPLES * SAMPLE_BYTES:
                    offsets = [start]
                    size = length
                else:
                    step = (length - SAMPLE_BYTES) // (SAMPLES - 1)
                    offsets = [start + k * step for k in range(SAMPLES)]
                    size = SAMPLE_BYTES
                for offset in offsets:
                    f.seek(offset)
                    h.update(f.read(size))
        return h.hexdigest()
    except (OSError, ValueError) as e:
        raise InputError(f"{file}: cannot read: {e}") from None


def base_fingerprint(base: ModelIndex) -> list[dict[str, Any]]:
    """Each base shard's name, size, header digest and content digest (``_sample_sha256``): enough to tell
    another model (of the same family too), another dtype or a re-sharded copy, reading a few KiB per tensor."""
    return [
        {
            "file": f.name,
            "size": f.stat().st_size,
            "header_sha256": _header_sha256(f),
            "sample_sha256": _sample_sha256(f),
        }
        for f in base.files
    ]


def open_base(
    manifest: dict[str, Any], archive: Path, given: str | None, notes: list[str] | None = None
) -> ModelIndex:
    """The base model to rebuild on (``given`` or the path recorded at compress time), checked against the
    manifest's fingerprint; ``InputError`` saying what differs. An archive made before the content digest
    existed is checked by headers and sizes only, with a note appended to ``notes``."""
    recorded = manifest["base"]
    ref = given if given is not None else recorded["path"]
    try:
        base = index_model(str(ref))
    except InputError as e:
        if given is None:
            raise InputError(
                f"archive {archive}: cannot open its base model {ref} ({e}); pass the base with --base / base="
            ) from None
        raise
    want = {s["file"]: s for s in recorded["shards"]}
    have = {s["file"]: s for s in base_fingerprint(base)}
    problems = []
    if set(want) != set(have):
        problems.append(f"it has shards {sorted(have)}, the archive's base had {sorted(want)}")
    else:
        for name, s in want.items():
            if have[name]["size"] != s["size"]:
                problems.append(f"{name} is {have[name]['size']} bytes, the archive's base's was {s['size']}")
            elif have[name]["header_sha256"] != s["header_sha256"]:
                problems.append(f"{name} has another header (tensor names, dtypes, shapes or offsets differ)")
            elif "sample_sha256" in s and have[name]["sample_sha256"] != s["sample_sha256"]:
                problems.append(f"{name} holds other values (same names and shapes: another model of the family?)")
    if problems:
        raise InputError(
            f"base model {base.path} is not the base archive {archive} was made from ({recorded['path']}): "
            + "; ".join(problems)
        )
    if notes is not None and not all("sample_sha256" in s for s in want.values()):
        notes.append(
            f"archive {archive} predates the base's content digest: {base.path} was checked by its shards' headers "
            "and sizes only, which another model of the same family shares; make sure it is the base"
        )
    return base


def side_files(model: Path) -> list[Path]:
    """The top-level files of a model directory other than its weights and shard index (config.json, tokenizer
    files, generation config, README, ...): what makes a rebuilt directory loadable as that model."""
    return sorted(
        p
        for p in model.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.name != INDEX_FILE
        and not p.name.endswith(WEIGHT_SUFFIXES)
    )


def store_side_files(archive: Path, i: int, model: Path) -> dict[str, dict[str, Any]]:
    """Copy model ``i``'s side files to ``files/<i>/``; returns ``{name: {path, size, sha256}}``."""
    out: dict[str, dict[str, Any]] = {}
    folder = archive / FILES_DIR / str(i)
    for src in side_files(model):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            shutil.copyfile(src, folder / src.name)
        except OSError as e:
            raise OutputError(f"cannot copy {src} into the archive: {e}") from None
        rel = f"{FILES_DIR}/{i}/{src.name}"
        out[src.name] = {"path": rel, "size": (folder / src.name).stat().st_size,
                         "sha256": sha256_file(folder / src.name)}
    return out


def restore_side_files(archive: Path, files: dict[str, dict[str, Any]], out: Path) -> None:
    """Copy a model's side files from the archive into ``out``, each checked against its digest."""
    for name, entry in files.items():
        src = archive / entry["path"]
        if not src.is_file():
            raise InputError(f"archive {archive}: {src} is missing (the model's {name})")
        if sha256_file(src) != entry["sha256"]:
            raise InputError(f"archive {archive}: {src} is corrupt (its sha256 is not the manifest's)")
        try:
            shutil.copyfile(src, out / name)
        except OSError as e:
            raise OutputError(f"cannot copy {src} into {out}: {e}") from None


def verify_archive_file(archive: Path, manifest: dict[str, Any], name: str) -> Path:
    """``archive/name``, after checking it exists with the size and sha256 the manifest recorded."""
    path = archive / name
    entry = manifest["archive_files"].get(name)
    if entry is None:
        raise InputError(f"archive {archive}: {MANIFEST} does not list {name}, which this model needs")
    if not path.is_file():
        raise InputError(f"archive {archive}: {path} is missing")
    size = path.stat().st_size
    if size != entry["size"]:
        raise InputError(f"archive {archive}: {path} is {size} bytes, the manifest says {entry['size']} (truncated "
                         "or replaced)")
    if sha256_file(path) != entry["sha256"]:
        raise InputError(f"archive {archive}: {path} is corrupt (its sha256 is not the manifest's)")
    return path


def write_manifest(archive: Path, manifest: dict[str, Any]) -> None:
    try:
        (archive / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
    except OSError as e:
        raise OutputError(f"cannot write {archive / MANIFEST}: {e}") from None


def _need(obj: Any, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(obj, dict) or key not in obj or not isinstance(obj[key], kind):
        raise InputError(f"{where}: missing or malformed {key!r}")
    return obj[key]


def load_manifest(archive: Path) -> dict[str, Any]:
    """``manifest.json`` of ``archive``, checked for everything decompress relies on."""
    if not archive.is_dir():
        raise InputError(f"archive {archive}: not a directory" if archive.exists()
                         else f"archive {archive}: directory not found")
    path = archive / MANIFEST
    if not path.is_file():
        raise InputError(f"archive {archive}: has no {MANIFEST} (not a ferromerge compress archive, or a partial "
                         "copy of one)")
    manifest = read_json(path, "the archive manifest")
    where = str(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise InputError(f"{path}: not a ferromerge compress manifest (no \"format\": \"{FORMAT}\")")
    if manifest.get("version") != VERSION:
        raise InputError(f"{path}: archive format version {manifest.get('version')!r}; this ferromerge reads "
                         f"version {VERSION}")
    scheme = _need(manifest, "scheme", str, where)
    if scheme not in SCHEMES:
        raise InputError(f"{path}: unknown scheme {scheme!r} (expected one of {', '.join(SCHEMES)})")
    base = _need(manifest, "base", dict, where)
    _need(base, "path", str, f"{where}: base")
    for s in _need(base, "shards", list, f"{where}: base"):
        _need(s, "file", str, f"{where}: base shards")
        _need(s, "size", int, f"{where}: base shards")
        _need(s, "header_sha256", str, f"{where}: base shards")
        if "sample_sha256" in s:
            _need(s, "sample_sha256", str, f"{where}: base shards")
    models = _need(manifest, "models", list, where)
    if not models:
        raise InputError(f"{path}: lists no models")
    for k, m in enumerate(models):
        w = f"{where}: models[{k}]"
        _need(m, "name", str, w)
        _need(m, "indexed", bool, w)
        shards = _need(m, "shards", list, w)
        if not shards or not all(isinstance(s, str) and s and Path(s).name == s for s in shards):
            raise InputError(f"{w}: shards must be file names")
        for name, f in _need(m, "files", dict, w).items():
            _need(f, "path", str, f"{w}: files: {name}")
            _need(f, "sha256", str, f"{w}: files: {name}")
            if Path(name).name != name or ".." in Path(f["path"]).parts or Path(f["path"]).is_absolute():
                raise InputError(f"{w}: files: {name!r} is not a plain file name inside the archive")
    for name, f in _need(manifest, "archive_files", dict, where).items():
        _need(f, "size", int, f"{where}: archive_files: {name}")
        _need(f, "sha256", str, f"{where}: archive_files: {name}")
    for t in _need(manifest, "tensors", list, where):
        name = _need(t, "name", str, f"{where}: tensors")
        w = f"{where}: tensor {name}"
        shape = _need(t, "shape", list, w)
        if not all(isinstance(d, int) and d >= 0 for d in shape):
            raise InputError(f"{w}: malformed shape {shape}")
        _need(t, "dtype", str, w)
        per_model = _need(t, "models", list, w)
        if len(per_model) != len(models):
            raise InputError(f"{w}: has {len(per_model)} model entries, the archive has {len(models)} models")
        for k, e in enumerate(per_model):
            _need(e, "dtype", str, f"{w}, model {k}")
            kind = _need(e, "kind", str, f"{w}, model {k}")
            if kind not in KINDS[scheme]:
                raise InputError(f"{w}, model {k}: kind {kind!r} is not one of {', '.join(KINDS[scheme])}")
            shard = _need(e, "shard", str, f"{w}, model {k}")
            if shard not in models[k]["shards"]:
                raise InputError(f"{w}, model {k}: shard {shard!r} is not among the model's shards")
            if kind == "lowrank":
                _need(e, "rank", int, f"{w}, model {k}")
    return manifest


def pick_model(manifest: dict[str, Any], archive: Path, model: str | int) -> int:
    """The index of ``model``: an index (int, or a string of digits that is no model's name) or a name."""
    names = [m["name"] for m in manifest["models"]]
    if isinstance(model, bool) or not isinstance(model, (int, str)):
        raise InputError(f"archive {archive}: model must be a name or an index, got {model!r}")
    if isinstance(model, str) and model in names:
        return names.index(model)
    if isinstance(model, str) and model.strip().isdigit():
        model = int(model)
    if isinstance(model, int):
        if 0 <= model < len(names):
            return model
        raise InputError(f"archive {archive}: no model {model}; it holds {len(names)} (0..{len(names) - 1}: "
                         f"{', '.join(names)})")
    raise InputError(f"archive {archive}: no model named {model!r}; it holds {', '.join(names)}")
