"""Masking (SPEC §4): a corpus of leak attempts, run through pgguard with every client.

``mask_t.customers`` holds sensitive values that cannot appear by accident (an email local
part ``zelda.q7x``, an SSN prefix ``913-27``, salary ``87654.32``, a uuid, a phone number in a
jsonb document, ``SECRETPNG`` bytes…), and the policy of this module masks ten of its columns
for everyone but the ``dba`` group, each with a different mask function. ``id``, ``name`` and
``level`` are clean.

Each case of ``CASES`` is one route by which a statement can reach a masked value: a direct
reference, ``*``, aliases, views, CTEs, subqueries, UNION, expressions and functions of a
column, SQL and PL/pgSQL functions, aggregates, JSON/row/XML constructors, whole-row
references, ``RETURNING``, cursors, SQL ``PREPARE``/``EXECUTE``, ``COPY … TO STDOUT``,
``pg_stats``, error messages, notices, session objects, ``search_path``… Each case runs, in one
session per client and identity, with every client of the matrix (``CLIENTS``: psql, psycopg 3
text and binary, asyncpg, pg8000, SQLAlchemy, node-postgres, and a raw protocol client in text
and binary formats, which sees every byte); a client that cannot run a case is skipped in the
parametrization, with the reason.

The needles (``NEEDLES``, ``binary_needles``) are renderings of the clear values that a correct
mask never produces (``keep_last(4)`` keeps ``4481``, so that is not a needle). Assertions:

- through pgguard, as a masked identity, no needle appears in anything the client received:
  values, errors, notices, COPY data, raw bytes
  (``test_no_clear_value_reaches_a_masked_identity``);
- directly against PostgreSQL, the needles of the columns a case exposes do appear, so each
  case can detect a leak (``test_leak_is_visible_on_a_direct_connection``);
- masked values keep their column's type: decoded as the column's Python type, and accepted
  by PostgreSQL as the column's type in the client's format
  (``test_masked_values_keep_their_type``);
- the RowDescription is unchanged, clean columns are byte-identical to a direct connection,
  queries of clean columns only return identical results, and the exempt ``dba`` identity
  sees exactly what a direct connection sees (positive controls);
- statements that would copy masked data into a table (CREATE TABLE AS, SELECT INTO, INSERT …
  SELECT, UPDATE … FROM, and more) are refused for a masked identity with SQLSTATE 42501 and
  a message beginning ``pgguard: masking``, and nothing is written; the same statements over
  clean columns are allowed, and ``dba`` may run them.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import re
import shutil
import socket
import struct
import subprocess
import textwrap
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any, Final

import asyncpg
import pg8000.native
import psycopg
import pytest
from sqlalchemy import text
from sqlalchemy.engine import URL, create_engine
from sqlalchemy.exc import DBAPIError
from sqlalchemy.pool import NullPool

from tests.support import rawpg
from tests.support.gateway import Gateway
from tests.support.pgcluster import PgServer

from .conftest import Endpoint

NODE_DIR: Final = Path(__file__).resolve().parents[1] / "node"
STEP_TIMEOUT: Final = 5.0  # seconds a client waits for one statement before giving up
MASKING_SECRET: Final = "masking-corpus-secret-4d1f9b7e0a2c"
MASKED_SUB: Final = "mask-dev"
MASKED_GROUPS: Final = ("developers",)
EXEMPT_SUB: Final = "mask-dba"
EXEMPT_GROUPS: Final = ("dba",)

# --------------------------------------------------------------------------------------------
# The data

SCHEMA_SQL: Final = """
DROP SCHEMA IF EXISTS mask_t CASCADE;
CREATE SCHEMA mask_t;
CREATE TABLE mask_t.customers (
    id         int PRIMARY KEY,
    name       text,
    email      text,
    ssn        text,
    salary     numeric(10, 2),
    birth      date,
    card       uuid,
    profile    jsonb,
    photo      bytea,
    score      float8,
    last_login timestamptz,
    code       varchar(12),
    level      int4
);
INSERT INTO mask_t.customers VALUES
  (1, 'Ada Plain', 'zelda.q7x@secret-mail.test', '913-27-4481', 87654.32, '1971-03-14',
   'f3b2c1d0-7a6e-4c1b-9d8e-2a4b6c8d0e1f', '{"phone": "+1-555-0199-777", "city": "Quahog"}',
   '\\x89534543524554504e47', 0.7345129, '2019-06-03 12:34:56+00', 'KX-99417-QZ', 3),
  (2, 'Bert Plain', 'yannick.r4w@hidden-box.test', '552-81-0917', 46813.29, '1983-11-27',
   '0d9e8f7a-6b5c-4d3e-8f2a-1b0c9d8e7f6a', '{"phone": "+44-20-7946-0321", "city": "Tredmoor"}',
   '\\x8948494444454e4a5047', 0.1928374, '2021-09-17 13:14:15+00', 'MV-33028-LT', 5),
  (3, 'Cy Plain', NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, 7);
CREATE TABLE mask_t.notes (id int PRIMARY KEY, body text);
INSERT INTO mask_t.notes VALUES (1, 'note one'), (2, 'note two');
CREATE VIEW mask_t.customers_v AS
  SELECT id, name, email, ssn, salary, card, profile FROM mask_t.customers;
CREATE VIEW mask_t.customers_vv AS
  SELECT id, name, email AS contact, ssn AS tax_id, salary FROM mask_t.customers_v;
CREATE FUNCTION mask_t.email_of(int) RETURNS text LANGUAGE sql STABLE
  AS $$ SELECT email FROM mask_t.customers WHERE id = $1 $$;
CREATE FUNCTION mask_t.customer_emails() RETURNS TABLE (id int, email text)
  LANGUAGE sql STABLE AS $$ SELECT id, email FROM mask_t.customers $$;
CREATE FUNCTION mask_t.all_customers() RETURNS SETOF mask_t.customers
  LANGUAGE sql STABLE AS $$ SELECT * FROM mask_t.customers $$;
CREATE FUNCTION mask_t.shout(text) RETURNS text LANGUAGE sql IMMUTABLE
  AS $$ SELECT upper($1) $$;
CREATE FUNCTION mask_t.email_of_plpgsql(int) RETURNS text LANGUAGE plpgsql STABLE
  AS $$ BEGIN RETURN (SELECT email FROM mask_t.customers WHERE id = $1); END $$;
CREATE FUNCTION mask_t.copy_emails() RETURNS int LANGUAGE plpgsql
  AS $$ BEGIN INSERT INTO mask_t.notes SELECT id + 200, email FROM mask_t.customers;
        RETURN 1; END $$;
CREATE FUNCTION mask_t.copy_names() RETURNS int LANGUAGE plpgsql
  AS $$ BEGIN INSERT INTO mask_t.notes SELECT id + 200, name FROM mask_t.customers;
        RETURN 1; END $$;
GRANT ALL ON SCHEMA mask_t TO PUBLIC;
GRANT ALL ON ALL TABLES IN SCHEMA mask_t TO PUBLIC;
ANALYZE mask_t.customers;
"""

POLICY: Final = """
version: 1
masks:
  - column: mask_t.customers.email
    function: partial_email
    exempt: {groups: [dba]}
  - column: mask_t.customers.ssn
    function: keep_last(4)
    exempt: {groups: [dba]}
  - column: mask_t.customers.salary
    function: generalize(1000)
    exempt: {groups: [dba]}
  - column: mask_t.customers.birth
    function: generalize(year)
    exempt: {groups: [dba]}
  - column: mask_t.customers.card
    function: hash(16)
    exempt: {groups: [dba]}
  - column: mask_t.customers.profile
    function: json_mask(['$.phone'])
    exempt: {groups: [dba]}
  - column: mask_t.customers.photo
    function: redact
    exempt: {groups: [dba]}
  - column: mask_t.customers.score
    function: noise(0.1)
    exempt: {groups: [dba]}
  - column: mask_t.customers.last_login
    function: redact
    exempt: {groups: [dba]}
  - column: mask_t.customers.code
    function: partial(2, '***', 2)
    exempt: {groups: [dba]}
defaults: {action: allow}
"""

MASKED_COLUMNS: Final = (
    "email",
    "ssn",
    "salary",
    "birth",
    "card",
    "profile",
    "photo",
    "score",
    "last_login",
    "code",
)
CLEAN_COLUMNS: Final = ("id", "name", "level")

_PHOTOS: Final = (b"\x89SECRETPNG", b"\x89HIDDENJPG")
_CARDS: Final = ("f3b2c1d0-7a6e-4c1b-9d8e-2a4b6c8d0e1f", "0d9e8f7a-6b5c-4d3e-8f2a-1b0c9d8e7f6a")
_LOGINS: Final = (
    datetime(2019, 6, 3, 12, 34, 56, tzinfo=UTC),
    datetime(2021, 9, 17, 13, 14, 15, tzinfo=UTC),
)

# What a correct mask never lets through, per column, in any textual rendering (matched
# case-insensitively). What each mask legitimately keeps is left out: partial_email keeps the
# first letter and the domain, keep_last(4) the last four digits, generalize the leading
# digits of salary ("87000.00") and the year of birth, json_mask the city, partial(2, …, 2) the
# first and last two characters of code.
NEEDLES: Final[dict[str, tuple[str, ...]]] = {
    "email": ("zelda.q7x", "yannick.r4w"),
    "ssn": ("913-27", "91327", "552-81", "55281"),
    "salary": ("87654", "46813"),
    "birth": ("1971-03-14", "1983-11-27"),
    "card": (*_CARDS, *(c.replace("-", "") for c in _CARDS)),
    "profile": ("555-0199-777", "7946-0321"),
    "photo": (
        "SECRETPNG",
        "HIDDENJPG",
        *(p.hex() for p in _PHOTOS),
        *(base64.b64encode(p).decode().rstrip("=") for p in _PHOTOS),
    ),
    "score": ("7345129", "1928374"),
    "last_login": (
        "2019-06-03",
        "2021-09-17",
        *(str(int(t.timestamp())) for t in _LOGINS),
    ),
    "code": ("99417", "33028"),
}

# The binary send functions of the sensitive values: what a leak looks like in binary format.
BINARY_NEEDLES_SQL: Final = """
SELECT 'salary', numeric_send(salary) FROM mask_t.customers WHERE salary IS NOT NULL
UNION ALL SELECT 'birth', date_send(birth) FROM mask_t.customers WHERE birth IS NOT NULL
UNION ALL SELECT 'card', uuid_send(card) FROM mask_t.customers WHERE card IS NOT NULL
UNION ALL SELECT 'score', float8send(score) FROM mask_t.customers WHERE score IS NOT NULL
UNION ALL SELECT 'last_login', timestamptz_send(last_login) FROM mask_t.customers
  WHERE last_login IS NOT NULL
