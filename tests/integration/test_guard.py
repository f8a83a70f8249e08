"""Guard rules through real clients: a corpus of hostile statements and their benign twins.

An AI-agent identity may not write, change schema or roles, run dangerous functions or read
vault.*, however the SQL is dressed up; ordinary reads stay allowed. Every refused write is
checked against the data directly, and every refusal leaves the session usable.
"""

from __future__ import annotations

import os
import signal
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.support.gateway import Gateway
from tests.support.pgcluster import PgServer

SCHEMA = """
DROP SCHEMA IF EXISTS vault CASCADE;
DROP TABLE IF EXISTS public.orders CASCADE;
DROP VIEW IF EXISTS public.orders_v CASCADE;
DROP SEQUENCE IF EXISTS public.order_seq;
CREATE SCHEMA vault;
CREATE TABLE vault.secrets (id int PRIMARY KEY, secret text);
INSERT INTO vault.secrets VALUES (1, 'hunter2');
CREATE TABLE public.orders (id int PRIMARY KEY, status text, total numeric);
INSERT INTO public.orders SELECT g, 'open', g * 10 FROM generate_series(1, 20) g;
CREATE VIEW public.orders_v AS SELECT id, status FROM public.orders;
CREATE SEQUENCE public.order_seq;
CREATE OR REPLACE FUNCTION public.bump() RETURNS int LANGUAGE plpgsql VOLATILE AS
  $$ BEGIN UPDATE public.orders SET total = total + 1; RETURN 1; END $$;
CREATE OR REPLACE FUNCTION public.tax(numeric) RETURNS numeric LANGUAGE sql IMMUTABLE AS
  $$ SELECT $1 * 0.2 $$;
CREATE OR REPLACE PROCEDURE public.wipe() LANGUAGE sql AS $$ DELETE FROM public.orders $$;
GRANT ALL ON ALL TABLES IN SCHEMA public, vault TO PUBLIC;
"""

POLICY = """
version: 1
rules:
  - name: ai-read-only
    when: {groups: [ai-agents]}
    match: {classes: [write, ddl, role, function, admin]}
    action: deny
    message: AI agents have read-only access
  - name: no-unbounded-delete
    match: {commands: [DELETE, UPDATE], without_where: true}
    action: deny
  - name: orders-writes-need-approval
    when: {groups: [developers]}
    match: {classes: [write], tables: [public.orders]}
    action: require_approval
    approvers: [dba]
  - name: no-secrets
    when: {groups: [ai-agents, developers]}
    match: {tables: ["vault.*"]}
    action: deny
defaults: {action: allow}
limits:
  - when: {groups: [ai-agents]}
    statement_timeout: 30s
    read_only: true
"""

