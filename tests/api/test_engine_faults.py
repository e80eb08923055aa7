"""The engine's contracts through the extension (CONTRACTS R1-R5), with plans written by hand: non-float tensors
copied byte for byte, NaN/Inf refused unless the plan allows them, a shard truncated or rewritten during the run
reported by file (and tensor) before ``execute`` returns, and each finished shard reported with zlib's CRC-32."""

from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

import numpy as np
import pytest

_engine = pytest.importorskip("ferromerge._engine")
from ferromerge.errors import InputError  # noqa: E402


def _write(path: Path, tensors: dict[str, tuple[str, list[int], bytes]]) -> None:
    """A safetensors file of raw tensors ``{name: (dtype, shape, bytes)}``, written by hand (any dtype)."""
    header, pos = {}, 0
    for name, (dtype, shape, data) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [pos, pos + len(data)]}
        pos += len(data)
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(len(h).to_bytes(8, "little") + h + b"".join(t[2] for t in tensors.values()))


def _f32(n: int, value: float = 1.0) -> bytes:
    return np.full(n, value, np.float32).tobytes()


def _linear(tmp: Path, names: list[str], n: int, **top: object) -> str:
    tensors = [
        {"name": t, "shape": [n], "out_dtype": "float32", "method": {"name": "linear"},
         "inputs": [{"file": str(tmp / "a.safetensors"), "tensor": t, "weight": 0.5},
                    {"file": str(tmp / "b.safetensors"), "tensor": t, "weight": 0.5}]}
        for t in names
    ]
    return json.dumps({**top, "shards": [{"file": "out.safetensors", "tensors": tensors}]})


def test_non_float_tensor_is_copied_byte_for_byte(tmp_path):
    ids = np.arange(-3, 7, dtype=np.int64)
    _write(tmp_path / "a.safetensors", {"ids": ("I64", [10], ids.tobytes()), "w": ("F32", [4], _f32(4))})
    a = str(tmp_path / "a.safetensors")
    plan = {"shards": [{"file": "out.safetensors", "tensors": [
        {"name": "ids", "shape": [10], "out_dtype": "int64", "method": {"name": "passthrough"},
         "inputs": [{"file": a, "tensor": "ids", "weight": 1.0}]},
        {"name": "w", "shape": [4], "out_dtype": "bfloat16", "method": {"name": "linear"},
         "inputs": [{"file": a, "tensor": "w", "weight": 1.0}]},
    ]}]}
    out = tmp_path / "out"
    out.mkdir()
    _engine.execute(json.dumps(plan), str(out))
    assert _engine.read_header(str(out / "out.safetensors"))["ids"] == ("I64", [10])
    raw = (out / "out.safetensors").read_bytes()
    assert ids.tobytes() in raw
    # Merging it is refused, naming the file and the tensor.
    plan["shards"][0]["tensors"][0]["method"] = {"name": "ties"}
    with pytest.raises(InputError, match=r"a\.safetensors: tensor 'ids': dtype I64 is not merged"):
        _engine.execute(json.dumps(plan), str(out))


def test_nonfinite_refused_unless_the_plan_allows_it(tmp_path):
    bad = np.ones(8, np.float32)
    bad[[1, 5]] = [np.nan, np.inf]
    _write(tmp_path / "a.safetensors", {"w": ("F32", [8], _f32(8))})
    _write(tmp_path / "b.safetensors", {"w": ("F32", [8], bad.tobytes())})
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(InputError) as e:
        _engine.execute(_linear(tmp_path, ["w"], 8), str(out))
    assert str(e.value) == (f"{tmp_path / 'b.safetensors'}: tensor 'w': 1 NaN and 1 infinite values; pass "
                            "--allow-nonfinite (allow_nonfinite=True) to merge them as they are")
    _engine.execute(_linear(tmp_path, ["w"], 8, allow_nonfinite=True), str(out))
    got = np.frombuffer((out / "out.safetensors").read_bytes()[-32:], np.float32)
    assert np.isnan(got[1]) and got[5] == np.inf and got[0] == 1.0


