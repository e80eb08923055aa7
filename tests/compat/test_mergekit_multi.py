"""``ferromerge multi`` against ``mergekit-multi`` (mergekit 0.1.5) on the tiny Llama family: the same multi-merge file
(named merges used by later ones, an unnamed final merge) gives the same intermediate and final tensors, the same
intermediate directory layout and the same model-card front matter."""

from __future__ import annotations

import json
import os
import subprocess
import textwrap
from pathlib import Path

import numpy as np
from helpers.mergekit import max_diffs, read_safetensors_dir, report_diffs

from ferromerge.model_card import front_matter
from ferromerge.multi import run_multi

DRIVER = textwrap.dedent(
    """
    import sys
    from mergekit.scripts.multimerge import main
    cfg, out, inter = sys.argv[1:4]
    main([cfg, "--out-path", out, "-I", inter, "--no-copy-tokenizer", "--quiet", "--random-seed", "1"],
         standalone_mode=False)
    """
)


def _config(family: Path) -> str:
    # the final merge is first in the file, "abc" uses "ab", the final uses both (base_model and models)
    return textwrap.dedent(
        f"""
        merge_method: slerp
        base_model: ab
        models:
          - model: ab
          - model: abc
        parameters:
          t: [0.2, 0.7]
        ---
        name: abc
        merge_method: task_arithmetic
        base_model: {family / 'base'}
        models:
          - model: ab
            parameters: {{weight: 0.7}}
          - model: {family / 'c'}
            parameters: {{weight: 0.3}}
        ---
        name: ab
        merge_method: linear
        models:
          - model: {family / 'a'}
            parameters: {{weight: 0.6}}
          - model: {family / 'b'}
            parameters: {{weight: 0.4}}
        """
    )


def test_multi_matches_mergekit_multi(family: Path, mergekit_python_path: Path, tmp_path: Path):
    config = tmp_path / "multi.yml"
    config.write_text(_config(family))
    (tmp_path / "driver.py").write_text(DRIVER)
    proc = subprocess.run(
        [str(mergekit_python_path), str(tmp_path / "driver.py"), str(config), str(tmp_path / "mk-out"),
         str(tmp_path / "mk-inter")],
        capture_output=True, text=True, env=dict(os.environ, CUDA_VISIBLE_DEVICES="", HF_HUB_OFFLINE="1"),
        timeout=1800,
    )
    assert proc.returncode == 0, f"mergekit-multi failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"

    results = run_multi(config, tmp_path / "fm-out", intermediate_dir=tmp_path / "fm-inter", copy_tokenizer=False,
                        quiet=True)
    assert [r.merge.name for r in results] == ["ab", "abc", None]
    assert sorted(p.name for p in (tmp_path / "mk-inter").iterdir()) == ["ab", "abc"]
    assert sorted(p.name for p in (tmp_path / "fm-inter").iterdir()) == ["ab", "abc"]

    for theirs, ours in [
        (tmp_path / "mk-inter" / "ab", tmp_path / "fm-inter" / "ab"),
        (tmp_path / "mk-inter" / "abc", tmp_path / "fm-inter" / "abc"),
        (tmp_path / "mk-out", tmp_path / "fm-out"),
    ]:
        mk, fm = read_safetensors_dir(theirs), read_safetensors_dir(ours)
        assert set(mk) == set(fm), ours.name
        diffs = [max_diffs(mk[k], fm[k], np.ones(mk[k].shape, bool)) for k in mk]
        abs_max, _ = report_diffs(f"multi {ours.name}", diffs)
        assert abs_max <= 1e-6, ours.name
        mk_config = json.loads((theirs / "config.json").read_text())
        assert json.loads((ours / "config.json").read_text())["num_hidden_layers"] == mk_config["num_hidden_layers"]
        # the same card metadata (mergekit's tags; ours add "ferromerge")
        mk_meta = front_matter((theirs / "README.md").read_text())
        fm_meta = front_matter((ours / "README.md").read_text())
        assert fm_meta["base_model"] == mk_meta["base_model"] == []  # local paths only
        assert fm_meta["library_name"] == mk_meta["library_name"]
        assert [t for t in fm_meta["tags"] if t != "ferromerge"] == mk_meta["tags"]
