"""Real checkpoints against mergekit 0.1.5: a tiny BERT (``BertForSequenceClassification``, made with transformers'
``from_config`` in the mergekit virtualenv) whose ``bert.embeddings.position_ids`` (int64, a buffer older
transformers saved and newer ones do not) is in the base only, in every model, or in a fine-tune only; and the same
models saved as PyTorch pickles (``pytorch_model.bin``), which mergekit reads with torch (and again with its own
``--lazy-unpickle``).

Both tools must write the same tensors: the buffer copied unchanged (never merged) where mergekit writes it, the
float tensors merged to within float32 rounding. Where the models hold different position_ids mergekit refuses
("Non-floating buffer ... differs between inputs"); ferromerge keeps the base's with a note (docs/compat.md).
(mergekit's ``BertModel`` definition cannot be merged at all in 0.1.5: its aliases crash the planner, hence the
classification head.)
"""

from __future__ import annotations

import json
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

import ferromerge
import helpers.mergekit
from helpers.mergekit import run_mergekit

POS = "bert.embeddings.position_ids"
VARIANTS = {"base_only": ("base",), "all": ("base", "a", "b"), "not_base": ("a",), "differ": ("base", "a", "b")}

BUILD = textwrap.dedent(
    """
    import json, shutil, sys, torch
    from pathlib import Path
    from transformers import BertConfig, BertForSequenceClassification
    from safetensors.torch import save_file
    root = Path(sys.argv[1])
    variants = json.loads(sys.argv[2])
    cfg = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=48, max_position_embeddings=40, num_labels=3,
                     architectures=["BertForSequenceClassification"])
    pos = torch.arange(40, dtype=torch.int64).unsqueeze(0)
    for i, name in enumerate(["base", "a", "b"]):
        torch.manual_seed(i)
        model = BertForSequenceClassification(cfg)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "bert.embeddings.position_ids"}
        for variant, holders in variants.items():
            for kind in ("st", "bin"):
                d = root / kind / variant / name
                d.mkdir(parents=True)
                cfg.save_pretrained(d)
                sd = dict(state)
                if name in holders:
                    sd["bert.embeddings.position_ids"] = pos * (1 + i) if variant == "differ" else pos
                if kind == "st":
                    save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
                else:
                    torch.save(sd, d / "pytorch_model.bin")
    """
)


@pytest.fixture(scope="module")
def bert(tmp_path_factory: pytest.TempPathFactory, mergekit_python_path: Path) -> Path:
    root = tmp_path_factory.mktemp("bert")

    proc = subprocess.run(
        [str(mergekit_python_path), "-c", BUILD, str(root), json.dumps(VARIANTS)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return root


def _configs(d: Path) -> dict[str, dict]:
    models = [{"model": str(d / "a"), "parameters": {"weight": 0.5, "density": 0.5}},
              {"model": str(d / "b"), "parameters": {"weight": 0.5, "density": 0.5}}]
    return {
        "linear": {"merge_method": "linear", "dtype": "float32", "models": [
            {"model": str(d / m), "parameters": {"weight": w}} for m, w in (("base", 0.5), ("a", 0.3), ("b", 0.2))]},
        "ties": {"merge_method": "ties", "base_model": str(d / "base"), "models": models, "dtype": "float32"},
        "slerp": {"merge_method": "slerp", "base_model": str(d / "base"), "dtype": "float32",
                  "models": [{"model": str(d / "base")}, {"model": str(d / "a")}], "parameters": {"t": [0, 0.5, 1]}},
        "pass": {"merge_method": "passthrough", "dtype": "float32", "slices": [
            {"sources": [{"model": str(d / "a"), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(d / "base"), "layer_range": [1, 3]}]}]},
    }


def _tensors(out: Path) -> dict[str, np.ndarray]:
    found: dict[str, np.ndarray] = {}
    for f in sorted(out.glob("*.safetensors")):
        found |= load_file(str(f))
    return found


def _compare(case: str, ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray]) -> None:
    assert set(ours) == set(theirs), f"{case}: only here {set(ours) - set(theirs)}, only mergekit's {set(theirs) - set(ours)}"
    for name, want in theirs.items():
        got = ours[name]
        assert got.dtype == want.dtype and got.shape == want.shape, f"{case}: {name}"
        if want.dtype.kind == "f":
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=f"{case}: {name}")
        else:
            assert np.array_equal(got, want), f"{case}: {name}"


