"""``ferromerge multi`` / ``ferromerge.multi.run_multi`` (mergekit-multi files): dependency order, cycles, names,
where outputs go, reuse of unchanged intermediates, and ``ferromerge run`` on such a file."""

from __future__ import annotations

import json
import os
import shutil
import textwrap
from pathlib import Path

import pytest
import yaml

import ferromerge
from ferromerge.errors import ConfigError, ParameterError
from ferromerge.multi import STAMP, is_multi, load_multi, run_multi
from ferromerge.synth import Family

from helpers.cli import run_cli


def _docs(*docs: dict) -> str:
    return yaml.safe_dump_all(list(docs), sort_keys=False)


def _linear(name: str | None, a: str, b: str) -> dict:
    doc = {"merge_method": "linear", "models": [{"model": a, "parameters": {"weight": 0.5}},
                                                 {"model": b, "parameters": {"weight": 0.5}}]}
    return {"name": name, **doc} if name is not None else doc


def _ta(name: str | None, base: str, *models: str) -> dict:
    doc = {"merge_method": "task_arithmetic", "base_model": base,
           "models": [{"model": m, "parameters": {"weight": 0.5}} for m in models]}
    return {"name": name, **doc} if name is not None else doc


def _weights(d: Path) -> bytes:
    return (d / "model.safetensors").read_bytes()


def test_merges_run_in_dependency_order_and_equal_single_runs(family_f32: Family, tmp_path):
    base, ft1, ft2, ft3 = (str(p) for p in (family_f32.base, *family_f32.finetunes))
    # the final (unnamed) merge comes first in the file and uses both named ones; "mix" uses "pair"
    text = _docs(_ta(None, base, "mix", ft3), _linear("mix", "pair", ft2), _linear("pair", ft1, ft2))
    (tmp_path / "multi.yml").write_text(text)
    results = run_multi(tmp_path / "multi.yml", tmp_path / "out", quiet=True)
    assert [r.merge.name for r in results] == ["pair", "mix", None]
    inter = tmp_path / "out-intermediates"
    assert [r.merge.out for r in results] == [inter / "pair", inter / "mix", tmp_path / "out"]
    assert not any(r.reused for r in results)
    # the same merges one by one, with paths written out
    ferromerge.run(_linear(None, ft1, ft2), tmp_path / "pair", quiet=True)
    ferromerge.run(_linear(None, str(tmp_path / "pair"), ft2), tmp_path / "mix", quiet=True)
    ferromerge.run(_ta(None, base, str(tmp_path / "mix"), ft3), tmp_path / "final", quiet=True)
    assert _weights(inter / "pair") == _weights(tmp_path / "pair")
    assert _weights(inter / "mix") == _weights(tmp_path / "mix")
    assert _weights(tmp_path / "out") == _weights(tmp_path / "final")
    # each output records its config with the names replaced by paths
    saved = yaml.safe_load((inter / "mix" / "mergekit_config.yml").read_text())
    assert saved["models"][0]["model"] == str(inter / "pair")
    assert json.loads((inter / "mix" / STAMP).read_text())["name"] == "mix"


