"""The method index of docs/architecture.md ("Method index") against the code, so that it cannot go stale: every
registry method has exactly one row, and every file and function a row names exists — the Rust kernel function
(``fn NAME`` in its file), the registry row's kernel name and base role, the NumPy reference function (imported),
and the test function (a top-level ``def`` of its test module, read with ``ast``: test modules are never imported
by other test code)."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from ferromerge.methods import REGISTRY

ROOT = Path(__file__).resolve().parents[2]
ARCHITECTURE = ROOT / "docs" / "architecture.md"
KERNELS = ROOT / "rust" / "core" / "src" / "merge" / "methods"
TESTS = ROOT / "tests"

#: | `method` | `file.rs`: `fn` | `kernel`, base | `module.fn` | `path.py::test_fn` |
ROW = re.compile(
    r"^\| `(?P<method>\w+)` \| `(?P<rust_file>[\w/]+\.rs)`: `(?P<rust_fn>\w+)` \| `(?P<kernel>\w+)`, (?P<base>\w+) "
    r"\| `(?P<ref_module>\w+)\.(?P<ref_fn>\w+)` \| `(?P<test_file>[\w/]+\.py)::(?P<test_fn>\w+)` \|$"
)


def index_rows() -> list[dict[str, str]]:
    text = ARCHITECTURE.read_text(encoding="utf-8")
    section = text.split("\n## Method index\n", 1)
    assert len(section) == 2, "docs/architecture.md has no '## Method index' section"
    body = section[1].split("\n## ", 1)[0]
    table = [line for line in body.splitlines() if line.startswith("| `")]
    rows = []
    for line in table:
        m = ROW.match(line)
        assert m, f"docs/architecture.md: a method index row does not have the expected form: {line!r}"
        rows.append(m.groupdict())
    return rows


ROWS = index_rows()


def test_every_registry_method_has_exactly_one_row() -> None:
    methods = [r["method"] for r in ROWS]
    assert sorted(methods) == sorted(set(methods)), "a method has two rows"
    assert set(methods) == set(REGISTRY), (
        f"missing rows: {sorted(set(REGISTRY) - set(methods))}; rows of unknown methods: "
        f"{sorted(set(methods) - set(REGISTRY))}")


@pytest.mark.parametrize("row", ROWS, ids=[r["method"] for r in ROWS])
def test_the_rust_kernel_function_exists(row: dict[str, str]) -> None:
    path = KERNELS / row["rust_file"]
    assert path.is_file(), f"{row['method']}: {path.relative_to(ROOT)} does not exist"
    source = path.read_text(encoding="utf-8")
    assert re.search(rf"\bfn {row['rust_fn']}\s*[(<]", source), (
        f"{row['method']}: no `fn {row['rust_fn']}` in {path.relative_to(ROOT)}")


@pytest.mark.parametrize("row", ROWS, ids=[r["method"] for r in ROWS])
def test_the_registry_row_matches(row: dict[str, str]) -> None:
    spec = REGISTRY[row["method"]]
    assert (spec.kernel, spec.base) == (row["kernel"], row["base"]), row["method"]


@pytest.mark.parametrize("row", ROWS, ids=[r["method"] for r in ROWS])
def test_the_reference_function_exists(row: dict[str, str]) -> None:
    module = importlib.import_module(f"reference.{row['ref_module']}")
    assert callable(getattr(module, row["ref_fn"], None)), (
        f"{row['method']}: tests/reference/{row['ref_module']}.py has no function {row['ref_fn']}")


@pytest.mark.parametrize("row", ROWS, ids=[r["method"] for r in ROWS])
def test_the_test_function_exists(row: dict[str, str]) -> None:
    path = TESTS / row["test_file"]
    assert path.is_file(), f"{row['method']}: {path.relative_to(ROOT)} does not exist"
    tree = ast.parse(path.read_text(encoding="utf-8"))
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    assert row["test_fn"] in defined, f"{row['method']}: no test function {row['test_fn']} in {row['test_file']}"
