"""planner/ sits beside deploy: it may import engine, router, kvtransfer and proto; only deploy (and
bench, tests) import it; it never imports bench or deploy."""
from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _imports(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module.split(".")[0])
    return names


def test_planner_imports_only_lower_layers():
    for f in (ROOT / "planner").glob("*.py"):
        bad = _imports(f) & {"bench", "deploy", "prefill_node", "decode_node", "node"}
        assert not bad, f"{f.name} imports {bad}"


def test_only_deploy_imports_planner_among_product_packages():
    for pkg in ("engine", "router", "kvtransfer", "proto", "prefill_node", "decode_node", "node"):
        for f in (ROOT / pkg).rglob("*.py") if (ROOT / pkg).exists() else []:
            assert "planner" not in _imports(f), f"{f.relative_to(ROOT)} imports planner"
