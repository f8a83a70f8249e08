"""Unit tests for the statement analyser (pgguard.policy.analysis) and the catalog snapshot
(pgguard.policy.catalog).

Most tests use a hand-built :class:`CatalogSnapshot` (no server). The catalog loader and
name resolution are also checked against a real PostgreSQL started with EmbeddedPostgres
(skipped when no server binaries are installed).
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pgguard.policy.analysis import (
    DANGEROUS_FUNCTIONS,
    AnalysisError,
    analyse,
    prepared_statement,
)
from pgguard.policy.catalog import (
    CATALOG_SQL,
    CatalogSnapshot,
    effective_search_path,
    snapshot_from_rows,
    split_search_path,
)
from pgguard.policy.facts import FunctionInfo, RelationInfo, StatementClass, StatementFacts
from pgguard.policy.model import COMMAND_CLASSES, WITHOUT_WHERE_TAGS

# --------------------------------------------------------------------------- hand-built catalog


def _rel(oid: int, schema: str, name: str, kind: str, cols: str, deps: str = "") -> RelationInfo:
    return RelationInfo(oid, schema, name, kind, tuple(cols.split()), tuple(deps.split()))


def _fn(
    oid: int,
    schema: str,
    name: str,
    volatility: Any,
    kind: Any = "f",
    *,
    secdef: bool = False,
    language: str | None = None,
) -> FunctionInfo:
    builtin = oid < 16384
    return FunctionInfo(
        oid,
        schema,
        name,
        volatility,
        kind,
        builtin=builtin,
        security_definer=secdef,
        language=language or ("internal" if builtin else "plpgsql"),
    )


_BUILTINS = {
    # name: volatility
    "lower": "i",
    "upper": "i",
    "length": "i",
    "count": "i",
    "max": "i",
    "sum": "i",
    "now": "s",
    "jsonb_build_object": "s",
    "random": "v",
    "clock_timestamp": "v",
    "gen_random_uuid": "v",
    "txid_current": "s",
    "pg_sleep": "v",
    "pg_advisory_lock": "v",
    "generate_series": "i",
    "extract": "i",
    "current_setting": "s",
    "currval": "v",
    "set_config": "v",
    "pg_notify": "v",
    "nextval": "v",
    "setval": "v",
    "pg_read_file": "v",
    "pg_read_binary_file": "v",
    "pg_ls_dir": "v",
    "pg_stat_file": "v",
    "lo_import": "v",
    "lo_export": "v",
    "lo_unlink": "v",
    "pg_terminate_backend": "v",
    "pg_cancel_backend": "v",
    "pg_reload_conf": "v",
    "pg_rotate_logfile": "v",
    "pg_promote": "v",
    "pg_switch_wal": "v",
    "pg_create_restore_point": "v",
    "query_to_xml": "v",
}

CATALOG = CatalogSnapshot(
    [
        _rel(20001, "public", "customers", "r", "id name email ssn salary"),
        _rel(20002, "public", "orders", "r", "id customer_id total status"),
        _rel(20003, "public", "t", "r", "id x"),
        _rel(20004, "vault", "secrets", "r", "id secret"),
        _rel(20005, "public", "v_orders", "v", "id total", "public.orders"),
        _rel(20006, "public", "vv", "v", "id", "public.v_orders"),
        _rel(20007, "public", "mv", "m", "id secret", "vault.secrets"),
        _rel(20008, "Public", "T", "r", "Id"),
        _rel(20009, "public", "s", "S", "last_value"),
        _rel(20010, "app", "events", "r", "id kind payload"),
        _rel(20011, "app", "t", "r", "id y"),
        _rel(1259, "pg_catalog", "pg_class", "r", "oid relname relnamespace"),
    ],
    [
        *(
            _fn(1000 + i, "pg_catalog", name, vol)
            for i, (name, vol) in enumerate(_BUILTINS.items())
        ),
        _fn(1100, "pg_catalog", "count", "i", "a"),
        _fn(30001, "public", "my_volatile_fn", "v"),
        _fn(30002, "public", "my_stable_fn", "s"),
        _fn(30003, "public", "my_immutable_fn", "i", language="sql"),
        _fn(30004, "public", "secdef_fn", "s", secdef=True),
        _fn(30005, "public", "proc", "v", "p"),
        _fn(30006, "app", "audit_fn", "v"),
    ],
)
PATH = ("pg_catalog", "public")


def one(sql: str, **kwargs: Any) -> StatementFacts:
    facts = analyse(sql, CATALOG, kwargs.pop("path", PATH), **kwargs)
    assert len(facts) == 1, facts
    return facts[0]


# --------------------------------------------------------------------------- the corpus


@dataclass(frozen=True)
class Case:
    sql: str
    classes: frozenset[StatementClass]
    command: str | None = None
    tables: frozenset[str] | None = None  # exact set, when given
    written: frozenset[str] | None = None  # exact set, when given
    without_where: bool | None = None
    sets_search_path: tuple[str, ...] | bool | None = False  # False: not checked
    local: bool | None = None
    path: tuple[str, ...] = PATH
    allowed: frozenset[str] = frozenset()
    id: str = ""


def C(sql: str, classes: str, command: str | None = None, **kw: Any) -> Case:
    """A corpus entry: ``classes`` space separated; ``tables``/``written`` space separated."""
    for key in ("tables", "written", "allowed"):
        if isinstance(kw.get(key), str):
            kw[key] = frozenset(kw[key].split())
    if "ww" in kw:
        kw["without_where"] = kw.pop("ww")
    if "sets" in kw:
        kw["sets_search_path"] = kw.pop("sets")
    cls: Any = frozenset(classes.split())
    return Case(sql, cls, command, **kw)


CORPUS: list[Case] = [
    # ---- ordinary reads (benign)
    C("select lower(email) from customers", "read", "SELECT", tables="public.customers"),
    C("SELECT count(*) FROM customers", "read", "SELECT", tables="public.customers"),
    C("select now(), jsonb_build_object('a', 1)", "read", "SELECT", tables=""),
    C("values (1), (2)", "read", "SELECT"),
    C("table orders", "read", "SELECT", tables="public.orders"),
    C("show search_path", "read", "SHOW"),
    C("SHOW ALL", "read", "SHOW"),
    C("select 1", "read", "SELECT"),
    C(
        "select c.name, o.total from customers c join orders o on o.customer_id = c.id",
        "read",
        tables="public.customers public.orders",
    ),
    C("select random(), clock_timestamp(), gen_random_uuid(), txid_current()", "read"),
    C("select pg_sleep(0)", "read"),
    C("select pg_advisory_lock(1)", "read"),
    C("select my_stable_fn(1), my_immutable_fn(2)", "read"),
    C("select * from generate_series(1, 3)", "read"),
    C("select extract(year from now())", "read"),
    C("select current_setting('search_path')", "read"),
    C("select currval('s')", "read"),
    C("select \"lower\"('X')", "read", id="quoted-lower"),
    C("select pg_catalog.lower('X')", "read"),
    C("select U&\"\\006Cower\"('X')", "read", id="unicode-lower"),
    C(
        "select * from customers c, lateral (select * from orders o where o.customer_id = c.id) x",
        "read",
        tables="public.customers public.orders",
    ),
    C("select id from t union select id from orders order by 1", "read"),
    # ---- volatile / unknown functions anywhere
    C("select my_volatile_fn()", "read function", "SELECT", tables=""),
    C("select * from orders where total > my_volatile_fn()", "read function"),
    C("select (select my_volatile_fn())", "read function"),
    C("with x as (select my_volatile_fn()) select 1", "read function"),
    C("select * from my_volatile_fn()", "read function"),
    C("select count(*) filter (where my_volatile_fn() > 0) from orders", "read function"),
    C("select * from orders order by my_volatile_fn()", "read function"),
    C("select * from orders group by id having max(total) > my_volatile_fn()", "read function"),
    C("insert into t (id, x) values (1, my_volatile_fn())", "write function", "INSERT"),
    C("update t set x = my_volatile_fn() where id = 1", "write function", "UPDATE"),
    C("select nosuch_fn()", "read function", id="unknown-function"),
    C("select public.lower('x')", "read function", id="not-the-builtin-lower"),
    C("select \"LOWER\"('x')", "read function", id="quoted-uppercase-lower"),
    C("select secdef_fn()", "read function", id="security-definer"),
    C("select app.audit_fn()", "read function"),
    C("select 1 operator(public.===) 2", "read function", id="user-operator"),
    C("select 1 operator(pg_catalog.+) 2", "read", id="builtin-operator"),
    C(
        "select my_volatile_fn()",
        "read",
        allowed="public.my_volatile_fn",
        id="allow-listed-volatile",
    ),
    # ---- dangerous built-ins
    C("select pg_read_file('/etc/passwd')", "read function"),
    C("select pg_read_binary_file('x')", "read function"),
    C("select * from pg_ls_dir('.')", "read function"),
    C("select pg_stat_file('postgresql.conf')", "read function"),
    C("select lo_import('/etc/passwd')", "read function"),
    C("select lo_export(1, '/tmp/x')", "read function"),
    C("select lo_unlink(1)", "read function"),
    C("select dblink_exec('dbname=x', 'delete from t')", "read function"),
    C("select * from dblink('dbname=x', 'select 1') as r(a int)", "read function"),
    C("select nextval('s')", "read function"),
    C("select setval('s', 1)", "read function"),
    C("select pg_terminate_backend(1)", "read function"),
    C("select pg_cancel_backend(1)", "read function"),
    C("select pg_reload_conf()", "read function"),
    C("select pg_rotate_logfile()", "read function"),
    C("select pg_promote()", "read function"),
    C("select pg_switch_wal()", "read function"),
    C("select pg_create_restore_point('x')", "read function"),
    C("select pg_file_write('x', 'y', false)", "read function"),
    C("select query_to_xml('select * from vault.secrets', true, true, '')", "read function"),
    C("select pg_catalog.pg_read_file('x')", "read function"),
    C("SELECT \"pg_read_file\"('x')", "read function"),
    C("insert into t values (nextval('s'), 1)", "write function"),
    C("select nextval('s')", "read", allowed="pg_catalog.nextval", id="allow-listed-nextval"),
    # ---- set_config and SET
    C(
        "select set_config('search_path', 'vault, public', false)",
        "read session",
        sets=("vault", "public"),
        local=False,
    ),
    C("select set_config('search_path', 'app', true)", "read session", sets=("app",), local=True),
    C("select set_config('role', 'postgres', false)", "read session role function", sets=None),
    C("select set_config('session_authorization', 'x', false)", "read session role function"),
    C("select set_config(current_user, 'x', false)", "read session function"),
    C("select set_config('search_path', current_user, false)", "read session function"),
    C("select set_config('statement_timeout', '1s', false)", "read session", sets=None),
    C("select set_config('pgguard.prompt_id', 'p1', false)", "read session"),
    C("select set_config('pgguard.identity', 'x', false)", "read session role function"),
    C("set search_path to vault, public", "session", "SET", sets=("vault", "public"), local=False),
    C("set local search_path = app", "session", "SET", sets=("app",), local=True),
    C("SET SESSION search_path TO DEFAULT", "session", "SET", sets=()),
    C("reset search_path", "session", "RESET", sets=()),
    C("reset all", "session", "RESET", sets=()),
    C("set schema 'app'", "session", "SET", sets=("app",)),
    C("set search_path = '$user', public", "session", sets=("$user", "public")),
    C("set role postgres", "session role", "SET"),
    C("reset role", "session role", "RESET"),
    C("set session authorization 'x'", "session role"),
    C("set statement_timeout = '5s'", "session", "SET", sets=None),
    C("set time zone 'UTC'", "session"),
    C("set transaction isolation level serializable", "transaction", "SET"),
    C("set default_transaction_read_only = off", "session"),
    C("set standard_conforming_strings = off", "session admin function", "SET"),
    C("set standard_conforming_strings to on", "session", "SET", id="scs-on"),
    C("reset standard_conforming_strings", "session", "RESET"),
    C(
        "select set_config('standard_conforming_strings', 'off', false)",
        "read session admin function",
    ),
    C("set client_encoding = 'SJIS'", "session admin function"),
    C("set names 'Shift_JIS_2004'", "session admin function"),
    C("set client_encoding to 'UTF8'", "session", id="utf8-encoding"),
    C("set names 'latin1'", "session"),
    C("discard all", "session", "DISCARD ALL", sets=()),
    C("discard plans", "session", "DISCARD PLANS", sets=None),
    C("listen ch", "session", "LISTEN"),
    C("unlisten *", "session", "UNLISTEN"),
    C("notify ch, 'x'", "session", "NOTIFY"),
    C("select pg_notify('ch', 'x')", "read session"),
    # ---- transaction control
    C("begin", "transaction", "BEGIN"),
    C("start transaction read only", "transaction", "START TRANSACTION"),
    C("commit", "transaction", "COMMIT"),
    C("rollback", "transaction", "ROLLBACK"),
    C("savepoint a", "transaction", "SAVEPOINT"),
    C("release savepoint a", "transaction", "RELEASE"),
    C("rollback to savepoint a", "transaction", "ROLLBACK"),
    C("prepare transaction 'x'", "transaction admin", "PREPARE TRANSACTION"),
    C("commit prepared 'x'", "transaction admin", "COMMIT PREPARED"),
    C("set constraints all deferred", "transaction", "SET CONSTRAINTS"),
    # ---- writes
    C(
        "insert into orders (customer_id, total) values (1, 2)",
        "write",
        "INSERT",
        tables="public.orders",
        written="public.orders",
        ww=False,
    ),
    C("update orders set total = 0 where id = 1", "write", "UPDATE", ww=False),
    C("update orders set total = 0", "write", "UPDATE", ww=True),
    C("delete from orders", "write", "DELETE", ww=True, written="public.orders"),
    C("delete from orders where true", "write", ww=True),
    C("delete from orders where 1=1", "write", ww=True),
    C("delete from orders where 'a' = 'a'", "write", ww=True),
    C("delete from orders where id = id", "write", ww=True),
    C("delete from orders where not false", "write", ww=True),
    C("delete from orders where 1 in (1, 2)", "write", ww=True),
    C("delete from orders where 't'::boolean", "write", ww=True),
    C("delete from orders where exists (select 1)", "write", ww=True),
    C("delete from orders where true or id = 5", "write", ww=True),
    C("delete from orders where id = 5", "write", ww=False),
    C("delete from orders where id = $1", "write", ww=False),
    C("delete from orders where current of c", "write", ww=False),
    C("delete from orders where false and id = 1", "write", ww=False),
    C(
        "delete from orders o using customers c where o.customer_id = c.id",
        "write read",
        tables="public.orders public.customers",
        written="public.orders",
        ww=False,
    ),
    C(
        "update t set x = (select max(total) from orders) where id = 1",
        "write read",
        written="public.t",
    ),
    C(
        "insert into t select id, total from orders",
        "write read",
        tables="public.t public.orders",
        written="public.t",
    ),
    C(
        "insert into t values (1, 2) on conflict (id) do update set x = excluded.x",
        "write",
        "INSERT",
        ww=False,
    ),
    C(
        "merge into orders o using t on o.id = t.id when matched then update set total = t.x",
        "write read",
        "MERGE",
        written="public.orders",
    ),
    C("truncate orders", "write", "TRUNCATE TABLE", written="public.orders", ww=True),
    C("truncate table orders, t cascade", "write", written="public.orders public.t"),
    C("select * from orders for update", "read write", "SELECT", written="public.orders"),
    C("select * from orders o, t for share of o", "read write", written="public.orders"),
    C("lock table orders", "write", "LOCK TABLE", written="public.orders"),
    C("lock table orders in access share mode", "read", "LOCK TABLE", written=""),
    C("lock orders in row exclusive mode", "read", written=""),
    C("refresh materialized view mv", "write read", "REFRESH MATERIALIZED VIEW"),
    C(
        "delete from v_orders where id = 1",
        "write",
        written="public.v_orders public.orders",
        id="write-through-view",
    ),
    # ---- data-modifying CTEs
    C(
        "with d as (delete from orders returning *) select * from d",
        "read write",
        "SELECT",
        written="public.orders",
        ww=True,
    ),
    C(
        "with u as (update orders set total = 0 where id = 2 returning id) select count(*) from u",
        "read write",
        "SELECT",
    ),
    C("with i as (insert into t values (1, 1) returning *) select 1", "read write"),
    C("with x as (select 1) delete from orders where id in (select * from x)", "write"),
    C(
        "select * from (with d as (delete from t returning *) select * from d) s",
        "read write",
        id="nested-modifying-cte",
    ),
    C("with r as (select * from orders) select * from r", "read", tables="public.orders"),
    # ---- EXPLAIN
    C("explain select * from orders", "read", "EXPLAIN", tables="public.orders"),
    C("explain delete from orders", "read", "EXPLAIN", written=""),
    C("explain analyze delete from orders", "read write", "EXPLAIN", written="public.orders"),
    C("explain (analyze) update orders set total = 1 where id = 1", "read write"),
    C("explain (analyze true, buffers) insert into t values (1, 1)", "read write"),
    C("explain (analyze 1) delete from orders", "read write"),
    C("explain (analyze false) delete from orders", "read"),
    C("explain (analyze off, costs off) delete from orders", "read"),
    C("EXPLAIN ANALYZE VERBOSE select my_volatile_fn()", "read function"),
    C("explain select my_volatile_fn()", "read"),
    C("explain analyze select * from orders", "read"),
    C("explain analyze with d as (delete from orders returning *) select * from d", "read write"),
    C("explain analyze create table x as select 1", "read ddl write"),
    C("explain analyze execute p", "read write function"),
    C("explain execute p", "read"),
    # ---- PREPARE / EXECUTE
    C("prepare p as delete from orders", "session write", "PREPARE", written="public.orders"),
    C("prepare p as select * from orders", "session read", "PREPARE"),
    C("prepare p(int) as select my_volatile_fn()", "session read function"),
    C("execute p", "read write function", "EXECUTE"),
    C("execute p(my_volatile_fn())", "read write function", "EXECUTE"),
    C("deallocate p", "session", "DEALLOCATE"),
    C("deallocate all", "session", "DEALLOCATE ALL"),
    # ---- DO / CALL
    C("do $$ begin delete from orders; end $$", "function", "DO"),
    C("do language plpgsql $$ begin null; end $$", "function", "DO"),
    C("call proc()", "function", "CALL"),
    C("call public.proc(my_volatile_fn())", "function", "CALL"),
    # ---- COPY
    C("copy orders to stdout", "copy read", "COPY", written=""),
    C("copy orders (id, total) to stdout with (format csv)", "copy read"),
    C("copy orders from stdin", "copy write", "COPY", written="public.orders"),
    C("copy (select * from vault.secrets) to stdout", "copy read", tables="vault.secrets"),
    C("copy (delete from orders returning *) to stdout", "copy read write"),
    C("copy orders to program 'curl http://x'", "copy read admin function"),
    C("copy orders from program 'cat /etc/passwd'", "copy write admin function"),
    C("copy orders to '/tmp/x'", "copy read admin function"),
    C("copy orders from '/tmp/x'", "copy write admin function"),
    # ---- SELECT INTO / CREATE TABLE AS
    C(
        "select * into newt from orders",
        "ddl write read",
        "SELECT",
        written="public.newt",
        tables="public.newt public.orders",
    ),
    C("select 1 into temp tmp", "ddl write read", "SELECT", written="pg_temp.tmp"),
    C(
        "create table newt as select * from orders",
        "ddl write read",
        "CREATE TABLE AS",
        written="public.newt",
    ),
    C("create table newt as select * from orders with no data", "ddl", "CREATE TABLE AS"),
    C(
        "create materialized view m2 as select * from vault.secrets",
        "ddl write read",
        "CREATE MATERIALIZED VIEW",
        tables="public.m2 vault.secrets",
    ),
    C("create temp table tt as select my_volatile_fn()", "ddl write function"),
    # ---- cursors
    C("declare c cursor for select * from orders", "read", "DECLARE CURSOR"),
    C("declare c cursor with hold for select my_volatile_fn()", "read function"),
    C("declare c cursor for select * from orders for update", "read write"),
    C("fetch 10 from c", "read", "FETCH"),
    C("move next in c", "read", "MOVE"),
    C("close c", "session", "CLOSE CURSOR"),
    C("close all", "session", "CLOSE CURSOR ALL"),
    # ---- identifiers, comments, casing, views
    C('select * from "Public"."T"', "read", tables="Public.T"),
    C('select * from "public"."orders"', "read", tables="public.orders"),
    C("SELECT * FROM PUBLIC.ORDERS", "read", tables="public.orders"),
    C("/* comment */ DeLeTe FROM orders", "write", "DELETE", ww=True),
    C("-- comment\nDELETE /* x */ FROM orders WHERE id = 1", "write", "DELETE", ww=False),
    C('select * from U&"\\0074"', "read", tables="public.t", id="unicode-table"),
    C("select * from U&\"!0074\" UESCAPE '!'", "read", tables="public.t", id="uescape-table"),
    C("select * from vault.secrets", "read", tables="vault.secrets"),
    C("select count(*) from vault.secrets", "read", tables="vault.secrets"),
    C(
        "select * from customers where id in (select id from vault.secrets)",
        "read",
        tables="public.customers vault.secrets",
    ),
    C("select (select secret from vault.secrets limit 1)", "read", tables="vault.secrets"),
    C("with s as (select * from vault.secrets) select * from s", "read", tables="vault.secrets"),
    C(
        "with secrets as (select * from secrets) select * from secrets",
        "read",
        tables="vault.secrets",
        path=("pg_catalog", "vault"),
        id="cte-shadowing-real-table",
    ),
    C(
        "with recursive r(n) as (select 1 union all select n + 1 from r where n < 3) "
        "select * from r",
        "read",
        tables="",
    ),
    C("select * from v_orders", "read", tables="public.v_orders public.orders"),
    C("select * from vv", "read", tables="public.vv public.v_orders public.orders"),
    C("select * from mv", "read", tables="public.mv vault.secrets"),
    C("select * from nosuch", "read", tables="public.nosuch"),
    C(
        "select * from nosuch",
        "read",
        tables="app.nosuch public.nosuch",
        path=("app", "public"),
        id="unknown-relation-any-schema-of-path",
    ),
    C("select * from app.nosuch", "read", tables="app.nosuch"),
    C("select relname from pg_class", "read", tables="pg_catalog.pg_class"),
    C("select * from t", "read", tables="app.t", path=("pg_catalog", "app", "public")),
    C('select * from orders as "O" where "O".id = 1', "read", tables="public.orders"),
    # ---- DDL
    C("create table x (a int)", "ddl", "CREATE TABLE", tables="public.x", written=""),
    C("create table app.x (a int default my_volatile_fn())", "ddl", tables="app.x"),
    C("create temp table tt (a int)", "ddl", tables="pg_temp.tt"),
    C(
        "create table x (a int references orders (id))",
        "ddl",
        tables="public.x public.orders",
    ),
    C(
        "alter table orders add column note text",
        "ddl write",
        "ALTER TABLE",
        written="public.orders",
    ),
    C("alter table orders add column n int default my_volatile_fn()", "ddl write function"),
    C(
        "alter table orders alter column total type int using my_volatile_fn()",
        "ddl write function",
    ),
    C("alter table orders rename to orders2", "ddl", "ALTER TABLE", written=""),
    C("alter table orders rename column total to amount", "ddl", "ALTER TABLE"),
    C("alter index orders_pkey rename to op", "ddl", "ALTER INDEX"),
    C("alter view v_orders set schema app", "ddl", "ALTER VIEW"),
    C("drop table orders", "ddl write", "DROP TABLE", written="public.orders"),
    C("drop table if exists orders, vault.secrets cascade", "ddl write"),
    C("drop view v_orders", "ddl", "DROP VIEW", written=""),
    C("drop schema vault cascade", "ddl write", "DROP SCHEMA", tables="vault.*"),
    C("drop schema app", "ddl", "DROP SCHEMA"),
    C("drop function my_volatile_fn()", "ddl", "DROP FUNCTION"),
    C("create index on orders (total)", "ddl", "CREATE INDEX", tables="public.orders"),
    C(
        "create view v3 as select * from vault.secrets",
        "ddl",
        "CREATE VIEW",
        tables="public.v3 vault.secrets",
    ),
    C("create view v4 as select my_volatile_fn()", "ddl", "CREATE VIEW"),
    C(
        "create function f() returns int language sql as $$ delete from orders returning 1 $$",
        "ddl",
        "CREATE FUNCTION",
    ),
    C(
        "create procedure p2() language sql begin atomic delete from orders; end",
        "ddl",
        "CREATE PROCEDURE",
    ),
    C("alter function my_volatile_fn() security definer", "ddl", "ALTER FUNCTION"),
    C(
        "create trigger tr before insert on orders for each row execute function my_volatile_fn()",
        "ddl",
        "CREATE TRIGGER",
    ),
    C("create rule r as on insert to t do instead delete from orders", "ddl", "CREATE RULE"),
    C("comment on table vault.secrets is 'x'", "ddl", "COMMENT", tables="vault.secrets"),
    C("create schema s2", "ddl", "CREATE SCHEMA"),
    C("create sequence s2", "ddl", "CREATE SEQUENCE", tables="public.s2"),
    C("alter sequence s restart", "ddl write", "ALTER SEQUENCE", written="public.s"),
    C("create type mood as enum ('a', 'b')", "ddl", "CREATE TYPE"),
    C("create domain d as int check (value > 0)", "ddl", "CREATE DOMAIN"),
    C("create policy p on orders using (true)", "ddl", "CREATE POLICY"),
    C("create aggregate agg (int) (sfunc = int4pl, stype = int)", "ddl", "CREATE AGGREGATE"),
    C("create foreign table ft (a int) server s", "ddl", "CREATE FOREIGN TABLE"),
    C("create extension pgcrypto", "ddl admin", "CREATE EXTENSION"),
    C("drop extension pgcrypto", "ddl admin", "DROP EXTENSION"),
    C("alter table orders owner to bob", "ddl write role", "ALTER TABLE"),
    C("alter schema app owner to bob", "ddl role", "ALTER SCHEMA"),
    # ---- role
    C("grant select on orders to bob", "role", "GRANT", tables="public.orders"),
    C("revoke all on vault.secrets from bob", "role", "REVOKE", tables="vault.secrets"),
    C("grant select on all tables in schema vault to bob", "role", "GRANT", tables="vault.*"),
    C("grant admin to bob", "role", "GRANT ROLE"),
    C("revoke admin from bob", "role", "REVOKE ROLE"),
    C("create role bob login superuser", "role", "CREATE ROLE"),
    C("create user bob", "role", "CREATE ROLE"),
    C("alter role bob superuser", "role", "ALTER ROLE"),
    C("alter user bob set search_path = x", "role", "ALTER ROLE", sets=None),
    C("alter group g add user bob", "role", "ALTER ROLE"),
    C("drop role bob", "role", "DROP ROLE"),
    C("alter default privileges grant select on tables to bob", "role", "ALTER DEFAULT PRIVILEGES"),
    C("reassign owned by bob to alice", "role ddl", "REASSIGN OWNED"),
    C("drop owned by bob", "role ddl write", "DROP OWNED"),
    C("security label on table orders is 'x'", "role", "SECURITY LABEL"),
    C(
        "create user mapping for bob server s options (user 'x', password 'y')",
        "role ddl",
        "CREATE USER MAPPING",
    ),
    # ---- admin
    C("vacuum", "admin", "VACUUM"),
    C("vacuum full orders", "admin", "VACUUM", tables="public.orders"),
    C("analyze orders", "admin", "ANALYZE", tables="public.orders"),
    C("checkpoint", "admin", "CHECKPOINT"),
    C("alter system set work_mem = '1GB'", "admin", "ALTER SYSTEM"),
    C("cluster orders", "admin", "CLUSTER"),
    C("reindex table orders", "admin", "REINDEX"),
    C("load 'plpgsql'", "admin function", "LOAD"),
    C("create database x", "admin ddl", "CREATE DATABASE"),
    C("drop database x", "admin ddl", "DROP DATABASE"),
    C("create tablespace ts location '/tmp/ts'", "admin ddl", "CREATE TABLESPACE"),
    C("alter database postgres set work_mem = '1MB'", "admin ddl", "ALTER DATABASE"),
    C(
        "create event trigger et on ddl_command_start execute function my_volatile_fn()",
        "admin ddl",
        "CREATE EVENT TRIGGER",
    ),
    C(
        "create subscription sub connection 'host=x' publication p",
        "admin ddl",
        "CREATE SUBSCRIPTION",
    ),
]


def _case_id(case: Case) -> str:
    return case.id or re.sub(r"\s+", " ", case.sql)[:60]


def test_corpus_size_and_unique_ids() -> None:
    assert len(CORPUS) >= 120
    ids = [_case_id(c) for c in CORPUS]
    duplicates = {i for i in ids if ids.count(i) > 1}
    # The same text may appear with different settings (allow-list, path) but then needs an id.
    assert not duplicates, duplicates


@pytest.mark.parametrize("case", CORPUS, ids=_case_id)
def test_corpus(case: Case) -> None:
    facts = one(case.sql, path=case.path, allowed_functions=case.allowed)
    assert facts.classes == case.classes, facts
    if case.command is not None:
        assert facts.command == case.command, facts
    if case.tables is not None:
        assert set(facts.tables) == case.tables, facts
    if case.written is not None:
        assert set(facts.written_tables) == case.written, facts
    if case.without_where is not None:
        assert facts.without_where is case.without_where, facts
    if case.sets_search_path is not False:
        assert facts.sets_search_path == case.sets_search_path, facts
    if case.local is not None:
        assert facts.search_path_is_local is case.local, facts
    assert set(facts.written_tables) <= set(facts.tables), facts
    if "write" not in facts.classes:
        assert not facts.written_tables or facts.command.startswith("ALTER"), facts
    # commands: the outer tag first, each tag once
    assert facts.commands[0] == facts.command, facts
    assert len(set(facts.commands)) == len(facts.commands), facts
    # the policy loader's "can never match" warnings agree with what the analyser produces
    for command in facts.commands:
        assert facts.classes <= COMMAND_CLASSES[command], (command, facts)
    if facts.without_where:
        assert not WITHOUT_WHERE_TAGS.isdisjoint(facts.commands), facts


def test_every_family_has_a_benign_twin() -> None:
    """Each evasion family of SPEC §3 has hostile and benign entries in the corpus."""
    families = {
        "cte": ("with ", "write"),
        "explain": ("explain", "write"),
        "prepare": ("prepare p", "write"),
        "function": ("select my_", "function"),
        "copy": ("copy ", "admin"),
        "into": (" into ", "ddl"),
        "cursor": ("declare ", "write"),
    }
    for family, (needle, dangerous) in families.items():
        entries = [c for c in CORPUS if needle in c.sql.lower()]
        assert any(dangerous in c.classes for c in entries), family
        assert any(dangerous not in c.classes for c in entries), family


# --------------------------------------------------------------------------- details


def test_backslash_quote_divergence_is_visible() -> None:
    """With standard_conforming_strings off the server would run the CREATE hidden in the
    literal below; the analyser lexes with it on, so the SET that turns it off is refused by
    class (admin, function) rather than trusted."""
    hidden = "select 'x\\''; create table pwned (a int); --'"
    assert [f.command for f in analyse(hidden, CATALOG, PATH)] == ["SELECT"]
    assert {"admin", "function"} <= one("set standard_conforming_strings = off").classes
    assert {"admin", "function"} <= one("set standard_conforming_strings = 0").classes


def test_columns_resolved_to_tables() -> None:
    facts = one(
        "select c.email, o.total, name from customers c join orders o on o.customer_id = c.id "
        "where status = 'paid'"
    )
    assert set(facts.columns) == {
        "public.customers.email",
        "public.customers.id",
        "public.customers.name",
        "public.orders.total",
        "public.orders.customer_id",
        "public.orders.status",
    }


def test_star_expands_known_columns() -> None:
    assert set(one("select * from t").columns) == {"public.t.id", "public.t.x"}
    assert set(one("select c.* from customers c, t").columns) == {
        "public.customers.id",
        "public.customers.name",
        "public.customers.email",
        "public.customers.ssn",
        "public.customers.salary",
    }
    assert set(one("select public.t.* from public.t").columns) == {"public.t.id", "public.t.x"}


def test_columns_schema_qualified_and_correlated() -> None:
    facts = one("select public.customers.ssn from public.customers")
    assert facts.columns == ("public.customers.ssn",)
    # an unqualified name binds to the innermost scope that has it (orders.id), and falls
    # through to the outer query when the inner relations lack it (customers.email)
    facts = one(
        "select (select max(total) from orders o where o.status = email and id > 0) from customers"
    )
    assert set(facts.columns) == {
        "public.orders.total",
        "public.orders.status",
        "public.orders.id",
        "public.customers.email",
    }


def test_dml_columns() -> None:
    facts = one("update customers set email = 'x' where id = 1 returning ssn")
    assert set(facts.columns) == {
        "public.customers.email",
        "public.customers.id",
        "public.customers.ssn",
    }
    facts = one("insert into customers (id, email) values (1, 'x')")
    assert set(facts.columns) == {"public.customers.id", "public.customers.email"}


def test_functions_are_resolved() -> None:
    facts = one("select lower(name), my_volatile_fn(), nosuch() from customers")
    assert facts.functions == ("pg_catalog.lower", "public.my_volatile_fn", "public.nosuch")
    assert any("nosuch" in note for note in facts.notes)


def test_function_names_in_definitions_recorded_without_class() -> None:
    facts = one("create view v9 as select my_volatile_fn(), nextval('s')")
    assert facts.classes == {"ddl"}
    assert set(facts.functions) == {"public.my_volatile_fn", "pg_catalog.nextval"}


def test_multi_statement_judged_each() -> None:
    facts = analyse("select 1; delete from orders; select my_volatile_fn()", CATALOG, PATH)
    assert [f.classes for f in facts] == [
        {"read"},
        {"write"},
        {"read", "function"},
    ]
    assert [f.sql for f in facts] == ["select 1", "delete from orders", "select my_volatile_fn()"]
    assert facts[1].without_where


def test_multi_statement_text_with_unicode() -> None:
    facts = analyse("select 'é'; select 'ü' from t", CATALOG, PATH)
    assert [f.sql for f in facts] == ["select 'é'", "select 'ü' from t"]


def test_transaction_block() -> None:
    facts = analyse("BEGIN; UPDATE orders SET total = 1 WHERE id = 1; COMMIT;", CATALOG, PATH)
    assert [f.command for f in facts] == ["BEGIN", "UPDATE", "COMMIT"]
    assert [f.classes for f in facts] == [{"transaction"}, {"write"}, {"transaction"}]


def test_search_path_change_applies_to_later_statements() -> None:
    facts = analyse("set search_path = vault; select * from secrets", CATALOG, PATH)
    assert facts[0].sets_search_path == ("vault",)
    assert facts[1].tables == ("vault.secrets",)
    facts = analyse(
        "select set_config('search_path', 'app', false); select * from t; reset search_path; "
        "select * from t",
        CATALOG,
        PATH,
    )
    assert facts[1].tables == ("app.t",)
    assert facts[3].tables == ("public.t",)


def test_search_path_user_expansion_in_multi_statement() -> None:
    facts = analyse(
        'set search_path = "$user"; select * from events', CATALOG, PATH, current_user="app"
    )
    assert facts[1].tables == ("app.events",)


def test_set_config_search_path_quoting() -> None:
    facts = one("select set_config('search_path', '\"Public\", App', false)")
    assert facts.sets_search_path == ("Public", "app")


def test_empty_and_comment_only() -> None:
    assert analyse("", CATALOG, PATH) == []
    assert analyse("  ;; -- nothing\n", CATALOG, PATH) == []
    assert analyse("/* only */", CATALOG, PATH) == []


@pytest.mark.parametrize(
    "sql",
    ["selec 1", "select from from", "delete orders", "select 'unterminated", "begin; sel;"],
)
def test_parse_error_raises(sql: str) -> None:
    with pytest.raises(AnalysisError):
        analyse(sql, CATALOG, PATH)


def test_unknown_statement_fails_closed() -> None:
    from pgguard.policy import analysis

    walker = analysis._Walker(CATALOG, PATH, frozenset(), None)
    command = analysis._statement(walker, "FrobnicateStmt", {})
    assert command == "FROBNICATE"
    assert walker.classes == {"admin", "role", "function", "ddl", "write"}
    assert any("unrecognised" in note for note in walker.notes)


def test_notes_explain_assumptions() -> None:
    assert one("select * from nosuch").notes
    assert one("execute p").notes
    assert one("do $$ begin end $$").notes
    assert not one("select lower(name) from customers").notes


# --------------------------------------------------------------------------- commands, settings


@pytest.mark.parametrize(
    ("sql", "commands"),
    [
        # plain statements: just their own tag (a subquery SELECT is no statement)
        ("select 1", ("SELECT",)),
        ("delete from orders where id = 1", ("DELETE",)),
        ("insert into t select id, total from orders", ("INSERT",)),
        ("update t set x = (select max(total) from orders) where id = 1", ("UPDATE",)),
        ("set work_mem = '1MB'", ("SET",)),
        ("vacuum", ("VACUUM",)),
        ("truncate orders", ("TRUNCATE TABLE",)),
        ("with r as (select * from orders) select * from r", ("SELECT",)),
        # data-modifying CTEs, at any depth
        ("with d as (delete from orders returning *) select * from d", ("SELECT", "DELETE")),
        (
            "with u as (update orders set total = 0 where id = 2 returning id) "
            "select count(*) from u",
            ("SELECT", "UPDATE"),
        ),
        ("with i as (insert into t values (1, 1) returning *) select 1", ("SELECT", "INSERT")),
        (
            "with m as (merge into orders o using t on o.id = t.id when matched then delete) "
            "select 1",
            ("SELECT", "MERGE"),
        ),
        (
            "select * from (with d as (delete from t returning *) select * from d) s",
            ("SELECT", "DELETE"),
        ),
        (
            "with a as (with b as (insert into t values (1, 1) returning id) "
            "update orders set total = 1 where id in (select id from b) returning id) "
            "delete from t where id in (select id from a)",
            ("DELETE", "UPDATE", "INSERT"),
        ),
        (
            "with a as (delete from t returning *), b as (delete from orders returning *) select 1",
            ("SELECT", "DELETE"),
        ),
        # EXPLAIN: only ANALYZE runs the statement
        ("explain analyze delete from orders", ("EXPLAIN", "DELETE")),
        ("explain (analyze true) update orders set total = 1", ("EXPLAIN", "UPDATE")),
        ("explain delete from orders", ("EXPLAIN",)),
        ("explain (analyze false) delete from orders", ("EXPLAIN",)),
        ("explain analyze select * from orders", ("EXPLAIN", "SELECT")),
        (
            "explain analyze with d as (delete from orders returning *) select * from d",
            ("EXPLAIN", "SELECT", "DELETE"),
        ),
        ("explain analyze create table x as select 1", ("EXPLAIN", "CREATE TABLE AS", "SELECT")),
        ("explain analyze execute p", ("EXPLAIN", "EXECUTE")),
        # PREPARE: the inner statement; EXECUTE of an unknown name: only EXECUTE
        ("prepare p as delete from orders", ("PREPARE", "DELETE")),
        (
            "prepare p as with d as (delete from orders returning *) select * from d",
            ("PREPARE", "SELECT", "DELETE"),
        ),
        ("execute p", ("EXECUTE",)),
        # CREATE TABLE AS / SELECT INTO / CREATE MATERIALIZED VIEW
        (
            "create table x as with d as (delete from orders returning *) select * from d",
            ("CREATE TABLE AS", "SELECT", "DELETE"),
        ),
        ("create table x as select * from orders", ("CREATE TABLE AS", "SELECT")),
        ("create table x as select * from orders with no data", ("CREATE TABLE AS",)),
        ("create table x as execute p", ("CREATE TABLE AS", "EXECUTE")),
        (
            "create materialized view m2 as select * from vault.secrets",
            ("CREATE MATERIALIZED VIEW", "SELECT"),
        ),
        ("select * into newt from orders", ("SELECT",)),
        (
            "with d as (delete from orders returning *) select * into newt from d",
            ("SELECT", "DELETE"),
        ),
        # COPY (query)
        ("copy (delete from orders returning *) to stdout", ("COPY", "DELETE")),
        (
            "copy (with d as (update orders set total = 0 returning *) select * from d) to stdout",
            ("COPY", "SELECT", "UPDATE"),
        ),
        ("copy (select * from orders) to stdout", ("COPY", "SELECT")),
        ("copy orders to stdout", ("COPY",)),
        ("copy orders from stdin", ("COPY",)),
        # DECLARE CURSOR
        ("declare c cursor for select * from orders", ("DECLARE CURSOR", "SELECT")),
        (
            "declare c cursor for with d as (delete from orders returning *) select * from d",
            ("DECLARE CURSOR", "SELECT", "DELETE"),
        ),
        # CREATE SCHEMA runs its elements
        (
            "create schema s2 create table a (x int) grant select on a to bob",
            ("CREATE SCHEMA", "CREATE TABLE", "GRANT"),
        ),
        # definitions run later: nothing nested
        ("create rule r as on insert to t do instead delete from orders", ("CREATE RULE",)),
        (
            "create procedure p2() language sql begin atomic delete from orders; end",
            ("CREATE PROCEDURE",),
        ),
        ("create view v5 as select * from orders", ("CREATE VIEW",)),
    ],
)
def test_commands(sql: str, commands: tuple[str, ...]) -> None:
    facts = one(sql)
    assert facts.commands == commands, facts
    assert facts.all_commands == commands


def test_commands_of_prepared_statements() -> None:
    _, deleter = prepared_statement(
        "prepare d as with x as (delete from orders returning *) select * from x", CATALOG, PATH
    ) or ("", None)
    assert deleter is not None
    assert deleter.commands == ("SELECT", "DELETE")
    known = {"d": deleter}
    assert one("execute d", prepared=known).commands == ("SELECT", "DELETE")
    assert one("explain analyze execute d", prepared=known).commands == (
        "EXPLAIN",
        "SELECT",
        "DELETE",
    )
    assert one("explain execute d", prepared=known).commands == ("EXPLAIN",)
    assert one("create table x as execute d", prepared=known).commands == (
        "CREATE TABLE AS",
        "SELECT",
        "DELETE",
    )
    facts = analyse("prepare e as delete from t; execute e; execute f", CATALOG, PATH)
    assert [f.commands for f in facts] == [("PREPARE", "DELETE"), ("DELETE",), ("EXECUTE",)]
    # facts built by hand (or by an older analyser) fall back to the command
    manual = StatementFacts(sql="delete from t", command="DELETE", classes=frozenset({"write"}))
    assert manual.commands == ()
    assert manual.all_commands == ("DELETE",)
    assert one("execute m", prepared={"m": manual}).commands == ("DELETE",)


@pytest.mark.parametrize(
    ("sql", "settings_"),
    [
        ("select 1", ()),
        ("delete from orders", ()),
        ("set work_mem = '1MB'", ("work_mem",)),
        ('set local "Work_Mem" = 1', ("work_mem",)),
        ("set work_mem from current", ("work_mem",)),
        ("set search_path to default", ("search_path",)),
        ("set schema 'app'", ("search_path",)),
        ("set time zone 'UTC'", ("timezone",)),
        ("set names 'latin1'", ("client_encoding",)),
        ("set role postgres", ("role",)),
        ("set session authorization default", ("session_authorization",)),
        ("set pgguard.prompt_id = 'p1'", ("pgguard.prompt_id",)),
        ("reset statement_timeout", ("statement_timeout",)),
        ("reset role", ("role",)),
        ("reset all", ("all",)),
        ("discard all", ("all",)),
        ("discard plans", ()),
        (
            "set transaction isolation level serializable, read only, deferrable",
            ("transaction_isolation", "transaction_read_only", "transaction_deferrable"),
        ),
        ("set transaction read write", ("transaction_read_only",)),
        (
            "set session characteristics as transaction isolation level read committed",
            ("default_transaction_isolation",),
        ),
        (
            "set session characteristics as transaction read write",
            ("default_transaction_read_only",),
        ),
        ("set transaction snapshot '00000003-0000001B-1'", ()),
        (
            "begin isolation level repeatable read read only",
            ("transaction_isolation", "transaction_read_only"),
        ),
        ("start transaction read write", ("transaction_read_only",)),
        ("begin", ()),
        ("commit", ()),
        (
            "select set_config('Statement_Timeout', '1s', false), "
            "set_config('search_path', 'app', true)",
            ("statement_timeout", "search_path"),
        ),
        ("select set_config(current_user, 'x', false)", ()),
        ("explain analyze select set_config('work_mem', '1MB', false)", ("work_mem",)),
        ("explain select set_config('work_mem', '1MB', false)", ()),
        ("prepare q as select set_config('work_mem', '1MB', false)", ()),
        ("create view v6 as select set_config('work_mem', '1MB', false)", ()),
        ("alter system set work_mem = '1GB'", ()),
        ("alter role bob set work_mem = '1MB'", ()),
        ("alter database postgres set work_mem = '1MB'", ()),
        (
            "create function f2() returns int language sql set work_mem = '1MB' as 'select 1'",
            (),
        ),
    ],
)
def test_settings(sql: str, settings_: tuple[str, ...]) -> None:
    assert one(sql).settings == settings_


def test_settings_of_executed_prepared_statements() -> None:
    facts = analyse(
        "prepare q as select set_config('work_mem', '1MB', false); execute q", CATALOG, PATH
    )
    assert [f.settings for f in facts] == [(), ("work_mem",)]
    _, inner = prepared_statement(
        "prepare q as select set_config('work_mem', '1MB', false)", CATALOG, PATH
    ) or ("", None)
    assert inner is not None
    assert one("explain analyze execute q", prepared={"q": inner}).settings == ("work_mem",)
    assert one("explain execute q", prepared={"q": inner}).settings == ()


# --------------------------------------------------------------------------- prepared statements


def test_prepared_statement_tracking() -> None:
    name, inner = prepared_statement("PREPARE del AS DELETE FROM orders", CATALOG, PATH) or (
        "",
        None,
    )
    assert name == "del"
    assert inner is not None
    assert inner.command == "DELETE"
    assert inner.classes == {"write"}
    assert inner.without_where
    facts = one("execute del", prepared={"del": inner})
    assert facts.command == "DELETE"
    assert facts.classes == {"write"}
    assert facts.written_tables == ("public.orders",)
    assert facts.without_where

    _, reader = prepared_statement(
        "prepare r(int) as select * from t where id = $1", CATALOG, PATH
    ) or (
        "",
        None,
    )
    assert reader is not None
    facts = one("execute r(1)", prepared={"r": reader})
    assert facts.classes == {"read"}
    assert facts.command == "SELECT"
    # explain analyze of a known read-only prepared statement
    assert one("explain analyze execute r(1)", prepared={"r": reader}).classes == {"read"}
    # unknown names still fail closed
    assert one("execute other", prepared={"r": reader}).classes == {"read", "write", "function"}


def test_prepare_and_execute_in_one_string() -> None:
    facts = analyse(
        "prepare r as select * from t; execute r; prepare d as delete from orders; execute d; "
        "deallocate d; execute d; discard all; execute r",
        CATALOG,
        PATH,
    )
    assert [(f.command, set(f.classes)) for f in facts] == [
        ("PREPARE", {"session", "read"}),
        ("SELECT", {"read"}),
        ("PREPARE", {"session", "write"}),
        ("DELETE", {"write"}),
        ("DEALLOCATE", {"session"}),
        ("EXECUTE", {"read", "write", "function"}),
        ("DISCARD ALL", {"session"}),
        ("EXECUTE", {"read", "write", "function"}),
    ]
    assert facts[3].without_where
    assert facts[3].written_tables == ("public.orders",)


def test_create_table_as_execute() -> None:
    assert one("create table x as execute p").classes == {"ddl", "write", "read", "function"}
    _, reader = prepared_statement("prepare r as select 1", CATALOG, PATH) or ("", None)
    assert reader is not None
    facts = one("create table x as execute r", prepared={"r": reader})
    assert facts.classes == {"ddl", "write", "read"}


def test_prepared_statement_other_statements() -> None:
    assert prepared_statement("select 1", CATALOG, PATH) is None
    assert prepared_statement("prepare a as select 1; prepare b as select 2", CATALOG, PATH) is None


# --------------------------------------------------------------------------- catalog snapshot


def test_snapshot_resolution() -> None:
    assert CATALOG.relation(None, "t", ("pg_catalog", "public")) is not None
    assert CATALOG.relation(None, "t", ("app", "public")).qualified == "app.t"  # type: ignore[union-attr]
    assert CATALOG.relation("vault", "secrets", ()) is not None
    assert CATALOG.relation(None, "secrets", PATH) is None
    assert CATALOG.relation("Public", "T", ()) is not None
    assert CATALOG.relation("public", "T", ()) is None
    assert [f.qualified for f in CATALOG.functions(None, "count", PATH)] == [
        "pg_catalog.count",
        "pg_catalog.count",
    ]
    assert CATALOG.functions(None, "audit_fn", PATH) == []
    assert CATALOG.functions("app", "audit_fn", ()) != ()


def test_snapshot_temp_schema() -> None:
    snap = CatalogSnapshot(
        [_rel(1, "pg_temp_3", "tmp", "r", "a"), _rel(2, "public", "tmp", "r", "b")],
        [_fn(30001, "pg_temp_3", "f", "v"), _fn(30002, "public", "f", "i")],
    )
    path = effective_search_path("public", "u", "pg_temp_3")
    assert path == ("pg_temp_3", "pg_catalog", "public")
    assert snap.relation(None, "tmp", path).schema == "pg_temp_3"  # type: ignore[union-attr]
    assert snap.relation("pg_temp", "tmp", path).schema == "pg_temp_3"  # type: ignore[union-attr]
    # functions are never looked up in the temporary schema
    assert [f.schema for f in snap.functions(None, "f", path)] == ["public"]


@pytest.mark.parametrize(
    ("setting", "user", "temp", "expected"),
    [
        ('"$user", public', "alice", None, ("pg_catalog", "alice", "public")),
        ('"$user", public', "", None, ("pg_catalog", "public")),
        ("public, pg_catalog", "u", None, ("public", "pg_catalog")),
        ('  App ,  "Mixed Case"  ', "u", None, ("pg_catalog", "app", "Mixed Case")),
        ('"a""b", c', "u", None, ("pg_catalog", 'a"b', "c")),
        ("app, public", "u", "pg_temp_7", ("pg_temp_7", "pg_catalog", "app", "public")),
        ("app, pg_temp, public", "u", "pg_temp_7", ("pg_catalog", "app", "pg_temp_7", "public")),
        ("app, pg_temp", "u", None, ("pg_catalog", "app")),
        ("", "u", None, ("pg_catalog",)),
        ("app, app, public", "u", None, ("pg_catalog", "app", "public")),
    ],
)
def test_effective_search_path(
    setting: str, user: str, temp: str | None, expected: tuple[str, ...]
) -> None:
    assert effective_search_path(setting, user, temp) == expected


def test_effective_search_path_from_names() -> None:
    assert effective_search_path(("$user", "Public"), "bob") == ("pg_catalog", "bob", "Public")


@pytest.mark.parametrize("bad", ['"unterminated', "a,,b", "a b", "a,", 'a"b'])
def test_split_search_path_rejects_malformed(bad: str) -> None:
    with pytest.raises(ValueError):
        split_search_path(bad)


def test_snapshot_from_rows_formats() -> None:
    rel = [1, "public", "r1", "v", ["a", "b"], [["public", "base"]]]
    fn = [2, "pg_catalog", "f1", "v", "f", True, False, "internal"]
    for wrap in (json.dumps, lambda d: json.dumps(d).encode(), lambda d: d):
        snap = snapshot_from_rows([("r", wrap(rel)), ("f", wrap(fn)), ("x", wrap([]))])
        info = snap.relation("public", "r1", ())
        assert info == RelationInfo(1, "public", "r1", "v", ("a", "b"), ("public.base",))
        (func,) = snap.functions("pg_catalog", "f1", ())
        assert func.builtin and func.volatility == "v" and func.language == "internal"
    # text-format booleans as PostgreSQL prints them
    snap = snapshot_from_rows(
        [(b"f", json.dumps([3, "public", "g", "s", "p", "f", "t", "plpgsql"]))]
    )
    (func,) = snap.functions("public", "g", ())
    assert not func.builtin and func.security_definer and func.kind == "p"


# --------------------------------------------------------------------------- property tests


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=200))
def test_arbitrary_text_gives_facts_or_analysis_error(text: str) -> None:
    try:
        result = analyse(text, CATALOG, PATH)
    except AnalysisError:
        return
    assert isinstance(result, list)
    assert all(isinstance(f, StatementFacts) for f in result)


_FRAGMENTS = [
    "select",
    "insert into",
    "update",
    "delete from",
    "with",
    "as",
    "(",
    ")",
    ",",
    ";",
    "*",
    "from",
    "where",
    "t",
    "orders",
    "vault.secrets",
    "x",
    "1",
    "'a'",
    "$1",
    "=",
    "and",
    "or",
    "not",
    "returning",
    "set",
    "values",
    "explain",
    "analyze",
    "prepare p as",
    "execute p",
    "copy",
    "to",
    "stdout",
    "program",
    "do",
    "$$ begin end $$",
    "call",
    "proc()",
    "lower(x)",
    "my_volatile_fn()",
    "nextval('s')",
    "join",
    "on",
    "lateral",
    "union",
    "all",
    "order by",
    "group by",
    "limit",
    "for update",
    "into",
    "create table",
    "drop",
    "table",
    "view",
    "grant",
    "select on",
    "to bob",
    "begin",
    "commit",
    "declare c cursor for",
    "fetch",
    "case when",
    "then",
    "else",
    "end",
    "exists",
    "in",
    "::int",
    "array[1]",
    "row(1, 2)",
    "distinct",
    "having",
    "window w as ()",
    "over w",
    "filter (where true)",
    "using",
    "merge into",
    "when matched then",
    "on conflict do nothing",
    "default",
    "null",
    "true",
]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(_FRAGMENTS), max_size=25))
def test_sqlish_fragments_give_facts_or_analysis_error(parts: list[str]) -> None:
    text = " ".join(parts)
    try:
        result = analyse(text, CATALOG, PATH)
    except AnalysisError:
        return
    for facts in result:
        assert facts.command
        assert facts.classes <= {
            "read",
            "write",
            "ddl",
            "role",
            "function",
            "session",
            "transaction",
            "copy",
            "admin",
        }


_HOSTILE = [
    "with d as (delete from orders returning *) select * from d",
    "explain analyze delete from orders",
    "prepare p as delete from orders",
    "select my_volatile_fn()",
    "select pg_read_file('/etc/passwd')",
    "copy orders to program 'x'",
    "select * into newt from orders",
    "declare c cursor for select * from orders for update",
    "select set_config('role', 'postgres', false)",
    "do $$ begin delete from orders; end $$",
    "update orders set total = 0",
    "select * from vault.secrets",
]


def _disguise(sql: str, data: st.DataObject) -> str:
    """Random comments, whitespace and keyword casing between tokens (outside literals)."""
    tokens = re.findall(r"\$\$.*?\$\$|'[^']*'|\"[^\"]*\"|\w+|[^\w\s]", sql, flags=re.S)
    out: list[str] = []
    for token in tokens:
        if token[0].isalpha() or token[0] == "_":
            token = "".join(
                c.upper() if data.draw(st.booleans(), label="case") else c.lower() for c in token
            )
        out.append(token)
        out.append(
            data.draw(
                st.sampled_from([" ", "  ", "\n", "\t", " /* x */ ", " -- y\n", "/**/ "]),
                label="gap",
            )
        )
    return "".join(out)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.sampled_from(_HOSTILE), st.data())
def test_disguise_does_not_change_classes(sql: str, data: st.DataObject) -> None:
    expected = one(sql)
    disguised = _disguise(sql, data)
    facts = one(disguised)
    assert facts.classes == expected.classes, disguised
    assert set(facts.tables) == set(expected.tables), disguised
    assert facts.without_where == expected.without_where, disguised


def test_dangerous_list_covers_issue_examples() -> None:
    for name in (
        "pg_read_file",
        "pg_read_binary_file",
        "pg_ls_dir",
        "pg_stat_file",
        "nextval",
        "setval",
        "pg_terminate_backend",
        "pg_cancel_backend",
        "pg_reload_conf",
        "pg_rotate_logfile",
        "pg_promote",
        "pg_switch_wal",
        "pg_create_restore_point",
    ):
        assert name in DANGEROUS_FUNCTIONS, name


def test_deep_nesting() -> None:
    # a long operator chain nests one level per operator: still analysed ...
    (facts,) = analyse("select " + " + ".join(["x"] * 2000) + " from t", CATALOG, PATH)
    assert facts.classes == {"read"}
    assert facts.columns == ("public.t.x",)
    # ... and beyond what can be walked the statement is refused, never crashes
    for sql in ("select " + " + ".join(["1"] * 20000), "select " + "not " * 6000 + "true"):
        with pytest.raises(AnalysisError):
            analyse(sql, CATALOG, PATH)


def test_simple_select_is_fast() -> None:
    sql = "SELECT abalance FROM customers WHERE id = 48213"
    analyse(sql, CATALOG, PATH)
    rounds = 2000
    start = time.perf_counter()
    for _ in range(rounds):
        analyse(sql, CATALOG, PATH)
    per_call = (time.perf_counter() - start) / rounds
    assert per_call < 0.002, f"{per_call * 1e6:.0f} µs per analyse()"


# --------------------------------------------------------------------------- real server

_SCHEMA_SQL = """
CREATE SCHEMA app;
CREATE SCHEMA vault;
CREATE SCHEMA "Mixed Case";
CREATE SCHEMA postgres;
CREATE TABLE public.customers (id int primary key, email text, ssn text, dropped int);
ALTER TABLE public.customers DROP COLUMN dropped;
CREATE TABLE app.orders (id int primary key, customer_id int, total numeric);
CREATE TABLE vault.secrets (id int, secret text);
CREATE TABLE "Mixed Case"."T" ("Id" int);
CREATE TABLE public.dup (a int);
CREATE TABLE app.dup (b int);
CREATE VIEW app.order_view AS
    SELECT o.id, c.email FROM app.orders o JOIN public.customers c ON c.id = o.customer_id;
