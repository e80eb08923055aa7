"""PyTorch checkpoints (``pytorch_model.bin``, sharded with ``pytorch_model.bin.index.json``) read without running
their pickle (``io.torch_pickle``), copied into the run's cache and merged exactly as their safetensors twin.

Checkpoints are written with torch (skipped without it); the refusals (a pickle that calls ``os.system``, legacy
pickles, compressed storages) need no torch. The differential test against mergekit reading the same ``.bin``
models is in tests/compat/test_mergekit_checkpoints.py.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import zipfile
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import ferromerge
from ferromerge import InputError
from ferromerge.io.torch_pickle import read_checkpoint, tensor_chunks
from ferromerge.models.index import PickledModelIndex, index_model, natural_key
from ferromerge.synth import Family

MODELS = ("base", "ft1", "ft2")


def _torch():  # type: ignore[no-untyped-def]
    return pytest.importorskip("torch")


def _save_bin(src: Path, dst: Path, shards: int = 1, extra: dict | None = None) -> Path:
    """``src`` (a safetensors model directory) as a PyTorch checkpoint in ``dst``, its side files copied."""
    torch = _torch()
    from safetensors.torch import load_file as load_torch

    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("*.safetensors", "*.safetensors.index.json"))
    state = {}
    for f in sorted(src.glob("*.safetensors")):
        state.update(load_torch(str(f)))
    state.update(extra or {})
    names = sorted(state, key=natural_key)
    if shards == 1:
        torch.save(state, dst / "pytorch_model.bin")
        return dst
    weight_map = {}
    for k in range(shards):
        file = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = names[k * len(names) // shards : (k + 1) * len(names) // shards]  # the output keeps the order
        torch.save({n: state[n] for n in part}, dst / file)
        weight_map |= {n: file for n in part}
    (dst / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return dst


def _dirs(family: Family) -> dict[str, Path]:
    return dict(zip(MODELS, [family.base, *family.finetunes[:2]], strict=True))


def _ties(m: dict[str, Path]) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(m["base"]),
        "models": [{"model": str(m[k]), "parameters": {"weight": 0.6, "density": 0.5}} for k in ("ft1", "ft2")],
    }


def _shards(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.glob("*.safetensors*"))}


@pytest.mark.parametrize("shards", [1, 3])
def test_merge_equals_the_safetensors_twin(family_bf16: Family, tmp_path: Path, shards: int) -> None:
    src = _dirs(family_bf16)
    pickled = {k: _save_bin(v, tmp_path / "bin" / k, shards) for k, v in src.items()}
    assert not list((tmp_path / "bin" / "base").glob("*.safetensors"))
    ferromerge.run(_ties(src), tmp_path / "out-st", quiet=True)
    ferromerge.run(_ties(pickled), tmp_path / "out-bin", quiet=True)
    assert _shards(tmp_path / "out-bin") == _shards(tmp_path / "out-st")
    # the default cache lives in the output's temporary directory: nothing is left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bin", "out-bin", "out-st"]
    assert not [p for p in (tmp_path / "out-bin").rglob("*") if "pickled" in p.name]


def test_cache_is_kept_and_reused_and_holds_only_what_the_merge_reads(
    family_f32: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = _dirs(family_f32)
    pickled = {k: _save_bin(v, tmp_path / "bin" / k) for k, v in src.items()}
    frank = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(pickled["ft1"]), "layer_range": [1, 2]}]}],
    }
    cache = tmp_path / "cache"
    ferromerge.run(frank, tmp_path / "out1", lora_merge_cache=cache)
    assert "copying" in capsys.readouterr().err
    (copy,) = cache.glob("pickled-ft1-*/pytorch_model.safetensors")
    held = load_file(str(copy))
    assert not any(n.startswith("model.layers.0.") for n in held)  # layer 0 is not read
    assert any(n.startswith("model.layers.1.") for n in held)
    ferromerge.run(frank, tmp_path / "out2", lora_merge_cache=cache)
    assert "copying" not in capsys.readouterr().err
    assert _shards(tmp_path / "out1") == _shards(tmp_path / "out2")
    # the same model, merged from safetensors
    frank["slices"][0]["sources"][0]["model"] = str(src["ft1"])
    ferromerge.run(frank, tmp_path / "out-st", quiet=True)
    assert _shards(tmp_path / "out1") == _shards(tmp_path / "out-st")


def test_plan_writes_nothing(family_f32: Family, tmp_path: Path) -> None:
    pickled = {k: _save_bin(v, tmp_path / "bin" / k) for k, v in _dirs(family_f32).items()}
    cache = tmp_path / "cache"
    report = ferromerge.plan(_ties(pickled), lora_merge_cache=cache)
    assert isinstance(report.plan.models[0], PickledModelIndex)
    assert not cache.exists()


def test_tensors_are_read_as_torch_stores_them(tmp_path: Path) -> None:
    """Every dtype, a shared storage with an offset, a transposed (strided) tensor, a state dict under
    ``state_dict``, a ``Parameter``."""
    torch = _torch()
    base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    state = {
        "f32": base,
        "view": base[2],  # shares base's storage at an offset
        "t": base.t(),  # strides (1, 6)
        "slice": base[:, 1:5:2],
        "bf16": base.to(torch.bfloat16),
        "f16": base.to(torch.float16),
        "i64": torch.arange(5),
        "i32": torch.arange(5, dtype=torch.int32),
        "i8": torch.arange(-2, 3, dtype=torch.int8),
        "u8": torch.arange(5, dtype=torch.uint8),
        "bool": torch.tensor([True, False, True]),
        "f64": base.double(),
        "f8": base.to(torch.float8_e4m3fn),
        "scalar": torch.tensor(3.5),
        "empty": torch.zeros(0, 3),
        "param": torch.nn.Parameter(torch.ones(2, 2)),
    }
    torch.save({"state_dict": state, "epoch": 3}, tmp_path / "x.bin")
    read = read_checkpoint(tmp_path / "x.bin")
    assert list(read) == list(state)
    for name, t in state.items():
        stored = read[name]
        data = b"".join(tensor_chunks(tmp_path / "x.bin", stored))
        want = t.detach().contiguous()
        assert stored.shape == tuple(want.shape), name
        flat = want.reshape(-1)
        raw = flat.view(torch.uint8) if want.dtype != torch.bool and want.numel() else flat
        assert data == raw.numpy().tobytes(), name
    assert read["t"].contiguous is False and read["view"].offset == 12
    assert read["f8"].dtype == "F8_E4M3" and read["bool"].dtype == "BOOL" and read["bf16"].dtype == "BF16"


def test_a_strided_tensor_larger_than_a_chunk_is_refused(tmp_path: Path) -> None:
    torch = _torch()
    torch.save({"t": torch.zeros(64, 32).t()}, tmp_path / "x.bin")
    (stored,) = read_checkpoint(tmp_path / "x.bin").values()
    with pytest.raises(InputError, match=r"x\.bin: a tensor of shape \[32, 64\] is stored with strides \[1, 32\]"):
        b"".join(tensor_chunks(tmp_path / "x.bin", stored, chunk=1024))
    assert len(b"".join(tensor_chunks(tmp_path / "x.bin", stored))) == 64 * 32 * 4


def test_expanded_tensors_are_gathered_or_refused(tmp_path: Path) -> None:
    """A saved ``expand`` view (stride 0) holds one stored element for the whole shape: small ones are gathered,
    ones too large to gather (or absurd shapes) are refused before anything is allocated."""
    torch = _torch()
    one = torch.tensor([2.5])
    torch.save({"small": one.expand(1000), "huge": one.expand(1 << 40), "absurd": one.expand(1 << 50)},
               tmp_path / "a.bin")
    with pytest.raises(InputError, match=r"a\.bin: not a tensor checkpoint .* more elements than a tensor can have"):
        read_checkpoint(tmp_path / "a.bin")
    torch.save({"small": one.expand(1000), "huge": one.expand(1 << 40)}, tmp_path / "b.bin")
    read = read_checkpoint(tmp_path / "b.bin")
    assert np.array_equal(np.frombuffer(b"".join(tensor_chunks(tmp_path / "b.bin", read["small"])), "<f4"),
                          np.full(1000, 2.5, np.float32))
    with pytest.raises(InputError, match=r"b\.bin: a tensor of shape \[1099511627776\] is stored with strides \[0\]"):
        next(tensor_chunks(tmp_path / "b.bin", read["huge"]))


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def _zip_checkpoint(path: Path, payload: bytes, compress: int = zipfile.ZIP_STORED) -> Path:
    with zipfile.ZipFile(path, "w", compression=compress) as z:
        z.writestr("archive/data.pkl", payload)
        z.writestr("archive/version", "3\n")
    return path


def _model_dir(root: Path, checkpoint: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    shutil.move(checkpoint, root / "pytorch_model.bin")
    return root


def test_a_pickle_that_runs_code_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = pickle.dumps({"w": _Evil(marker)}, protocol=2)
    ckpt = _zip_checkpoint(tmp_path / "evil.bin", evil)
    with pytest.raises(InputError, match=r"evil\.bin: the pickle asks for posix\.system, which is not part of a tensor "
                                         r"checkpoint; refused"):
        read_checkpoint(ckpt)
    assert not marker.exists()
    # through a merge: refused before anything is written
    model = _model_dir(tmp_path / "m", ckpt)
    config = {"merge_method": "linear", "models": [{"model": str(model), "parameters": {"weight": 1.0}}]}
    with pytest.raises(InputError, match=r"pytorch_model\.bin: the pickle asks for posix\.system"):
        ferromerge.run(config, tmp_path / "out", quiet=True)
    assert not marker.exists() and not (tmp_path / "out").exists()
    # the same pickle without the zip (a legacy checkpoint) is refused unread
    (tmp_path / "legacy.bin").write_bytes(evil)
    with pytest.raises(InputError, match=r"legacy\.bin: a legacy PyTorch pickle .* torch\.save\(torch\.load\(path, "
                                         r"weights_only=True\), path\)"):
        read_checkpoint(tmp_path / "legacy.bin")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("obj", "global_name"),
    [
        (eval, "(__builtin__|builtins)\\.eval"),
        (io.FileIO, "_io.FileIO"),
        (np.zeros, "numpy"),
    ],
)
def test_any_other_global_is_refused(tmp_path: Path, obj: object, global_name: str) -> None:
    ckpt = _zip_checkpoint(tmp_path / "x.bin", pickle.dumps({"w": obj}, protocol=2))
    with pytest.raises(InputError, match=rf"x\.bin: the pickle asks for {global_name}"):
        read_checkpoint(ckpt)


def test_not_a_state_dict_is_refused(tmp_path: Path) -> None:
    ckpt = _zip_checkpoint(tmp_path / "x.bin", pickle.dumps({"w": [1, 2]}, protocol=2))
    with pytest.raises(InputError, match=r"x\.bin: entry 'w' is a list, not a tensor"):
        read_checkpoint(ckpt)
    ckpt = _zip_checkpoint(tmp_path / "y.bin", pickle.dumps(["w"], protocol=2))
    with pytest.raises(InputError, match=r"y\.bin: holds a list, not a state dict"):
        read_checkpoint(ckpt)
    (tmp_path / "z.bin").write_bytes(b"hello")
    with pytest.raises(InputError, match=r"z\.bin: not a PyTorch checkpoint"):
        read_checkpoint(tmp_path / "z.bin")
    with zipfile.ZipFile(tmp_path / "w.bin", "w") as z:
        z.writestr("something.txt", "x")
    with pytest.raises(InputError, match=r"w\.bin: a zip archive without one <archive>/data\.pkl"):
        read_checkpoint(tmp_path / "w.bin")


def test_legacy_and_compressed_checkpoints_are_refused(tmp_path: Path) -> None:
    torch = _torch()
    state = {"w": torch.ones(3)}
    torch.save(state, tmp_path / "legacy.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(InputError, match=r"legacy\.bin: a legacy PyTorch pickle \(written by torch < 1\.6"):
        read_checkpoint(tmp_path / "legacy.bin")
    torch.save(state, tmp_path / "ok.bin")
    with zipfile.ZipFile(tmp_path / "ok.bin") as src, zipfile.ZipFile(tmp_path / "deflated.bin", "w",
                                                                       zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    with pytest.raises(InputError, match=r"deflated\.bin: tensor w: its storage .* is compressed or encrypted"):
        read_checkpoint(tmp_path / "deflated.bin")


def test_sharded_index_errors(family_f32: Family, tmp_path: Path) -> None:
    model = _save_bin(family_f32.base, tmp_path / "m", shards=2)
    (model / "pytorch_model-00002-of-00002.bin").unlink()
    with pytest.raises(InputError, match=r"pytorch_model\.bin\.index\.json: names shard pytorch_model-00002-of-00002"
                                         r"\.bin, but .* does not exist"):
        index_model(str(model), tmp_path / "cache")
    # without a cache (extract-lora, compress) pickles are refused with how to convert
    with pytest.raises(InputError, match="only PyTorch .bin weights, which only merges"):
        index_model(str(model))


def test_safetensors_win_over_pickles(family_f32: Family, tmp_path: Path) -> None:
    """As in transformers and mergekit: a directory with both is read from its safetensors."""
    model = _save_bin(family_f32.base, tmp_path / "m")
    shutil.copy(family_f32.base / "model.safetensors", model / "model.safetensors")
    index = index_model(str(model), tmp_path / "cache")
    assert not isinstance(index, PickledModelIndex) and index.files == (model / "model.safetensors",)


def test_a_pickled_model_under_a_lora_is_refused_with_how_to_convert(family_f32: Family, tmp_path: Path) -> None:
    model = _save_bin(family_f32.base, tmp_path / "m")
    (tmp_path / "adapter").mkdir()
    config = {"merge_method": "linear", "models": [{"model": f"{model}+{tmp_path / 'adapter'}",
                                                    "parameters": {"weight": 1.0}}]}
    with pytest.raises(InputError, match=r"only PyTorch \.bin weights, .* not as the model of a model\+lora reference; "
                                         r"convert them with transformers"):
        ferromerge.plan(config)