# (statement, rule that must refuse it for an AI agent, or None for allowed)
CORPUS: list[tuple[str, str | None]] = [
    # plain reads and their write twins
    ("select count(*) from orders", None),
    ("delete from orders where id = 1", "ai-read-only"),
    ("update orders set status = 'x' where id = 1", "ai-read-only"),
    ("insert into orders values (100, 'x', 1)", "ai-read-only"),
    # a write hidden in a CTE
    ("with o as (select * from orders) select count(*) from o", None),
    (
        "with d as (delete from orders where id = 2 returning *) select count(*) from d",
        "ai-read-only",
    ),
    # EXPLAIN ANALYZE executes
    ("explain select * from orders where id = 3", None),
    ("explain analyze delete from orders where id = 3", "ai-read-only"),
    # SQL-level PREPARE / EXECUTE
    ("prepare p_read as select * from orders where id = $1", None),
    ("prepare p_write as delete from orders where id = $1", "ai-read-only"),
    # DO blocks and procedures
    ("select tax(total) from orders where id = 4", None),
    ("do $$ begin delete from orders where id = 4; end $$", "ai-read-only"),
    ("call wipe()", "ai-read-only"),
    # volatile functions
    ("select lower(status), now(), jsonb_build_object('a', 1) from orders limit 1", None),
    ("select bump()", "ai-read-only"),
    ("select * from orders where id = bump()", "ai-read-only"),
    ("select nextval('order_seq')", "ai-read-only"),
    ("select pg_read_file('/etc/passwd')", "ai-read-only"),
    # multi-statement strings
    ("select 1; select 2", None),
    ("select 1; delete from orders where id = 5", "ai-read-only"),
    # COPY
    ("copy orders from program 'cat /etc/passwd'", "ai-read-only"),
    ("copy orders to '/tmp/pgguard-leak.csv'", "ai-read-only"),
    # SELECT INTO / CREATE TABLE AS
    ("select * from orders where id = 6", None),
    ("select * into stolen from orders", "ai-read-only"),
    ("create table stolen2 as select * from orders", "ai-read-only"),
    # cursors
    ("begin; declare c1 cursor for select * from orders; fetch 1 from c1; commit", None),
    ("begin; declare c2 cursor for select bump(); fetch 1 from c2; commit", "ai-read-only"),
    # identifiers, comments, casing
    ('select count(*) from "public"."orders"', None),
    ('/* hi */ DeLeTe /* x */ FROM "public"."orders" WHERE id = 7', "ai-read-only"),
    ("DELETE FROM public.orders -- trailing\n WHERE id = 8", "ai-read-only"),
    ('delete from U&"\\006Frders" where id = 9', "ai-read-only"),
    # DDL, roles, admin
    ("create table t_new (x int)", "ai-read-only"),
    ("drop view orders_v", "ai-read-only"),
    ("grant select on orders to public", "ai-read-only"),
    ("create role mallory", "ai-read-only"),
    ("vacuum orders", "ai-read-only"),
    ("alter system set work_mem = '1GB'", "ai-read-only"),
    ("checkpoint", "ai-read-only"),
    # vault, and views of things
    ("select * from orders_v limit 1", None),
    ("select * from vault.secrets", "no-secrets"),
    ('select * from "vault".secrets', "no-secrets"),
    ("select (select secret from vault.secrets limit 1)", "no-secrets"),
    # session and transaction work stays allowed
    ("show search_path", None),
    ("set application_name = 'agent'", None),
    ("begin; select 1; commit", None),
    # the read-only clamp
    ("begin read write", "limits"),
    ("set default_transaction_read_only = off", "limits"),
    ("set statement_timeout = 0", "limits"),
]


@pytest.fixture(scope="module")
def policy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("policies") / "guard.yaml"
    path.write_text(textwrap.dedent(POLICY))
    return path


@pytest.fixture(scope="module")
def guarded(
    pg: PgServer, policy_file: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Gateway]:
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
        conn.execute(SCHEMA.encode())
    gw = Gateway(
        pg,
        tmp_path_factory.mktemp("guarded"),
        overrides={"policies": [str(policy_file)]},
    )
    gw.start()
    yield gw
    gw.stop()


def snapshot(pg: PgServer) -> list[Any]:
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
        orders = conn.execute("select id, status, total from public.orders order by id").fetchall()
        secrets = conn.execute("select * from vault.secrets").fetchall()
        tables = conn.execute(
            "select count(*) from pg_class where relname in ('stolen', 'stolen2', 't_new')"
        ).fetchall()
        roles = conn.execute("select count(*) from pg_roles where rolname = 'mallory'").fetchall()
        return [orders, secrets, tables, roles]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize(("sql", "rule"), CORPUS)
def test_corpus_for_an_ai_agent(
    guarded: Gateway, pg: PgServer, sql: str, rule: str | None, protocol: str
) -> None:
    if protocol == "extended" and ";" in sql.strip().rstrip(";"):
        pytest.skip("multi-statement strings exist only in the simple protocol")
    before = snapshot(pg)
    with psycopg.connect(guarded.dsn("agent", groups=["ai-agents"]), autocommit=True) as conn:
        cur = conn.cursor()
        query = sql.encode() if protocol == "simple" else sql
        if rule is None:
            cur.execute(query)
        else:
            with pytest.raises(psycopg.Error) as info:
                cur.execute(query)
            assert info.value.sqlstate == "42501", info.value
            message = info.value.diag.message_primary or ""
            assert message.startswith(f"pgguard: {rule}: "), message
        # The session goes on after a refusal.
        assert conn.execute("select 1").fetchone() == (1,)
    assert snapshot(pg) == before, "a refused or read-only statement changed the data"