@pytest.fixture(scope="module")
def merged(bert: Path, mergekit_python_path: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    work = tmp_path_factory.mktemp("mk")
    configs = {f"{kind}-{v}-{m}": cfg for kind in ("st", "bin") for v in VARIANTS
               for m, cfg in _configs(bert / kind / v).items()}
    results = run_mergekit(configs, mergekit_python_path, work)
    # the pickled models once more through mergekit's own lazy unpickler (--lazy-unpickle)
    lazy_work = tmp_path_factory.mktemp("mk-lazy")
    driver = helpers.mergekit.DRIVER
    helpers.mergekit.DRIVER = driver.replace('"--random-seed", "1234"]', '"--random-seed", "1234", "--lazy-unpickle"]')
    assert "--lazy-unpickle" in helpers.mergekit.DRIVER
    try:
        lazy = run_mergekit({k: v for k, v in configs.items() if k.startswith("bin-")}, mergekit_python_path, lazy_work)
    finally:
        helpers.mergekit.DRIVER = driver
    ours: dict[str, tuple[Path, tuple[str, ...], str | None]] = {}
    for case, cfg in configs.items():
        out = work / f"fm-{case}"
        try:
            report = ferromerge.plan(cfg)
            ferromerge.run(cfg, out, quiet=True)
            ours[case] = (out, report.plan.notes, None)
        except ferromerge.MergeError as e:
            ours[case] = (out, (), f"{type(e).__name__}: {e}")
    return {"mergekit": results, "lazy": lazy, "ours": ours}


@pytest.mark.parametrize("kind", ["st", "bin"])
@pytest.mark.parametrize("variant", ["base_only", "all", "not_base"])
@pytest.mark.parametrize("method", ["linear", "ties", "slerp", "pass"])
def test_same_tensors_as_mergekit(merged: dict, kind: str, variant: str, method: str) -> None:
    case = f"{kind}-{variant}-{method}"
    _, mk_out, error = merged["mergekit"][case]
    out, notes, failed = merged["ours"][case]
    assert failed is None, failed
    if (variant, method) == ("not_base", "ties"):
        # mergekit: "Base input is not present in merge inputs"; ferromerge copies the fine-tune's (docs/compat.md)
        assert error is not None and "Base input is not present" in error
        assert np.array_equal(_tensors(out)[POS], np.arange(40).reshape(1, 40))
        return
    assert error is None, error
    _compare(case, _tensors(out), _tensors(mk_out))
    assert notes == ()
    if kind == "bin":
        _, lazy_out, lazy_error = merged["lazy"][case]
        assert lazy_error is None, lazy_error
        _compare(f"{case} (--lazy-unpickle)", _tensors(out), _tensors(lazy_out))
    # the pickled models merge exactly as their safetensors twins
    if kind == "bin":
        twin, _, _ = merged["ours"][f"st-{variant}-{method}"]
        assert {k: v.tobytes() for k, v in _tensors(out).items()} == {k: v.tobytes() for k, v in _tensors(twin).items()}


@pytest.mark.parametrize("method", ["linear", "ties", "slerp"])
def test_other_position_ids_mergekit_refuses_ferromerge_keeps_the_base(merged: dict, method: str) -> None:
    case = f"st-differ-{method}"
    _, _, error = merged["mergekit"][case]
    assert error is not None and "Non-floating buffer 'bert.embeddings.position_ids' differs between inputs" in error
    out, notes, failed = merged["ours"][case]
    assert failed is None, failed
    assert np.array_equal(_tensors(out)[POS], np.arange(40).reshape(1, 40))  # the base's (model 0 of the build)
    assert len(notes) == 1 and POS in notes[0] and "whose are kept" in notes[0]


@pytest.mark.parametrize("kind", ["st", "bin"])
def test_other_position_ids_in_a_frankenmerge_come_from_the_first_slice(merged: dict, kind: str) -> None:
    """Both tools take embedding-side tensors from the first slice's source (model a: its position_ids x2)."""
    case = f"{kind}-differ-pass"
    _, mk_out, error = merged["mergekit"][case]
    out, notes, failed = merged["ours"][case]
    assert error is None and failed is None, (error, failed)
    _compare(case, _tensors(out), _tensors(mk_out))
    assert np.array_equal(_tensors(out)[POS], 2 * np.arange(40).reshape(1, 40)) and notes == ()
