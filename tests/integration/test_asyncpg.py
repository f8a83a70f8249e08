"""asyncpg (binary protocol, prepared statements, COPY) against both targets."""

from __future__ import annotations

import asyncio
import io
import json
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import sql

from tests.support.schema import ITEMS

from .conftest import Endpoint


async def _connect(ep: Endpoint) -> asyncpg.Connection:
    conn: asyncpg.Connection = await asyncpg.connect(
        host=ep.host,
        port=ep.port,
        user=ep.user,
        password=ep.password,
        database=ep.dbname,
        timeout=10,
    )
    # jsonb in binary format (version byte 1, then the JSON text), both directions.
    await conn.set_type_codec(
        "jsonb",
        encoder=lambda v: b"\x01" + json.dumps(v).encode(),
        decoder=lambda b: json.loads(b[1:]),
        schema="pg_catalog",
        format="binary",
    )
    return conn


def run(ep: Endpoint, body: Callable[[asyncpg.Connection], Awaitable[None]]) -> None:
    async def main() -> None:
        conn = await _connect(ep)
        try:
            await asyncio.wait_for(body(conn), timeout=90)
        finally:
            await conn.close(timeout=5)

    asyncio.run(main())


def test_prepared_statements(endpoint: Endpoint) -> None:
    async def body(conn: asyncpg.Connection) -> None:
        stmt = await conn.prepare("SELECT id, name, price, created FROM items WHERE id = $1")
        assert [t.name for t in stmt.get_parameters()] == ["int4"]
        assert [a.name for a in stmt.get_attributes()] == ["id", "name", "price", "created"]
        assert [a.type.name for a in stmt.get_attributes()] == [
            "int4",
            "text",
            "numeric",
            "timestamptz",
        ]
        for i in range(1, 101):
            row = await stmt.fetchrow(i)
            it = ITEMS[i - 1]
            assert tuple(row) == (it.id, it.name, it.price, it.created)
        assert await stmt.fetchrow(1000) is None
        many = await conn.prepare("SELECT g, g * 2 FROM generate_series(1, $1) g")
        for n in (0, 1, 10, 1000):
            rows = await many.fetch(n)
            assert [tuple(r) for r in rows] == [(g, 2 * g) for g in range(1, n + 1)]
        count = await conn.prepare("SELECT count(*) FROM items WHERE price > $1")
        assert await count.fetchval(Decimal("100")) == 20
        assert await count.fetchval(Decimal("0")) == 100
        # The statement cache path (implicitly prepared statements).
        for i in range(20):
            assert await conn.fetchval("SELECT $1::int + $2::int", i, 1) == i + 1

    run(endpoint, body)


def test_binary_formats(endpoint: Endpoint) -> None:
    u = uuid.UUID("12345678-1234-5678-1234-567812345678")
    ts = datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC)
    values: list[tuple[str, Any]] = [
        ("int2", -32768),
        ("int4", 2147483647),
        ("int8", -(2**63)),
        ("numeric", Decimal("-123456789012345678901234567890.123456789")),
        ("numeric", Decimal("0.000001")),
        ("numeric", Decimal("NaN")),
        ("float8", -1.25e-300),
        ("bool", False),
        ("text", "ünïcødé ✓ \x01 tab\t"),
        ("bytea", bytes(range(256))),
        ("uuid", u),
        ("timestamptz", ts),
        ("timestamp", datetime(2020, 2, 29, 12, 0)),
        ("date", date(1900, 1, 1)),
        ("interval", timedelta(days=3, seconds=7, microseconds=11)),
        ("jsonb", {"a": [1, 2.5, None, True], "b": {"c": "ü"}}),
        ("int4[]", [1, None, -3]),
        ("int8[]", [[1, 2], [3, 4]]),
        ("text[]", ["a", "", None, "d,e", '"q"']),
        ("numeric[]", [Decimal("1.10"), Decimal("-0")]),
        ("uuid[]", [u]),
        ("timestamptz[]", [ts, None]),
        ("bytea[]", [b"\x00", b""]),
    ]

    async def body(conn: asyncpg.Connection) -> None:
        query = "SELECT " + ", ".join(f"${i}::{t}" for i, (t, _) in enumerate(values, 1))
        row = await conn.fetchrow(query, *[v for _, v in values])
        got = list(row)
        for (t, v), g in zip(values, got, strict=True):
            if isinstance(v, Decimal) and v.is_nan():
                assert isinstance(g, Decimal) and g.is_nan(), t
            else:
                assert g == v, t
        assert str(got[3]) == "-123456789012345678901234567890.123456789"
        # NULLs in every type.
        nulls = await conn.fetchrow("SELECT " + ", ".join(f"NULL::{t}" for t, _ in values))
        assert list(nulls) == [None] * len(values)
        # The reference table, all columns binary.
        rows = await conn.fetch("SELECT * FROM items ORDER BY id")
        assert [tuple(r) for r in rows] == [it.as_tuple() for it in ITEMS]

    run(endpoint, body)


def test_executemany(endpoint: Endpoint, table: str) -> None:
    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY, v text, n numeric)')
        rows = [(i, f"v{i}", Decimal(i) / 8) for i in range(1, 2001)]
        await conn.executemany(f'INSERT INTO "{table}" VALUES ($1, $2, $3)', rows)
        got = await conn.fetch(f'SELECT * FROM "{table}" ORDER BY id')
        assert [tuple(r) for r in got] == rows
        # A failing executemany is atomic and leaves the connection usable.
        with pytest.raises(asyncpg.UniqueViolationError):
            await conn.executemany(
                f'INSERT INTO "{table}" VALUES ($1, $2, $3)',
                [(5000, "new", None), (1, "dup", None)],
            )
        assert await conn.fetchval(f'SELECT count(*) FROM "{table}"') == 2000

    run(endpoint, body)


