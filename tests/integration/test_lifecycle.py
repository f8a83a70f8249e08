"""Process and session lifecycle: a dying upstream, SIGTERM drain, back-pressure, workers."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import errors

from tests.support.gateway import Gateway, GatewayStartError, MakeGateway
from tests.support.pgcluster import PgServer
from tests.support.ports import free_port
from tests.support.procmem import child_pids


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
        assert_cancels_reach_their_worker(conns, pg)
    finally:
        for conn in conns:
            conn.close()


def assert_cancels_reach_their_worker(conns: list[psycopg.Connection[Any]], pg: PgServer) -> None:
    """Cancel a running statement on each connection: a CancelRequest lands on any worker,
    which passes it to the session's worker over its cancel socket."""
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


# --------------------------------------------------------------------------- a supervised worker


def _json_log(gw: Gateway) -> list[dict[str, Any]]:
    events = []
    for line in gw.read_log().splitlines():
        if line.startswith("{"):
            with contextlib.suppress(ValueError):
                events.append(json.loads(line))
    return events


def _log_matches(gw: Gateway, pattern: str) -> list[re.Match[str]]:
    return [m for e in _json_log(gw) if (m := re.fullmatch(pattern, str(e.get("event"))))]


def _wait(check: Callable[[], Any], what: str, timeout: float = 15.0) -> Any:
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)
    return result


def _process_group(pgid: int) -> set[int]:
    """Live (not zombie) processes of process group ``pgid``."""
    out: set[int] = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if fields[0] != "Z" and int(fields[2]) == pgid:
                out.add(int(stat.parent.name))
    return out