def test_unchanged_merges_are_reused_and_changes_rerun_dependents(family_f32: Family, tmp_path):
    base, ft1, ft2, ft3 = (str(p) for p in (family_f32.base, *family_f32.finetunes))
    src = tmp_path / "ft1"
    shutil.copytree(ft1, src)
    config = tmp_path / "multi.yml"
    config.write_text(_docs(_linear("pair", str(src), ft2), _ta(None, base, "pair", ft3)))
    first = run_multi(config, tmp_path / "out", quiet=True)
    assert [r.reused for r in first] == [False, False]
    stamp = (tmp_path / "out-intermediates" / "pair" / "model.safetensors").stat().st_mtime_ns
    again = run_multi(config, tmp_path / "out", quiet=True)
    assert [r.reused for r in again] == [True, True]
    assert (tmp_path / "out-intermediates" / "pair" / "model.safetensors").stat().st_mtime_ns == stamp
    # another seed changes what a run writes (the fingerprint holds the settings): both rerun
    assert [r.reused for r in run_multi(config, tmp_path / "out", quiet=True, seed=3, overwrite=True)] == [
        False, False]
    assert [r.reused for r in run_multi(config, tmp_path / "out", quiet=True, seed=3)] == [True, True]
    # an input file changes: the intermediate and what uses it run again
    weights = src / "model.safetensors"
    os.utime(weights, ns=(weights.stat().st_atime_ns, weights.stat().st_mtime_ns + 10**9))
    assert [r.reused for r in run_multi(config, tmp_path / "out", quiet=True, seed=3, overwrite=True)] == [
        False, False]
    # a changed config of the final merge alone reruns it only
    config.write_text(_docs(_linear("pair", str(src), ft2), _ta(None, base, "pair", ft3, ft1)))
    assert [r.reused for r in run_multi(config, tmp_path / "out", quiet=True, seed=3, overwrite=True)] == [
        True, False]
    # --no-lazy runs everything
    assert [r.reused for r in run_multi(config, tmp_path / "out", quiet=True, seed=3, overwrite=True,
                                        lazy=False)] == [False, False]


def test_a_changed_final_output_needs_overwrite(family_f32: Family, tmp_path):
    base, ft1, ft2, ft3 = (str(p) for p in (family_f32.base, *family_f32.finetunes))
    config = tmp_path / "multi.yml"
    config.write_text(_docs(_linear("pair", ft1, ft2), _ta(None, base, "pair", ft3)))
    run_multi(config, tmp_path / "out", quiet=True)
    with pytest.raises(ferromerge.OutputError, match="already exists"):
        run_multi(config, tmp_path / "out", quiet=True, seed=1)


def test_cycle_is_a_config_error_naming_it(tmp_path):
    config = tmp_path / "multi.yml"
    config.write_text(_docs(_linear("a", "b", "/m/x"), _linear("b", "c", "/m/y"), _linear("c", "a", "/m/z"),
                            _linear(None, "a", "/m/w")))
    with pytest.raises(ConfigError, match=r"cycle: 'a' -> 'b' -> 'c' -> 'a'"):
        load_multi(config, tmp_path / "out")
    proc = run_cli("multi", config, tmp_path / "out")
    assert proc.returncode == 2 and "cycle" in proc.stderr and "Traceback" not in proc.stderr
    config.write_text(_docs(_linear("self", "self", "/m/x")))
    with pytest.raises(ConfigError, match="cycle: 'self' -> 'self'"):
        load_multi(config, None, tmp_path / "inter")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out-intermediates").exists()


@pytest.mark.parametrize(
    ("docs", "match"),
    [
        ([_linear("a", "/m/x", "/m/y"), _linear("a", "/m/x", "/m/z")], "two merges are named 'a'"),
        ([_linear(None, "/m/x", "/m/y"), _linear(None, "/m/x", "/m/z")], "a second merge without a name"),
        ([{**_linear(None, "/m/x", "/m/y"), "name": None}, _linear(None, "/m/x", "/m/z")],
         "a second merge without a name"),
        ([_linear("a/b", "/m/x", "/m/y"), _linear(None, "/m/x", "/m/z")], "usable as a directory name"),
        ([_linear("..", "/m/x", "/m/y"), _linear(None, "/m/x", "/m/z")], "usable as a directory name"),
        ([{**_linear("a", "/m/x", "/m/y"), "name": 3}, _linear(None, "a", "/m/z")], "usable as a directory name"),
        ([_linear("a", "/m/x", "/m/y"), ["not", "a", "mapping"]], "document 2: expected a merge config"),
        ([_linear("a", "/m/x", "/m/y"), {"merge_method": "linear", "modles": []}], "the unnamed merge: models: missing"),
    ],
)
def test_malformed_files_are_config_errors_before_anything_runs(tmp_path, docs, match):
    config = tmp_path / "multi.yml"
    config.write_text(_docs(*docs))
    with pytest.raises(ConfigError, match=match):
        run_multi(config, tmp_path / "out", quiet=True)
    assert list(tmp_path.iterdir()) == [config]


