"""A corpus of broken inputs: each fails with the right error class / exit code, a message naming the file and
tensor where there is one, and no output directory (nor a partial one) left behind."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from collections import namedtuple
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import ferromerge
from ferromerge import _engine
from ferromerge.cli import main
from ferromerge.models.index import read_tensors
from ferromerge._run import prepare
from ferromerge.synth import Family, make_family, make_model, save_model
from ferromerge.io.dtypes import from_f32

from helpers.cli import run_cli, ties_config, write_config

NORM = "model.layers.1.input_layernorm.weight"

DiskUsage = namedtuple("DiskUsage", "total used free")


@pytest.fixture
def fam(family_bf16: Family, tmp_path: Path) -> Family:
    """A private copy of the bf16 family, free to damage."""
    root = tmp_path / "models"
    shutil.copytree(family_bf16.base.parent, root)
    return Family(root / "base", [root / ft.name for ft in family_bf16.finetunes])


def leftovers(out: Path) -> list[Path]:
    return [*out.parent.glob(f".{out.name}.ferromerge-*")]


def fails(
    capsys: pytest.CaptureFixture[str],
    config: Path | dict[str, Any],
    out: Path,
    code: int,
    *fragments: str,
    args: tuple[str, ...] = (),
) -> str:
    """Run the CLI in-process; check the exit code, a single ``ferromerge: error:`` line containing every fragment,
    and that neither the output nor a partial directory exists; ``ferromerge plan`` must fail the same way (exit
    code, one line with every fragment), writing nothing. Returns the message."""
    if isinstance(config, dict):
        config = write_config(out.parent / "merge.yml", config)
    capsys.readouterr()
    assert main(["run", str(config), str(out), *args]) == code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("ferromerge: error: "), err
    for fragment in fragments:
        assert fragment in lines[0]
    assert not out.exists() and leftovers(out) == []
    assert main(["plan", str(config), str(out), *args]) == code
    planned = capsys.readouterr()
    plan_lines = planned.err.strip().splitlines()
    # every fragment rather than the exact line: where two tensors are at fault (overlapping offsets) the engine
    # names either one
    assert len(plan_lines) == 1 and plan_lines[0].startswith("ferromerge: error: ") and planned.out == "", planned
    for fragment in fragments:
        assert fragment in plan_lines[0]
    assert not out.exists() and leftovers(out) == []
    return lines[0]


def rewrite_header(path: Path, edit: Callable[[dict[str, Any]], dict[str, Any]]) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = edit(json.loads(raw[8 : 8 + n]))
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + n :])


def write_raw_safetensors(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> None:
    """Any dtype (the engine's save_file writes float dtypes only)."""
    header, blobs, offset = {}, [], 0
    for name, (dtype, array) in tensors.items():
        blob = np.ascontiguousarray(array).tobytes()
        header[name] = {"dtype": dtype, "shape": list(array.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def bf16_tensors(model: Path) -> dict[str, tuple[str, np.ndarray]]:
    return {n: ("BF16", from_f32(x, "BF16")) for n, x in read_tensors(model / "model.safetensors").items()}


# ---------------------------------------------------------------- models and files


def test_missing_model_directory(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(fam.finetunes[1])
    fails(capsys, ties_config(fam), tmp_path / "out", 1, f"directory not found: {fam.finetunes[1]}")


def test_missing_shard_named_in_the_index(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    family = make_family(tmp_path / "models", n_finetunes=1, shard_size=40_000)
    shard = sorted(family.finetunes[0].glob("model-*.safetensors"))[1]
    shard.unlink()
    fails(
        capsys,
        ties_config(family),
        tmp_path / "out",
        1,
        str(family.finetunes[0] / "model.safetensors.index.json"),
        f"names shard {shard.name}",
        str(shard),
    )


def test_index_names_a_tensor_its_shard_lacks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    family = make_family(tmp_path / "models", n_finetunes=1, shard_size=40_000)
    index_path = family.finetunes[0] / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(family.finetunes[0].glob("model-*.safetensors"))[0]
    index["weight_map"]["model.norm.weight"] = first.name
    index_path.write_text(json.dumps(index))
    fails(capsys, ties_config(family), tmp_path / "out", 1, str(index_path), "model.norm.weight", str(first))


def test_truncated_safetensors_file(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = fam.finetunes[0] / "model.safetensors"
    file.write_bytes(file.read_bytes()[:-100])
    fails(capsys, ties_config(fam), tmp_path / "out", 1, str(file))


def test_header_is_garbage(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = fam.finetunes[2] / "model.safetensors"
    raw = file.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    file.write_bytes(raw[:8] + b"{garbage!" + b" " * (n - 9) + raw[8 + n :])
    fails(capsys, ties_config(fam), tmp_path / "out", 1, str(file))


def test_header_length_larger_than_the_file(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = fam.base / "model.safetensors"
    raw = file.read_bytes()
    file.write_bytes(struct.pack("<Q", 2 * len(raw)) + raw[8:])
    fails(capsys, ties_config(fam), tmp_path / "out", 1, str(file))


def test_offsets_beyond_the_data_name_the_file_and_tensor(
    fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    file = fam.finetunes[0] / "model.safetensors"
    size = file.stat().st_size

    def edit(h: dict[str, Any]) -> dict[str, Any]:
        a, b = h[NORM]["data_offsets"]
        h[NORM]["data_offsets"] = [size + a, size + b]
        return h

    rewrite_header(file, edit)
    fails(capsys, ties_config(fam), tmp_path / "out", 1, str(file), NORM)


def test_overlapping_offsets(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    file = fam.finetunes[1] / "model.safetensors"

    def edit(h: dict[str, Any]) -> dict[str, Any]:
        h[NORM]["data_offsets"] = h["model.layers.0.input_layernorm.weight"]["data_offsets"]
        return h

    rewrite_header(file, edit)
    fails(capsys, ties_config(fam), tmp_path / "out", 1, str(file))


def test_tensor_missing_in_one_model(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = read_tensors(fam.finetunes[1] / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    (fam.finetunes[1] / "model.safetensors").unlink()
    save_model(fam.finetunes[1], tensors)
    fails(
        capsys,
        ties_config(fam),
        tmp_path / "out",
        1,
        str(fam.finetunes[1]),
        "has no tensor model.layers.1.mlp.up_proj.weight",
    )


def test_tensor_the_base_lacks(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = read_tensors(fam.finetunes[0] / "model.safetensors")
    tensors["model.extra.weight"] = np.zeros(4, np.float32)
    save_model(fam.finetunes[0], tensors)
    fails(
        capsys,
        ties_config(fam),
        tmp_path / "out",
        1,
        str(fam.finetunes[0] / "model.safetensors"),
        "model.extra.weight",
        "not in",
    )


def test_shape_mismatch(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.rmtree(fam.finetunes[2])
    make_model(fam.finetunes[2], intermediate=96)
    msg = fails(
        capsys, ties_config(fam), tmp_path / "out", 1, str(fam.finetunes[2] / "model.safetensors"), "shape [64, 96]"
    )
    assert "tensor model.layers.0.mlp.down_proj.weight" in msg and "has [64, 128]" in msg and "vocabulary" not in msg


def test_vocabulary_size_mismatch_is_named_and_never_truncated(
    fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(fam.finetunes[0])
    make_model(fam.finetunes[0], vocab=260)
    fails(
        capsys,
        ties_config(fam),
        tmp_path / "out",
        1,
        str(fam.finetunes[0] / "model.safetensors"),
        "lm_head.weight",
        "vocabulary-size mismatch (260 vs 256 tokens)",
        "align the vocabularies with tokenizer_source",
    )


@pytest.mark.parametrize(("dtype", "array"), [("I64", np.arange(64, dtype=np.int64)), ("F64", np.ones(64))])
@pytest.mark.parametrize("which", ["base", "finetune"])
def test_unsupported_dtype(
    fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str], dtype: str, array: np.ndarray, which: str
) -> None:
    model = fam.base if which == "base" else fam.finetunes[1]
    tensors = bf16_tensors(model)
    tensors[NORM] = (dtype, array)
    write_raw_safetensors(model / "model.safetensors", tensors)
    fails(capsys, ties_config(fam), tmp_path / "out", 1, str(model / "model.safetensors"), NORM, f"dtype {dtype}")


# ---------------------------------------------------------------- config


def test_unknown_method(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, {**ties_config(fam), "merge_method": "magic"}, tmp_path / "out", 2, "unknown merge method 'magic'")


def test_unknown_parameter(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # mergekit ignores it, so ferromerge warns (tests/config/test_leniency.py); --strict makes it this error
    cfg = ties_config(fam)
    cfg["models"][1]["parameters"]["densty"] = 0.3
    fails(capsys, cfg, tmp_path / "out", 2, "models[1].parameters.densty: ties has no parameter 'densty' (did you "
          "mean 'density'?)", "strict mode", args=("--strict",))


@pytest.mark.parametrize("density", [0, 1.5, -0.5])
def test_density_out_of_range(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str], density: float) -> None:
    cfg = ties_config(fam)
    cfg["models"][2]["parameters"]["density"] = density
    fails(capsys, cfg, tmp_path / "out", 2, "models[2].parameters.density: density must be in (0, 1]")


def test_missing_weight(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = ties_config(fam)
    del cfg["models"][0]["parameters"]["weight"]
    fails(capsys, cfg, tmp_path / "out", 2, f"Missing required parameter weight for {fam.finetunes[0]}")


def test_empty_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "empty.yml").write_text("")
    fails(capsys, tmp_path / "empty.yml", tmp_path / "out", 2, str(tmp_path / "empty.yml"), "empty")


def test_yaml_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "bad.yml").write_text("merge_method: ties\nmodels:\n  - model: a\n   parameters: {weight: 1}\n")
    fails(capsys, tmp_path / "bad.yml", tmp_path / "out", 2, str(tmp_path / "bad.yml"), "YAML syntax error (line 4")


def test_bad_out_shard_size(fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fails(capsys, ties_config(fam), tmp_path / "out", 2, "shard size '5X'", args=("--out-shard-size", "5X"))


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ("1MiB", "memory limit '1MiB' (1048576 bytes) is too small: at least 64 MiB"),
        ("67108863", "memory limit '67108863' (67108863 bytes) is too small: at least 64 MiB"),
        ("lots", "memory limit 'lots': expected a number of bytes"),
        ("0", "memory limit '0': must be positive"),
    ],
)
def test_bad_memory_limit(
    fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str], limit: str, message: str
) -> None:
    fails(capsys, ties_config(fam), tmp_path / "out", 2, message, args=("--memory-limit", limit))


def test_the_engine_refuses_a_memory_limit_below_64_mib(fam: Family, tmp_path: Path) -> None:
    # the engine is the authority (ferromerge.run checks first only to fail before indexing the models)
    _, plan = prepare(ties_config(fam))
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(ferromerge.ParameterError, match="too small"):
        _engine.execute(plan.to_json(), str(out), None, None, 64 * 2**20 - 1)
    assert list(out.iterdir()) == []


# ---------------------------------------------------------------- the output directory


def test_existing_output_needs_overwrite_and_overwrite_replaces_it(
    fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    config = write_config(tmp_path / "merge.yml", ties_config(fam))
    assert main(["run", str(config), str(out)]) == 1
    assert "already exists; use --overwrite" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]
    assert main(["run", str(config), str(out), "--overwrite", "--quiet"]) == 0
    assert not (out / "old.txt").exists() and (out / "model.safetensors").exists()
    assert leftovers(out) == []


def test_output_inside_an_input_model_is_refused(
    fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = write_config(tmp_path / "merge.yml", ties_config(fam))
    assert main(["run", str(config), str(fam.base.parent), "--overwrite"]) == 1
    assert "contains the input model" in capsys.readouterr().err
    assert (fam.base / "model.safetensors").exists()


def test_a_failed_run_keeps_the_existing_output(
    fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    shutil.rmtree(fam.finetunes[0])
    config = write_config(tmp_path / "merge.yml", ties_config(fam))
    assert main(["run", str(config), str(out), "--overwrite"]) == 1
    assert (out / "old.txt").read_text() == "old" and leftovers(out) == []


def test_stale_partial_directory_is_removed_and_mentioned(
    fam: Family, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / f".out.ferromerge-partial-{dead.stdout.strip()}"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"partial")
    config = write_config(tmp_path / "merge.yml", ties_config(fam))
    assert main(["run", str(config), str(tmp_path / "out")]) == 0
    assert f"removing {stale}, left by an interrupted run" in capsys.readouterr().err
    assert not stale.exists() and (tmp_path / "out" / "model.safetensors").exists()


def test_too_little_disk_space_fails_before_merging(
    fam: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _, plan = prepare(ties_config(fam))
    needed = int(plan.bytes_out * 1.01)
    asked: list[Path] = []

    def disk_usage(path: str | Path) -> DiskUsage:
        asked.append(Path(path))
        return DiskUsage(10**12, 10**12 - free, free)

    monkeypatch.setattr(shutil, "disk_usage", disk_usage)
    free = needed - 1
    out = tmp_path / "new" / "out"  # the nearest existing parent is asked
    with pytest.raises(ferromerge.OutputError) as e:
        ferromerge.run(ties_config(fam), out, quiet=True)
    assert str(out) in str(e.value) and f"needs {needed} bytes" in str(e.value)
    assert f"{tmp_path} has {free} bytes" in str(e.value)
    assert asked == [tmp_path] and not out.parent.exists()
    config = write_config(tmp_path / "merge.yml", ties_config(fam))
    capsys.readouterr()
    assert main(["run", str(config), str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("ferromerge: error: not enough disk space") and err.count("\n") == 1
    assert not out.parent.exists()
    free = needed
    assert ferromerge.run(ties_config(fam), out, quiet=True).tensors == 21


# ---------------------------------------------------------------- interruptions


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_an_exception_from_the_progress_callback_aborts_and_cleans_up(
    fam: Family, tmp_path: Path, exc: type[BaseException]
) -> None:
    calls = []

    def stop(done: int, total: int, _b: int, _bt: int) -> None:
        calls.append(done)
        if done == 5:
            raise exc("stop")

    out = tmp_path / "out"
    with pytest.raises(exc, match="stop"):
        ferromerge.run(ties_config(fam), out, quiet=True, on_progress=stop)
    assert calls == [1, 2, 3, 4, 5]
    assert not out.exists() and leftovers(out) == []


# Runs the real CLI in a fresh process, with the engine's progress hook wrapped so that the process sends itself
# a real SIGINT after the third tensor: deterministic, whatever the machine's speed.
_SIGINT_AT_TENSOR_3 = """
import os, signal, sys
import ferromerge._engine as engine
real = engine.execute
def execute(plan, out, progress=None, threads=None, memory_limit=None, external_merge=None, **kw):
    def hook(done, total, b, bt):
        if progress is not None:
            progress(done, total, b, bt)
        if done == 3:
            os.kill(os.getpid(), signal.SIGINT)
    return real(plan, out, hook, threads, memory_limit, external_merge, **kw)
engine.execute = execute
from ferromerge.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigint_during_a_cli_run_exits_130_and_leaves_nothing(fam: Family, tmp_path: Path) -> None:
    config = write_config(tmp_path / "merge.yml", ties_config(fam))
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-c", _SIGINT_AT_TENSOR_3, "run", str(config), str(out), "--threads", "1"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 130, proc.stderr
    assert "ferromerge: interrupted; no output was written" in proc.stderr and "Traceback" not in proc.stderr
    assert not out.exists() and leftovers(out) == []


def test_errors_in_a_real_process_are_one_line_without_traceback(fam: Family, tmp_path: Path) -> None:
    (fam.finetunes[0] / "model.safetensors").write_bytes(b"\x01\x00")
    config = write_config(tmp_path / "merge.yml", ties_config(fam))
    result = run_cli("run", config, tmp_path / "out")
    assert result.returncode == 1
    assert result.stderr.startswith("ferromerge: error: ") and result.stderr.count("\n") == 1
    assert str(fam.finetunes[0] / "model.safetensors") in result.stderr
    assert not (tmp_path / "out").exists()