def _listens(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds a TCP socket listening on ``port`` (Linux /proc)."""
    inodes: set[str] = set()
    with contextlib.suppress(OSError):
        for fd in Path(f"/proc/{pid}/fd").iterdir():
            with contextlib.suppress(OSError):
                link = os.readlink(fd)
                if link.startswith("socket:["):
                    inodes.add(link[8:-1])
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "0A" and fields[9] in inodes:
                    return True
    return False


def _metrics(gw: Gateway) -> tuple[dict[tuple[str, frozenset[tuple[str, str]]], float], str]:
    conn = http.client.HTTPConnection("127.0.0.1", gw.admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        response = conn.getresponse()
        assert response.status == 200
        body = response.read().decode()
        worker = response.getheader("X-Pgguard-Worker", "")
    finally:
        conn.close()
    samples = {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    return samples, worker


def _metric(gw: Gateway, name: str, **labels: str) -> float:
    return _metrics(gw)[0].get((name, frozenset(labels.items())), 0.0)


RESTARTING = r"worker (\d) \(pid (\d+)\) (.*) after [\d.]+s; restarting it in ([\d.]+)s"
RESTARTED = r"worker (\d) restarted \(pid (\d+)\)"
LISTENING = r"pgguard listening on .*"


@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="needs Linux /proc")
def test_a_killed_worker_is_replaced(
    make_gateway: MakeGateway, pg: PgServer, tmp_path: Path
) -> None:
    trail = tmp_path / "audit.jsonl"
    gw = make_gateway(
        workers=2,
        audit={"url": None, "jsonl": str(trail), "mode": "strict"},
        log={"format": "json", "level": "info"},
    )
    assert gw.proc is not None
    parent = gw.proc.pid
    _wait(lambda: len(_log_matches(gw, LISTENING)) == 2, "both workers to listen")
    _wait(lambda: len(child_pids(parent)) == 2, "two workers")
    workers = child_pids(parent)
    conns: list[psycopg.Connection[Any]] = []

    def served_by(tag: str) -> str:
        """The worker id whose audit chain (``host:port:<worker>``) recorded ``tag``'s query."""
        for line in trail.read_text().splitlines():
            record = json.loads(line)
            if record.get("event") == "statement" and record.get("application_name") == tag:
                return str(record["instance_id"]).rsplit(":", 1)[1]
        raise AssertionError(f"no audit record for {tag}")

    def connect(tag: str) -> tuple[psycopg.Connection[Any], str]:
        conn = psycopg.connect(gw.dsn(tag, application_name=tag), autocommit=True)
        conns.append(conn)
        assert conn.execute("select 1").fetchone() == (1,)
        return conn, served_by(tag)

    def restarts() -> list[re.Match[str]]:
        return _log_matches(gw, RESTARTING)

    def replacements() -> list[re.Match[str]]:
        return _log_matches(gw, RESTARTED)

    try:
        before = dict(connect(f"before{i}") for i in range(6))
        opened = len(before)
        _wait(
            lambda: (
                _metric(gw, "pgguard_connections_total", result="accepted") == opened
                and _metric(gw, "pgguard_client_connections") == opened
            ),
            "/metrics to count the first sessions",
        )

        # kill -9 one worker: the parent logs which worker it was and starts another.
        victim = min(workers)
        os.kill(victim, signal.SIGKILL)
        _wait(lambda: len(replacements()) == 1, "the replacement")
        (died,) = restarts()
        worker_id = died.group(1)
        assert (int(died.group(2)), died.group(3)) == (victim, "was killed by SIGKILL")
        assert replacements()[0].group(1) == worker_id
        first_pid = int(replacements()[0].group(2))
        assert child_pids(parent) == (workers - {victim}) | {first_pid}

        # Killed again at once (a crash loop): it comes back after a longer back-off.
        os.kill(first_pid, signal.SIGKILL)
        _wait(lambda: len(replacements()) == 2, "the second replacement")
        first, second = restarts()
        assert second.group(1) == worker_id and int(second.group(2)) == first_pid
        assert float(second.group(4)) >= max(0.5, 2 * float(first.group(4)))
        new_pid = int(replacements()[1].group(2))
        _wait(lambda: _listens(new_pid, gw.port), "the replacement to listen")
        workers = child_pids(parent)
        assert new_pid in workers and len(workers) == 2

        # Sessions of the dead worker are gone; the others carry on.
        survivors = [c for c, w in before.items() if w != worker_id]
        lost = [c for c, w in before.items() if w == worker_id]
        for conn in survivors:
            assert conn.execute("select 2").fetchone() == (2,)
        for conn in lost:
            with pytest.raises(psycopg.OperationalError):
                conn.execute("select 2")

        # New clients reach both workers, the replacement included.
        after: dict[psycopg.Connection[Any], str] = {}
        for i in range(40):
            conn, worker = connect(f"after{i}")
            after[conn] = worker
            if set(after.values()) == {"0", "1"} and len(after) >= 4:
                break
        assert set(after.values()) == {"0", "1"}

        # /metrics: the dead worker's counters stay in the totals, its gauges do not.
        accepted = opened + len(after)
        open_now = len(survivors) + len(after)
        _wait(
            lambda: (
                _metric(gw, "pgguard_connections_total", result="accepted") == accepted
                and _metric(gw, "pgguard_client_connections") == open_now
            ),
            f"/metrics to count {accepted} accepted and {open_now} open",
        )
        answered = {_metrics(gw)[1] for _ in range(40)}
        assert answered == {"0", "1"}, answered

        # The replacement routes cancels like its predecessor (the same cancel socket name).
        assert_cancels_reach_their_worker([*survivors[:2], *list(after)[:4]], pg)

        # SIGHUP reloads in both workers and restarts nothing.
        os.kill(parent, signal.SIGHUP)
        _wait(lambda: len(_log_matches(gw, r"SIGHUP: reloading the policy")) == 2, "reloads")
        time.sleep(0.5)
        assert child_pids(parent) == workers
        assert len(replacements()) == 2

        # SIGTERM: everything stops, nothing restarts, nothing is left behind.
        for conn in conns:
            conn.close()
        os.kill(parent, signal.SIGTERM)
        assert gw.proc.wait(20) == 0
        assert not _process_group(parent), "processes left behind"
        assert len(replacements()) == 2 and len(restarts()) == 2
        assert len(_log_matches(gw, r"pgguard stopped")) == 2
    finally:
        for conn in conns:
            conn.close()

    # Each worker id kept its audit chain: two chains, both intact.
    from pgguard.audit.query import verify_jsonl

    ok, report = verify_jsonl(trail)
    assert ok, report
    chains = {json.loads(line)["instance_id"] for line in trail.read_text().splitlines()}
    assert len(chains) == 2 and {c.rsplit(":", 1)[1] for c in chains} == {"0", "1"}


def test_a_worker_that_cannot_start_stops_pgguard(make_gateway: MakeGateway) -> None:
    """In the initial start, a worker that fails before serving (here: the admin port is
    taken) stops pgguard with status 1 rather than leaving a parent that restarts it forever."""
    gw = make_gateway(workers=2, log={"format": "json", "level": "info"}, start=False)
    with socket.socket() as taken:  # no SO_REUSEPORT: the workers cannot share it
        taken.bind(("127.0.0.1", gw.admin_port))
        taken.listen()
        with pytest.raises(GatewayStartError) as info:
            gw.start()
    assert "exited with status 1" in str(info.value)
    assert _log_matches(gw, r"worker \d \(pid \d+\) could not start: stopping the workers")
    assert not _log_matches(gw, r".*restarting it in.*")
    assert gw.proc is not None and not _process_group(gw.proc.pid)