UNION ALL SELECT 'last_login', numeric_send(extract(epoch FROM last_login))
  FROM mask_t.customers WHERE last_login IS NOT NULL
UNION ALL SELECT 'photo', photo FROM mask_t.customers WHERE photo IS NOT NULL
"""

# column -> (type oid, a check on $1 that must hold for a valid value of the column's type)
COLUMN_TYPES: Final[dict[str, tuple[int, str]]] = {
    "id": (23, "$1 IS NOT NULL"),
    "name": (25, "$1 IS NOT NULL"),
    "email": (25, "$1 IS NOT NULL"),
    "ssn": (25, "$1 IS NOT NULL"),
    "salary": (1700, "$1 = round($1, 2) AND abs($1) < 100000000"),  # numeric(10, 2)
    "birth": (1082, "$1 IS NOT NULL"),
    "card": (2950, "$1 IS NOT NULL"),
    "profile": (3802, "$1 IS NOT NULL"),
    "photo": (17, "$1 IS NOT NULL"),
    "score": (701, "$1 IS NOT NULL"),
    "last_login": (1184, "$1 IS NOT NULL"),
    "code": (1043, "char_length($1) <= 12"),  # varchar(12)
    "level": (23, "$1 IS NOT NULL"),
}

# --------------------------------------------------------------------------------------------
# The corpus


@dataclass(frozen=True)
class CopySpec:
    """``COPY {source} TO STDOUT WITH (FORMAT {format}[, HEADER])``."""

    source: str  # "(query)" or "schema.table"
    format: str = "text"
    header: bool = False

    @property
    def sql(self) -> str:
        header = ", HEADER" if self.header else ""
        return f"COPY {self.source} TO STDOUT WITH (FORMAT {self.format}{header})"


@dataclass(frozen=True)
class Case:
    """One route to a masked value. ``steps`` run in order on one session."""

    name: str
    steps: tuple[str, ...]
    cols: tuple[str, ...]  # masked columns whose clear values the statement returns
    typed: Mapping[str, str] = field(default_factory=dict)  # result column -> table column
    clean: tuple[str, ...] = ()  # clean columns in the result that must come through as is
    copy: CopySpec | None = None
    simple_only: bool = False  # a multi-statement string: simple query protocol only
    psql_steps: tuple[str, ...] | None = None  # psql spelling, when it differs
    psql_only: bool = False


ALL: Final = MASKED_COLUMNS
STAR_TYPED: Final = {c: c for c in (*CLEAN_COLUMNS, *MASKED_COLUMNS)}


def same(*cols: str) -> dict[str, str]:
    return {c: c for c in cols}


def q(
    name: str,
    sql: str | Sequence[str],
    cols: Sequence[str],
    *,
    typed: Mapping[str, str] | None = None,
    clean: Sequence[str] = (),
    tx: bool = False,
    simple_only: bool = False,
    psql: str | None = None,
) -> Case:
    steps = (sql,) if isinstance(sql, str) else tuple(sql)
    if tx:
        steps = ("BEGIN", *steps, "ROLLBACK")
    return Case(
        name,
        steps,
        tuple(cols),
        typed=dict(typed or {}),
        clean=tuple(clean),
        simple_only=simple_only,
        psql_steps=(psql,) if psql is not None else None,
    )


def copy_case(name: str, spec: CopySpec, cols: Sequence[str]) -> Case:
    return Case(name, (spec.sql,), tuple(cols), copy=spec)


C = "mask_t.customers"
CASES: Final[list[Case]] = [
    # direct references, *, aliases
    q(
        "direct_reference",
        f"SELECT id, name, email, ssn, salary, birth, card, profile, photo, "
        f"score, last_login, code, level FROM {C} ORDER BY id",
        ALL,
        typed=STAR_TYPED,
        clean=CLEAN_COLUMNS,
    ),
    q("star", f"SELECT * FROM {C} ORDER BY id", ALL, typed=STAR_TYPED, clean=CLEAN_COLUMNS),
    q("table_command", f"TABLE {C}", ALL, typed=STAR_TYPED, clean=CLEAN_COLUMNS),
    q(
        "quoted_identifiers",
        'SELECT "id", "email" FROM "mask_t"."customers" ORDER BY 1',
        ["email"],
        typed=same("id", "email"),
        clean=["id"],
    ),
    q(
        "alias",
        f"SELECT c.id, c.email AS contact, c.ssn AS tax_id, c.salary AS pay "
        f"FROM {C} AS c ORDER BY c.id",
        ["email", "ssn", "salary"],
        typed={"id": "id", "contact": "email", "tax_id": "ssn", "pay": "salary"},
        clean=["id"],
    ),
    q("swapped_aliases", f"SELECT email AS name, name AS email FROM {C} ORDER BY id", ["email"]),
    q(
        "table_alias_column_list",
        f"SELECT t.e FROM {C} AS t(a, b, e) ORDER BY t.a",
        ["email"],
        typed={"e": "email"},
    ),
    q(
        "search_path",
        [
            "SET search_path = mask_t, public",
            "SELECT id, email, card FROM customers ORDER BY id",
            "RESET search_path",
        ],
        ["email", "card"],
        typed=same("id", "email", "card"),
        clean=["id"],
    ),
    # views
    q(
        "view",
        "SELECT * FROM mask_t.customers_v ORDER BY id",
        ["email", "ssn", "salary", "card", "profile"],
        typed=same("id", "name", "email", "ssn", "salary", "card", "profile"),
        clean=["id", "name"],
    ),
    q(
        "view_of_view",
        "SELECT * FROM mask_t.customers_vv ORDER BY id",
        ["email", "ssn", "salary"],
        typed={"id": "id", "name": "name", "contact": "email", "tax_id": "ssn", "salary": "salary"},
        clean=["id", "name"],
    ),
    # A view the session itself creates: pgguard may not know it and mask every column (it
    # cannot prove id clean), so id is not checked as clean here.
    q(
        "temp_view",
        [
            f"CREATE TEMP VIEW mask_tv AS SELECT id, email FROM {C}",
            "SELECT * FROM mask_tv ORDER BY id",
            "DROP VIEW mask_tv",
        ],
        ["email"],
        typed=same("id", "email"),
    ),
    # CTEs, subqueries, set operations, joins
    q(
        "cte",
        f"WITH c AS (SELECT * FROM {C}) SELECT id, email, birth, photo FROM c ORDER BY id",
        ["email", "birth", "photo"],
        typed=same("id", "email", "birth", "photo"),
        clean=["id"],
    ),
    q(
        "cte_materialized",
        f"WITH c AS MATERIALIZED (SELECT id, ssn, score FROM {C}) SELECT * FROM c ORDER BY id",
        ["ssn", "score"],
        typed=same("id", "ssn", "score"),
        clean=["id"],
    ),
    q(
        "cte_column_alias",
        f"WITH x(i, e) AS (SELECT id, email FROM {C}) SELECT e FROM x ORDER BY i",
        ["email"],
        typed={"e": "email"},
    ),
    q(
        "recursive_cte",
        f"WITH RECURSIVE r(n, e) AS (SELECT 1, email FROM {C} WHERE id = 1 "
        "UNION ALL SELECT n + 1, e FROM r WHERE n < 2) SELECT e FROM r",
        ["email"],
    ),
    q(
        "subquery",
        f"SELECT s.id, s.email, s.card FROM (SELECT * FROM {C}) s ORDER BY s.id",
        ["email", "card"],
        typed=same("id", "email", "card"),
        clean=["id"],
    ),
    q(
        "union",
        f"SELECT email FROM {C} UNION SELECT 'nobody@example.test' ORDER BY 1",
        ["email"],
        typed=same("email"),
    ),
    q(
        "union_clean_first_branch",
        f"SELECT name FROM {C} UNION ALL SELECT email FROM {C}",
        ["email"],
    ),
    q(
        "join",
        f"SELECT c.id, n.body, c.email, c.code FROM {C} c JOIN mask_t.notes n "
        "USING (id) ORDER BY c.id",
        ["email", "code"],
        typed=same("id", "email", "code"),
        clean=["id"],
    ),
    q(
        "lateral",
        f"SELECT x.e FROM {C} c CROSS JOIN LATERAL (SELECT c.email AS e) x ORDER BY c.id",
        ["email"],
    ),
    q("scalar_subquery", f"SELECT (SELECT email FROM {C} WHERE id = 1) AS e", ["email"]),
    q(
        "values_list",
        f"SELECT * FROM (VALUES ((SELECT email FROM {C} WHERE id = 1))) AS v(e)",
        ["email"],
    ),
    q("unnest_array_subquery", f"SELECT * FROM unnest(ARRAY(SELECT email FROM {C}))", ["email"]),
    q("window_function", f"SELECT first_value(email) OVER (ORDER BY id) FROM {C}", ["email"]),
    # expressions and functions of a column
    q("upper", f"SELECT upper(email) FROM {C} ORDER BY id", ["email"]),
    q("concat", f"SELECT email || '' AS e, ssn || '' AS s FROM {C} ORDER BY id", ["email", "ssn"]),
    q("coalesce", f"SELECT coalesce(email, '') FROM {C} ORDER BY id", ["email"]),
    q("case_when", f"SELECT CASE WHEN true THEN email END FROM {C} ORDER BY id", ["email"]),
    q(
        "casts_to_text",
        f"SELECT salary::text, birth::text, card::text, score::text, "
        f"last_login::text, code::text FROM {C} ORDER BY id",
        ["salary", "birth", "card", "score", "last_login", "code"],
    ),
    q(
        "arithmetic",
        f"SELECT salary + 0, score * 1, birth + 0, "
        f"extract(epoch FROM last_login) FROM {C} ORDER BY id",
        ["salary", "score", "birth", "last_login"],
    ),
    q(
        "string_functions",
        f"SELECT substr(email, 1, 12), replace(card::text, '-', ''), "
        f"replace(ssn, '-', ''), string_to_array(email, '@') FROM {C} ORDER BY id",
        ["email", "card", "ssn"],
    ),
    q(
        "json_access",
        f"SELECT profile->>'phone', profile #>> '{{phone}}', "
        f"jsonb_path_query_first(profile, '$.phone') FROM {C} ORDER BY id",
        ["profile"],
    ),
    q(
        "bytea_encodings",
        f"SELECT encode(photo, 'escape'), encode(photo, 'base64'), "
        f"encode(photo, 'hex') FROM {C} ORDER BY id",
        ["photo"],
    ),
    # functions
    q("sql_function_scalar", "SELECT mask_t.email_of(1)", ["email"]),
    q(
        "inlinable_sql_function",
        "SELECT * FROM mask_t.customer_emails() ORDER BY id",
        ["email"],
        typed=same("id", "email"),
        clean=["id"],
    ),
    q(
        "inlinable_sql_function_setof",
        "SELECT * FROM mask_t.all_customers() ORDER BY id",
        ALL,
        typed=STAR_TYPED,
        clean=CLEAN_COLUMNS,
    ),
    q(
        "inlinable_sql_function_of_column",
        f"SELECT mask_t.shout(email) FROM {C} ORDER BY id",
        ["email"],
    ),
    q("plpgsql_function", "SELECT mask_t.email_of_plpgsql(1)", ["email"]),
    q(
        "temp_function",
        [
            "CREATE FUNCTION pg_temp.mask_fn() RETURNS text LANGUAGE sql "
            f"AS $$ SELECT email FROM {C} WHERE id = 1 $$",
            "SELECT pg_temp.mask_fn()",
            "DROP FUNCTION pg_temp.mask_fn()",
        ],
        ["email"],
    ),
    # aggregates
    q("string_agg", f"SELECT string_agg(email, ',' ORDER BY id) FROM {C}", ["email"]),
    q("json_agg", f"SELECT json_agg(email ORDER BY id) FROM {C}", ["email"]),
    q("array_agg_subscript", f"SELECT (array_agg(email ORDER BY id))[1] FROM {C}", ["email"]),
    q(
        "array_agg",
        f"SELECT array_agg(card ORDER BY id), array_agg(salary ORDER BY id) FROM {C}",
        ["card", "salary"],
    ),
    q(
        "min_max",
        f"SELECT max(email), min(salary), max(birth) FROM {C}",
        ["email", "salary", "birth"],
    ),
    q(
        "distinct",
        f"SELECT DISTINCT ssn FROM {C} WHERE ssn IS NOT NULL ORDER BY 1",
        ["ssn"],
        typed=same("ssn"),
    ),
    # JSON, row and XML constructors; whole-row references
    q("row_to_json", f"SELECT row_to_json(c) FROM {C} c ORDER BY c.id", ALL),
    q("to_jsonb_star", f"SELECT to_jsonb(c.*) FROM {C} c ORDER BY c.id", ALL),
    q(
        "jsonb_build_object",
        f"SELECT jsonb_build_object('e', email, 's', salary) FROM {C} ORDER BY id",
        ["email", "salary"],
    ),
    q(
        "jsonb_each_text",
        f"SELECT c.id, j.key, j.value FROM {C} c, "
        "jsonb_each_text(to_jsonb(c)) j ORDER BY c.id, j.key",
        ALL,
        clean=["id"],
    ),
    q("whole_row", f"SELECT c FROM {C} c ORDER BY c.id", ALL),
    q("whole_row_field", f"SELECT (c).email, (c).ssn FROM {C} c ORDER BY c.id", ["email", "ssn"]),
    q(
        "row_constructor",
        f"SELECT ROW(email, card, photo) FROM {C} ORDER BY id",
        ["email", "card", "photo"],
    ),
    q("format_row", f"SELECT format('%s', c) FROM {C} c ORDER BY c.id", ALL),
    q("row_cast_text", f"SELECT c::text FROM {C} c ORDER BY c.id", ALL),
    q(
        "query_to_xml",
        f"SELECT query_to_xml('select email, card, photo from {C}', true, false, '')",
        ["email", "card", "photo"],
    ),
    q("xmlelement", f"SELECT xmlelement(name e, email) FROM {C} ORDER BY id", ["email"]),
    # statistics, errors, notices
    q(
        "pg_stats",
        "SELECT attname, most_common_vals::text AS mcv, histogram_bounds::text AS "
        "hist FROM pg_stats WHERE schemaname = 'mask_t' AND tablename = 'customers' "
        "ORDER BY attname",
        ["email", "ssn", "salary", "birth", "card", "code"],
    ),
    q("error_message_cast", f"SELECT email::int FROM {C} ORDER BY id", ["email"]),
    q(
        "error_message_json_cast",
        f"SELECT (profile->>'phone')::numeric FROM {C} ORDER BY id",
        ["profile"],
    ),
    q(
        "notice_from_do_block",
        f"DO $$BEGIN RAISE NOTICE 'got %', (SELECT email FROM {C} WHERE id = 1); END$$",
        ["email"],
    ),
    # cursors, prepared statements, RETURNING
    q(
        "cursor_fetch",
        [
            f"DECLARE mask_c CURSOR FOR SELECT id, email, card FROM {C} ORDER BY id",
            "FETCH ALL FROM mask_c",
        ],
        ["email", "card"],
        typed=same("id", "email", "card"),
        clean=["id"],
        tx=True,
    ),
    q(
        "cursor_fetch_star",
        [
            f"DECLARE mask_c2 CURSOR FOR SELECT * FROM {C} ORDER BY id",
            "FETCH 2 FROM mask_c2",
            "FETCH NEXT FROM mask_c2",
        ],
        ALL,
        typed=STAR_TYPED,
        clean=CLEAN_COLUMNS,
        tx=True,
    ),
    q(
        "sql_prepare_execute",
        [
            f"PREPARE mask_p(int) AS SELECT id, email, ssn, photo FROM {C} WHERE id = $1",
            "EXECUTE mask_p(1)",
            "DEALLOCATE mask_p",
        ],
        ["email", "ssn", "photo"],
        typed=same("id", "email", "ssn", "photo"),
        clean=["id"],
    ),
    q(
        "update_returning",
        f"UPDATE {C} SET name = name WHERE id = 1 RETURNING id, email",
        ["email"],
        typed=same("id", "email"),
        clean=["id"],
        tx=True,
    ),
    q(
        "delete_returning_star",
        f"DELETE FROM {C} WHERE id = 2 RETURNING *",
        ALL,
        typed=STAR_TYPED,
        clean=CLEAN_COLUMNS,
        tx=True,
    ),
    q(
        "cte_update_returning",
        f"WITH u AS (UPDATE {C} SET level = level WHERE id = 1 "
        "RETURNING *) SELECT id, email, salary FROM u",
        ["email", "salary"],
        typed=same("id", "email", "salary"),
        clean=["id"],
        tx=True,
    ),
    q(
        "multi_statement_string",
        f"SELECT 1 AS one; SELECT email FROM {C} ORDER BY id",
        ["email"],
        simple_only=True,
        psql=f"SELECT 1 AS one \\; SELECT email FROM {C} ORDER BY id",
    ),
    # COPY ... TO STDOUT
    copy_case(
        "copy_text",
        CopySpec(f"(SELECT id, email, photo, card FROM {C} ORDER BY id)"),
        ["email", "photo", "card"],
    ),
    copy_case("copy_csv_header", CopySpec(f"(SELECT * FROM {C} ORDER BY id)", "csv", True), ALL),
    copy_case("copy_binary", CopySpec(f"(SELECT * FROM {C} ORDER BY id)", "binary"), ALL),
    copy_case("copy_table", CopySpec(C), ALL),
    copy_case(
        "copy_view_csv",
        CopySpec("(SELECT * FROM mask_t.customers_vv)", "csv"),
        ["email", "ssn", "salary"],
    ),
    Case(
        "psql_backslash_copy",
        (
            f"\\copy (SELECT id, email, ssn FROM {C} ORDER BY id) TO STDOUT "
            "WITH (FORMAT csv, HEADER)",
        ),
        ("email", "ssn"),
        psql_only=True,
    ),
]

# Queries of clean columns only: identical through pgguard and directly.
CONTROLS: Final[list[Case]] = [
    q(
        "clean_columns",
        f"SELECT id, name, level FROM {C} ORDER BY id",
        [],
        typed=same(*CLEAN_COLUMNS),
        clean=CLEAN_COLUMNS,
    ),
    q(
        "clean_aggregates",
        f"SELECT count(*), string_agg(name, ',' ORDER BY id) AS name, sum(level) AS level FROM {C}",
        [],
    ),
    q(
        "clean_join",
        f"SELECT c.id, c.name, n.body FROM {C} c JOIN mask_t.notes n USING (id) ORDER BY c.id",
        [],
        clean=["id", "name"],
    ),
    copy_case("clean_copy", CopySpec(f"(SELECT id, name, level FROM {C} ORDER BY id)", "csv"), []),
    q(
        "clean_view_columns",
        "SELECT id, name FROM mask_t.customers_vv ORDER BY id",
        [],
        clean=["id", "name"],
    ),
]

ALL_CASES: Final = [*CASES, *CONTROLS]
CASE_BY_NAME: Final = {c.name: c for c in ALL_CASES}
assert len(CASE_BY_NAME) == len(ALL_CASES), "duplicate case names"

# --------------------------------------------------------------------------------------------
# The client matrix

CLIENTS: Final = (
    "psql",
    "psycopg_text",
    "psycopg_binary",
    "asyncpg",
    "pg8000",
    "sqlalchemy",
    "node",
    "raw_text",
    "raw_binary",
)
PY_CLIENTS: Final = ("psycopg_text", "psycopg_binary", "asyncpg", "pg8000", "sqlalchemy")
EXTENDED_ONLY: Final = ("psycopg_binary", "asyncpg", "pg8000", "raw_binary")
WITH_OIDS: Final = (
    "psycopg_text",
    "psycopg_binary",
    "asyncpg",
    "pg8000",
    "node",
    "raw_text",
    "raw_binary",
)


def unsupported(case: Case, client: str) -> str | None:
    """Why ``client`` cannot run ``case`` (None: it can)."""
    if case.psql_only and client != "psql":
        return "\\copy is a psql meta-command"
    if case.copy is not None:
        if client == "node":
            return "node-postgres needs pg-copy-streams for COPY TO STDOUT (not in tests/node)"
        if client == "sqlalchemy":
            return "SQLAlchemy has no COPY API (its psycopg driver is covered by psycopg_*)"
    if case.simple_only:
        if client in EXTENDED_ONLY:
            return f"{client} runs statements with the extended protocol: one statement each"
        if client == "sqlalchemy":
            return "SQLAlchemy returns only the first result of a multi-statement string"
    return None


def matrix(
    cases: Sequence[Case],
    clients: Sequence[str] = CLIENTS,
    keep: Callable[[Case, str], bool] = lambda c, k: True,
) -> list[Any]:
    params: list[Any] = []
    for case in cases:
        for client in clients:
            if not keep(case, client):
                continue
            reason = unsupported(case, client)
            marks = [pytest.mark.skip(reason=reason)] if reason else []
            params.append(pytest.param(case, client, id=f"{case.name}-{client}", marks=marks))
    return params


# --------------------------------------------------------------------------------------------
# What a client received


@dataclass
class ResultSet:
    columns: list[str]
    oids: list[int]  # empty when the client does not say
    rows: list[list[Any]]  # as the client decoded them (raw clients: the exact field bytes)
    formats: list[int] = field(default_factory=list)  # raw clients: 0 text, 1 binary


@dataclass
class StepRun:
    sql: str
    sets: list[ResultSet] = field(default_factory=list)
    error: dict[str, str] | None = None  # every field of an ErrorResponse
    copy: bytes | None = None
    client_error: str | None = None  # the client itself failed (not an ErrorResponse)


@dataclass
class CaseRun:
    steps: list[StepRun] = field(default_factory=list)
    notices: list[dict[str, str]] = field(default_factory=list)
    raw: bytes = b""  # every byte received (raw clients), psql's stdout and stderr
    stdout: bytes = b""  # psql
    stderr: str = ""  # psql


def _sqlstate(error: Mapping[str, str] | None) -> str | None:
    if error is None:
        return None
    return error.get("C") or error.get("sqlstate") or error.get("code")


def _message(error: Mapping[str, str]) -> str:
    return error.get("M") or error.get("message") or error.get("message_primary") or ""


def render(value: Any, texts: list[str], blobs: list[bytes]) -> None:
    """Every textual rendering of a decoded value (recursively), and its bytes."""
    if value is None:
        return
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        blobs.append(raw)
        texts.append(raw.hex())
        texts.append(raw.decode("latin-1"))
    elif isinstance(value, str):
        texts.append(value)
    elif isinstance(value, Mapping):
        texts.append(json.dumps(value, ensure_ascii=False, default=str))
        for item in value.values():
            render(item, texts, blobs)
    elif isinstance(value, list | tuple | asyncpg.Record):
        for item in value.values() if isinstance(value, asyncpg.Record) else value:
            render(item, texts, blobs)
    else:
        texts.append(str(value))
        if isinstance(value, uuid.UUID):
            texts.append(value.hex)
        elif isinstance(value, float):
            texts.append(repr(value))


def haystack(run: CaseRun) -> tuple[str, bytes]:
    """All the text and all the bytes a client received for a case."""
    texts: list[str] = [run.stderr]
    blobs: list[bytes] = [run.raw]
    for notice in run.notices:
        texts.extend(notice.values())
    for step in run.steps:
        if step.error:
            texts.extend(step.error.values())
        if step.client_error:
            texts.append(step.client_error)
        if step.copy is not None:
            blobs.append(step.copy)
            texts.append(step.copy.decode("utf-8", "replace"))
        for rs in step.sets:
            for row in rs.rows:
                for value in row:
                    if rs.formats and isinstance(value, bytes):  # a raw client: wire bytes
                        texts.append(value.decode("utf-8", "replace"))
                        blobs.append(value)
                    else:
                        render(value, texts, blobs)
    return "\n".join(texts), b"\n".join(blobs)


def find_needles(
    run: CaseRun, binary: Mapping[str, Sequence[bytes]], cols: Sequence[str] = MASKED_COLUMNS
) -> dict[str, list[str]]:
    """Per column, the clear values of it found in what the client received (with context)."""
    text_all, blob = haystack(run)
    low_text, low_blob = text_all.lower(), blob.lower()
    found: dict[str, list[str]] = {}
    for col in cols:
        for needle in NEEDLES[col]:
            low = needle.lower()
            at = low_text.find(low)
            if at >= 0:
                snippet = text_all[max(0, at - 40) : at + len(needle) + 40]
                found.setdefault(col, []).append(f"{needle!r} in {snippet!r}")
            elif low.encode() in low_blob:
                at = low_blob.find(low.encode())
                snippet_b = blob[max(0, at - 24) : at + len(needle) + 24]
                found.setdefault(col, []).append(f"{needle!r} in bytes {snippet_b!r}")
        for needle_b in binary.get(col, ()):
            at = blob.find(needle_b)
            if at >= 0:
                snippet_b = blob[max(0, at - 16) : at + len(needle_b) + 16]
                found.setdefault(col, []).append(f"binary {needle_b.hex()} in bytes {snippet_b!r}")
    return found


# --------------------------------------------------------------------------------------------
# Runners: every case on one session per client


def _steps(case: Case, client: str) -> tuple[str, ...]:
    if client == "psql" and case.psql_steps is not None:
        return case.psql_steps
    return case.steps


def _diag(diag: psycopg.errors.Diagnostic) -> dict[str, str]:
    out: dict[str, str] = {}
    for attr in (
        "severity",
        "sqlstate",
        "message_primary",
        "message_detail",
        "message_hint",
        "statement_position",
        "internal_position",
        "internal_query",
        "context",
        "schema_name",
        "table_name",
        "column_name",
        "datatype_name",
        "constraint_name",
        "source_file",
        "source_line",
        "source_function",
    ):
        value = getattr(diag, attr, None)
        if value is not None:
            out[attr] = str(value)
    return out


def run_psycopg(ep: Endpoint, cases: Sequence[Case], *, binary: bool) -> dict[str, CaseRun]:
    """psycopg 3: text results over the simple protocol, or binary results over named
    prepared statements (``prepare=True``)."""
    out: dict[str, CaseRun] = {}
    with psycopg.connect(ep.conninfo(), autocommit=True, connect_timeout=10) as conn:
        notices: list[dict[str, str]] = []
        conn.add_notice_handler(lambda d: notices.append(_diag(d)))
        for case in cases:
            run = out[case.name] = CaseRun()
            notices.clear()
            for sql in case.steps:
                step = StepRun(sql)
                run.steps.append(step)
                cur = conn.cursor(binary=binary)
                try:
                    if case.copy is not None:
                        with cur.copy(sql) as copy:
                            step.copy = b"".join(bytes(chunk) for chunk in copy)
                        continue
                    cur.execute(sql, prepare=True if binary else None)
                    while True:
                        if cur.description is not None:
                            step.sets.append(
                                ResultSet(
                                    [d.name for d in cur.description],
                                    [d.type_code for d in cur.description],
                                    [list(r) for r in cur.fetchall()],
                                )
                            )
                        if not cur.nextset():
                            break
                except psycopg.Error as exc:
                    step.error = _diag(exc.diag)
                    if not step.error:
                        step.client_error = repr(exc)
            run.notices = list(notices)
    return out


_UTILITY = re.compile(
    r"^\s*(BEGIN|ROLLBACK|COMMIT|PREPARE|DEALLOCATE|DECLARE|CLOSE|SET|RESET|DO|CREATE|DROP)\b",
    re.I,
)


def run_asyncpg(ep: Endpoint, cases: Sequence[Case]) -> dict[str, CaseRun]:
    """asyncpg: binary results, every row-returning statement as a named prepared statement
    (``Connection.prepare``); utility statements with ``execute``; COPY with
    ``copy_from_query``/``copy_from_table``."""

    async def connect() -> asyncpg.Connection:
        conn: asyncpg.Connection = await asyncpg.connect(
            host=ep.host,
            port=ep.port,
            user=ep.user,
            password=ep.password,
            database=ep.dbname,
            timeout=10,
        )
        conn.add_log_listener(
            lambda _c, m: notices.append({k: str(v) for k, v in m.as_dict().items()})
        )
        return conn

    async def step_of(conn: asyncpg.Connection, case: Case, step: StepRun) -> None:
        sql = step.sql
        if case.copy is not None:
            buf = io.BytesIO()
            spec = case.copy
            opts: dict[str, Any] = {"output": buf, "format": spec.format}
            if spec.header:
                opts["header"] = True
            if spec.source.startswith("("):
                await conn.copy_from_query(spec.source[1:-1], **opts)
            else:
                schema, table = spec.source.split(".")
                await conn.copy_from_table(table, schema_name=schema, **opts)
            step.copy = buf.getvalue()
        elif _UTILITY.match(sql):
            await conn.execute(sql)
        else:
            stmt = await conn.prepare(sql)
            attrs = stmt.get_attributes()
            rows = await stmt.fetch()
            step.sets.append(
                ResultSet(
                    [a.name for a in attrs],
                    [a.type.oid for a in attrs],
                    [list(r.values()) for r in rows],
                )
            )

    notices: list[dict[str, str]] = []

    async def main() -> dict[str, CaseRun]:
        out: dict[str, CaseRun] = {}
        conn = await connect()
        try:
            for case in cases:
                run = out[case.name] = CaseRun()
                notices.clear()
                for sql in case.steps:
                    step = StepRun(sql)
                    run.steps.append(step)
                    try:
                        await asyncio.wait_for(step_of(conn, case, step), STEP_TIMEOUT)
                    except asyncpg.PostgresError as exc:
                        step.error = {k: str(v) for k, v in exc.as_dict().items()}
                    except (asyncpg.InterfaceError, ValueError, TypeError) as exc:
                        step.client_error = repr(exc)
                    except TimeoutError:
                        step.client_error = f"no answer within {STEP_TIMEOUT}s"
                        conn.terminate()
                    if conn.is_closed():  # a client failure: go on with a new session
                        step.client_error = (step.client_error or "") + " (session lost)"
                        conn = await connect()
                await asyncio.sleep(0)  # deliver notices
                run.notices = list(notices)
        finally:
            await conn.close(timeout=5)
        return out

    return asyncio.run(main())


_POSITIONAL = re.compile(r"\$\d")


def run_pg8000(ep: Endpoint, cases: Sequence[Case]) -> dict[str, CaseRun]:
    """pg8000: every statement as a named prepared statement (extended protocol, text
    results), but those with a ``$n`` of their own (simple protocol: pg8000 would bind it);
    COPY with ``stream=`` (unnamed statement)."""
    out: dict[str, CaseRun] = {}
    con = pg8000.native.Connection(
        user=ep.user,
        password=ep.password,
        host=ep.host,
        port=ep.port,
        database=ep.dbname,
        timeout=30,
    )
    try:
        for case in cases:
            run = out[case.name] = CaseRun()
            con.notices.clear()
            for sql in case.steps:
                step = StepRun(sql)
                run.steps.append(step)
                try:
                    if case.copy is not None:
                        buf = io.BytesIO()
                        con.run(sql, stream=buf)
                        step.copy = buf.getvalue()
                        continue
                    if _POSITIONAL.search(sql):  # pg8000 would take $1 for its own parameter
                        rows = con.run(sql)
                        columns = con.columns
                    else:
                        ps = con.prepare(sql)
                        try:
                            rows = ps.run()
                            columns = ps.columns
                        finally:
                            ps.close()
                    if columns:
                        step.sets.append(
                            ResultSet(
                                [c["name"] for c in columns],
                                [c["type_oid"] for c in columns],
                                [list(r) for r in rows or []],
                            )
                        )
                except pg8000.native.DatabaseError as exc:
                    arg = exc.args[0] if exc.args else None
                    if isinstance(arg, dict):
                        step.error = {str(k): str(v) for k, v in arg.items()}
                    else:
                        step.client_error = repr(exc)
                except pg8000.native.InterfaceError as exc:
                    step.client_error = repr(exc)
            run.notices = [
                {k.decode(errors="replace"): v.decode(errors="replace") for k, v in n.items()}
                for n in con.notices
            ]
    finally:
        con.close()
    return out


def run_sqlalchemy(ep: Endpoint, cases: Sequence[Case]) -> dict[str, CaseRun]:
    """SQLAlchemy 2 Core over psycopg, ``text()`` statements on an AUTOCOMMIT connection."""
    out: dict[str, CaseRun] = {}
    url = URL.create(
        "postgresql+psycopg",
        username=ep.user,
        password=ep.password,
        host=ep.host,
        port=ep.port,
        database=ep.dbname,
    )
    engine = create_engine(url, poolclass=NullPool)
    try:
        with engine.connect() as conn:
            conn = conn.execution_options(isolation_level="AUTOCOMMIT")
            notices: list[dict[str, str]] = []
            driver = conn.connection.driver_connection
            assert isinstance(driver, psycopg.Connection)
            driver.add_notice_handler(lambda d: notices.append(_diag(d)))
            for case in cases:
                run = out[case.name] = CaseRun()
                notices.clear()
                for sql in case.steps:
                    step = StepRun(sql)
                    run.steps.append(step)
                    try:
                        res = conn.execute(text(sql))
                        if res.returns_rows:
                            step.sets.append(
                                ResultSet(list(res.keys()), [], [list(r) for r in res.fetchall()])
                            )
                    except DBAPIError as exc:
                        orig = exc.orig
                        if isinstance(orig, psycopg.Error) and _diag(orig.diag):
                            step.error = _diag(orig.diag)
                        else:
                            step.client_error = repr(exc)
                run.notices = list(notices)
    finally:
        engine.dispose()
    return out


def run_node(ep: Endpoint, cases: Sequence[Case], workdir: Path) -> dict[str, CaseRun]:
    """node-postgres (tests/node/masking_check.js): named prepared statements, raw text."""
    node = shutil.which("node")
    if node is None or not (NODE_DIR / "node_modules" / "pg").is_dir():
        pytest.fail("node or tests/node/node_modules missing (run `make node`)")
    spec = workdir / f"node-cases-{ep.target}.json"
    spec.write_text(
        json.dumps([{"name": c.name, "steps": c.steps, "simple": c.simple_only} for c in cases])
    )
    proc = subprocess.run(
        [node, str(NODE_DIR / "masking_check.js"), str(spec)],
        capture_output=True,
        text=True,
        env=ep.env(),
        cwd=NODE_DIR,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"masking_check.js failed:\n{proc.stderr}"
    data = json.loads(proc.stdout)
    out: dict[str, CaseRun] = {}
    for case in cases:
        got = data[case.name]
        run = out[case.name] = CaseRun(notices=got["notices"])
        for s in got["steps"]:
            step = StepRun(s["sql"], error=s["error"])
            if step.error is not None and set(step.error) == {"client"}:
                step.client_error, step.error = step.error["client"], None
            step.sets = [ResultSet(r["columns"], r["oids"], r["rows"]) for r in s["sets"]]
            run.steps.append(step)
    return out


PSQL_FIELDSEP: Final = "\x1f"
PSQL_NULL: Final = "<<null>>"


def _psql_marker(case: str, step: int) -> str:
    return f"@@pgguard-masking {case} {step}@@"


def run_psql(pg: PgServer, ep: Endpoint, cases: Sequence[Case]) -> dict[str, CaseRun]:
    """psql: one invocation, every case in one script read from stdin (simple protocol,
    text). Errors and notices go to stderr: each step is marked on stdout (\\echo) and on
    stderr (\\warn)."""
    lines = ["\\set VERBOSITY verbose", "\\pset footer off", f"\\pset null '{PSQL_NULL}'"]
    markers: list[str] = []
    for case in cases:
        for i, sql in enumerate(_steps(case, "psql")):
            marker = _psql_marker(case.name, i)
            markers.append(marker)
            lines += [f"\\echo {marker}", f"\\warn {marker}"]
            lines.append(sql if sql.startswith("\\") else sql + ";")
    psql_bin = shutil.which("psql") or pg.bin("psql")
    proc = subprocess.run(
        [psql_bin, "-X", "-q", "-A", "-F", PSQL_FIELDSEP, "-f", "-"],
        input="\n".join(lines).encode() + b"\n",
        capture_output=True,
        env=ep.env(),
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, f"psql failed ({proc.returncode}):\n{proc.stderr!r}"
    stdout_parts = _split_sections(proc.stdout, markers)
    stderr_parts = _split_sections(proc.stderr, markers)
    out: dict[str, CaseRun] = {}
    for case in cases:
        run = out[case.name] = CaseRun()
        for i, sql in enumerate(_steps(case, "psql")):
            marker = _psql_marker(case.name, i)
            stdout, stderr = stdout_parts[marker], stderr_parts[marker]
            run.stdout += stdout
            run.stderr += stderr.decode("utf-8", "replace")
            run.raw += stdout + b"\n" + stderr
            step = StepRun(sql)
            if case.copy is not None or case.psql_only:
                step.copy = stdout
            else:
                step.sets = _psql_sets(stdout.decode("utf-8", "replace"))
            run.steps.append(step)
    return out


def _split_sections(data: bytes, markers: Sequence[str]) -> dict[str, bytes]:
    """The output after each marker line, up to the next one."""
    sections: dict[str, bytes] = {}
    positions: list[tuple[int, int]] = []
    pos = 0
    for marker in markers:
        line = marker.encode() + b"\n"
        at = data.find(line, pos)
        assert at >= 0, f"psql output has no {marker!r}: {data[pos : pos + 2000]!r}"
        positions.append((at, at + len(line)))
        pos = at + len(line)
    for i, marker in enumerate(markers):
        end = positions[i + 1][0] if i + 1 < len(markers) else len(data)
        sections[marker] = data[positions[i][1] : end]
    return sections


def _psql_sets(text_out: str) -> list[ResultSet]:
    """psql's unaligned output of one result (header line, then rows); values as text."""
    lines = text_out.split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        return []
    header = lines[0].split(PSQL_FIELDSEP)
    rows: list[list[Any]] = [
        [None if v == PSQL_NULL else v for v in line.split(PSQL_FIELDSEP)] for line in lines[1:]
    ]
    return [ResultSet(header, [], rows)]


