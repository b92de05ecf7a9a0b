"""The "may import" column of docs/LAYOUT.md holds: import-linter's contracts ([tool.importlinter] in
pyproject.toml) over this checkout's tsdkd_plugin, function-level imports included.

The second test breaks one rule in a copy of the package and expects the same command to fail, so a
configuration that checks nothing (no contracts, or the installed package analysed instead of this
checkout) cannot pass unnoticed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    """`lint-imports` on the package under `root`; the checkout comes first on the import path, ahead
    of any installed (editable) tsdkd_plugin."""
    exe = Path(sys.executable).with_name("lint-imports")
    assert exe.is_file(), f"{exe} is missing: install the test extra (pip install -e '.[test]')"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (str(root), os.environ.get("PYTHONPATH")))))
    return subprocess.run(
        [str(exe), "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_layer_contracts_are_kept():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "0 broken" in result.stdout


def test_a_forbidden_import_breaks_its_contract(tmp_path):
    shutil.copytree(REPO / "tsdkd_plugin", tmp_path / "tsdkd_plugin", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    chunking = tmp_path / "tsdkd_plugin" / "objective" / "chunking.py"
    chunking.write_text(chunking.read_text() + "\n\ndef _violation():\n    import ray  # noqa: F401\n")
    result = lint_imports(tmp_path)
    assert result.returncode != 0, result.stdout[-4000:]
    assert "tsdkd_plugin.objective is not allowed to import ray" in result.stdout, result.stdout[-4000:]
