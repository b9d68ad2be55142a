"""Imports go one way (DESIGN.md, Layout): entry points and ``detectors/tasks`` on top, the parts and primitives
below, and a neck or head never imports a backbone module (shared layers live in ``detectors/layers.py``)."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "detectors"
ENTRY_SCRIPTS = {"train", "evaluate", "predict"}


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (function-level imports included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def package_files(*under: str) -> list[Path]:
    return sorted(p for folder in under for p in (PACKAGE / folder).rglob("*.py"))


@pytest.mark.parametrize("path", [p for p in package_files(".") if "tasks" not in p.relative_to(PACKAGE).parts
                                  and p.name != "__main__.py"], ids=lambda p: str(p.relative_to(PACKAGE)))
def test_nothing_below_the_tasks_imports_a_task_or_an_entry_point(path):
    wrong = {m for m in imported_modules(path) if m.split(".")[:2] == ["detectors", "tasks"] or m in ENTRY_SCRIPTS}
    assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}: a command's __main__.py calls it"


@pytest.mark.parametrize("path", package_files("necks", "heads"), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_necks_and_heads_know_no_backbone(path):
    wrong = {m for m in imported_modules(path) if m.startswith("detectors.backbones")}
    assert not wrong, f"{path.relative_to(PACKAGE)} imports {sorted(wrong)}: shared layers go in detectors/layers.py"


def test_python_m_detectors_anchors_runs_the_task():
    # a malformed command line: the task's own exit status 2, after its usage line
    proc = subprocess.run([sys.executable, "-m", "detectors.anchors", "cluster"], capture_output=True, text=True,
                          cwd=PACKAGE.parent, timeout=300)
    assert proc.returncode == 2, proc.stderr