def _row_description(body: bytes) -> tuple[list[str], list[int], list[int]]:
    (n,) = struct.unpack("!h", body[:2])
    pos = 2
    names: list[str] = []
    oids: list[int] = []
    formats: list[int] = []
    for _ in range(n):
        end = body.index(b"\x00", pos)
        names.append(body[pos:end].decode())
        _table, _attnum, oid, _len, _mod, fmt = struct.unpack("!ihihih", body[end + 1 : end + 19])
        oids.append(oid)
        formats.append(fmt)
        pos = end + 19
    return names, oids, formats


def _data_row(body: bytes) -> list[bytes | None]:
    (n,) = struct.unpack("!h", body[:2])
    pos = 2
    out: list[bytes | None] = []
    for _ in range(n):
        (length,) = struct.unpack("!i", body[pos : pos + 4])
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + length])
            pos += length
    return out


def run_raw(ep: Endpoint, cases: Sequence[Case], *, binary: bool) -> dict[str, CaseRun]:
    """A raw v3 client: every byte after authentication is kept. Text: simple Query.
    Binary: Parse/Bind (all results binary)/Describe/Execute/Sync, unnamed."""
    out: dict[str, CaseRun] = {}

    def connect() -> rawpg.RawConnection:
        conn = rawpg.connect(
            ep.host, ep.port, ep.user, ep.dbname, ep.password, timeout=STEP_TIMEOUT
        )
        # rawpg writes each message on its own: without this, Nagle's algorithm and delayed
        # ACKs stall every Parse/Bind/Describe/Execute/Sync round.
        conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return conn

    conn = connect()
    try:
        for case in cases:
            run = out[case.name] = CaseRun()
            raw: list[bytes] = []
            for sql in case.steps:
                step = StepRun(sql)
                run.steps.append(step)
                if binary:
                    conn.parse("", sql)
                    conn.bind("", "", [], result_formats=[1])
                    conn.describe("P", "")
                    conn.execute("")
                    conn.sync()
                else:
                    conn.send(b"Q", sql.encode() + b"\x00")
                copy: list[bytes] = []
                current: ResultSet | None = None
                try:
                    messages = conn.read_until_ready()
                except (OSError, rawpg.ProtocolViolation) as exc:
                    step.client_error = f"{exc!r} (session lost)"
                    conn.terminate()
                    conn = connect()
                    continue
                for kind, body in messages:
                    raw.append(kind + body)
                    if kind == b"T":
                        names, oids, formats = _row_description(body)
                        current = ResultSet(names, oids, [], formats)
                        step.sets.append(current)
                    elif kind == b"D":
                        assert current is not None, f"DataRow without RowDescription in {sql}"
                        current.rows.append(list(_data_row(body)))
                    elif kind == b"C":
                        current = None
                    elif kind == b"E" and step.error is None:
                        step.error = rawpg.parse_fields(body)
                    elif kind == b"N":
                        run.notices.append(rawpg.parse_fields(body))
                    elif kind == b"H":
                        step.copy = b""
                    elif kind == b"d":
                        copy.append(body)
                if step.copy is not None:
                    step.copy = b"".join(copy)
            run.raw = b"".join(raw)
    finally:
        conn.terminate()
    return out


