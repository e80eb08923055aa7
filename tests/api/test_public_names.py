"""The package's public names (``ferromerge.__all__``) load on first use (PEP 562), so that importing the package,
as every command does first, imports nothing heavy (issue 13: Ctrl-C during start-up); each name is still the
object its module defines, and what type checkers read (the ``TYPE_CHECKING`` imports) is what runs."""

from __future__ import annotations

import ast
import importlib
import subprocess
import sys
from pathlib import Path

import ferromerge
from ferromerge import _engine

INIT = Path(ferromerge.__file__)


def test_importing_the_package_or_the_commands_imports_neither_numpy_nor_the_engine() -> None:
    code = ("import sys, ferromerge, ferromerge.cli, ferromerge.cli.mergekit_yaml\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'numpy' or m == 'ferromerge._core'))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == "[]"


def test_every_public_name_is_its_modules_object() -> None:
    homes: dict[str, str] = ferromerge._HOMES
    assert set(homes) == set(ferromerge.__all__) - {"__version__"}
    for name, module in homes.items():
        assert getattr(ferromerge, name) is getattr(importlib.import_module(f"ferromerge.{module}"), name), name
    assert ferromerge.__version__ == _engine.version()
    namespace: dict[str, object] = {}
    exec("from ferromerge import *", namespace)
    assert set(ferromerge.__all__) <= set(namespace) and set(ferromerge.__all__) <= set(dir(ferromerge))


def test_the_type_checking_imports_are_the_homes() -> None:
    block = next(n for n in ast.parse(INIT.read_text(encoding="utf-8")).body
                 if isinstance(n, ast.If) and isinstance(n.test, ast.Name) and n.test.id == "TYPE_CHECKING")
    imported = {a.name: n.module for n in block.body if isinstance(n, ast.ImportFrom) for a in n.names}
    assert imported == ferromerge._HOMES


def test_a_submodule_is_an_attribute_and_a_missing_name_an_attribute_error() -> None:
    code = ("import ferromerge\n"
            "assert ferromerge.config.load_config is not None\n"
            "assert not hasattr(ferromerge, 'no_such_name')\n")
    subprocess.run([sys.executable, "-c", code], check=True)
