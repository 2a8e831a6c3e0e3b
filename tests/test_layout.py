"""The package's layout rules: the import contracts of pyproject.toml (import-linter) hold, and they
catch a forbidden import and an import circle when one is added; no module grows past the size a
reader can hold (README "Layout")."""

from __future__ import annotations

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
    shutil.copytree(
        ROOT / "mlet_dist", root / "mlet_dist", ignore=shutil.ignore_patterns("__pycache__")
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
