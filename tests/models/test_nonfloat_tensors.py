"""Non-float tensors (int64 ``position_ids``, bool masks, ...): copied from the base, else from the first model that
has one, never merged; models without them are fine; other values are a note and the base's value is kept
(docs/compat.md; the differential test against mergekit is tests/compat/test_mergekit_checkpoints.py)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import ferromerge
from ferromerge import InputError
from ferromerge.synth import Family

POS = "model.embeddings.position_ids"  # an embedding-side (pre-layer) tensor, as in BERT
MASK = "model.layers.1.self_attn.causal_mask"
POSITIONS = np.arange(16, dtype=np.int64).reshape(1, 16)
CAUSAL = np.tril(np.ones((4, 4), dtype=np.bool_))


def _copy(family: Family, root: Path, extra: dict[str, dict[str, np.ndarray]]) -> dict[str, Path]:
    """The family's base and first two fine-tunes under ``root``, each with its ``extra`` tensors added."""
    out = {}
    for name, src in (("base", family.base), ("a", family.finetunes[0]), ("b", family.finetunes[1])):
        dst = root / name
        shutil.copytree(src, dst)
        tensors = load_file(str(dst / "model.safetensors"))
        tensors.update(extra.get(name, {}))
        save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
        out[name] = dst
    return out


def _ties(m: dict[str, Path]) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(m["base"]),
        "models": [{"model": str(m[k]), "parameters": {"weight": 0.5, "density": 0.5}} for k in ("a", "b")],
        "dtype": "float32",
    }


def _linear(m: dict[str, Path], order: tuple[str, ...] = ("base", "a", "b")) -> dict:
    return {"merge_method": "linear", "models": [{"model": str(m[k]), "parameters": {"weight": 1.0}} for k in order]}


def _planned(config: dict, name: str) -> dict:
    plan = json.loads(ferromerge.plan(config).plan.to_json())
    (found,) = [t for s in plan["shards"] for t in s["tensors"] if t["name"] == name]
    return found


def _sources(config: dict, name: str) -> list[str]:
    return [str(Path(i["file"]).parent) for i in _planned(config, name)["inputs"]]


def test_copied_from_the_base_in_its_own_dtype(family_f32: Family, tmp_path: Path) -> None:
    m = _copy(family_f32, tmp_path, {k: {POS: POSITIONS} for k in ("base", "a", "b")})
    t = _planned(_ties(m), POS)
    assert t["out_dtype"] == "I64" and t["shape"] == [1, 16]
    assert t["cast_dtype"] is None and t["base"] is None
    assert [(i["weight"], i["density"]) for i in t["inputs"]] == [(1.0, 1.0)]
    assert _sources(_ties(m), POS) == [str(m["base"])]
    assert t["method"]["name"] == "linear" and t["method"]["normalize"] is False
    report = ferromerge.plan(_ties(m))
    assert report.plan.notes == () and not [n for n in report.summary()["notes"] if POS in n]


@pytest.mark.parametrize("holders", [("base",), ("a",), ("b",), ("a", "b")])
def test_present_in_only_some_models(family_f32: Family, tmp_path: Path, holders: tuple[str, ...]) -> None:
    m = _copy(family_f32, tmp_path, {k: {POS: POSITIONS} for k in holders})
    # the base when it has it, else the first model in config order
    want = str(m["base"]) if "base" in holders else str(m[holders[0]])
    assert _sources(_ties(m), POS) == [want]
    # linear has no base: the config's first model (the reference) leads, then config order
    assert _sources(_linear(m, ("b", "a", "base")), POS) == [str(m["b" if "b" in holders else holders[0]])]


def test_other_values_are_a_note_and_the_base_wins(family_f32: Family, tmp_path: Path) -> None:
    m = _copy(family_f32, tmp_path, {"base": {POS: POSITIONS}, "a": {POS: POSITIONS[:, ::-1].copy()},
                                     "b": {POS: POSITIONS}})
    report = ferromerge.plan(_ties(m))
    assert _sources(_ties(m), POS) == [str(m["base"])]
    (note,) = report.plan.notes
    assert POS in note and repr(str(m["a"])) in note and repr(str(m["b"])) not in note
    assert f"than {str(m['base'])!r}, whose are kept" in note
    assert note in report.summary()["notes"] and f"note: {note}" in report.lines()


def test_another_shape_or_dtype_is_a_note_too(family_f32: Family, tmp_path: Path) -> None:
    m = _copy(family_f32, tmp_path, {"base": {POS: POSITIONS}, "a": {POS: POSITIONS.astype(np.int32)},
                                     "b": {POS: POSITIONS[:, :8].copy()}})
    (note,) = ferromerge.plan(_ties(m)).plan.notes
    assert repr(str(m["a"])) in note and repr(str(m["b"])) in note


def test_a_float_tensor_missing_from_a_model_is_still_an_error(family_f32: Family, tmp_path: Path) -> None:
    m = _copy(family_f32, tmp_path, {"a": {"model.extra.weight": np.ones(3, np.float32)}})
    with pytest.raises(InputError, match="model.extra.weight .* ferromerge does not drop tensors silently"):
        ferromerge.plan(_ties(m))


