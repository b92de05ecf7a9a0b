"""recipes_tools' data and evaluation modules import no other layer of the plugin and none of the
training stack: they run on an evaluation node that has lm_eval and transformers but not OpenRLHF
(docs/LAYOUT.md; the cluster-side modules, listed in recipes_tools/__init__.py, are exempt)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "tsdkd_plugin" / "recipes_tools"
LIGHT = ("prepare_data", "math_answers", "evaluate", "compare", "local_tasks")
FORBIDDEN = ("tsdkd_plugin.host", "tsdkd_plugin.cli", "tsdkd_plugin.toy", "tsdkd_plugin.objective",
             "openrlhf", "ray", "deepspeed")


def imported_modules(path: Path):
    for node in ast.walk(ast.parse(path.read_text(), str(path))):  # function-level imports too
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            yield node.module


@pytest.mark.parametrize("module", LIGHT)
def test_data_and_evaluation_tools_stay_in_their_layer(module):
    bad = [name for name in imported_modules(TOOLS / f"{module}.py")
           if any(name == f or name.startswith(f + ".") for f in FORBIDDEN)]
    assert bad == [], f"recipes_tools/{module}.py imports {bad}"