def _bf16(values: list[float]) -> np.ndarray:
    return (np.array(values, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _passthrough_plan(path: Path, weight: float = 1.0, out_dtype: str = "bfloat16", **top: object) -> str:
    # what the Python registry plans for mergekit's passthrough: linear over one input, weight = scale, no normalize
    return json.dumps({"shards": [{"file": "out.safetensors", "tensors": [
        {"name": "w", "shape": [6], "out_dtype": out_dtype, "method": {"name": "linear", "normalize": False},
         "inputs": [{"file": str(path), "tensor": "w", "weight": weight}]}]}], **top})


def test_unscaled_passthrough_of_a_float_tensor_is_a_byte_copy(tmp_path):
    """mergekit's passthrough returns the tensor as it is, so every bit pattern survives, −0.0 included (a sum
    started from +0.0, as the linear kernel's is, would make it +0.0); NaN and infinities are still refused, naming
    the file and the tensor, unless the plan allows them (then copied as they are). A scale or another dtype merges."""
    bits = _bf16([-0.0, 1.5, -0.0, 3.25e-3, -7.0, 0.0])
    _write(tmp_path / "a.safetensors", {"w": ("BF16", [6], bits.tobytes())})
    out = tmp_path / "out"
    out.mkdir()
    _engine.execute(_passthrough_plan(tmp_path / "a.safetensors"), str(out))
    assert (out / "out.safetensors").read_bytes()[-12:] == bits.tobytes()

    bad = bits.copy()
    bad[1], bad[4] = 0x7FC1, 0xFF80  # a NaN with a payload, −inf
    _write(tmp_path / "b.safetensors", {"w": ("BF16", [6], bad.tobytes())})
    with pytest.raises(InputError) as e:
        _engine.execute(_passthrough_plan(tmp_path / "b.safetensors"), str(out))
    assert str(e.value) == (f"{tmp_path / 'b.safetensors'}: tensor 'w': 1 NaN and 1 infinite values; pass "
                            "--allow-nonfinite (allow_nonfinite=True) to merge them as they are")
    _engine.execute(_passthrough_plan(tmp_path / "b.safetensors", allow_nonfinite=True), str(out))
    assert (out / "out.safetensors").read_bytes()[-12:] == bad.tobytes()

    # scale 2: merged as mergekit's `tensor * scale`, the sign of a zero kept; into float32: the values widened
    _engine.execute(_passthrough_plan(tmp_path / "a.safetensors", weight=2.0), str(out))
    got = np.frombuffer((out / "out.safetensors").read_bytes()[-12:], np.uint16)
    np.testing.assert_array_equal(got, _bf16([-0.0, 3.0, -0.0, 6.5e-3, -14.0, 0.0]))
    _engine.execute(_passthrough_plan(tmp_path / "a.safetensors", out_dtype="float32"), str(out))
    wide = np.frombuffer((out / "out.safetensors").read_bytes()[-24:], np.float32)
    np.testing.assert_array_equal(wide, (bits.astype(np.uint32) << 16).view(np.float32))


def test_truncated_shard_is_an_input_error_naming_file_and_tensor(tmp_path):
    n = 100_000
    names = ["w1", "w2", "w3", "w4"]
    for f in ("a", "b"):
        _write(tmp_path / f"{f}.safetensors", {t: ("F32", [n], _f32(n)) for t in names})
    b = tmp_path / "b.safetensors"
    out = tmp_path / "out"
    out.mkdir()

    def progress(done, total, bytes_done, bytes_total):
        if done == 1:
            os.truncate(b, b.stat().st_size - 4 * n - 10)  # inside w3: w2 may be read ahead already

    with pytest.raises(InputError) as e:
        _engine.execute(_linear(tmp_path, names, n), str(out), progress=progress, threads=2)
    msg = str(e.value)
    assert str(b) in msg and "tensor 'w3'" in msg and "truncated" in msg, msg


def test_shard_rewritten_during_the_run_is_an_input_error(tmp_path):
    n = 1000
    for f in ("a", "b"):
        _write(tmp_path / f"{f}.safetensors", {t: ("F32", [n], _f32(n)) for t in ("w1", "w2")})
    b = tmp_path / "b.safetensors"
    out = tmp_path / "out"
    out.mkdir()

    def progress(done, total, bytes_done, bytes_total):
        if done == 1:  # a download or save_pretrained replacing the file
            new = tmp_path / "new.safetensors"
            new.write_bytes(b.read_bytes())
            new.replace(b)

    with pytest.raises(InputError, match=r"b\.safetensors: changed while the merge was reading it \(it was replaced"):
        _engine.execute(_linear(tmp_path, ["w1", "w2"], n), str(out), progress=progress)


def test_on_shard_done_reports_each_shard_with_zlib_crc32(tmp_path):
    n = 70_000
    names = ["w1", "w2", "w3"]
    for f, v in (("a", 1.0), ("b", 3.0)):
        _write(tmp_path / f"{f}.safetensors", {t: ("F32", [n], _f32(n, v * (k + 1))) for k, t in enumerate(names)})
    plan = json.loads(_linear(tmp_path, names, n, chunk_elems=4096))
    tensors = plan["shards"][0]["tensors"]
    plan["shards"] = [{"file": "one.safetensors", "tensors": tensors[:2]},
                      {"file": "two.safetensors", "tensors": tensors[2:]}]
    out = tmp_path / "out"
    out.mkdir()
    done: list[tuple[str, int, int]] = []
    _engine.execute(json.dumps(plan), str(out), threads=2, on_shard_done=lambda *a: done.append(a))
    assert [d[0] for d in done] == ["one.safetensors", "two.safetensors"]
    for name, size, crc in done:
        data = (out / name).read_bytes()
        assert (size, crc) == (len(data), zlib.crc32(data)), name

    def fail(*_):
        raise RuntimeError("journal full")

    with pytest.raises(RuntimeError, match="journal full"):
        _engine.execute(json.dumps(plan), str(out), on_shard_done=fail)
