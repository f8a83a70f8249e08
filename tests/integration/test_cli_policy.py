"""`pgguard policy check` and `pgguard policy explain` as a DBA runs them."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import psycopg

from tests.support.pgcluster import PgServer

PGGUARD = str(Path(sys.executable).parent / "pgguard")
REPO = Path(__file__).resolve().parents[2]


def run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PGGUARD, *args], capture_output=True, text=True, timeout=60, cwd=cwd or REPO
    )


def test_check_accepts_the_demo_policy() -> None:
    result = run("policy", "check", "policies/demo.yaml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "policy OK" in result.stdout


def test_check_lists_every_error_with_file_and_rule(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "version: 1\n"
        "rules:\n"
        "  - name: one\n"
        "    match: {classes: [writes]}\n"
        "    action: deny\n"
        "  - name: two\n"
        "    action: maybe\n"
    )
    never = tmp_path / "never.yaml"
    never.write_text(
        "version: 1\nrules:\n  - name: empty-groups\n    when: {groups: []}\n    action: deny\n"
    )
    result = run("policy", "check", str(bad), str(never), "--json")
    assert result.returncode == 1
    report = json.loads(result.stdout)
    errors = " ".join(json.dumps(e) for e in report["errors"])
    assert "bad.yaml" in errors and "one" in errors and "two" in errors
    assert "writes" in errors and "maybe" in errors
    warnings = " ".join(json.dumps(w) for w in report["warnings"])
    assert "empty-groups" in warnings


def test_explain_against_a_live_catalog(pg: PgServer, tmp_path: Path) -> None:
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
        conn.execute("create schema if not exists vault")
        conn.execute("create table if not exists vault.keys (id int, secret text)")
        conn.execute(
            "create or replace function public.touch() returns int language sql volatile"
            " as 'select 1'"
        )
    config = tmp_path / "pgguard.yaml"
    config.write_text(f"policies: [{REPO / 'policies' / 'demo.yaml'}]\n")
    dsn = pg.superuser_app_dsn()
    result = run(
        "policy",
        "explain",
        "--config",
        str(config),
        "--as",
        "bot",
        "--groups",
        "ai-agents",
        "--dsn",
        dsn,
        "select touch(), k.secret from vault.keys k",
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "decision: deny" in out
    assert "class: function" in out
    assert "vault.keys" in out and "public.touch" in out
    allowed = run(
        "policy",
        "explain",
        "--config",
        str(config),
        "--as",
        "dana",
        "--groups",
        "dba",
        "--dsn",
        dsn,
        "select count(*) from vault.keys",
    )
    assert "decision: allow" in allowed.stdout
