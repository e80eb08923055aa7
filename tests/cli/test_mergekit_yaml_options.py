"""mergekit-yaml's options on ``ferromerge run``, ``ferromerge multi`` and ``ferromerge-yaml``
(``cli.mergekit_options``, ``cli.mergekit_yaml``): every flag parses, the ones that mean something here set the
same ferromerge setting, the others leave a note; ``ferromerge-yaml`` takes mergekit-yaml's arguments only.

The flags are read from mergekit's own click command when its virtualenv is present (so a flag we miss fails
here); without it, from the copy of mergekit 0.1.5's list below.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import ferromerge
from ferromerge.cli import _parser as ferromerge_parser
from ferromerge.cli import mergekit_yaml
from ferromerge.cli.mergekit_options import OPTIONS, settings
from ferromerge.synth import Family
from ferromerge.torch_spectral import torch_unavailable_reason

from helpers.cli import ties_config, write_config

DEFAULT_VENV = Path.home() / ".cache" / "ferromerge" / "mergekit-venv"

#: mergekit 0.1.5's mergekit-yaml options (name, option strings, secondary option strings, kind), from
#: mergekit/options.py's MergeOptions through add_merge_options
MERGEKIT_0_1_5 = [
    ("allow_crimes", ["--allow-crimes"], ["--no-allow-crimes"], "bool"),
    ("unsafe_truncate_embeddings", ["--unsafe-truncate-embeddings"], ["--no-unsafe-truncate-embeddings"], "bool"),
    ("transformers_cache", ["--transformers-cache"], [], "text"),
    ("lora_merge_cache", ["--lora-merge-cache"], [], "text"),
    ("lora_merge_dtype", ["--lora-merge-dtype"], [], "text"),
    ("cuda", ["--cuda"], ["--no-cuda"], "bool"),
    ("device", ["--device"], [], "text"),
    ("low_cpu_memory", ["--low-cpu-memory"], ["--no-low-cpu-memory"], "bool"),
    ("out_shard_size", ["--out-shard-size"], [], "size"),
    ("copy_tokenizer", ["--copy-tokenizer"], ["--no-copy-tokenizer"], "bool"),
    ("clone_tensors", ["--clone-tensors"], ["--no-clone-tensors"], "bool"),
    ("trust_remote_code", ["--trust-remote-code"], ["--no-trust-remote-code"], "bool"),
    ("random_seed", ["--random-seed"], [], "integer"),
    ("lazy_unpickle", ["--lazy-unpickle"], ["--no-lazy-unpickle"], "bool"),
    ("write_model_card", ["--write-model-card"], ["--no-write-model-card"], "bool"),
    ("safe_serialization", ["--safe-serialization"], ["--no-safe-serialization"], "bool"),
    ("verbosity", ["-v"], [], "count"),
    ("quiet", ["--quiet"], ["--no-quiet"], "bool"),
    ("read_to_gpu", ["--read-to-gpu"], ["--no-read-to-gpu"], "bool"),
    ("multi_gpu", ["--multi-gpu"], ["--no-multi-gpu"], "bool"),
    ("num_threads", ["--num-threads", "-j"], [], "integer"),
    ("gpu_rich", ["--gpu-rich"], [], "bool"),
    ("async_write", ["--async-write"], ["--no-async-write"], "bool"),
    ("write_threads", ["--write-threads"], [], "integer"),
]

LIST_FLAGS = """
import json
from mergekit.scripts.run_yaml import main
out = []
for p in main.params:
    if p.param_type_name != "option":
        continue
    kind = "count" if p.count else ("bool" if p.is_flag else p.type.name)
    out.append([p.name, list(p.opts), list(p.secondary_opts), kind])