# --------------------------------------------------------------------------------------------
# Fixtures


@dataclass
class Corpus:
    """The runs of every case, per client and identity, computed once each on demand."""

    pg: PgServer
    gateway: Gateway
    workdir: Path
    binary_needles: dict[str, list[bytes]]
    cache: dict[tuple[str, str], dict[str, CaseRun]] = field(default_factory=dict)
    failures: dict[tuple[str, str], str] = field(default_factory=dict)

    def endpoint(self, target: str) -> Endpoint:
        pg, gw = self.pg, self.gateway
        if target == "direct":
            return Endpoint("direct", pg.host, pg.port, pg.pgguard_user, pg.pgguard_password, "app")
        if target == "masked":
            token = gw.token(MASKED_SUB, MASKED_GROUPS)
            return Endpoint("masked", gw.host, gw.port, MASKED_SUB, token, "app")
        assert target == "exempt"
        token = gw.token(EXEMPT_SUB, EXEMPT_GROUPS)
        return Endpoint("exempt", gw.host, gw.port, EXEMPT_SUB, token, "app")

    def runs(self, client: str, target: str) -> dict[str, CaseRun]:
        key = (client, target)
        if key in self.failures:  # do not wait for a broken run twice
            pytest.fail(f"the {client} run as {target} failed earlier: {self.failures[key]}")
        if key not in self.cache:
            try:
                self.cache[key] = self._run_all(client, target)
            except Exception as exc:
                self.failures[key] = repr(exc)[:2000]
                raise
        return self.cache[key]

    def _run_all(self, client: str, target: str) -> dict[str, CaseRun]:
        cases = [c for c in ALL_CASES if unsupported(c, client) is None]
        ep = self.endpoint(target)
        if client == "psql":
            return run_psql(self.pg, ep, cases)
        if client.startswith("psycopg"):
            return run_psycopg(ep, cases, binary=client == "psycopg_binary")
        if client == "asyncpg":
            return run_asyncpg(ep, cases)
        if client == "pg8000":
            return run_pg8000(ep, cases)
        if client == "sqlalchemy":
            return run_sqlalchemy(ep, cases)
        if client == "node":
            return run_node(ep, cases, self.workdir)
        return run_raw(ep, cases, binary=client == "raw_binary")

    def run(self, case: Case, client: str, target: str) -> CaseRun:
        return self.runs(client, target)[case.name]


