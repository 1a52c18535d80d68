"""Every `from raysweep... import name` and `from analysis... import name` in the code, the ones
inside functions included, names something that exists: a module moved in the layout, or a
constant moved between modules, fails here rather than the first time a user runs that path
(`python -m raysweep.bench overhead` once imported TRAIN_RUNS from where it no longer was)."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
OWN = ("raysweep", "analysis")


def _imports() -> list[tuple[str, int, str, str]]:
    found = []
    for package in OWN:
        for path in sorted((REPO / package).rglob("*.py")):
            tree = ast.parse(path.read_text(), filename=str(path))
            for node in ast.walk(tree):
                if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module \
                        and node.module.split(".")[0] in OWN:
                    for alias in node.names:
                        found.append((str(path.relative_to(REPO)), node.col_offset, node.module, alias.name))
    return found


IMPORTS = _imports()


def test_the_scan_sees_the_imports_inside_functions():
    inside = [where for where, indent, _, _ in IMPORTS if indent > 0]
    assert "raysweep/bench/overhead.py" in inside and len(IMPORTS) > 100


@pytest.mark.parametrize("module", sorted({m for _, _, m, _ in IMPORTS}))
def test_every_name_imported_from_our_own_modules_exists(module):
    mod = importlib.import_module(module)
    missing = []
    for where, _, m, name in IMPORTS:
        if m != module or name == "*" or hasattr(mod, name):
            continue
        try:  # a submodule imported by name: `from raysweep import tune`
            importlib.import_module(f"{module}.{name}")
        except ModuleNotFoundError:
            missing.append(f"{where}: from {module} import {name}")
    assert not missing, "\n".join(missing)
