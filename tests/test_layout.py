"""The package's layout rules: the import contracts of pyproject.toml (import-linter, over
``mlet_dist`` and ``benchmarks``) hold, and they catch a forbidden import and an import circle
when one is added, in the package and in the benchmarks; the test modules and launch/ (no
packages: they import each other by name) have no import circle either; no module grows past
the size a reader can hold (docs/architecture.md)."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

# Modules allowed past MAX_LINES, each with the reason (none today).
MAX_LINES = 550
LARGE_MODULES: dict[str, str] = {}


def _lint_imports(root: Path) -> subprocess.CompletedProcess[str]:
    """Runs import-linter on the package under ``root`` with the contracts of ``root``."""
    if not LINT_IMPORTS.exists():
        pytest.fail(
            f"{LINT_IMPORTS} is missing: run `bash launch/setup.sh` (installs import-linter)"
        )
    env = {**os.environ, "PYTHONPATH": str(root)}  # the copy's package, not the installed one
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(root / "pyproject.toml"), "--no-cache"],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def _copy(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(ROOT / "pyproject.toml", root)
    for package in ("mlet_dist", "benchmarks"):
        shutil.copytree(
            ROOT / package, root / package, ignore=shutil.ignore_patterns("__pycache__", "results")
        )
    return root


def test_import_contracts_hold():
    out = _lint_imports(ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_forbidden_import_and_circle_are_caught(tmp_path):
    root = _copy(tmp_path)
    # data must never import the trainer
    init = root / "mlet_dist" / "data" / "__init__.py"
    init.write_text(init.read_text() + "\nimport mlet_dist.train  # noqa: E402, F401\n")
    # an import circle between two new sibling modules
    utils = root / "mlet_dist" / "utils"
    (utils / "circle_a.py").write_text("import mlet_dist.utils.circle_b  # noqa: F401\n")
    (utils / "circle_b.py").write_text("import mlet_dist.utils.circle_a  # noqa: F401\n")
    out = _lint_imports(root)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "data knows no model, trainer" in text and "BROKEN" in text
    assert "mlet_dist.data is not allowed to import mlet_dist.train" in text
    assert "No import circles between the modules of any package BROKEN" in text
    assert "circle_a" in text and "circle_b" in text


def test_benchmark_circle_and_package_import_are_caught(tmp_path):
    root = _copy(tmp_path)
    # the runner <-> a suite (the circle benchmarks/run.py <-> serving_bench.py had)
    suite = root / "benchmarks" / "serving_bench.py"
    suite.write_text(suite.read_text() + "\nimport benchmarks.run  # noqa: E402, F401\n")
    # the package must never import the benchmarks
    utils = root / "mlet_dist" / "utils" / "__init__.py"
    utils.write_text(utils.read_text() + "\nimport benchmarks.common  # noqa: E402, F401\n")
    out = _lint_imports(root)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text
    assert "No import circles between the benchmark modules BROKEN" in text
    assert "serving_bench -> .run" in text
    assert "The package imports nothing of the benchmarks BROKEN" in text
    assert "mlet_dist is not allowed to import benchmarks" in text
    assert "mlet_dist.utils -> benchmarks.common" in text


def _import_circles(folder: Path) -> list[list[str]]:
    """The import circles among the modules of a folder that is no package (its modules import
    each other by name, as tests/ and launch/ do): each as [a, b, ..., a]."""
    names = {p.stem for p in folder.glob("*.py")}
    graph: dict[str, set[str]] = {}
    for name in sorted(names):
        deps = set()
        for node in ast.walk(ast.parse((folder / f"{name}.py").read_text())):
            if isinstance(node, ast.Import):
                deps |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                deps.add(node.module)
        graph[name] = {d.split(".")[0] for d in deps} & names - {name}
    circles = []

    def walk(path: list[str]) -> None:
        for dep in sorted(graph[path[-1]]):
            if dep == path[0]:
                circles.append([*path, dep])
            elif dep not in path and dep > path[0]:  # each circle once, from its least module
                walk([*path, dep])

    for name in sorted(graph):
        walk([name])
    return circles


def test_no_import_circle_among_tests_and_launch(tmp_path):
    for folder in ("tests", "launch"):
        assert _import_circles(ROOT / folder) == [], folder
    (tmp_path / "test_a.py").write_text("from test_b import x\n")
    (tmp_path / "test_b.py").write_text("import os\nimport test_c\n")
    (tmp_path / "test_c.py").write_text("def f():\n    import test_a\n")
    assert _import_circles(tmp_path) == [["test_a", "test_b", "test_c", "test_a"]]


def test_no_module_past_the_size_limit():
    too_long = {}
    for path in sorted((ROOT / "mlet_dist").rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        lines = len(path.read_text().splitlines())
        if lines > MAX_LINES and rel not in LARGE_MODULES:
            too_long[rel] = lines
    assert not too_long, (
        f"modules over {MAX_LINES} lines (split them along their jobs, or add them to "
        f"LARGE_MODULES with the reason): {too_long}"
    )
    for rel in LARGE_MODULES:  # the exemptions must stay needed
        assert len((ROOT / rel).read_text().splitlines()) > MAX_LINES, rel
