"""Imports run downward only (shared/DESIGN.md): cli → recipes → {teacher, prune, eval, train} →
{models, data} → losses → {signal, config, errors, utils}. Same-layer packages do not import each
other, and no recipe imports another recipe."""

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "kdkit"
LAYER = {"cli": 0, "recipes": 1, "teacher": 2, "prune": 2, "eval": 2, "train": 2,
         "models": 3, "data": 3, "losses": 4, "signal": 5, "config": 5, "errors": 6, "utils": 6}


def _imports(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kdkit."):
            yield node.module
        elif isinstance(node, ast.Import):
            yield from (a.name for a in node.names if a.name.startswith("kdkit."))


def test_imports_run_downward():
    bad = []
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        here = rel.parts[0].removesuffix(".py")
        if here not in LAYER:
            continue
        for module in _imports(path):
            there = module.split(".")[1]
            if there == here and here != "recipes":
                continue  # within one package
            if there not in LAYER:
                continue
            if LAYER[there] <= LAYER[here]:
                bad.append(f"{rel} imports {module}")
    assert not bad, "\n".join(bad)