CREATE VIEW public.view_of_view AS SELECT id FROM app.order_view;
CREATE VIEW public.secret_view AS SELECT count(*) FROM vault.secrets;
CREATE MATERIALIZED VIEW app.secret_mv AS SELECT * FROM vault.secrets;
CREATE SEQUENCE app.seq;
CREATE FUNCTION app.imm(int) RETURNS int IMMUTABLE LANGUAGE sql AS 'select $1';
CREATE FUNCTION app.stab() RETURNS int STABLE LANGUAGE sql AS 'select 1';
CREATE FUNCTION app.vol() RETURNS int VOLATILE LANGUAGE plpgsql AS 'begin return 1; end';
CREATE FUNCTION app.definer() RETURNS int STABLE SECURITY DEFINER LANGUAGE sql AS 'select 1';
CREATE PROCEDURE app.proc() LANGUAGE sql AS 'select 1';
"""


@pytest.fixture(scope="session")
def live() -> Iterator[tuple[CatalogSnapshot, str]]:
    """A private PostgreSQL with a small schema: (snapshot from CATALOG_SQL, dsn)."""
    psycopg = pytest.importorskip("psycopg")
    from pgguard.embedded import EmbeddedError, EmbeddedPostgres

    try:
        server = EmbeddedPostgres()
    except EmbeddedError as exc:
        pytest.skip(f"no PostgreSQL server binaries: {exc}")
    server.start()
    try:
        dsn = (
            f"host={server.host} port={server.port} user={server.superuser} "
            f"password={server.password} dbname=postgres"
        )
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(_SCHEMA_SQL)
            rows = conn.execute(CATALOG_SQL).fetchall()
        yield snapshot_from_rows(rows), dsn
    finally:
        server.stop()


def test_live_catalog_relations(live: tuple[CatalogSnapshot, str]) -> None:
    snap, _ = live
    customers = snap.relation("public", "customers", ())
    assert customers is not None
    assert customers.kind == "r"
    assert customers.columns == ("id", "email", "ssn")  # dropped column gone
    view = snap.relation("app", "order_view", ())
    assert view is not None and view.kind == "v"
    assert set(view.depends_on) == {"app.orders", "public.customers"}
    vov = snap.relation("public", "view_of_view", ())
    assert vov is not None and vov.depends_on == ("app.order_view",)
    mv = snap.relation("app", "secret_mv", ())
    assert mv is not None and mv.kind == "m" and mv.depends_on == ("vault.secrets",)
    seq = snap.relation("app", "seq", ())
    assert seq is not None and seq.kind == "S"
    mixed = snap.relation("Mixed Case", "T", ())
    assert mixed is not None and mixed.columns == ("Id",)
    pg_class = snap.relation(None, "pg_class", ("pg_catalog", "public"))
    assert pg_class is not None and pg_class.oid == 1259
    assert snap.relation("pg_toast", "anything", ()) is None


def test_live_catalog_functions(live: tuple[CatalogSnapshot, str]) -> None:
    snap, _ = live

    def only(schema: str, name: str) -> FunctionInfo:
        (fn,) = snap.functions(schema, name, ())
        return fn

    assert only("app", "imm").volatility == "i"
    assert only("app", "imm").language == "sql"
    assert only("app", "stab").volatility == "s"
    vol = only("app", "vol")
    assert vol.volatility == "v" and vol.language == "plpgsql" and not vol.builtin
    assert only("app", "definer").security_definer
    assert only("app", "proc").kind == "p"
    lower = snap.functions("pg_catalog", "lower", ())
    assert lower and all(f.builtin and f.volatility == "i" for f in lower)
    assert all(
        f.builtin and f.volatility == "v" for f in snap.functions("pg_catalog", "nextval", ())
    )
    assert any(f.kind == "a" for f in snap.functions("pg_catalog", "count", ()))
    assert any(f.kind == "w" for f in snap.functions("pg_catalog", "row_number", ()))


def test_live_catalog_text_rows_match(live: tuple[CatalogSnapshot, str]) -> None:
    """The loader accepts the rows exactly as a text-format DataRow carries them."""
    import psycopg

    snap, dsn = live
    with psycopg.connect(dsn) as conn:
        cur = conn.cursor(binary=False)
        rows = cur.execute(CATALOG_SQL).fetchall()
        raw = [(kind.encode(), doc.encode()) for kind, doc in rows]
    again = snapshot_from_rows(raw)
    assert again.relation_count == snap.relation_count
    assert again.function_count == snap.function_count


def test_live_analysis(live: tuple[CatalogSnapshot, str]) -> None:
    snap, _ = live
    path = effective_search_path('"$user", public', "postgres")

    def run(sql: str) -> StatementFacts:
        (facts,) = analyse(sql, snap, path)
        return facts

    facts = run("select * from view_of_view")
    assert set(facts.tables) == {
        "public.view_of_view",
        "app.order_view",
        "app.orders",
        "public.customers",
    }
    assert run("select * from public.secret_view").tables == (
        "public.secret_view",
        "vault.secrets",
    )
    assert run("select lower(email), now(), count(*) from customers group by 1").classes == {"read"}
    assert run("select random(), clock_timestamp(), gen_random_uuid(), pg_sleep(0)").classes == {
        "read"
    }
    assert run("select app.imm(1), app.stab()").classes == {"read"}
    assert run("select app.vol()").classes == {"read", "function"}
    assert run("select app.definer()").classes == {"read", "function"}
    assert run("call app.proc()").classes == {"function"}
    assert run("select nextval('app.seq')").classes == {"read", "function"}
    assert run("select pg_read_file('postgresql.conf')").classes == {"read", "function"}
    assert run("select jsonb_build_object('a', 1), extract(year from now())").classes == {"read"}
    assert run('select * from "Mixed Case"."T"').tables == ("Mixed Case.T",)
    assert run("select * from dup").tables == ("public.dup",)
    (facts,) = analyse("select * from dup", snap, effective_search_path("app, public", "x"))
    assert facts.tables == ("app.dup",)


@pytest.mark.parametrize(
    "setting",
    [
        "app, public",
        '"$user", public',
        "public, pg_catalog",
        '"Mixed Case", app',
        "nosuch, app",
        "vault",
    ],
)
def test_live_search_path_matches_server(live: tuple[CatalogSnapshot, str], setting: str) -> None:
    import psycopg

    snap, dsn = live
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(f"SET search_path = {setting}")
        (server_path,) = conn.execute("SELECT current_schemas(true)").fetchone() or ([],)
        (shown,) = conn.execute("SHOW search_path").fetchone() or ("",)
        schemas = {row[0] for row in conn.execute("SELECT nspname FROM pg_namespace")}
        # the analyser sees the same path from the SET statement and from SHOW
        (facts,) = analyse(f"SET search_path = {setting}", snap, ())
        assert facts.sets_search_path is not None
        for path in (
            effective_search_path(shown, "postgres"),
            effective_search_path(facts.sets_search_path, "postgres"),
        ):
            assert [s for s in path if s in schemas] == list(server_path)
        # and resolves like the server
        for name in ("dup", "customers", "orders", "secrets", "T", "pg_class"):
            row = conn.execute(
                "SELECT n.nspname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE c.oid = to_regclass(%s)",
                [f'"{name}"'],
            ).fetchone()
            info = snap.relation(None, name, effective_search_path(shown, "postgres"))
            assert (info.schema if info else None) == (row[0] if row else None), name


def test_live_temp_schema(live: tuple[CatalogSnapshot, str]) -> None:
    import psycopg

    _, dsn = live
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TEMP TABLE scratch (a int)")
        (temp,) = conn.execute("SELECT pg_my_temp_schema()::regnamespace::text").fetchone() or ("",)
        for setting in ("app, public", "app, pg_temp, public"):
            conn.execute(f"SET search_path = {setting}")
            (server_path,) = conn.execute("SELECT current_schemas(true)").fetchone() or ([],)
            assert effective_search_path(setting, "postgres", temp) == tuple(server_path)
        rows = conn.execute(CATALOG_SQL).fetchall()
    snap = snapshot_from_rows(rows)
    path = effective_search_path("app, public", "postgres", temp)
    info = snap.relation(None, "scratch", path)
    assert info is not None and info.schema == temp
