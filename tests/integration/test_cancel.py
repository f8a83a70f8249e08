"""Query cancellation (CancelRequest on a new connection) against both targets."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import asyncpg
import psycopg
import pytest
from psycopg import errors
from psycopg.pq import TransactionStatus

from tests.support import rawpg

from .conftest import Endpoint


def _status(conn: psycopg.Connection[Any]) -> TransactionStatus:
    """The transaction status (a call, so that type checkers do not narrow it)."""
    return conn.info.transaction_status


def _sleepers(admin: psycopg.Connection[Any], marker: str) -> int:
    row = admin.execute(
        "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query LIKE %s",
        (f"%{marker}%",),
    ).fetchone()
    assert row is not None
    return int(row[0])


def _wait_no_sleepers(admin: psycopg.Connection[Any], marker: str) -> None:
    deadline = time.monotonic() + 5
    while _sleepers(admin, marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _sleepers(admin, marker) == 0, "the upstream query is still running"


@pytest.mark.parametrize("method", ["cancel", "cancel_safe"])
def test_psycopg_cancel(endpoint: Endpoint, admin: psycopg.Connection[Any], method: str) -> None:
    marker = f"cancel_{method}_{endpoint.target}"
    with endpoint.connect(autocommit=True) as conn:
        timer = threading.Timer(0.5, getattr(conn, method))
        timer.start()
        start = time.monotonic()
        try:
            with pytest.raises(errors.QueryCanceled) as exc:
                conn.execute(f"SELECT pg_sleep(30) /* {marker} */")
        finally:
            timer.cancel()
        elapsed = time.monotonic() - start
        assert exc.value.sqlstate == "57014"
        assert exc.value.diag.message_primary == "canceling statement due to user request"
        assert elapsed < 5, f"cancel took {elapsed:.1f}s"
        _wait_no_sleepers(admin, marker)
        assert conn.execute("SELECT 1").fetchone() == (1,)
        assert _status(conn) == TransactionStatus.IDLE

        # Inside a transaction block: the block is failed, ROLLBACK recovers.
        conn.execute("BEGIN")
        timer = threading.Timer(0.5, getattr(conn, method))
        timer.start()
        try:
            with pytest.raises(errors.QueryCanceled):
                conn.execute(f"SELECT pg_sleep(30) /* {marker} tx */")
        finally:
            timer.cancel()
        assert _status(conn) == TransactionStatus.INERROR
        conn.execute("ROLLBACK")
        assert conn.execute("SELECT 2").fetchone() == (2,)


def test_cancel_reaches_only_its_session(
    endpoint: Endpoint, admin: psycopg.Connection[Any]
) -> None:
    """Two sessions sleep; cancelling one must not touch the other."""
    with endpoint.connect(autocommit=True) as a, endpoint.connect(autocommit=True) as b:
        outcome: dict[str, Any] = {}

        def run_b() -> None:
            try:
                outcome["b"] = b.execute("SELECT pg_sleep(2), 'b done'").fetchone()
            except Exception as e:  # recorded and asserted below
                outcome["b"] = e

        tb = threading.Thread(target=run_b)
        tb.start()
        timer = threading.Timer(0.5, a.cancel_safe)
        timer.start()
        try:
            with pytest.raises(errors.QueryCanceled):
                a.execute("SELECT pg_sleep(30)")
        finally:
            timer.cancel()
            tb.join(10)
        assert outcome.get("b") == ("", "b done")  # pg_sleep() returns void, read as ""
        assert a.execute("SELECT 'a alive'").fetchone() == ("a alive",)


def test_asyncpg_timeout_cancels(endpoint: Endpoint, admin: psycopg.Connection[Any]) -> None:
    marker = f"asyncpg_timeout_{endpoint.target}"

    async def main() -> None:
        conn = await asyncpg.connect(
            host=endpoint.host,
            port=endpoint.port,
            user=endpoint.user,
            password=endpoint.password,
            database=endpoint.dbname,
            timeout=10,
        )
        try:
            start = time.monotonic()
            with pytest.raises(asyncio.TimeoutError):
                await conn.fetchval(f"SELECT pg_sleep(30) /* {marker} */", timeout=0.5)
            assert time.monotonic() - start < 5
            assert await conn.fetchval("SELECT 41 + 1", timeout=5) == 42
            _wait_no_sleepers(admin, marker)
            # Cancelling the asyncio task also cancels the server-side query.
            task = asyncio.ensure_future(conn.fetchval(f"SELECT pg_sleep(30) /* {marker} 2 */"))
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await conn.fetchval("SELECT 'ok'", timeout=5) == "ok"
            _wait_no_sleepers(admin, marker)
        finally:
            await conn.close(timeout=5)

    asyncio.run(main())


def test_cancel_with_wrong_key_is_ignored(endpoint: Endpoint) -> None:
    """A CancelRequest must carry the session's secret key; a wrong one cancels nothing."""
    with rawpg.connect(
        endpoint.host, endpoint.port, endpoint.user, endpoint.dbname, endpoint.password
    ) as conn:
        assert conn.backend_key is not None
        pid, key = conn.backend_key
        conn.send(b"Q", b"SELECT pg_sleep(1.5), 'finished'\x00")
        time.sleep(0.3)
        rawpg.send_cancel(endpoint.host, endpoint.port, pid, key ^ 0x5A5A5A5A)
        rawpg.send_cancel(endpoint.host, endpoint.port, pid + 1, key)
        messages = conn.read_until_ready()
        kinds = "".join(k.decode() for k, _ in messages)
        assert kinds == "TDCZ", messages
        # And the right key does cancel.
        conn.send(b"Q", b"SELECT pg_sleep(30)\x00")
        time.sleep(0.3)
        rawpg.send_cancel(endpoint.host, endpoint.port, pid, key)
        messages = conn.read_until_ready()
        errs = [rawpg.parse_fields(b) for k, b in messages if k == b"E"]
        assert [e["C"] for e in errs] == ["57014"]
