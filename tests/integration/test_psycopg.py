"""psycopg 3 against both targets: simple/extended/pipelined queries, COPY in every format,
server-side cursors, notices, LISTEN/NOTIFY, transactions, errors, large streamed results,
parameter statuses."""

from __future__ import annotations

import csv
import hashlib
import io
import json
import time
from datetime import UTC, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any

import psycopg
import pytest
from psycopg import errors, sql
from psycopg.pq import TransactionStatus
from psycopg.types.json import Jsonb

from tests.support.gateway import Gateway
from tests.support.procmem import RssSampler
from tests.support.schema import ITEMS

from .conftest import Endpoint


def _status(conn: psycopg.Connection[Any]) -> TransactionStatus:
    """The transaction status (a call, so that type checkers do not narrow it)."""
    return conn.info.transaction_status


ITEM_TYPES = [("id", 23), ("name", 25), ("price", 1700), ("created", 1184), ("data", 3802),
              ("blob", 17)]  # fmt: skip


def _items(ids: list[int]) -> list[tuple[Any, ...]]:
    return [ITEMS[i - 1].as_tuple() for i in ids]


def test_simple_query_protocol(endpoint: Endpoint) -> None:
    with endpoint.connect(autocommit=True) as conn:
        cur = conn.execute("SELECT id, name FROM items WHERE id <= 3 ORDER BY id")
        assert cur.fetchall() == [(1, "item-001"), (2, "item-002"), (3, "item-003")]
        # No parameters and text results: psycopg uses the simple protocol, so several
        # statements in one string are allowed and each gives a result set.
        cur.execute(
            "SELECT 1 AS one; SELECT 'two' AS two, NULL::int AS n; SELECT count(*) FROM items"
        )
        assert cur.fetchall() == [(1,)]
        assert cur.nextset()
        assert [d.name for d in cur.description or []] == ["two", "n"]
        assert cur.fetchall() == [("two", None)]
        assert cur.nextset()
        assert cur.fetchall() == [(100,)]
        assert not cur.nextset()
        cur.execute("SELECT * FROM items ORDER BY id")
        assert [(d.name, d.type_code) for d in cur.description or []] == ITEM_TYPES
        assert cur.fetchall() == [it.as_tuple() for it in ITEMS]


@pytest.mark.parametrize("binary", [False, True], ids=["text", "binary"])
def test_extended_query_protocol(endpoint: Endpoint, binary: bool) -> None:
    ids = [1, 7, 10, 25, 50, 77, 100]
    with endpoint.connect(autocommit=True) as conn:
        cur = conn.cursor(binary=binary)
        cur.execute("SELECT * FROM items WHERE id = ANY(%s) ORDER BY id", (ids,))
        assert [(d.name, d.type_code) for d in cur.description or []] == ITEM_TYPES
        assert cur.fetchall() == _items(ids)
        # Named prepared statements, executed many times with different parameters.
        for i in range(1, 31):
            cur.execute("SELECT * FROM items WHERE id = %s", (i,), prepare=True)
            assert cur.fetchall() == _items([i])
        cur.execute(
            "SELECT %s::int4, %s::int8, %s::numeric, %s::text, %s::bytea, %s::jsonb, "
            "%s::timestamptz, %s::int[], %s::text[], %s::bool, %s::float8",
            (
                -7, 2**40, Decimal("-12345.6789"), "ünï\tcode", b"\x00\x01\xff",
                Jsonb({"a": [1, None]}),
                datetime(2001, 2, 3, 4, 5, 6, 789, tzinfo=UTC), [1, None, 3], ["a", "b,c", None],
                True, 1.5,
            ),
        )  # fmt: skip
        assert cur.fetchone() == (
            -7, 2**40, Decimal("-12345.6789"), "ünï\tcode", b"\x00\x01\xff", {"a": [1, None]},
            datetime(2001, 2, 3, 4, 5, 6, 789, tzinfo=UTC), [1, None, 3], ["a", "b,c", None],
            True, 1.5,
        )  # fmt: skip
        # An empty result and a statement with no result set.
        cur.execute("SELECT * FROM items WHERE id < %s", (0,))
        assert cur.fetchall() == []
        cur.execute("SELECT set_config('application_name', %s, false)", ("psycopg-test",))
        assert cur.fetchone() == ("psycopg-test",)