@pytest.fixture(scope="module")
def masking_gateway(pg: PgServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
        conn.execute(SCHEMA_SQL.encode())
    policy = tmp_path_factory.mktemp("masking-policies") / "masking.yaml"
    policy.write_text(textwrap.dedent(POLICY))
    gw = Gateway(
        pg,
        tmp_path_factory.mktemp("masking-gateway"),
        overrides={"policies": [str(policy)]},
        env={"PGGUARD_MASKING_SECRET": MASKING_SECRET},
    )
    gw.start()
    try:
        yield gw
    finally:
        gw.stop()
        with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
            conn.execute("DROP SCHEMA IF EXISTS mask_t CASCADE")


@pytest.fixture(scope="module")
def corpus(
    pg: PgServer, masking_gateway: Gateway, tmp_path_factory: pytest.TempPathFactory
) -> Corpus:
    binary: dict[str, list[bytes]] = {}
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
        for col, value in conn.execute(BINARY_NEEDLES_SQL).fetchall():
            binary.setdefault(col, []).append(bytes(value))
    return Corpus(pg, masking_gateway, tmp_path_factory.mktemp("masking-runs"), binary)


@pytest.fixture(scope="module")
def checker(pg: PgServer, masking_gateway: Gateway) -> Iterator[rawpg.RawConnection]:
    """A direct raw connection that asks PostgreSQL whether a value is valid for a type."""
    conn = rawpg.connect(pg.host, pg.port, pg.pgguard_user, "app", pg.pgguard_password)
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        yield conn
    finally:
        conn.terminate()


def server_rejects(conn: rawpg.RawConnection, value: bytes, col: str, fmt: int) -> str | None:
    """None if PostgreSQL reads ``value`` (in format ``fmt``) as a valid value of ``col``'s
    type, else why not."""
    oid, check = COLUMN_TYPES[col]
    conn.parse("", f"SELECT {check}", [oid])
    conn.bind("", "", [value], param_formats=[fmt], result_formats=[0])
    conn.execute("")
    conn.sync()
    answer: str | None = "no row"
    for kind, body in conn.read_until_ready():
        if kind == b"E":
            return rawpg.parse_fields(body).get("M", "error")
        if kind == b"D":
            answer = None if _data_row(body) == [b"t"] else f"check {check} failed"
    return answer


def _python_type_problem(col: str, value: Any) -> str | None:
    """None if ``value`` is what a Python driver gives for a valid value of ``col``."""
    if col in ("id", "level"):
        ok = isinstance(value, int)
    elif col in ("name", "email", "ssn"):
        ok = isinstance(value, str)
    elif col == "code":
        ok = isinstance(value, str) and len(value) <= 12
    elif col == "salary":
        ok = isinstance(value, Decimal) and value == value.quantize(Decimal("0.01"))
    elif col == "birth":
        ok = isinstance(value, date) and not isinstance(value, datetime)
    elif col == "last_login":
        ok = isinstance(value, datetime) and value.tzinfo is not None
    elif col == "card":
        ok = isinstance(value, uuid.UUID)
    elif col == "photo":
        ok = isinstance(value, bytes | memoryview)
    elif col == "score":
        ok = isinstance(value, float)
    elif col == "profile":
        ok = isinstance(value, dict) or (
            isinstance(value, str) and isinstance(json.loads(value), dict)
        )
    else:  # pragma: no cover
        raise AssertionError(col)
    return None if ok else f"{type(value).__name__} {value!r}"


def _describe(run: CaseRun) -> str:
    parts = []
    for step in run.steps:
        if step.error:
            parts.append(f"{step.sql[:60]!r}: ERROR {_sqlstate(step.error)} {_message(step.error)}")
        if step.client_error:
            parts.append(f"{step.sql[:60]!r}: client error {step.client_error}")
    return "; ".join(parts) or "no error"


# --------------------------------------------------------------------------------------------
# The leak corpus


@pytest.mark.parametrize(("case", "client"), matrix(CASES))
def test_leak_is_visible_on_a_direct_connection(corpus: Corpus, case: Case, client: str) -> None:
    """The harness half: directly, each case shows the clear values of the columns it
    exposes, so that the pgguard half can see a leak."""
    run = corpus.run(case, client, "direct")
    for step in run.steps:
        assert step.client_error is None, f"{case.name} via {client}: {step.client_error}"
    found = find_needles(run, corpus.binary_needles, case.cols)
    missing = [col for col in case.cols if col not in found]
    assert not missing, (
        f"{case.name} via {client} directly: no clear value of {missing} in what the client "
        f"received ({_describe(run)})"
    )


@pytest.mark.parametrize(("case", "client"), matrix(CASES))
def test_no_clear_value_reaches_a_masked_identity(corpus: Corpus, case: Case, client: str) -> None:
    run = corpus.run(case, client, "masked")
    direct = corpus.run(case, client, "direct")
    for step, dstep in zip(run.steps, direct.steps, strict=True):
        assert step.client_error is None or dstep.client_error is not None, (
            f"{case.name} via {client}: the client could not read what pgguard sent for "
            f"{step.sql!r}: {step.client_error}"
        )
    found = find_needles(run, corpus.binary_needles)
    if found:
        pytest.fail(
            f"{case.name} via {client} LEAKED to a masked identity: "
            + "; ".join(f"{col}: {', '.join(hits[:2])}" for col, hits in found.items()),
            pytrace=False,
        )


def _typed_values(run: CaseRun, case: Case) -> Iterator[tuple[str, int, Any, int]]:
    """(table column, row index, value, format) for every typed result column."""
    for step in run.steps:
        for rs in step.sets:
            for i, name in enumerate(rs.columns):
                col = case.typed.get(name)
                if col is None:
                    continue
                fmt = rs.formats[i] if rs.formats else 0
                for r, row in enumerate(rs.rows):
                    if row[i] is not None:
                        yield col, r, row[i], fmt


@pytest.mark.parametrize("target", ["direct", "masked"])
@pytest.mark.parametrize(
    ("case", "client"), matrix(CASES + CONTROLS, keep=lambda c, k: bool(c.typed))
)
def test_masked_values_keep_their_type(
    corpus: Corpus, checker: rawpg.RawConnection, case: Case, client: str, target: str
) -> None:
    """Python clients decode each value as its column's type; text and binary values as
    received are valid input for the column's type (and fit numeric(10,2), varchar(12))."""
    run = corpus.run(case, client, target)
    seen: set[str] = set()
    problems: list[str] = []
    for col, r, value, fmt in _typed_values(run, case):
        seen.add(col)
        if client in PY_CLIENTS:
            problem = _python_type_problem(col, value)
        else:
            raw = value.encode() if isinstance(value, str) else bytes(value)
            problem = server_rejects(checker, raw, col, fmt)
        if problem:
            problems.append(f"{col} row {r}: {problem} ({value!r})")
    assert not problems, f"{case.name} via {client} ({target}): " + "; ".join(problems)
    if target == "direct":  # the harness half: the check saw every typed column
        missing = set(case.typed.values()) - seen
        assert not missing, f"{case.name} via {client}: no value of {missing} was checked"


# --------------------------------------------------------------------------------------------
# Positive controls


def _plain(value: Any) -> Any:
    if isinstance(value, asyncpg.Record):
        return tuple(_plain(v) for v in value.values())
    if isinstance(value, list | tuple):
        return tuple(_plain(v) for v in value)
    if isinstance(value, memoryview | bytearray):
        return bytes(value)
    return value


def comparable(run: CaseRun) -> list[Any]:
    """What must be equal between two runs of a case (values, errors, COPY data, notices)."""
    if run.stdout or run.stderr:  # psql
        return [run.stdout, run.stderr]
    out: list[Any] = []
    for step in run.steps:
        error = None if step.error is None else (_sqlstate(step.error), _message(step.error))
        sets = [(rs.columns, [[_plain(v) for v in row] for row in rs.rows]) for rs in step.sets]
        out.append((step.sql, sets, error, step.copy, step.client_error))
    out.append(sorted(_message(n) for n in run.notices))
    return out


@pytest.mark.parametrize(("case", "client"), matrix(ALL_CASES))
def test_exempt_identity_sees_exactly_the_direct_result(
    corpus: Corpus, case: Case, client: str
) -> None:
    exempt = comparable(corpus.run(case, client, "exempt"))
    direct = comparable(corpus.run(case, client, "direct"))
    assert exempt == direct, f"{case.name} via {client}: the dba identity saw something else"


@pytest.mark.parametrize(("case", "client"), matrix(CONTROLS))
def test_clean_only_queries_are_identical_for_a_masked_identity(
    corpus: Corpus, case: Case, client: str
) -> None:
    masked = comparable(corpus.run(case, client, "masked"))
    direct = comparable(corpus.run(case, client, "direct"))
    assert masked == direct, f"{case.name} via {client}: a clean-only query came back changed"


def _is_refusal(error: Mapping[str, str] | None) -> bool:
    return _sqlstate(error) == "42501" and _message(error or {}).startswith("pgguard:")


@pytest.mark.parametrize(
    ("case", "client"), matrix(CASES, keep=lambda c, k: bool(c.clean) and k != "psql")
)
def test_clean_columns_are_byte_identical(corpus: Corpus, case: Case, client: str) -> None:
    """Next to masked ones, clean columns come through exactly as PostgreSQL sent them
    (raw clients: the same DataRow field bytes)."""
    masked = corpus.run(case, client, "masked")
    direct = corpus.run(case, client, "direct")
    compared = 0
    for mstep, dstep in zip(masked.steps, direct.steps, strict=True):
        assert dstep.error is None, f"{case.name} via {client} directly: {dstep.error}"
        assert mstep.error is None, f"{case.name} via {client} through pgguard: {mstep.error}"
        assert len(mstep.sets) == len(dstep.sets), f"{case.name} via {client}: result sets"
        for mset, dset in zip(mstep.sets, dstep.sets, strict=True):
            assert len(mset.rows) == len(dset.rows), f"{case.name} via {client}: row count"
            for col in case.clean:
                if col not in dset.columns:
                    continue
                mi, di = mset.columns.index(col), dset.columns.index(col)
                mvals = [_plain(row[mi]) for row in mset.rows]
                dvals = [_plain(row[di]) for row in dset.rows]
                assert mvals == dvals, f"{case.name} via {client}: clean column {col} changed"
                compared += 1
    assert compared, f"{case.name} via {client}: none of {case.clean} in the direct result"


@pytest.mark.parametrize(("case", "client"), matrix(CASES, WITH_OIDS))
def test_row_description_is_unchanged(corpus: Corpus, case: Case, client: str) -> None:
    """Column names and type OIDs are those of a direct connection (SPEC §4: the
    RowDescription is unchanged). A step pgguard refused has no result to compare."""
    masked = corpus.run(case, client, "masked")
    direct = corpus.run(case, client, "direct")
    for mstep, dstep in zip(masked.steps, direct.steps, strict=True):
        if _is_refusal(mstep.error) and not mstep.sets:
            continue
        got = [(rs.columns, rs.oids) for rs in mstep.sets]
        want = [(rs.columns, rs.oids) for rs in dstep.sets]
        assert got == want, f"{case.name} via {client}: {mstep.sql!r}"


# --------------------------------------------------------------------------------------------
# Copying masked data into a table


@dataclass(frozen=True)
class CopyInto:
    name: str
    masked: tuple[str, ...]  # statements that copy masked values: refused
    clean: tuple[str, ...] | None  # their twins over clean columns: allowed (None: not checked)
    check: str  # what the dba sees afterwards, in the same transaction (contains a needle)


COPY_INTO: Final[list[CopyInto]] = [
    CopyInto(
        "create_table_as",
        (f"CREATE TABLE mask_t.mask_c1 AS SELECT email FROM {C}",),
        (f"CREATE TABLE mask_t.mask_c1 AS SELECT name FROM {C}",),
        "SELECT string_agg(email, ',') FROM mask_t.mask_c1",
    ),
    CopyInto(
        "select_into",
        (f"SELECT email INTO mask_t.mask_c2 FROM {C}",),
        (f"SELECT name INTO mask_t.mask_c2 FROM {C}",),
        "SELECT string_agg(email, ',') FROM mask_t.mask_c2",
    ),
    CopyInto(
        "insert_select",
        (f"INSERT INTO mask_t.notes(id, body) SELECT id + 100, email FROM {C}",),
        (f"INSERT INTO mask_t.notes(id, body) SELECT id + 100, name FROM {C}",),
        "SELECT string_agg(body, ',') FROM mask_t.notes",
    ),
    CopyInto(
        "update_from",
        (f"UPDATE mask_t.notes n SET body = c.email FROM {C} c WHERE c.id = n.id",),
        (f"UPDATE mask_t.notes n SET body = c.name FROM {C} c WHERE c.id = n.id",),
        "SELECT string_agg(body, ',') FROM mask_t.notes",
    ),
    CopyInto(
        "create_temp_table_as",
        (f"CREATE TEMP TABLE mask_c3 AS SELECT id, ssn FROM {C}",),
        (f"CREATE TEMP TABLE mask_c3 AS SELECT id, name FROM {C}",),
        "SELECT string_agg(ssn, ',') FROM mask_c3",
    ),
    CopyInto(
        "create_materialized_view",
        (f"CREATE MATERIALIZED VIEW mask_t.mask_c4 AS SELECT card FROM {C}",),
        (f"CREATE MATERIALIZED VIEW mask_t.mask_c4 AS SELECT name FROM {C}",),
        "SELECT string_agg(card::text, ',') FROM mask_t.mask_c4",
    ),
    CopyInto(
        "insert_values_scalar_subquery",
        (f"INSERT INTO mask_t.notes VALUES (100, (SELECT email FROM {C} WHERE id = 1))",),
        (f"INSERT INTO mask_t.notes VALUES (100, (SELECT name FROM {C} WHERE id = 1))",),
        "SELECT string_agg(body, ',') FROM mask_t.notes",
    ),
    CopyInto(
        "insert_select_from_cte",
        (
            f"WITH s AS (SELECT id, email FROM {C}) INSERT INTO mask_t.notes "
            "SELECT id + 100, email FROM s",
        ),
        (
            f"WITH s AS (SELECT id, name FROM {C}) INSERT INTO mask_t.notes "
            "SELECT id + 100, name FROM s",
        ),
        "SELECT string_agg(body, ',') FROM mask_t.notes",
    ),
    CopyInto(
        "insert_select_expression_of_view",
        ("INSERT INTO mask_t.notes SELECT id + 100, upper(contact) FROM mask_t.customers_vv",),
        ("INSERT INTO mask_t.notes SELECT id + 100, upper(name) FROM mask_t.customers_vv",),
        "SELECT string_agg(body, ',') FROM mask_t.notes",
    ),
    CopyInto(
        "insert_select_whole_row",
        (f"INSERT INTO mask_t.notes SELECT c.id + 100, c::text FROM {C} c",),
        (f"INSERT INTO mask_t.notes SELECT c.id + 100, c.name::text FROM {C} c",),
        "SELECT string_agg(body, ',') FROM mask_t.notes",
    ),
    CopyInto(
        "update_scalar_subquery",
        (
            f"UPDATE mask_t.notes SET body = (SELECT email FROM {C} c WHERE c.id = notes.id) "
            "WHERE id = 1",
        ),
        (
            f"UPDATE mask_t.notes SET body = (SELECT name FROM {C} c WHERE c.id = notes.id) "
            "WHERE id = 1",
        ),
        "SELECT string_agg(body, ',') FROM mask_t.notes",
    ),
    CopyInto(
        "merge",
        (
            f"MERGE INTO mask_t.notes n USING {C} c ON n.id = c.id "
            "WHEN MATCHED THEN UPDATE SET body = c.email",
        ),
        (
            f"MERGE INTO mask_t.notes n USING {C} c ON n.id = c.id "
            "WHEN MATCHED THEN UPDATE SET body = c.name",
        ),
        "SELECT string_agg(body, ',') FROM mask_t.notes",
    ),
    CopyInto(
        "sql_prepare_execute_insert_select",
        (
            f"PREPARE mask_ins AS INSERT INTO mask_t.notes SELECT id + 100, email FROM {C}",
            "EXECUTE mask_ins",
        ),
        (
            f"PREPARE mask_ins AS INSERT INTO mask_t.notes SELECT id + 100, name FROM {C}",
            "EXECUTE mask_ins",
            "DEALLOCATE mask_ins",
        ),
        "SELECT string_agg(body, ',') FROM mask_t.notes",
    ),
    CopyInto(
        "do_block_insert_select",
        (f"DO $$BEGIN INSERT INTO mask_t.notes SELECT id + 100, email FROM {C}; END$$",),
        None,
        "SELECT string_agg(body, ',') FROM mask_t.notes",
    ),
    CopyInto(
        "volatile_function_insert_select",
        ("SELECT mask_t.copy_emails()",),
        None,
        "SELECT string_agg(body, ',') FROM mask_t.notes",
    ),
]


RESTORE_COPY_TARGETS: Final = """
DROP TABLE IF EXISTS mask_t.mask_c1, mask_t.mask_c2;
DROP MATERIALIZED VIEW IF EXISTS mask_t.mask_c4;
DELETE FROM mask_t.notes;
INSERT INTO mask_t.notes VALUES (1, 'note one'), (2, 'note two');
"""


@pytest.fixture
def copy_targets(pg: PgServer, masking_gateway: Gateway) -> Iterator[None]:
    """Puts the copy targets back after a test, so that a copy pgguard failed to refuse
    does not break the tests after it."""
    yield
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
        conn.execute(RESTORE_COPY_TARGETS.encode())


def snapshot(pg: PgServer) -> list[Any]:
    """What a copy could change, read directly."""
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
        notes = conn.execute("SELECT id, body FROM mask_t.notes ORDER BY id").fetchall()
        tables = conn.execute(
            "SELECT n.nspname, c.relname FROM pg_class c JOIN pg_namespace n "
            "ON n.oid = c.relnamespace WHERE c.relname LIKE 'mask\\_c%' ORDER BY 1, 2"
        ).fetchall()
        return [notes, tables]


@pytest.mark.parametrize("protocol", ["simple", "extended"])
@pytest.mark.parametrize("stmt", COPY_INTO, ids=lambda s: s.name)
def test_copying_masked_data_into_a_table_is_refused(
    masking_gateway: Gateway, copy_targets: None, pg: PgServer, stmt: CopyInto, protocol: str
) -> None:
    before = snapshot(pg)
    dsn = masking_gateway.dsn(MASKED_SUB, groups=MASKED_GROUPS)
    with psycopg.connect(dsn, autocommit=True) as conn:
        cur = conn.cursor(binary=protocol == "extended")  # binary results: extended protocol
        refused: list[str] = []
        for sql in stmt.masked:
            try:
                cur.execute(sql)
            except psycopg.Error as exc:
                message = exc.diag.message_primary or ""
                assert exc.sqlstate == "42501" and message.startswith("pgguard: masking"), (
                    f"{stmt.name}: {sql!r} failed, but not as a masking refusal: "
                    f"{exc.sqlstate} {message}"
                )
                refused.append(sql)
                break  # what follows a refused PREPARE cannot run either
        assert refused, f"{stmt.name}: copying masked data into a table was allowed"
        # The session goes on.
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert snapshot(pg) == before, f"{stmt.name}: a refused copy changed the data"


@pytest.mark.parametrize(
    "stmt", [s for s in COPY_INTO if s.clean is not None], ids=lambda s: s.name
)
def test_copying_clean_columns_into_a_table_is_allowed(
    masking_gateway: Gateway, copy_targets: None, pg: PgServer, stmt: CopyInto
) -> None:
    before = snapshot(pg)
    assert stmt.clean is not None
    dsn = masking_gateway.dsn(MASKED_SUB, groups=MASKED_GROUPS)
    with psycopg.connect(dsn) as conn:  # one transaction, rolled back
        for sql in stmt.clean:
            conn.execute(sql)
        conn.rollback()
    assert snapshot(pg) == before


@pytest.mark.parametrize("stmt", COPY_INTO, ids=lambda s: s.name)
def test_exempt_identity_may_copy_masked_data(
    masking_gateway: Gateway, copy_targets: None, pg: PgServer, stmt: CopyInto
) -> None:
    before = snapshot(pg)
    dsn = masking_gateway.dsn(EXEMPT_SUB, groups=EXEMPT_GROUPS)
    with psycopg.connect(dsn) as conn:  # one transaction, rolled back
        for sql in stmt.masked:
            conn.execute(sql)
        row = conn.execute(stmt.check).fetchone()
        assert row is not None
        copied = str(row[0])
        needles = [n for col in MASKED_COLUMNS for n in NEEDLES[col]]
        assert any(n.lower() in copied.lower() for n in needles), (
            f"{stmt.name}: the copy has no clear value"
        )
        conn.rollback()
    assert snapshot(pg) == before
