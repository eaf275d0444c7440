"""The import contracts in pyproject.toml hold, and docs/architecture.md shows the layers they enforce."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from tests.conftest import REPO

CONTRACTS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]


def test_import_contracts_are_kept():
    lint = Path(sys.executable).parent / "lint-imports"
    done = subprocess.run([str(lint), "--no-cache"], cwd=REPO, capture_output=True, text=True)
    assert done.returncode == 0, f"an import contract is broken (pyproject.toml, docs/architecture.md):\n{done.stdout}"


def test_architecture_doc_lists_each_layer_of_the_contract():
    (layers,) = [c["layers"] for c in CONTRACTS if c["type"] == "layers"]
    doc = (REPO / "docs/architecture.md").read_text(encoding="utf-8")
    for number, layer in enumerate(layers, start=1):
        row = re.search(rf"^\| {number} \|.*$", doc, re.MULTILINE)
        assert row, f"docs/architecture.md has no row '| {number} |' for layer {layer!r}"
        listed = set(re.findall(r"`([\w.]+)`", row.group(0).split("|")[2]))
        assert listed == {m.strip() for m in layer.split(":")}, f"layer {number} in docs/architecture.md"