def test_slices_carry_layer_buffers_present_in_some_sources(family_f32: Family, tmp_path: Path) -> None:
    m = _copy(family_f32, tmp_path, {"a": {MASK: CAUSAL, POS: POSITIONS}, "b": {POS: POSITIONS[:, ::-1].copy()}})
    config = {
        "merge_method": "slerp",
        "base_model": str(m["base"]),
        "slices": [{"sources": [{"model": str(m["base"]), "layer_range": [0, 2]},
                                {"model": str(m["a"]), "layer_range": [0, 2]}]}],
        "parameters": {"t": 0.5},
        "dtype": "float32",
    }
    assert _sources(config, MASK) == [str(m["a"])]
    assert _planned(config, MASK)["out_dtype"] == "BOOL"
    assert _sources(config, POS) == [str(m["a"])]  # the base lacks it: the slice's other source has it
    # a frankenmerge: pre-layer tensors come from the first slice's sources only (as mergekit plans them)
    frank = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(m["b"]), "layer_range": [0, 2]}]},
                   {"sources": [{"model": str(m["a"]), "layer_range": [1, 2]}]}],
    }
    assert _sources(frank, POS) == [str(m["b"])]
    assert _sources(frank, "model.layers.2.self_attn.causal_mask") == [str(m["a"])]
    names = [t.name for t in ferromerge.plan(frank).plan.tensors]
    assert "model.layers.1.self_attn.causal_mask" not in names


def test_merged_output_holds_the_bytes(family_f32: Family, tmp_path: Path) -> None:
    """End to end (the engine's copy, CONTRACTS R1): the output holds the base's tensor byte for byte and the
    float tensors merged as without it; config.json keeps the float dtype."""
    m = _copy(family_f32, tmp_path / "in", {"base": {POS: POSITIONS, MASK: CAUSAL}, "a": {POS: POSITIONS[:, ::-1].copy()}})
    ferromerge.run(_ties(m), tmp_path / "out", quiet=True)
    out = load_file(str(tmp_path / "out" / "model.safetensors"))
    assert out[POS].dtype == np.int64 and np.array_equal(out[POS], POSITIONS)
    assert out[MASK].dtype == np.bool_ and np.array_equal(out[MASK], CAUSAL)
    plain = {k: tmp_path / "plain" / k for k in m}
    for k, src in zip(("base", "a", "b"), (family_f32.base, family_f32.finetunes[0], family_f32.finetunes[1]),
                      strict=True):
        shutil.copytree(src, plain[k])
    ferromerge.run(_ties(plain), tmp_path / "out-plain", quiet=True)
    ref = load_file(str(tmp_path / "out-plain" / "model.safetensors"))
    assert set(out) == set(ref) | {POS, MASK}
    for k, v in ref.items():
        assert out[k].tobytes() == v.tobytes(), k
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype")) == "float32"


def test_a_dtype_that_cannot_be_copied_is_an_error(family_f32: Family, tmp_path: Path) -> None:
    """Sub-byte and exotic safetensors float dtypes (F8_E8M0 here) are neither merged nor copied: an error naming the
    file, tensor and dtype, never a traceback."""
    from ferromerge.io.writer import header_bytes

    m = _copy(family_f32, tmp_path, {})
    odd = m["base"] / "model-odd.safetensors"
    odd.write_bytes(header_bytes([("model.embeddings.scales", "F8_E8M0", [2], 0, 2)], {"format": "pt"}) + b"\0\0")
    tensors = load_file(str(m["base"] / "model.safetensors"))
    (m["base"] / "model.safetensors").rename(m["base"] / "model-main.safetensors")
    weight_map = {n: "model-main.safetensors" for n in tensors} | {"model.embeddings.scales": "model-odd.safetensors"}
    (m["base"] / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(InputError, match=r"model-odd\.safetensors: tensor model\.embeddings\.scales has dtype F8_E8M0; "
                                         "ferromerge merges F32, F16 and BF16 tensors only"):
        ferromerge.plan(_ties(m))


def test_a_buffer_that_is_a_float_in_another_model_is_an_error(family_f32: Family, tmp_path: Path) -> None:
    """int64 in the base and float32 in a fine-tune: neither a merge nor a copy is right; the error names both."""
    m = _copy(family_f32, tmp_path, {})
    tensors = load_file(str(m["base"] / "model.safetensors"))
    name = next(n for n in sorted(tensors) if n.endswith("norm.weight"))
    tensors[name] = np.arange(tensors[name].size, dtype=np.int64).reshape(tensors[name].shape)
    save_file(tensors, str(m["base"] / "model.safetensors"))
    with pytest.raises(InputError, match=rf"base/model\.safetensors: tensor {re.escape(name)} has dtype I64 .* holds "
                                         r"it as F32"):
        ferromerge.plan(_ties(m))