def test_pipeline(endpoint: Endpoint, table: str) -> None:
    with endpoint.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY, v text)").format(
            sql.Identifier(table)))  # fmt: skip
        ins = sql.SQL("INSERT INTO {} VALUES (%s, %s)").format(sql.Identifier(table))
        sel = sql.SQL("SELECT count(*), coalesce(sum(id), 0) FROM {}").format(sql.Identifier(table))
        with conn.pipeline() as p:
            cur = conn.cursor()
            checks = []
            for i in range(1, 1001):
                cur.execute(ins, (i, f"v{i}"))
                if i % 250 == 0:
                    c = conn.cursor()
                    c.execute(sel)
                    checks.append((c, i))
            cur.executemany(ins, [(i, f"m{i}") for i in range(1001, 2001)])
            p.sync()
            for c, n in checks:
                assert c.fetchone() == (n, n * (n + 1) // 2)
        assert conn.execute(sel).fetchone() == (2000, 2000 * 2001 // 2)

        # An error inside a pipeline aborts what follows up to the sync, and the statements
        # before it in the same implicit transaction are rolled back; the session goes on.
        with pytest.raises(errors.UniqueViolation), conn.pipeline():
            conn.execute(ins, (5000, "rolled back"))
            conn.execute(ins, (1, "dup"))
            conn.execute(ins, (5001, "skipped"))
        with conn.pipeline():
            conn.execute(ins, (5002, "kept"))
            r = conn.execute(sel)
        assert r.fetchone() == (2001, 2000 * 2001 // 2 + 5002)
        assert _status(conn) == TransactionStatus.IDLE


COPY_ROWS: list[tuple[int, str, Decimal | None, Any, bytes | None]] = [
    (1, "plain", Decimal("1.50"), {"k": 1}, b"\x00\x01"),
    (2, "tab\tand\nnewline and \\ backslash", Decimal("-2.25"), None, b""),
    (3, "ünïcødé ✓", None, {"nested": {"x": [1, 2]}}, None),
    (4, "", Decimal("0.00"), [], b"\xff" * 300),
]


def _csv_quote(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def _csv_line(id_: int, name: str, amount: Decimal | None, data: Any, blob: bytes | None) -> str:
    """One CSV line; strings always quoted (an unquoted empty field is NULL)."""
    cells = [
        str(id_),
        _csv_quote(name),
        "" if amount is None else str(amount),
        "" if data is None else _csv_quote(json.dumps(data)),
        "" if blob is None else "\\x" + blob.hex(),
    ]
    return ",".join(cells) + "\n"


def _create_copy_table(conn: psycopg.Connection[Any], table: str) -> None:
    conn.execute(sql.SQL(
        "CREATE TABLE {} (id int PRIMARY KEY, name text, amount numeric(10,2), data jsonb, "
        "blob bytea)").format(sql.Identifier(table)))  # fmt: skip


def _read_back(conn: psycopg.Connection[Any], table: str) -> list[tuple[Any, ...]]:
    q = sql.SQL("SELECT * FROM {} ORDER BY id").format(sql.Identifier(table))
    return conn.execute(q).fetchall()


def _expected_copy_rows(offset: int) -> list[tuple[Any, ...]]:
    return [(r[0] + offset, *r[1:]) for r in COPY_ROWS]


def test_copy_from_stdin(endpoint: Endpoint, table: str) -> None:
    t = sql.Identifier(table)
    with endpoint.connect(autocommit=True) as conn:
        _create_copy_table(conn, table)
        cur = conn.cursor()
        # text, row by row
        with cur.copy(sql.SQL("COPY {} FROM STDIN").format(t)) as copy:
            for r in COPY_ROWS:
                copy.write_row((r[0], r[1], r[2], None if r[3] is None else Jsonb(r[3]), r[4]))
        assert cur.rowcount == 4
        # csv, raw bytes in uneven chunks
        csv_rows = "".join(_csv_line(r[0] + 10, *r[1:]) for r in COPY_ROWS).encode()
        with cur.copy(sql.SQL("COPY {} FROM STDIN WITH (FORMAT csv)").format(t)) as copy:
            for i in range(0, len(csv_rows), 7):
                copy.write(csv_rows[i : i + 7])
        # binary, typed rows
        with cur.copy(sql.SQL("COPY {} FROM STDIN WITH (FORMAT binary)").format(t)) as copy:
            copy.set_types(["int4", "text", "numeric", "jsonb", "bytea"])
            for r in COPY_ROWS:
                copy.write_row((r[0] + 20, r[1], r[2], None if r[3] is None else Jsonb(r[3]), r[4]))
        # many rows
        with cur.copy(sql.SQL("COPY {} (id, name) FROM STDIN").format(t)) as copy:
            for i in range(1000, 21000):
                copy.write_row((i, f"bulk {i}"))
        assert cur.rowcount == 20000
        rows = _read_back(conn, table)
        assert rows[:12] == _expected_copy_rows(0) + _expected_copy_rows(10) + _expected_copy_rows(
            20
        )
        assert len(rows) == 20012
        assert rows[-1] == (20999, "bulk 20999", None, None, None)

        # A failing COPY (bad data) is an error, and the session goes on.
        with (
            pytest.raises(errors.InvalidTextRepresentation),
            cur.copy(sql.SQL("COPY {} (id, name) FROM STDIN").format(t)) as copy,
        ):
            copy.write(b"999999\tfine\nnot-a-number\tbad\n")
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert len(_read_back(conn, table)) == 20012

        # The client gives up mid-COPY (CopyFail): nothing is written, the session goes on.
        class ClientGaveUp(Exception):
            pass

        with (
            pytest.raises(ClientGaveUp),
            cur.copy(sql.SQL("COPY {} (id, name) FROM STDIN").format(t)) as copy,
        ):
            copy.write_row((888888, "never"))
            raise ClientGaveUp
        assert _status(conn) == TransactionStatus.IDLE
        assert len(_read_back(conn, table)) == 20012
        # And inside a transaction block, the failed COPY fails the block.
        with (
            pytest.raises(ClientGaveUp),
            conn.transaction(),
            cur.copy(sql.SQL("COPY {} (id, name) FROM STDIN").format(t)) as copy,
        ):
            copy.write_row((777777, "never"))
            raise ClientGaveUp
        assert len(_read_back(conn, table)) == 20012


def test_large_values(endpoint: Endpoint, table: str) -> None:
    """Single values of tens of MB, both ways (one DataRow / one Bind message each)."""
    t = sql.Identifier(table)
    blob = bytes(range(256)) * (20 * 1024 * 1024 // 256)  # 20 MiB
    with endpoint.connect(autocommit=True) as conn:
        row = conn.execute("SELECT length(repeat('ab', 15000000)), repeat('ab', 15000000)")
        n, text = row.fetchone() or (0, "")
        assert n == 30_000_000 and text == "ab" * 15_000_000
        conn.execute(sql.SQL("CREATE TABLE {} (id int, b bytea)").format(t))
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1, %b)").format(t), (blob,))
        got = conn.cursor(binary=True).execute(sql.SQL("SELECT b, md5(b) FROM {}").format(t))
        b, digest = got.fetchone() or (b"", "")
        assert b == blob
        assert digest == hashlib.md5(blob).hexdigest()
        got = conn.execute(sql.SQL("SELECT b FROM {}").format(t))  # text format: 40 MiB hex
        assert (got.fetchone() or (b"",))[0] == blob


@pytest.mark.parametrize("fmt", ["text", "csv", "binary"])
def test_copy_to_stdout(
    endpoint: Endpoint, table: str, admin: psycopg.Connection[Any], fmt: str
) -> None:
    t = sql.Identifier(table)
    with admin.cursor() as acur:
        _create_copy_table(admin, table)
        with acur.copy(sql.SQL("COPY {} FROM STDIN WITH (FORMAT binary)").format(t)) as copy:
            copy.set_types(["int4", "text", "numeric", "jsonb", "bytea"])
            for r in COPY_ROWS:
                copy.write_row((r[0], r[1], r[2], None if r[3] is None else Jsonb(r[3]), r[4]))
            for i in range(1000, 31000):
                copy.write_row((i, f"row {i}", Decimal(i) / 4, {"i": i}, i.to_bytes(4, "big")))
    stmt = sql.SQL("COPY (SELECT * FROM {} ORDER BY id) TO STDOUT WITH (FORMAT {})").format(
        t, sql.SQL(fmt)
    )
    with admin.cursor() as acur, acur.copy(stmt) as copy:
        reference = b"".join(bytes(chunk) for chunk in copy)
    assert len(reference) > 500_000
    with endpoint.connect(autocommit=True) as conn:
        cur = conn.cursor()
        with cur.copy(stmt) as copy:
            got = b"".join(bytes(chunk) for chunk in copy)
        assert cur.rowcount == 30004
        assert got == reference
        rows: list[tuple[Any, ...]]
        if fmt == "csv":
            rows = [tuple(r) for r in csv.reader(io.StringIO(got.decode()))]
            last_blob = "\\x" + (30999).to_bytes(4, "big").hex()
            assert rows[-1] == ("30999", "row 30999", "7749.75", '{"i": 30999}', last_blob)
        else:
            with cur.copy(stmt) as copy:
                if fmt == "binary":
                    copy.set_types(["int4", "text", "numeric", "jsonb", "bytea"])
                rows = list(copy.rows())
            if fmt == "binary":
                assert rows[:4] == [tuple(r) for r in COPY_ROWS]
                assert rows[-1] == (30999, "row 30999", Decimal("7749.75"), {"i": 30999},
                                    (30999).to_bytes(4, "big"))  # fmt: skip
            else:
                assert rows[-1] == ("30999", "row 30999", "7749.75", '{"i": 30999}',
                                    "\\x" + (30999).to_bytes(4, "big").hex())  # fmt: skip
        assert len(rows) == 30004
        assert conn.execute("SELECT 1").fetchone() == (1,)


def test_server_side_cursor(endpoint: Endpoint) -> None:
    with endpoint.connect() as conn:
        with conn.cursor(name="ten_k") as cur:
            cur.itersize = 700
            cur.execute("SELECT g, md5(g::text) FROM generate_series(1, 10000) g ORDER BY g")
            n = 0
            total = 0
            for g, h in cur:
                n += 1
                total += g
                if g % 1000 == 321:
                    assert h == hashlib.md5(str(g).encode()).hexdigest()
            assert (n, total) == (10000, 10000 * 10001 // 2)
        with conn.cursor(name="scroll", scrollable=True, binary=True) as cur:
            cur.execute("SELECT id, name FROM items ORDER BY id")
            assert cur.fetchmany(3) == [(1, "item-001"), (2, "item-002"), (3, "item-003")]
            cur.scroll(95)
            assert cur.fetchone() == (99, "item-099")
            cur.scroll(0, mode="absolute")
            assert cur.fetchone() == (1, "item-001")
            assert len(cur.fetchall()) == 99
        conn.commit()
        # A WITH HOLD cursor survives the commit.
        with conn.cursor(name="held", withhold=True) as cur:
            cur.execute("SELECT g FROM generate_series(1, 2500) g")
            conn.commit()
            assert sum(r[0] for r in cur) == 2500 * 2501 // 2


def test_notices(endpoint: Endpoint) -> None:
    seen: list[tuple[str | None, str | None, str | None]] = []
    with endpoint.connect(autocommit=True) as conn:
        conn.add_notice_handler(lambda d: seen.append((d.severity, d.sqlstate, d.message_primary)))
        conn.execute(
            "DO $$BEGIN RAISE NOTICE 'hello %', 42; "
            "RAISE WARNING 'careful' USING ERRCODE = '01000'; "
            "RAISE NOTICE 'custom' USING ERRCODE = 'P0042'; END$$"
        )
        conn.execute("DROP TABLE IF EXISTS surely_does_not_exist_xyz")
        assert conn.execute("SELECT 1").fetchone() == (1,)
    assert seen == [
        ("NOTICE", "00000", "hello 42"),
        ("WARNING", "01000", "careful"),
        ("NOTICE", "P0042", "custom"),
        ("NOTICE", "00000", 'table "surely_does_not_exist_xyz" does not exist, skipping'),
    ]


def test_listen_notify_two_connections(endpoint: Endpoint) -> None:
    channel = f"chan_{endpoint.target}"
    with endpoint.connect(autocommit=True) as listener, endpoint.connect(autocommit=True) as sender:
        listener.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
        sender_pid = sender.execute("SELECT pg_backend_pid()").fetchone()
        sender.execute(sql.SQL("NOTIFY {}, 'first'").format(sql.Identifier(channel)))
        sender.execute("SELECT pg_notify(%s, %s)", (channel, "second ünïcødé"))
        with sender.transaction():
            sender.execute("SELECT pg_notify(%s, %s)", (channel, "in tx"))
        got = list(listener.notifies(timeout=10, stop_after=3))
        assert [(n.channel, n.payload) for n in got] == [
            (channel, "first"),
            (channel, "second ünïcødé"),
            (channel, "in tx"),
        ]
        assert sender_pid is not None
        assert {n.pid for n in got} == {sender_pid[0]}
        # Unlisten: nothing more arrives.
        listener.execute("UNLISTEN *")
        sender.execute("SELECT pg_notify(%s, 'late')", (channel,))
        assert list(listener.notifies(timeout=0.5)) == []
        assert listener.execute("SELECT 1").fetchone() == (1,)


def test_backend_pid_consistent(endpoint: Endpoint) -> None:
    """The process id a client learns at startup (BackendKeyData) is the one the server
    reports elsewhere: pg_backend_pid() and the sender pid of a NOTIFY. Clients rely on this,
    e.g. to ignore their own notifications (``n.pid == conn.info.backend_pid``)."""
    with endpoint.connect(autocommit=True) as listener, endpoint.connect(autocommit=True) as sender:
        for conn in (listener, sender):
            row = conn.execute("SELECT pg_backend_pid()").fetchone()
            assert row == (conn.info.backend_pid,)
        listener.execute("LISTEN pid_check")
        listener.execute("NOTIFY pid_check, 'self'")
        sender.execute("NOTIFY pid_check, 'other'")
        got = list(listener.notifies(timeout=10, stop_after=2))
        assert [(n.payload, n.pid) for n in got] == [
            ("self", listener.info.backend_pid),
            ("other", sender.info.backend_pid),
        ]


def test_transactions_and_rollback(endpoint: Endpoint, table: str) -> None:
    t = sql.Identifier(table)
    with endpoint.connect(autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(t))
        ins = sql.SQL("INSERT INTO {} VALUES (%s)").format(t)
        with conn.transaction():
            conn.execute(ins, (1,))
            assert _status(conn) == TransactionStatus.INTRANS
        with conn.transaction():
            conn.execute(ins, (2,))
            with conn.transaction(force_rollback=True):  # savepoint
                conn.execute(ins, (3,))
            conn.execute(ins, (4,))
        with conn.transaction(force_rollback=True):
            conn.execute(ins, (5,))
        assert _status(conn) == TransactionStatus.IDLE
        ids = conn.execute(sql.SQL("SELECT id FROM {} ORDER BY id").format(t)).fetchall()
        assert ids == [(1,), (2,), (4,)]
    # Explicit BEGIN / ROLLBACK / COMMIT through the driver's implicit transactions.
    with endpoint.connect() as conn:
        conn.execute(ins, (6,))
        assert _status(conn) == TransactionStatus.INTRANS
        conn.rollback()
        conn.execute(ins, (7,))
        conn.commit()
    # Explicit transaction control statements in autocommit mode.
    with endpoint.connect(autocommit=True) as conn:
        conn.execute("BEGIN ISOLATION LEVEL SERIALIZABLE")
        assert _status(conn) == TransactionStatus.INTRANS
        conn.execute(ins, (8,))
        conn.execute("SAVEPOINT s1")
        conn.execute(ins, (9,))
        conn.execute("ROLLBACK TO SAVEPOINT s1")
        conn.execute("COMMIT")
        conn.execute("START TRANSACTION")
        conn.execute(ins, (10,))
        conn.execute("ROLLBACK")
        assert _status(conn) == TransactionStatus.IDLE
        ids = conn.execute(sql.SQL("SELECT id FROM {} ORDER BY id").format(t)).fetchall()
        assert ids == [(1,), (2,), (4,), (7,), (8,)]


def test_error_mid_transaction_then_rollback(endpoint: Endpoint, table: str) -> None:
    t = sql.Identifier(table)
    with endpoint.connect() as conn:
        conn.execute(sql.SQL("CREATE TABLE {} (id int PRIMARY KEY)").format(t))
        conn.commit()
        conn.execute(sql.SQL("INSERT INTO {} VALUES (1)").format(t))
        with pytest.raises(errors.DivisionByZero) as exc:
            conn.execute("SELECT 1 / 0")
        assert exc.value.sqlstate == "22012"
        assert exc.value.diag.severity == "ERROR"
        assert exc.value.diag.message_primary == "division by zero"
        assert _status(conn) == TransactionStatus.INERROR
        with pytest.raises(errors.InFailedSqlTransaction):
            conn.execute("SELECT 1")
        assert _status(conn) == TransactionStatus.INERROR
        conn.rollback()
        assert _status(conn) == TransactionStatus.IDLE
        assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(t)).fetchone() == (0,)
        conn.commit()
        # Errors of other kinds, in the extended protocol, outside a transaction.
        conn.autocommit = True
        with pytest.raises(errors.UndefinedTable):
            conn.execute("SELECT * FROM no_such_table_here WHERE id = %s", (1,))
        with pytest.raises(errors.SyntaxError):
            conn.execute("SELEC 1")
        with pytest.raises(errors.InvalidTextRepresentation):
            conn.execute("SELECT %s::int", ("x",))
        assert _status(conn) == TransactionStatus.IDLE
        assert conn.execute("SELECT %s::int + 1", (41,)).fetchone() == (42,)


@pytest.mark.slow
def test_two_million_rows_streamed(endpoint: Endpoint, request: pytest.FixtureRequest) -> None:
    sampler: RssSampler | None = None
    if endpoint.target == "pgguard":
        gw: Gateway = request.getfixturevalue("gateway")
        assert gw.proc is not None
        sampler = RssSampler(gw.proc.pid)
    start = time.monotonic()
    n = 0
    width = 0
    last = 0
    with endpoint.connect(autocommit=True) as conn:
        cur = conn.cursor()
        if sampler is not None:
            sampler.__enter__()
        try:
            for g, x in cur.stream(
                "SELECT g, repeat('x', 100) FROM generate_series(1, 2000000) g", size=20000
            ):
                n += 1
                width += len(x)
                last = g
        finally:
            if sampler is not None:
                sampler.__exit__(None, None, None)
        assert conn.execute("SELECT 1").fetchone() == (1,)
    elapsed = time.monotonic() - start
    assert (n, width, last) == (2_000_000, 200_000_000, 2_000_000)
    assert elapsed < 45, f"2M rows took {elapsed:.1f}s"
    if sampler is not None:
        # ~240 MB crossed the gateway; a streaming relay holds a bounded window of it.
        assert sampler.growth < 128 * 1024 * 1024, (
            f"gateway RSS grew by {sampler.growth / 2**20:.0f} MiB while streaming "
            f"(baseline {sampler.baseline / 2**20:.0f} MiB, peak {sampler.peak / 2**20:.0f} MiB)"
        )


def test_startup_options(endpoint: Endpoint) -> None:
    """application_name and options=-c … reach the server; so does the database name."""
    with endpoint.connect(
        autocommit=True,
        application_name="matrix-app",
        options="-c statement_timeout=1234 -c search_path=pg_catalog,public",
    ) as conn:
        assert conn.info.parameter_status("application_name") == "matrix-app"
        assert conn.execute(
            "SELECT current_setting('application_name'), current_setting('statement_timeout'), "
            "current_setting('search_path'), current_database()"
        ).fetchone() == ("matrix-app", "1234ms", "pg_catalog,public", "app")
    with endpoint.connect(autocommit=True, dbname="postgres") as conn:
        assert conn.execute("SELECT current_database()").fetchone() == ("postgres",)
    with pytest.raises(psycopg.OperationalError) as exc:
        endpoint.connect(dbname="no_such_db_here")
    assert 'database "no_such_db_here" does not exist' in str(exc.value)


def test_parameter_status(endpoint: Endpoint, admin: psycopg.Connection[Any]) -> None:
    version = admin.execute("SHOW server_version").fetchone()
    assert version is not None
    with endpoint.connect(autocommit=True) as conn:
        info = conn.info
        assert info.parameter_status("server_version") == version[0]
        assert info.server_version == admin.info.server_version
        expected = {
            "server_encoding": "UTF8",
            "client_encoding": "UTF8",
            "DateStyle": "ISO, MDY",
            "TimeZone": "UTC",
            "integer_datetimes": "on",
            "standard_conforming_strings": "on",
            "IntervalStyle": "postgres",
        }
        for name, value in expected.items():
            assert info.parameter_status(name) == value, name
        assert info.backend_pid != 0
        conn.execute("SET TimeZone = 'Europe/Paris'")
        assert info.parameter_status("TimeZone") == "Europe/Paris"
        row = conn.execute("SELECT '2024-01-15 12:00:00+00'::timestamptz::text").fetchone()
        assert row == ("2024-01-15 13:00:00+01",)
        ts = conn.execute("SELECT '2024-07-15 12:00:00+00'::timestamptz").fetchone()
        assert ts is not None
        assert ts[0].utcoffset() == timedelta(hours=2)
        assert ts[0] == datetime(2024, 7, 15, 14, 0, tzinfo=timezone(timedelta(hours=2)))
        conn.execute("SET application_name = 'param-test'")
        assert info.parameter_status("application_name") == "param-test"
        conn.execute("SET DateStyle = 'SQL, DMY'")
        assert info.parameter_status("DateStyle") == "SQL, DMY"
        conn.execute("RESET ALL")
        assert info.parameter_status("TimeZone") == "UTC"
        assert info.parameter_status("DateStyle") == "ISO, MDY"
