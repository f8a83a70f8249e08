"""node-postgres against both targets (tests/node/client_check.js)."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.schema import ITEMS

from .conftest import Endpoint

NODE_DIR = Path(__file__).resolve().parents[1] / "node"


def test_node_postgres(endpoint: Endpoint) -> None:
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "pg").is_dir():
        pytest.skip("node or tests/node/node_modules missing (run `make node`)")
    proc = subprocess.run(
        [node, str(NODE_DIR / "client_check.js")],
        capture_output=True,
        text=True,
        env=endpoint.env(),
        cwd=NODE_DIR,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["param"] == {
        "rows": [{"sum": 42, "t": "ünïcødé ✓", "n": "12.50"}],
        "fields": [["sum", 23], ["t", 25], ["n", 1700]],
    }
    assert out["items"] == [
        {
            "id": it.id,
            "name": it.name,
            "price": str(it.price),
            "created": it.created.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "data": it.data,
            "blob": None if it.blob is None else it.blob.hex(),
        }
        for it in ITEMS[:3]
    ]
    assert out["named"] == [ITEMS[4].name, ITEMS[24].name]
    assert out["multi"] == [
        ["SELECT", [{"a": 1}]],
        ["SELECT", [{"b": "two"}]],
        ["SELECT", [{"c": 100}]],
    ]
    assert out["tx"] == {"in_tx": 2, "after": [3]}
    assert out["error"] == {"code": "22012", "message": "division by zero", "severity": "ERROR"}
    assert out["error_in_tx"] == "42P01"
    assert out["error_after"] == "25P02"
    assert out["alive"] == "alive"
    assert out["notification"] == {"channel": "node_channel", "payload": "from node"}