def test_copy_out_allowed_and_copy_in_refused(guarded: Gateway, pg: PgServer) -> None:
    before = snapshot(pg)
    with psycopg.connect(guarded.dsn("agent", groups=["ai-agents"]), autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy("copy (select id from orders order by id) to stdout") as copy:
            rows = [row for row in copy.rows()]
        assert len(rows) == 20
        with pytest.raises(errors.InsufficientPrivilege, match="ai-read-only"):  # noqa: SIM117
            with cur.copy("copy orders from stdin") as copy:
                copy.write_row((999, "x", 1))
        assert conn.execute("select 1").fetchone() == (1,)
    assert snapshot(pg) == before


def test_sql_prepare_then_execute_is_judged_as_the_prepared_statement(guarded: Gateway) -> None:
    with psycopg.connect(guarded.dsn("agent", groups=["ai-agents"]), autocommit=True) as conn:
        conn.execute(b"prepare read_one as select status from orders where id = $1")
        assert conn.execute(b"execute read_one(3)").fetchone() == ("open",)
        # A statement it may not run cannot be smuggled in through PREPARE/EXECUTE.
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute(b"prepare wipe_one as delete from orders where id = $1")
        with pytest.raises(psycopg.Error):
            conn.execute(b"execute wipe_one(3)")
        assert conn.execute("select count(*) from orders").fetchone() == (20,)


def test_developer_rules(guarded: Gateway, pg: PgServer) -> None:
    with psycopg.connect(guarded.dsn("dev", groups=["developers"]), autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match="no-unbounded-delete"):
            conn.execute("delete from orders")
        with pytest.raises(errors.InsufficientPrivilege, match="orders-writes-need-approval"):
            conn.execute("update orders set status = 'void' where id = 1")
        # Writes elsewhere are fine; reads of orders too.
        conn.execute("create temp table scratch (x int)")
        conn.execute("insert into scratch values (1)")
        assert conn.execute("select count(*) from orders").fetchone() == (20,)


def test_refusal_in_a_transaction_block_fails_it(guarded: Gateway) -> None:
    with psycopg.connect(guarded.dsn("agent", groups=["ai-agents"])) as conn:
        conn.execute("select 1")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("delete from orders where id = 1")
        assert conn.info.transaction_status == psycopg.pq.TransactionStatus.INERROR
        conn.rollback()
        assert conn.execute("select count(*) from orders").fetchone() == (20,)


def test_search_path_cannot_hide_a_table(guarded: Gateway) -> None:
    with psycopg.connect(guarded.dsn("agent", groups=["ai-agents"]), autocommit=True) as conn:
        conn.execute("set search_path = vault, public")
        with pytest.raises(errors.InsufficientPrivilege, match="no-secrets"):
            conn.execute("select * from secrets")
        # The same in one pipeline, before pgguard hears back from the server.
        with pytest.raises(errors.InsufficientPrivilege), conn.pipeline():
            conn.execute("set search_path = public")
            conn.execute("set search_path = vault")
            conn.execute("select secret from secrets")
        conn.execute("reset search_path")
        assert conn.execute("select count(*) from orders").fetchone() == (20,)


def test_read_only_clamp_is_set_upstream(guarded: Gateway) -> None:
    with psycopg.connect(guarded.dsn("agent", groups=["ai-agents"]), autocommit=True) as conn:
        row = conn.execute(
            "select current_setting('default_transaction_read_only'),"
            " current_setting('statement_timeout')"
        ).fetchone()
        assert row == ("on", "30s")


def test_new_function_is_judged_after_ddl(guarded: Gateway, pg: PgServer) -> None:
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        admin.execute("drop function if exists public.fresh_fn()")
    with psycopg.connect(guarded.dsn("dba", groups=["dba"]), autocommit=True) as dba:
        dba.execute(
            "create function public.fresh_fn() returns int language sql volatile as 'select 1'"
        )
        dba.execute("select 1")  # the refresh runs once the DDL is committed
    time.sleep(0.5)
    agent = guarded.dsn("agent", groups=["ai-agents"])
    with (
        psycopg.connect(agent, autocommit=True) as conn,
        pytest.raises(errors.InsufficientPrivilege, match="ai-read-only"),
    ):
        conn.execute("select fresh_fn()")


def test_policy_reload_on_sighup_and_invalid_policy_kept_out(
    guarded: Gateway, pg: PgServer, tmp_path: Path
) -> None:
    del guarded  # only for its schema
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules: []\n")
    gw = Gateway(pg, tmp_path / "gw", overrides={"policies": [str(policy)]})
    gw.start()
    try:
        assert gw.proc is not None
        with psycopg.connect(gw.dsn("agent", groups=["ai-agents"]), autocommit=True) as conn:
            assert conn.execute("select count(*) from orders").fetchone() == (20,)
            policy.write_text(
                "version: 1\nrules:\n  - name: no-orders\n    match: {tables: [public.orders]}\n"
                "    action: deny\n"
            )
            os.kill(gw.proc.pid, signal.SIGHUP)
            time.sleep(0.5)
            with pytest.raises(errors.InsufficientPrivilege, match="no-orders"):
                conn.execute("select count(*) from orders")
            # A broken policy is reported and the one in force stays.
            policy.write_text("version: 1\nrules:\n  - name: BAD NAME\n    action: nope\n")
            os.kill(gw.proc.pid, signal.SIGHUP)
            time.sleep(0.5)
            with pytest.raises(errors.InsufficientPrivilege, match="no-orders"):
                conn.execute("select count(*) from orders")
        assert "policy reload failed" in gw.read_log()
    finally:
        gw.stop()


def test_invalid_policy_stops_startup(pg: PgServer, tmp_path: Path) -> None:
    policy = tmp_path / "bad.yaml"
    policy.write_text("version: 2\nrules: [{name: x}]\n")
    gw = Gateway(pg, tmp_path / "gw", overrides={"policies": [str(policy)]})
    with pytest.raises(Exception):  # noqa: B017 - the harness raises its own start error
        gw.start(timeout=10)
    assert "policy" in gw.read_log()


ROW_LIMITS = """
version: 1
rules: []
limits:
  - when: {groups: [trunc]}
    max_rows: 5
    on_max_rows: truncate
  - when: {groups: [strict]}
    max_rows: 5
    on_max_rows: error
"""


@pytest.fixture(scope="module")
def row_limited(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    workdir = tmp_path_factory.mktemp("rowlimits")
    policy = workdir / "limits.yaml"
    policy.write_text(ROW_LIMITS)
    gw = Gateway(pg, workdir / "gw", overrides={"policies": [str(policy)]})
    gw.start()
    yield gw
    gw.stop()


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_max_rows_truncates_with_a_notice(row_limited: Gateway, protocol: str) -> None:
    notices: list[str] = []
    with psycopg.connect(row_limited.dsn("t", groups=["trunc"]), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(d.message_primary or ""))
        sql = "select g from generate_series(1, 1000) g"
        cur = conn.execute(sql.encode() if protocol == "simple" else sql)
        assert [r[0] for r in cur.fetchall()] == [1, 2, 3, 4, 5]
        assert any("limits" in n for n in notices)
        # Unlimited identities and small results are untouched.
        assert conn.execute("select count(*) from generate_series(1, 1000)").fetchone() == (1000,)


def test_max_rows_error_mode_stops_the_query(row_limited: Gateway) -> None:
    with psycopg.connect(row_limited.dsn("s", groups=["strict"])) as conn:
        started = time.monotonic()
        with pytest.raises(psycopg.Error) as info:
            conn.execute("select g from generate_series(1, 50000000) g").fetchall()
        assert info.value.sqlstate == "54000"
        assert "pgguard: limits:" in str(info.value)
        assert time.monotonic() - started < 20  # cancelled, not run to the end
        conn.rollback()
        assert conn.execute("select 1").fetchone() == (1,)
    with psycopg.connect(row_limited.dsn("free", groups=["other"])) as conn:
        assert len(conn.execute("select g from generate_series(1, 100) g").fetchall()) == 100


def test_policy_reloads_when_its_file_changes(
    guarded: Gateway, pg: PgServer, tmp_path: Path
) -> None:
    del guarded  # only for its schema
    policy = tmp_path / "p.yaml"
    policy.write_text("version: 1\nrules: []\n")
    gw = Gateway(pg, tmp_path / "gw", overrides={"policies": [str(policy)]})
    gw.start()
    try:
        with psycopg.connect(gw.dsn("agent"), autocommit=True) as conn:
            assert conn.execute("select count(*) from orders").fetchone() == (20,)
            policy.write_text(
                "version: 1\nrules:\n  - name: watched\n    match: {tables: [public.orders]}\n"
                "    action: deny\n    message: changed on disk\n"
            )
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                try:
                    conn.execute("select count(*) from orders")
                except errors.InsufficientPrivilege as exc:
                    assert "pgguard: watched: changed on disk" in str(exc)
                    break
                time.sleep(0.3)
            else:
                pytest.fail("the changed policy file was not picked up:\n" + gw.read_log())
    finally:
        gw.stop()
