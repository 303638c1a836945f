"""The layout: imports flow one way, each file using only the files above it (README, tour of the files).

Run: python -m pytest tests/test_layout.py -q   (a second: it only parses the files)
"""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
ORDER = ["data", "llava", "attention", "model", "strategies", "pictures", "eval", "runner", "train",
         "study"]  # top to bottom
ALLOWED = {  # which of our files each may import; every one lies above it in ORDER
    "data": set(), "llava": {"data"}, "attention": set(), "model": {"attention"},
    "strategies": {"data", "model"}, "pictures": set(), "eval": {"data", "pictures"},
    "runner": {"data", "llava", "model", "strategies", "pictures", "eval"},
    "train": {"data", "llava", "model", "strategies", "pictures", "eval", "runner"},
    "study": {"data", "runner", "eval", "strategies", "pictures"},
}


def our_imports(name):
    """The project files that ROOT/<name>.py imports, at the top or inside a function."""
    found = set()
    for node in ast.walk(ast.parse((ROOT / f"{name}.py").read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(ORDER)


def test_every_project_file_is_in_the_layout():
    assert {p.stem for p in ROOT.glob("*.py")} == set(ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_imports_flow_one_way(name):
    assert all(ORDER.index(dep) < ORDER.index(name) for dep in ALLOWED[name])  # the table itself is one-way
    extra = our_imports(name) - ALLOWED[name]
    assert not extra, f"{name}.py imports {sorted(extra)}, which it may not (allowed: {sorted(ALLOWED[name])})"
