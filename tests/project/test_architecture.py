"""The layer contract of docs/architecture.md: imports run down the layers, never in a
loop, and no module outside the tests grows past 600 lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import grimp

REPO = Path(__file__).resolve().parents[2]
MAX_LINES = 600


def test_imports_follow_the_layer_contract() -> None:
    """import-linter's contracts in pyproject.toml hold (layers; a core without I/O)."""
    lint_imports = Path(sys.executable).parent / "lint-imports"
    result = subprocess.run(
        [str(lint_imports), "--no-cache"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def test_no_module_imports_itself_through_others() -> None:
    """No import loop between two modules of metadatad, however long."""
    graph = grimp.build_graph("metadatad", cache_dir=None)
    loops = []
    for module in sorted(graph.modules):
        for imported in graph.find_modules_directly_imported_by(module):
            chain = graph.find_shortest_chain(importer=imported, imported=module)
            if chain is not None:
                loops.append((module, *chain))
    assert loops == []


def test_no_module_is_over_600_lines() -> None:
    sizes = {
        str(path.relative_to(REPO)): len(path.read_text(encoding="utf-8").splitlines())
        for folder in ("metadatad", "bench", "twisted")
        for path in (REPO / folder).rglob("*.py")
    }
    assert {name: size for name, size in sizes.items() if size > MAX_LINES} == {}


def test_test_case_name_headers_name_existing_tests() -> None:
    """``# -*- test-case-name: ... -*-`` names test modules that exist."""
    missing = {}
    for path in (REPO / "metadatad").rglob("*.py"):
        first = path.read_text(encoding="utf-8").split("\n", 1)[0]
        if "test-case-name:" not in first:
            continue
        names = first.split("test-case-name:", 1)[1].replace("-*-", "").split(",")
        for name in (n.strip() for n in names):
            if not (REPO / (name.replace(".", "/") + ".py")).is_file():
                missing[str(path.relative_to(REPO))] = name
    assert missing == {}
