"""Imports run one way (DESIGN.md): the import-linter contracts in pyproject.toml hold for the
tree, and each kind of contract fails when an offending import is planted in a copy of it."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("importlinter")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ["deploy", "planner", "router", "prefill_node", "decode_node", "node", "proto", "kvtransfer", "engine", "bench"]
LINT = "from importlinter.cli import lint_imports_command; lint_imports_command()"


def _lint(root: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(root))
    return subprocess.run([sys.executable, "-c", LINT, "--config", str(root / "pyproject.toml"), "--no-cache"],
                          cwd=root, env=env, capture_output=True, text=True, timeout=300)


def test_the_tree_keeps_every_import_contract():
    res = _lint(ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "0 broken" in res.stdout


@pytest.mark.parametrize("package, planted, broken", [
    ("engine", "import deploy", "engine is not allowed to import deploy"),
    ("kvtransfer", "from node import core", "kvtransfer is not allowed to import node"),
    ("prefill_node", "import decode_node", "prefill_node is not allowed to import decode_node"),
    ("router", "import bench", "The product never imports bench BROKEN"),
    ("engine", "import grpc", "engine and kvtransfer know nothing of gRPC or the wire protocol BROKEN"),
    ("node", "import node.server", "No import cycles between the modules or subpackages of one package BROKEN"),
])
def test_a_planted_import_breaks_a_contract(tmp_path, package, planted, broken):
    for name in PACKAGES:
        shutil.copytree(ROOT / name, tmp_path / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    # node.core is imported by node.server; importing node.server back closes a cycle.
    target = tmp_path / package / ("core.py" if package == "node" else "_planted.py")
    target.write_text(target.read_text() + f"\n{planted}\n" if target.exists() else f"{planted}\n")
    res = _lint(tmp_path)
    assert res.returncode != 0
    assert broken in res.stdout, res.stdout + res.stderr
