"""Masking as operators see it: the metric, the audit record, policy check and explain,
a policy reload that adds masks to open sessions, and the session recording."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from psycopg import errors

from tests.support.gateway import MakeGateway
from tests.support.pgcluster import PgServer

from .test_admin import scrape, value
from .test_audit import eventually, statements

PGGUARD = str(Path(sys.executable).parent / "pgguard")
SECRET_EMAIL = "quincy.m2v@private-mail.test"

SCHEMA = f"""
DROP SCHEMA IF EXISTS mask_ops CASCADE;
CREATE SCHEMA mask_ops;
CREATE TABLE mask_ops.people (id int PRIMARY KEY, name text, email text, age int);
INSERT INTO mask_ops.people VALUES (1, 'Quincy', '{SECRET_EMAIL}', 41), (2, 'Rae', NULL, 35);
GRANT ALL ON SCHEMA mask_ops TO PUBLIC;
GRANT ALL ON ALL TABLES IN SCHEMA mask_ops TO PUBLIC;
"""

POLICY = """
version: 1
masks:
  - column: mask_ops.people.email
    function: partial_email
    exempt: {groups: [dba]}
"""


@pytest.fixture(scope="module", autouse=True)
def schema(pg: PgServer) -> Iterator[None]:
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
        conn.execute(SCHEMA)
    yield


def policy_file(tmp_path: Path, text: str = POLICY) -> Path:
    path = tmp_path / "masks.yaml"
    path.write_text(text)
    return path


def test_metric_audit_record_and_recording(make_gateway: MakeGateway, tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'audit.db'}"
    gw = make_gateway(
        policies=[str(policy_file(tmp_path))],
        audit={"url": url, "mode": "strict"},
        recording={"max_rows": 5, "max_bytes": 65536},
    )
    with psycopg.connect(gw.dsn("mia", groups=["developers"]), autocommit=True) as conn:
        rows = conn.execute("select id, email from mask_ops.people order by id").fetchall()
        assert rows == [(1, "q****@private-mail.test"), (2, None)]
        conn.execute("select id, name from mask_ops.people order by id").fetchall()
    samples = eventually(
        lambda: (
            s
            if value(
                s := scrape(gw)[0], "pgguard_masked_values_total", column="mask_ops.people.email"
            )
            else None
        )
    )
    assert value(samples, "pgguard_masked_values_total", column="mask_ops.people.email") == 1

    found = eventually(lambda: [r for r in statements(gw, "mia") if "email" in r.statement])
    [masked] = found
    assert masked.masked_columns == ("mask_ops.people.email",)
    clean = [r for r in statements(gw, "mia") if "name" in r.statement]
    assert clean and clean[0].masked_columns == ()
    # The session recording keeps what the client got, never the clear value.
    with open(tmp_path / "audit.db", "rb") as db:
        assert SECRET_EMAIL.encode() not in db.read()
    preview = json.dumps(masked.extra)
    assert "q****@private-mail.test" in preview


def test_exempt_identity_sees_clear_values(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = make_gateway(policies=[str(policy_file(tmp_path))])
    with psycopg.connect(gw.dsn("dana", groups=["dba"]), autocommit=True) as conn:
        row = conn.execute("select email from mask_ops.people where id = 1").fetchone()
    assert row == (SECRET_EMAIL,)


def test_reload_that_adds_masks_reaches_open_sessions(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    path = policy_file(tmp_path, "version: 1\nrules: []\n")
    gw = make_gateway(policies=[str(path)])
    with psycopg.connect(gw.dsn("mia", groups=["developers"]), autocommit=True) as conn:
        sql = "select email from mask_ops.people where id = 1"
        assert conn.execute(sql).fetchone() == (SECRET_EMAIL,)
        path.write_text(POLICY)
        gw.proc.send_signal(1)  # SIGHUP: reload
        deadline = time.monotonic() + 15
        seen: list[object] = []
        while time.monotonic() < deadline:
            try:
                got = conn.execute(sql).fetchone()
            except errors.SerializationFailure as exc:
                # The first statement after the change is refused while masking starts.
                assert "pgguard: masking" in str(exc)
                seen.append("refused")
                continue
            seen.append(got)
            if got == ("q****@private-mail.test",):
                break
            time.sleep(0.1)
        # Once the reload is in force, no clear value: first fully redacted (the catalog is
        # still loading), then the mask itself.
        first = next(i for i, v in enumerate(seen) if v != (SECRET_EMAIL,))
        assert all(v in ("refused", ("****",), ("q****@private-mail.test",)) for v in seen[first:])
        assert got == ("q****@private-mail.test",)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PGGUARD, *args], capture_output=True, text=True, timeout=60)


def test_policy_check_reports_masks_that_cannot_apply(pg: PgServer, tmp_path: Path) -> None:
    bad = policy_file(
        tmp_path,
        "version: 1\nmasks:\n  - column: mask_ops.people.age\n    function: partial_email\n",
    )
    offline = run_cli("policy", "check", str(bad))
    assert offline.returncode == 0, offline.stdout  # types are only known with a catalog
    live = run_cli("policy", "check", "--dsn", pg.superuser_app_dsn(), str(bad), "--json")
    assert live.returncode == 1, live.stdout
    report = json.loads(live.stdout)
    assert any("mask_ops.people.age" in e and "partial_email" in e for e in report["type_errors"])
    good = run_cli("policy", "check", "--dsn", pg.superuser_app_dsn(), str(policy_file(tmp_path)))
    assert good.returncode == 0, good.stdout


def test_explain_shows_masked_result_columns_and_copy_refusals(
    pg: PgServer, tmp_path: Path
) -> None:
    config = tmp_path / "pgguard.yaml"
    config.write_text(f"policies: [{policy_file(tmp_path)}]\n")
    dsn = pg.superuser_app_dsn()

    def explain(sql: str, groups: str = "developers") -> str:
        args = ("policy", "explain", "--config", str(config), "--as", "mia")
        result = run_cli(*args, "--groups", groups, "--dsn", dsn, sql)
        assert result.returncode == 0, result.stderr
        return result.stdout

    out = explain("select id, upper(email) from mask_ops.people")
    assert "result column 2 (mask_ops.people.email)" in out and "redact" in out
    out = explain("select id, email from mask_ops.people")
    assert "result column 2 (mask_ops.people.email)" in out and "partial_email" in out
    out = explain("create table mask_ops.copy as select email from mask_ops.people")
    assert "decision: deny" in out and "masking" in out
    out = explain("select id, email from mask_ops.people", groups="dba")
    assert "masked columns: none" in out


def test_keyed_masks_agree_across_replicas(make_gateway: MakeGateway, tmp_path: Path) -> None:
    """hash is deterministic with a shared secret: two gateways give the same value (joins
    across replicas still work); another secret gives another value."""
    policy = policy_file(
        tmp_path,
        "version: 1\nmasks:\n  - column: mask_ops.people.email\n    function: hash(12)\n",
    )
    sql = "select email from mask_ops.people where id = 1"
    seen = []
    for secret in ("shared-key", "shared-key", "other-key"):
        gw = make_gateway(policies=[str(policy)], env={"PGGUARD_MASKING_SECRET": secret})
        with psycopg.connect(gw.dsn("mia", groups=["developers"]), autocommit=True) as conn:
            seen.append(conn.execute(sql).fetchone())
    assert seen[0] == seen[1] != seen[2]
    assert seen[0] is not None and len(seen[0][0]) == 12 and SECRET_EMAIL not in seen[0][0]