def test_where_outputs_go(family_f32: Family, tmp_path):
    base, ft1, ft2, ft3 = (str(p) for p in (family_f32.base, *family_f32.finetunes))
    config = tmp_path / "multi.yml"
    config.write_text(_docs(_linear("pair", ft1, ft2), _ta("top", base, "pair", ft3)))
    # every merge named, no OUT: all go to the intermediate directory (mergekit-multi without --out-path)
    done = run_multi(config, None, intermediate_dir=tmp_path / "I", quiet=True)
    assert [r.merge.out for r in done] == [tmp_path / "I" / "pair", tmp_path / "I" / "top"]
    # every merge named, OUT given: the last document is the final merge
    done = run_multi(config, tmp_path / "final", intermediate_dir=tmp_path / "I", quiet=True)
    assert [r.merge.out for r in done] == [tmp_path / "I" / "pair", tmp_path / "final"]
    assert done[0].reused
    # an unnamed merge needs OUT; no OUT and no --intermediate-dir is an error
    config.write_text(_docs(_linear("pair", ft1, ft2), _ta(None, base, "pair", ft3)))
    with pytest.raises(ConfigError, match="give the output directory"):
        load_multi(config, None, tmp_path / "I")
    config.write_text(_docs(_linear("pair", ft1, ft2), _ta("top", base, "pair", ft3)))
    with pytest.raises(ParameterError, match="--intermediate-dir"):
        load_multi(config, None)


def test_run_detects_a_multi_file_and_multi_takes_mergekit_multi_options(family_f32: Family, tmp_path):
    base, ft1, ft2, ft3 = (str(p) for p in (family_f32.base, *family_f32.finetunes))
    config = tmp_path / "multi.yml"
    config.write_text(_docs(_linear("pair", ft1, ft2), _ta(None, base, "pair", ft3)))
    assert is_multi(config) and not is_multi(tmp_path / "missing.yml")
    proc = run_cli("run", config, tmp_path / "a", "-I", tmp_path / "inter", "--random-seed", "2")
    assert proc.returncode == 0, proc.stderr
    assert "merge 'pair': merged" in proc.stdout and "the unnamed merge: merged" in proc.stdout
    proc = run_cli("multi", config, "--out-path", tmp_path / "b", "-I", tmp_path / "inter", "--random-seed", "2",
                   "--no-write-model-card")
    assert proc.returncode == 0, proc.stderr
    # the intermediate was made with the same settings except the card: run again, the rest equal
    assert "merge 'pair': merged" in proc.stdout
    assert _weights(tmp_path / "a") == _weights(tmp_path / "b")
    assert not (tmp_path / "b" / "README.md").exists()
    proc = run_cli("multi", config, tmp_path / "b", "-I", tmp_path / "inter", "--random-seed", "2",
                   "--no-write-model-card", "--quiet")
    assert proc.returncode == 0 and proc.stdout == ""


def test_single_document_with_a_name_is_a_plain_config(family_f32: Family, tmp_path):
    doc = _linear("solo", str(family_f32.finetunes[0]), str(family_f32.finetunes[1]))
    config = tmp_path / "one.yml"
    config.write_text(textwrap.dedent(yaml.safe_dump(doc)))
    assert not is_multi(config)
    proc = run_cli("run", config, tmp_path / "out", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert not (tmp_path / "out-intermediates").exists()


def test_strict_checks_every_merge_before_the_first_runs_and_resume_is_refused(family_f32: Family, tmp_path):
    ft1, ft2 = (str(p) for p in family_f32.finetunes[:2])
    config = tmp_path / "multi.yml"
    config.write_text(_docs(_linear("pair", ft1, ft2), {**_linear(None, "pair", ft2), "parameters": {"densty": 0.5}}))
    with pytest.raises(ConfigError, match="the unnamed merge"):
        run_multi(config, tmp_path / "out", quiet=True, strict=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multi.yml"]
    with pytest.raises(ParameterError, match="resume"):
        run_multi(config, tmp_path / "out", quiet=True, resume=True)
