"""pg8000 (pure Python, extended protocol) against both targets."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pg8000.native
import pytest

from tests.support.schema import ITEMS

from .conftest import Endpoint


def _connect(ep: Endpoint) -> pg8000.native.Connection:
    return pg8000.native.Connection(
        user=ep.user,
        password=ep.password,
        host=ep.host,
        port=ep.port,
        database=ep.dbname,
        timeout=30,
        application_name="pg8000-test",
    )


def test_queries_with_params(endpoint: Endpoint) -> None:
    con = _connect(endpoint)
    try:
        rows = con.run("SELECT id, name, price FROM items WHERE id <= :n ORDER BY id", n=3)
        assert rows == [[it.id, it.name, it.price] for it in ITEMS[:3]]
        assert [c["name"] for c in con.columns or []] == ["id", "name", "price"]
        got = con.run(
            "SELECT :a::int + 1, :b::text || '!', :c::numeric * 2, :d::date, :e::bytea, "
            "CAST(:f AS int[])",
            a=41, b="ünï", c=Decimal("1.25"), d=date(2024, 2, 29), e=b"\x00\xff", f=[1, 2],
        )  # fmt: skip
        assert got == [[42, "ünï!", Decimal("2.50"), date(2024, 2, 29), b"\x00\xff", [1, 2]]]
        ps = con.prepare("SELECT name FROM items WHERE id = :id")
        try:
            for i in (1, 50, 100):
                assert ps.run(id=i) == [[ITEMS[i - 1].name]]
        finally:
            ps.close()
        even = sum(1 for it in ITEMS if it.data is not None and it.data["even"])
        assert con.run("SELECT count(*) FROM items WHERE data ->> 'even' = :v", v="true") == [
            [even]
        ]
        assert con.run("SELECT current_setting('application_name')") == [["pg8000-test"]]
    finally:
        con.close()


def test_transaction(endpoint: Endpoint, table: str) -> None:
    con = _connect(endpoint)
    try:
        con.run(f'CREATE TABLE "{table}" (id int PRIMARY KEY, v text)')
        con.run("START TRANSACTION")
        con.run(f'INSERT INTO "{table}" VALUES (:i, :v)', i=1, v="one")
        con.run("COMMIT")
        con.run("START TRANSACTION")
        con.run(f'INSERT INTO "{table}" VALUES (:i, :v)', i=2, v="two")
        assert con.run(f'SELECT count(*) FROM "{table}"') == [[2]]
        con.run("ROLLBACK")
        assert con.run(f'SELECT id, v FROM "{table}" ORDER BY id') == [[1, "one"]]
        assert con.row_count == 1
    finally:
        con.close()


def test_error_then_continue(endpoint: Endpoint, table: str) -> None:
    con = _connect(endpoint)
    try:
        with pytest.raises(pg8000.native.DatabaseError) as exc:
            con.run("SELECT 1 / 0")
        assert exc.value.args[0]["C"] == "22012"
        assert exc.value.args[0]["M"] == "division by zero"
        assert con.run("SELECT 1") == [[1]]
        with pytest.raises(pg8000.native.DatabaseError) as exc:
            con.run("SELECT * FROM no_such_table_pg8000")
        assert exc.value.args[0]["C"] == "42P01"
        con.run(f'CREATE TABLE "{table}" (id int PRIMARY KEY)')
        con.run("START TRANSACTION")
        con.run(f'INSERT INTO "{table}" VALUES (1)')
        with pytest.raises(pg8000.native.DatabaseError) as exc:
            con.run(f'INSERT INTO "{table}" VALUES (1)')
        assert exc.value.args[0]["C"] == "23505"
        with pytest.raises(pg8000.native.DatabaseError) as exc:
            con.run("SELECT 1")
        assert exc.value.args[0]["C"] == "25P02"
        con.run("ROLLBACK")
        assert con.run(f'SELECT count(*) FROM "{table}"') == [[0]]
        assert con.run("SELECT :x::text", x="still alive") == [["still alive"]]
    finally:
        con.close()
