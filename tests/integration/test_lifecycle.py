"""Process and session lifecycle: a dying upstream, SIGTERM drain, back-pressure, workers."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg import errors

from tests.support.gateway import Gateway, MakeGateway
from tests.support.pgcluster import PgServer
from tests.support.ports import free_port


class TcpCutter:
    """A loopback TCP relay to PostgreSQL whose connections the test can cut at will."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.sockets: list[socket.socket] = []
        self._stop = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self._stop:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        """Drop every relayed connection without a word, as a dead network would."""
        for s in self.sockets:
            try:
                s.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00"
                )
                s.close()
            except OSError:
                pass

    def close(self) -> None:
        self._stop = True
        self.listener.close()
        self.cut()


@pytest.fixture
def cutter(pg: PgServer) -> Iterator[TcpCutter]:
    relay = TcpCutter((pg.host, pg.port))
    yield relay
    relay.close()


def test_upstream_dying_mid_session_gives_08006(
    make_gateway: MakeGateway, cutter: TcpCutter
) -> None:
    gw = make_gateway(upstream={"port": cutter.port})
    other = psycopg.connect(gw.dsn("bob"), autocommit=True)
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        assert conn.execute("select 1").fetchone() == (1,)
        cutter.cut()
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert "lost connection to the upstream server" in str(info.value)
    other.close()
    # The gateway itself carries on: a new session through a healthy path works.
    assert gw.running
    healthy = make_gateway()
    with psycopg.connect(healthy.dsn("carol")) as conn:
        assert conn.execute("select 2").fetchone() == (2,)


def test_upstream_terminated_backend_error_reaches_client(gateway: Gateway, admin: Any) -> None:
    with psycopg.connect(gateway.dsn("alice"), autocommit=True) as conn:
        pid = conn.execute("select pg_backend_pid()").fetchone()
        assert pid is not None
        admin.execute("select pg_terminate_backend(%s)", pid)
        with pytest.raises(psycopg.OperationalError) as info:
            conn.execute("select 1")
        assert "terminating connection" in str(info.value) or "lost connection" in str(info.value)


def test_sigterm_drains(make_gateway: MakeGateway) -> None:
    gw = make_gateway(limits={"drain_timeout": "10s"})
    idle = psycopg.connect(gw.dsn("idle-user"), autocommit=True)
    busy = psycopg.connect(gw.dsn("busy-user"), autocommit=True)
    in_tx = psycopg.connect(gw.dsn("tx-user"))
    in_tx.execute("select 1")  # opens a transaction block
    result: dict[str, Any] = {}

    def long_statement() -> None:
        try:
            result["row"] = busy.execute("select 42 from pg_sleep(1.5)").fetchone()
        except Exception as exc:  # recorded for the assertion below
            result["error"] = exc

    worker = threading.Thread(target=long_statement)
    worker.start()
    time.sleep(0.3)
    assert gw.proc is not None
    os.kill(gw.proc.pid, signal.SIGTERM)
    time.sleep(0.3)
    # No new sessions.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gw.dsn("late-user"), connect_timeout=3)
    # The idle session is told why it ends.
    with pytest.raises(psycopg.OperationalError) as info:
        idle.execute("select 1")
    assert "administrator command" in str(info.value)
    # The open transaction may finish.
    in_tx.execute("select 2")
    in_tx.commit()
    worker.join(10)
    assert result.get("row") == (42,), result
    assert gw.proc.wait(15) == 0
    for conn in (idle, busy, in_tx):
        conn.close()


def _rss_kib(pid: int) -> int:
    total = 0
    pids = [pid]
    children = f"/proc/{pid}/task/{pid}/children"
    if os.path.exists(children):
        with open(children) as fh:
            pids += [int(p) for p in fh.read().split()]
    for p in pids:
        with open(f"/proc/{p}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return total


def test_slow_client_does_not_make_pgguard_buffer_the_result(gateway: Gateway) -> None:
    """A 200 MB result to a client that does not read: pgguard must stop reading upstream."""
    assert gateway.proc is not None
    conn = psycopg.connect(gateway.dsn("slow"), autocommit=True)
    sock = socket.socket(fileno=os.dup(conn.pgconn.socket))
    before = _rss_kib(gateway.proc.pid)
    conn.pgconn.send_query(b"select repeat('x', 1000) from generate_series(1, 200000)")
    conn.pgconn.flush()
    time.sleep(3)  # without back-pressure pgguard would now hold most of 200 MB
    grown_mib = (_rss_kib(gateway.proc.pid) - before) / 1024
    assert grown_mib < 40, f"pgguard grew by {grown_mib:.0f} MiB for a client that does not read"
    # Now read it all: every row arrives.
    rows = 0
    while True:
        conn.pgconn.consume_input()
        while not conn.pgconn.is_busy():
            res = conn.pgconn.get_result()
            if res is None:
                break
            rows += res.ntuples
        else:
            continue
        break
    assert rows == 200000
    sock.close()
    conn.close()


@pytest.mark.parametrize("workers", [2])
def test_workers_share_the_port_and_route_cancels(
    make_gateway: MakeGateway, pg: PgServer, workers: int
) -> None:
    gw = make_gateway(workers=workers)
    conns = [psycopg.connect(gw.dsn(f"user{i}"), autocommit=True) for i in range(6)]
    try:
        results: list[Any] = [None] * len(conns)

        def run(i: int) -> None:
            try:
                conns[i].execute("select pg_sleep(20)")
                results[i] = "finished"
            except errors.QueryCanceled:
                results[i] = "cancelled"
            except Exception as exc:
                results[i] = exc

        pids = [conn.info.backend_pid for conn in conns]
        threads = [threading.Thread(target=run, args=(i,)) for i in range(len(conns))]
        for t in threads:
            t.start()
        # Cancel only once every statement is running, or a cancel could arrive too early.
        with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline:
                row = admin.execute(
                    "select count(*) from pg_stat_activity where pid = any(%s)"
                    " and query like 'select pg_sleep%%' and state = 'active'",
                    (pids,),
                ).fetchone()
                if row and row[0] == len(conns):
                    break
                time.sleep(0.05)
        started = time.monotonic()
        for conn in conns:
            conn.cancel_safe()
        for t in threads:
            t.join(10)
        assert results == ["cancelled"] * len(conns)
        assert time.monotonic() - started < 8
        for conn in conns:
            assert conn.execute("select 1").fetchone() == (1,)
    finally:
        for conn in conns:
            conn.close()


def test_gateway_survives_garbage_from_a_client(gateway: Gateway) -> None:
    with psycopg.connect(gateway.dsn("steady"), autocommit=True) as steady:
        for junk in (
            b"\x00\x00\x00\x08\x00\x00\x00\x00",
            os.urandom(64),
            b"GET / HTTP/1.1\r\n\r\n",
        ):
            with socket.create_connection((gateway.host, gateway.port), timeout=5) as s:
                s.sendall(junk)
                with contextlib.suppress(OSError):
                    s.recv(1024)
        assert steady.execute("select 1").fetchone() == (1,)
    assert gateway.running


def test_unreachable_upstream_port_is_08001(make_gateway: MakeGateway) -> None:
    gw = make_gateway(upstream={"port": free_port()})
    with pytest.raises(psycopg.OperationalError) as info:
        psycopg.connect(gw.dsn("alice"))
    assert "could not connect to the upstream server" in str(info.value)
