"""Clients cannot change who they are upstream: role, session authorization, pgguard.*.

Each refusal is an ERROR 42501 naming the rule, and the session stays usable; inside a
transaction block the block is failed on both sides, as PostgreSQL itself would do.
"""

from __future__ import annotations

from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.support.gateway import Gateway, MakeGateway

HOSTILE = [
    "SET ROLE postgres",
    "set local role postgres",
    "SET SESSION AUTHORIZATION postgres",
    "RESET ROLE",
    "RESET SESSION AUTHORIZATION",
    'SET U&"\\0072ole" TO postgres',
    "select set_config('role', 'postgres', false)",
    "SELECT pg_catalog.set_config('session_authorization', 'postgres', false)",
    "select set_config('pgguard.user', 'mallory', false)",
    "set pgguard.groups = 'dba'",
    'set "pgguard"."user" = mallory',
    "select 1; set role postgres",
    "/* hi */ SeT /* there */ RoLe postgres",
    "with x as (select set_config('role', 'postgres', true)) select * from x",
]


def identity_of(conn: psycopg.Connection[Any]) -> tuple[Any, ...]:
    row = conn.execute(
        "select current_user, current_setting('pgguard.user'), current_setting('pgguard.groups')"
    ).fetchone()
    assert row is not None
    return tuple(row)


@pytest.mark.parametrize("sql", HOSTILE)
@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_identity_changes_refused(gateway: Gateway, sql: str, protocol: str) -> None:
    with psycopg.connect(gateway.dsn("alice", groups=["dev"]), autocommit=True) as conn:
        before = identity_of(conn)
        cur = conn.cursor()
        with pytest.raises(errors.InsufficientPrivilege) as info:
            if protocol == "simple":
                cur.execute(sql.encode(), prepare=False)  # bytes: psycopg uses a Query message
            else:
                cur.execute(sql, prepare=True)
        assert info.value.diag.message_primary is not None
        assert info.value.diag.message_primary.startswith("pgguard: identity-guard:")
        assert identity_of(conn) == before == ("pgguard", "alice", "dev")


def test_prompt_id_may_be_set(gateway: Gateway) -> None:
    with psycopg.connect(gateway.dsn("alice"), autocommit=True) as conn:
        conn.execute("set pgguard.prompt_id = 'p-123'")
        row = conn.execute("select current_setting('pgguard.prompt_id')").fetchone()
        assert row == ("p-123",)


def test_refusal_inside_transaction_fails_the_block(gateway: Gateway) -> None:
    with psycopg.connect(gateway.dsn("alice")) as conn:
        conn.execute("select 1")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("set role postgres")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("select 1")
        conn.rollback()
        assert conn.execute("select current_user").fetchone() == ("pgguard",)


def test_multi_statement_query_with_a_refusal_runs_none(gateway: Gateway, admin: Any) -> None:
    admin.execute("drop table if exists guard_multi; create table guard_multi(x int)")
    admin.execute("grant all on guard_multi to public")
    try:
        with psycopg.connect(gateway.dsn("alice"), autocommit=True) as conn:
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(b"insert into guard_multi values (1); set role postgres")
            assert admin.execute("select count(*) from guard_multi").fetchone() == (0,)
            conn.execute(b"insert into guard_multi values (2)")
        assert admin.execute("select count(*) from guard_multi").fetchone() == (1,)
    finally:
        admin.execute("drop table if exists guard_multi")


def test_pipeline_refusal_discards_to_sync(gateway: Gateway) -> None:
    with psycopg.connect(gateway.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege), conn.pipeline():
            conn.execute("select 1")
            conn.execute("set role postgres")
            conn.execute("select 2")
        # The next pipeline works normally.
        with conn.pipeline():
            cur = conn.execute("select 3")
        assert cur.fetchone() == (3,)


@pytest.mark.parametrize(
    "options",
    ["-c role=postgres", "-c session_authorization=postgres", "-c pgguard.user=mallory"],
)
def test_startup_options_cannot_choose_identity(gateway: Gateway, options: str) -> None:
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(gateway.dsn("alice", options=options))
    assert "identity-guard" in str(info.value)


def test_role_map_cannot_be_discarded(make_gateway: MakeGateway) -> None:
    gw = make_gateway(identity={"role_map": {"analysts": "analyst"}})
    with psycopg.connect(gw.dsn("bob", groups=["analysts"]), autocommit=True) as conn:
        assert identity_of(conn)[0] == "analyst"
        for sql in ("discard all", "reset role", "set role none", "reset session authorization"):
            with pytest.raises(errors.InsufficientPrivilege):
                conn.execute(sql)
        conn.execute("reset all")
        conn.execute("discard plans")
        assert identity_of(conn) == ("analyst", "bob", "analysts")


@pytest.mark.parametrize(
    "sql",
    [
        "set standard_conforming_strings = off",
        "select set_config('standard_conforming_strings', 'off', false)",
        "set client_encoding = 'SJIS'",
        "set names 'BIG5'",
    ],
)
def test_settings_that_change_how_sql_is_read_are_refused(gateway: Gateway, sql: str) -> None:
    with psycopg.connect(gateway.dsn("alice"), autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match="sql-safety"):
            conn.execute(sql)
        row = conn.execute("show standard_conforming_strings").fetchone()
        assert row == ("on",)


@pytest.mark.parametrize(
    "params",
    [{"options": "-c standard_conforming_strings=off"}, {"client_encoding": "SJIS"}],
)
def test_startup_cannot_weaken_sql_parsing(gateway: Gateway, params: dict[str, str]) -> None:
    with pytest.raises(psycopg.OperationalError, match="sql-safety"):
        psycopg.connect(gateway.dsn("alice", **params))
