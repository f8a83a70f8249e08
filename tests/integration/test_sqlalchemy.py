"""SQLAlchemy 2 Core (no ORM) over psycopg and asyncpg, against both targets."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest
from sqlalchemy import (
    Column,
    DateTime,
    Integer,
    MetaData,
    Numeric,
    String,
    Table,
    bindparam,
    func,
    select,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import URL, Connection, create_engine
from sqlalchemy.pool import NullPool

from .conftest import Endpoint

BASE = datetime(2024, 3, 1, tzinfo=UTC)
ROWS: list[dict[str, Any]] = [
    {
        "id": i,
        "name": f"n{i:04d}",
        "amount": Decimal(i) / 4,
        "data": {"i": i, "odd": bool(i % 2)},
        "created": BASE + timedelta(minutes=i),
    }
    for i in range(1, 1001)
]


def _url(ep: Endpoint, driver: str) -> URL:
    return URL.create(
        f"postgresql+{driver}",
        username=ep.user,
        password=ep.password,
        host=ep.host,
        port=ep.port,
        database=ep.dbname,
    )


def _table(name: str) -> tuple[MetaData, Table]:
    md = MetaData()
    t = Table(
        name,
        md,
        Column("id", Integer, primary_key=True),
        Column("name", String(50), nullable=False),
        Column("amount", Numeric(10, 2)),
        Column("data", JSONB),
        Column("created", DateTime(timezone=True)),
    )
    return md, t


def _exercise(conn: Connection, md: MetaData, t: Table) -> None:
    """The shared body, on a synchronous connection (run_sync for asyncio)."""
    md.create_all(conn)
    conn.commit()
    conn.execute(t.insert(), ROWS)  # executemany ("insertmanyvalues" batches)
    conn.commit()
    assert conn.execute(select(func.count()).select_from(t)).scalar_one() == len(ROWS)
    q = (
        select(t)
        .where(t.c.id.between(bindparam("lo"), bindparam("hi")))
        .where(t.c.name != bindparam("skip"))
        .order_by(t.c.id)
    )
    got = conn.execute(q, {"lo": 10, "hi": 20, "skip": "n0015"}).all()
    expected = [r for r in ROWS if 10 <= r["id"] <= 20 and r["id"] != 15]
    assert [row._asdict() for row in got] == expected
    agg = conn.execute(
        select(func.count(), func.sum(t.c.amount)).where(t.c.data["odd"].as_boolean())
    ).one()
    assert tuple(agg) == (500, sum(r["amount"] for r in ROWS if r["id"] % 2))
    cnt = conn.execute(
        text(f'SELECT count(*) FROM "{t.name}" WHERE created >= :since'),
        {"since": BASE + timedelta(minutes=901)},
    ).scalar_one()
    assert cnt == 100
    # Rollback: nothing of this survives.
    conn.execute(t.delete().where(t.c.id <= 500))
    conn.execute(t.update().values(name="changed"))
    conn.execute(t.insert(), [{"id": 5000, "name": "gone"}])
    assert conn.execute(select(func.count()).select_from(t)).scalar_one() == 501
    conn.rollback()
    assert conn.execute(select(func.count()).select_from(t)).scalar_one() == 1000
    assert conn.execute(select(t.c.name).where(t.c.id == 1)).scalar_one() == "n0001"
    conn.commit()
    md.drop_all(conn)
    conn.commit()


def test_core_psycopg(endpoint: Endpoint, table: str) -> None:
    engine = create_engine(_url(endpoint, "psycopg"), poolclass=NullPool)
    try:
        md, t = _table(table)
        with engine.connect() as conn:
            _exercise(conn, md, t)
    finally:
        engine.dispose()


def test_core_asyncpg(endpoint: Endpoint, table: str) -> None:
    # sqlalchemy.ext.asyncio needs greenlet (the SQLAlchemy[asyncio] extra).
    pytest.importorskip("greenlet", reason="add SQLAlchemy[asyncio] (greenlet) to the dev extra")
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main() -> None:
        engine = create_async_engine(_url(endpoint, "asyncpg"), poolclass=NullPool)
        try:
            md, t = _table(table)
            async with engine.connect() as conn:
                await conn.run_sync(lambda sync_conn: _exercise(sync_conn, md, t))
                # And natively awaited statements.
                n = await conn.scalar(text("SELECT count(*) FROM items WHERE id < :n"), {"n": 11})
                assert n == 10
        finally:
            await engine.dispose()

    asyncio.run(main())
