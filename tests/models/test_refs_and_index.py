"""Model references (local paths, the Hugging Face cache) and the tensor index of a model directory."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

import ferromerge
from ferromerge import InputError
from ferromerge.models.index import index_model, read_tensors
from ferromerge.models.refs import resolve
from ferromerge.synth import Family, make_model

COMMIT_A = "a" * 40
COMMIT_B = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, family_bf16: Family) -> Path:
    """A hub cache holding org/llama: main -> COMMIT_A (the base), dev -> COMMIT_B (a fine-tune)."""
    cache = tmp_path / "hub"
    repo = cache / "models--org--llama"
    shutil.copytree(family_bf16.base, repo / "snapshots" / COMMIT_A)
    shutil.copytree(family_bf16.finetunes[0], repo / "snapshots" / COMMIT_B)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT_A)
    (repo / "refs" / "dev").write_text(COMMIT_B + "\n")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


def test_local_path_absolute_and_relative_to_the_working_directory(
    family_bf16: Family, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert resolve(str(family_bf16.base)) == family_bf16.base.resolve()
    monkeypatch.chdir(family_bf16.base.parent)
    assert resolve("base") == family_bf16.base.resolve()
    assert resolve("./ft1") == family_bf16.finetunes[0].resolve()


def test_missing_local_directory_names_the_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(InputError, match=f"directory not found: {tmp_path / 'nope'}"):
        resolve("./nope")


def test_a_file_is_not_a_model_directory(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(InputError, match="is not a directory"):
        resolve(str(tmp_path / "f"))


def test_hf_cache_default_branch(hf_cache: Path) -> None:
    assert resolve("org/llama") == (hf_cache / "models--org--llama" / "snapshots" / COMMIT_A).resolve()


def test_hf_cache_revision_by_branch_and_by_commit(hf_cache: Path) -> None:
    snapshot_b = (hf_cache / "models--org--llama" / "snapshots" / COMMIT_B).resolve()
    assert resolve("org/llama@dev") == snapshot_b
    assert resolve(f"org/llama@{COMMIT_B}") == snapshot_b


def test_hf_home_is_used_when_hf_hub_cache_is_unset(
    hf_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "hfhome"
    home.mkdir()
    shutil.move(str(hf_cache), home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert resolve("org/llama").parent.name == "snapshots"


@pytest.mark.parametrize(
    ("ref", "looked_for"),
    [
        ("org/absent", "models--org--absent/refs/main"),
        ("org/llama@nobranch", "models--org--llama/refs/nobranch"),
        (f"org/llama@{'f' * 40}", f"models--org--llama/snapshots/{'f' * 40}"),
    ],
)
def test_absent_from_the_cache_names_the_paths_looked_for(hf_cache: Path, ref: str, looked_for: str) -> None:
    with pytest.raises(InputError) as e:
        resolve(ref)
    message = str(e.value)
    assert str(hf_cache / looked_for) in message
    assert "never downloads" in message and str(Path.cwd() / ref) in message


def test_a_ref_pointing_at_a_missing_snapshot(hf_cache: Path) -> None:
    (hf_cache / "models--org--llama" / "refs" / "gone").write_text(COMMIT_B[::-1])
    with pytest.raises(InputError, match=f"points to commit {COMMIT_B[::-1]}"):
        resolve("org/llama@gone")


def test_index_of_a_cached_model(hf_cache: Path) -> None:
    index = index_model("org/llama@dev")
    assert index.ref == "org/llama@dev" and len(index.tensors) == 21


def test_index_of_a_single_file_model(family_bf16: Family) -> None:
    index = index_model(str(family_bf16.base))
    names = list(index.tensors)
    assert names[:2] == ["lm_head.weight", "model.embed_tokens.weight"]  # natural name order within a file
    assert names.index("model.layers.0.mlp.up_proj.weight") < names.index("model.layers.1.mlp.up_proj.weight")
    info = index.tensors["model.layers.1.self_attn.k_proj.weight"]
    assert (info.dtype, info.shape, info.file) == ("BF16", (32, 64), family_bf16.base / "model.safetensors")


def test_index_of_a_sharded_model_follows_shard_order(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", shard_size=40_000, dtype="float32")
    index = index_model(str(model))
    assert len(index.files) > 2 and [f.name for f in index.files] == sorted(f.name for f in index.files)
    shard_of = [index.files.index(info.file) for info in index.tensors.values()]
    assert shard_of == sorted(shard_of) and len(index.tensors) == 21


def test_pytorch_bin_only_is_rejected(tmp_path: Path) -> None:
    """Without a cache directory (extract-lora, compress, a LoRA's model) pickles are refused; merges read them
    (tests/models/test_pickle_checkpoints.py)."""
    (tmp_path / "pytorch_model.bin").write_bytes(b"\0")
    with pytest.raises(InputError, match=r"only PyTorch \.bin weights, which only merges \(ferromerge run, plan\) read"):
        index_model(str(tmp_path))


def test_directory_without_weights(tmp_path: Path) -> None:
    (tmp_path / "consolidated.safetensors").write_bytes(b"\0")
    with pytest.raises(InputError, match=rf"{tmp_path} has no model.safetensors .*found consolidated.safetensors"):
        index_model(str(tmp_path))


def test_read_tensors_round_trips_synthetic_weights(tmp_path: Path) -> None:
    model = make_model(tmp_path / "m", dtype="float16", layers=1)
    tensors = read_tensors(model / "model.safetensors")
    assert next(iter(tensors)) == "model.embed_tokens.weight" and len(tensors) == 12
    norm = tensors["model.layers.0.input_layernorm.weight"]
    assert norm.dtype == np.float32 and norm.shape == (64,) and np.all(norm == 1.0)


def _sharded(family: Family, root: Path) -> Path:
    """The base as two shards with an index (the tensors split in file order)."""
    from safetensors.numpy import load_file, save_file

    model = root / "m"
    shutil.copytree(family.base, model)
    tensors = load_file(str(model / "model.safetensors"))
    (model / "model.safetensors").unlink()
    names = list(tensors)
    files = {"model-00001-of-00002.safetensors": names[: len(names) // 2],
             "model-00002-of-00002.safetensors": names[len(names) // 2 :]}
    for file, part in files.items():
        save_file({n: tensors[n] for n in part}, str(model / file), metadata={"format": "pt"})
    weight_map = {n: f for f, part in files.items() for n in part}
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return model


def test_single_file_beside_the_shard_index_is_a_note(family_f32: Family, tmp_path: Path) -> None:
    """mergekit reads the index; transformers would load model.safetensors: the shards are read, with a note."""
    model = _sharded(family_f32, tmp_path)
    assert index_model(str(model)).notes == ()
    shutil.copy(family_f32.base / "model.safetensors", model / "model.safetensors")
    index = index_model(str(model))
    assert [f.name for f in index.files] == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    (note,) = index.notes
    assert "has both model.safetensors and model.safetensors.index.json; the shards the index names are read" in note
    config = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}}]}
    report = ferromerge.plan(config)
    assert note in report.plan.notes and f"note: {note}" in report.lines()


@pytest.mark.parametrize(
    ("make", "what"),
    [
        (lambda p: p.mkdir(), "is a directory, not a file"),
        (lambda p: os.mkfifo(p), r"is a FIFO \(named pipe\), not a regular file"),
        (lambda p: p.symlink_to("/dev/zero"), "is a device, not a regular file"),
        (lambda p: p.symlink_to(p.parent / "gone"), r"does not exist \(a dangling symbolic link\)"),
    ],
)
def test_a_shard_that_is_not_a_regular_file_is_named_for_what_it_is(
    family_f32: Family, tmp_path: Path, make, what: str  # type: ignore[no-untyped-def]
) -> None:
    model = _sharded(family_f32, tmp_path)
    shard = model / "model-00002-of-00002.safetensors"
    shard.unlink()
    make(shard)
    with pytest.raises(InputError, match=rf"names shard model-00002-of-00002\.safetensors, but {shard} {what}"):
        index_model(str(model))
    # the single-file layout: model.safetensors itself
    single = tmp_path / "single"
    single.mkdir()
    make(single / "model.safetensors")
    with pytest.raises(InputError, match=rf"model\.safetensors \(the model's weights\) {what}"):
        index_model(str(single))