def test_copy(
    endpoint: Endpoint, tables: Callable[[str], str], admin: psycopg.Connection[Any]
) -> None:
    table = tables("")
    records = [
        (i, f"name {i}" if i % 5 else None, Decimal(i) / 3 if i % 7 else None,
         {"i": i}, bytes([i % 256]) * (i % 4))
        for i in range(1, 5001)
    ]  # fmt: skip
    query = f'SELECT id, name, amount, data, blob FROM "{table}" WHERE id % 3 = 0 ORDER BY id'

    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute(
            f'CREATE TABLE "{table}" (id int PRIMARY KEY, name text, amount numeric(12,4), '
            "data jsonb, blob bytea)"
        )
        res = await conn.copy_records_to_table(
            table, records=records, columns=["id", "name", "amount", "data", "blob"]
        )
        assert res == "COPY 5000"
        got = await conn.fetch(f'SELECT * FROM "{table}" ORDER BY id')
        assert len(got) == 5000
        assert tuple(got[1]) == (2, "name 2", Decimal("0.6667"), {"i": 2}, b"\x02\x02")
        assert tuple(got[34]) == (35, None, None, {"i": 35}, b"###")
        for fmt in ("text", "csv", "binary"):
            out = io.BytesIO()
            res = await conn.copy_from_query(query, output=out, format=fmt)
            assert res == "COPY 1666"
            stmt = sql.SQL("COPY ({}) TO STDOUT WITH (FORMAT {})").format(
                sql.SQL(query),
                sql.SQL(fmt),
            )
            with admin.cursor() as cur, cur.copy(stmt) as copy:
                reference = b"".join(bytes(c) for c in copy)
            assert out.getvalue() == reference, fmt
        out = io.BytesIO()
        assert await conn.copy_from_table(table, output=out, columns=["id"]) == "COPY 5000"
        ids = [int(x) for x in out.getvalue().decode().split()]
        assert sorted(ids) == list(range(1, 5001))  # heap order is not guaranteed

    run(endpoint, body)


def test_transaction(endpoint: Endpoint, table: str) -> None:
    class Boom(Exception):
        pass

    async def body(conn: asyncpg.Connection) -> None:
        await conn.execute(f'CREATE TABLE "{table}" (id int PRIMARY KEY)')
        ins = f'INSERT INTO "{table}" VALUES ($1)'
        async with conn.transaction():
            await conn.execute(ins, 1)
            assert conn.is_in_transaction()
        with pytest.raises(Boom):
            async with conn.transaction():
                await conn.execute(ins, 2)
                raise Boom
        async with conn.transaction(isolation="serializable"):
            await conn.execute(ins, 3)
            with pytest.raises(asyncpg.UniqueViolationError):
                async with conn.transaction():  # savepoint
                    await conn.execute(ins, 4)
                    await conn.execute(ins, 1)
            await conn.execute(ins, 5)
        tr = conn.transaction()
        await tr.start()
        await conn.execute(ins, 6)
        with pytest.raises(asyncpg.DivisionByZeroError):
            await conn.execute("SELECT 1/0")
        with pytest.raises(asyncpg.InFailedSQLTransactionError):
            await conn.execute("SELECT 1")
        await tr.rollback()
        assert not conn.is_in_transaction()
        ids = await conn.fetch(f'SELECT id FROM "{table}" ORDER BY id')
        assert [r["id"] for r in ids] == [1, 3, 5]

    run(endpoint, body)


def test_cursor_in_transaction(endpoint: Endpoint) -> None:
    async def body(conn: asyncpg.Connection) -> None:
        query = "SELECT g, 'row ' || g FROM generate_series(1, $1) g ORDER BY g"
        async with conn.transaction():
            n = 0
            total = 0
            async for rec in conn.cursor(query, 7777, prefetch=333):
                n += 1
                total += rec[0]
                assert rec[1] == f"row {rec[0]}"
            assert (n, total) == (7777, 7777 * 7778 // 2)
            cur = await conn.cursor(query, 1000)
            first = await cur.fetch(10)
            assert [r[0] for r in first] == list(range(1, 11))
            assert await cur.forward(489) == 489
            row = await cur.fetchrow()
            assert row is not None and row[0] == 500
            rest = await cur.fetch(10000)
            assert len(rest) == 500
            assert await cur.fetchrow() is None
        assert not conn.is_in_transaction()

    run(endpoint, body)


def test_many_concurrent_sessions(endpoint: Endpoint) -> None:
    """40 sessions at once, each with its own session state; no answer crosses sessions."""

    async def one(i: int) -> None:
        conn = await _connect(endpoint)
        try:
            await conn.execute(f"SET application_name = 'conc-{i}'")
            pid = await conn.fetchval("SELECT pg_backend_pid()")
            for j in range(25):
                row = await conn.fetchrow(
                    "SELECT $1::int, $2::text, current_setting('application_name'), "
                    "pg_backend_pid()",
                    i * 1000 + j,
                    "x" * (i * 37 + j),
                )
                assert tuple(row) == (i * 1000 + j, "x" * (i * 37 + j), f"conc-{i}", pid)
        finally:
            await conn.close(timeout=5)

    async def main() -> None:
        await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(40))), timeout=60)

    asyncio.run(main())