print(json.dumps(out))
"""


def _mergekit_flags() -> list[tuple[str, list[str], list[str], str]]:
    env = os.environ.get("FERROMERGE_MERGEKIT_PYTHON")
    python = Path(env) if env else DEFAULT_VENV / "bin" / "python"
    if not (python.is_file() and os.access(python, os.X_OK)):
        return MERGEKIT_0_1_5
    proc = subprocess.run([str(python), "-c", LIST_FLAGS], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return [tuple(row) for row in json.loads(proc.stdout)]  # type: ignore[misc]


FLAGS = _mergekit_flags()


def _value(name: str, kind: str, tmp: Path) -> list[str]:
    samples = {"device": "cpu", "lora_merge_dtype": "bfloat16", "transformers_cache": str(tmp / "hub"),
               "lora_merge_cache": str(tmp / "lora-cache"), "out_shard_size": "1B"}
    if kind in ("bool", "count"):
        return []
    return [samples.get(name, "2")]


def _uses(tmp: Path) -> list[tuple[str, list[str]]]:
    """Every way to write every flag: each option string, and each --no- form."""
    uses = []
    for name, opts, secondary, kind in FLAGS:
        for flag in [*opts, *secondary]:
            uses.append((name, [flag, *_value(name, kind, tmp)]))
    return uses


def test_the_table_has_every_mergekit_option():
    assert [row[0] for row in FLAGS] == list(OPTIONS), "cli.mergekit_options.OPTIONS must mirror MergeOptions"
    for name, opts, _secondary, _kind in FLAGS:
        assert tuple(opts) == OPTIONS[name].flags, name


@pytest.mark.parametrize("command", ["ferromerge-yaml", "run", "multi"])
def test_every_mergekit_flag_parses(tmp_path, monkeypatch, command):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    for name, argv in _uses(tmp_path):
        if command == "ferromerge-yaml":
            args = mergekit_yaml.parser().parse_args(["c.yml", "out", *argv])
        else:
            args = ferromerge_parser().parse_args([command, "c.yml", "out", *argv])
        kwargs, notes = settings(args)
        assert set(kwargs) == {"seed", "threads", "out_shard_size", "lora_merge_cache", "quiet", "copy_tokenizer",
                               "write_model_card", "device"}, argv
        o = OPTIONS[name]
        if o.inert is not None and not argv[0].startswith("--no-") and name not in (
                "allow_crimes", "clone_tensors", "lazy_unpickle", "async_write", "safe_serialization"):
            assert any(argv[0] in n and "no effect" in n for n in notes), (argv, notes)
        if o.inert is None and name != "gpu_rich":
            assert not notes, (argv, notes)
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)


def _settings(*argv: str) -> tuple[dict, list[str]]:
    return settings(mergekit_yaml.parser().parse_args(["c.yml", "out", *argv]))


def test_flags_that_mean_something_set_ferromerge_settings(tmp_path, monkeypatch):
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    defaults, notes = _settings()
    assert defaults == {"seed": 0, "threads": None, "out_shard_size": "5B", "lora_merge_cache": None, "quiet": False,
                        "copy_tokenizer": True, "write_model_card": True, "device": None}
    assert notes == []
    assert _settings("--random-seed", "7")[0]["seed"] == 7
    assert _settings("-j", "3")[0]["threads"] == 3
    assert _settings("--num-threads", "3")[0]["threads"] == 3
    assert _settings("--cuda")[0]["device"] == "cuda"
    assert _settings("--cuda", "--device", "cpu")[0]["device"] == "cpu"  # an explicit device wins, as in mergekit
    assert _settings("--cuda", "--no-cuda")[0]["device"] is None
    assert _settings("--gpu-rich")[0]["device"] == "cuda"
    auto = "cuda" if torch_unavailable_reason("cuda") is None else "cpu"
    assert _settings("--device", "auto")[0]["device"] == auto
    assert _settings("--out-shard-size", "2M")[0]["out_shard_size"] == "2M"
    assert _settings("--lora-merge-cache", "lc")[0]["lora_merge_cache"] == "lc"
    assert _settings("--quiet")[0]["quiet"] is True
    assert _settings("--no-copy-tokenizer")[0]["copy_tokenizer"] is False
    assert _settings("--no-write-model-card")[0]["write_model_card"] is False
    _settings("--transformers-cache", str(tmp_path / "hub"))
    assert os.environ["HF_HUB_CACHE"] == str(tmp_path / "hub")
    # ferromerge run's own spellings work beside mergekit's
    args = ferromerge_parser().parse_args(["run", "c.yml", "out", "--seed", "4", "--threads", "2"])
    assert (args.seed, args.threads) == (4, 2)


def test_inert_flags_say_why_and_defaults_say_nothing():
    _, notes = _settings("--low-cpu-memory", "--trust-remote-code", "-vv", "--no-safe-serialization",
                         "--lora-merge-dtype", "bfloat16", "--read-to-gpu", "--multi-gpu", "--write-threads", "4",
                         "--unsafe-truncate-embeddings")
    joined = "\n".join(notes)
    for flag in ("--low-cpu-memory", "--trust-remote-code", "-vv", "--no-safe-serialization",
                 "--lora-merge-dtype bfloat16", "--read-to-gpu", "--multi-gpu", "--write-threads 4",
                 "--unsafe-truncate-embeddings"):
        assert f"{flag} has no effect here: " in joined, flag
    # values that ask for what ferromerge does anyway
    _, quiet = _settings("--no-low-cpu-memory", "--no-trust-remote-code", "--safe-serialization", "--lazy-unpickle",
                         "--allow-crimes", "--clone-tensors", "--async-write", "--no-read-to-gpu")
    assert quiet == []


def test_ferromerge_yaml_takes_only_mergekit_arguments():
    for extra in (["--seed", "1"], ["--memory-limit", "1GiB"], ["--overwrite"], ["--random-se", "1"]):
        with pytest.raises(SystemExit) as e:
            mergekit_yaml.parser().parse_args(["c.yml", "out", *extra])
        assert e.value.code == 2
    with pytest.raises(SystemExit):
        mergekit_yaml.parser().parse_args(["c.yml"])  # OUT_PATH is required


def test_ferromerge_yaml_merges_as_ferromerge_run(family_f32: Family, tmp_path, capsys):
    config = write_config(tmp_path / "dare.yml", ties_config(family_f32, merge_method="dare_ties"))
    out = tmp_path / "yaml"
    rc = mergekit_yaml.main([str(config), str(out), "--random-seed", "5", "--no-copy-tokenizer",
                             "--no-write-model-card", "-j", "1", "--low-cpu-memory", "--lazy-unpickle"])
    assert rc == 0
    assert "--low-cpu-memory has no effect here" in capsys.readouterr().err
    ferromerge.run(config, tmp_path / "run", seed=5, quiet=True)
    assert (out / "model.safetensors").read_bytes() == (tmp_path / "run" / "model.safetensors").read_bytes()
    assert not (out / "README.md").exists() and (tmp_path / "run" / "README.md").exists()
    assert not (out / "tokenizer.json").exists() and (tmp_path / "run" / "tokenizer.json").exists()
    # the seed reaches the merge: another seed gives other DARE masks
    assert mergekit_yaml.main([str(config), str(tmp_path / "seed6"), "--random-seed", "6", "--quiet"]) == 0
    assert (tmp_path / "seed6" / "model.safetensors").read_bytes() != (out / "model.safetensors").read_bytes()
    # errors go through ferromerge's handler: one line, exit 1 for an existing output
    assert mergekit_yaml.main([str(config), str(out), "--quiet"]) == 1
    assert "already exists" in capsys.readouterr().err


def test_transformers_cache_is_where_org_name_models_are_found(family_f32: Family, tmp_path):
    hub = tmp_path / "hub"
    commit = "0" * 40
    repo = hub / "models--org--base"
    shutil.copytree(family_f32.base, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    cfg = ties_config(family_f32)
    cfg["base_model"] = "org/base"
    config = write_config(tmp_path / "hub.yml", cfg)
    env = dict(os.environ, HF_HUB_CACHE=str(tmp_path / "empty"), HF_HOME=str(tmp_path / "empty"))
    base = [sys.executable, "-m", "ferromerge.cli", "run", str(config)]
    proc = subprocess.run([*base, str(tmp_path / "a"), "--quiet"], capture_output=True, text=True, env=env,
                          timeout=300)
    assert proc.returncode == 1 and "org/base" in proc.stderr
    proc = subprocess.run([*base, str(tmp_path / "b"), "--quiet", "--transformers-cache", str(hub)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    card = (tmp_path / "b" / "README.md").read_text()
    assert "base_model:\n- org/base\n" in card


def test_no_copy_tokenizer_with_a_chat_template_says_so(family_f32: Family, tmp_path, capsys):
    config = write_config(tmp_path / "t.yml", ties_config(family_f32, chat_template="chatml"))
    ferromerge.run(config, tmp_path / "out", copy_tokenizer=False)
    assert "chat_template not written: the tokenizer is not copied" in capsys.readouterr().err
    assert not (tmp_path / "out" / "tokenizer_config.json").exists()


def test_help_lists_mergekit_options_as_a_group(capsys):
    with pytest.raises(SystemExit):
        ferromerge_parser().parse_args(["run", "--help"])
    text = capsys.readouterr().out
    assert "mergekit-yaml's other options" in text and "--lazy-unpickle" in text and "--random-seed" in text
    with pytest.raises(SystemExit):
        mergekit_yaml.parser().parse_args(["--help"])
    assert "CONFIG_FILE OUT_PATH" in capsys.readouterr().out


LIST_MULTI_FLAGS = """
import json
from mergekit.scripts.multimerge import main
from mergekit.options import MergeOptions
print(json.dumps([[list(p.opts), list(p.secondary_opts)] for p in main.params
                  if p.param_type_name == "option" and p.name not in MergeOptions.model_fields]))
"""


def test_multi_takes_mergekit_multi_arguments(tmp_path):
    """mergekit-multi's own options (besides mergekit-yaml's): --out-path, -I/--intermediate-dir, --[no-]lazy."""
    env = os.environ.get("FERROMERGE_MERGEKIT_PYTHON")
    python = Path(env) if env else DEFAULT_VENV / "bin" / "python"
    flags = [[["--out-path"], []], [["--intermediate-dir", "-I"], []], [["--lazy"], ["--no-lazy"]]]
    if python.is_file() and os.access(python, os.X_OK):
        proc = subprocess.run([str(python), "-c", LIST_MULTI_FLAGS], capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-2000:]
        flags = json.loads(proc.stdout)
    for opts, secondary in flags:
        for flag in [*opts, *secondary]:
            argv = [flag] if flag.endswith("lazy") else [flag, str(tmp_path / "x")]
            args = ferromerge_parser().parse_args(["multi", "c.yml", *argv])
            assert args.func is not None
    args = ferromerge_parser().parse_args(["multi", "c.yml", "--out-path", "o", "-I", "i", "--no-lazy"])
    assert (args.out_path, args.intermediate_dir, args.lazy) == ("o", "i", False)
