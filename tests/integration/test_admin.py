"""The admin listener (SPEC §7): /healthz, /readyz, /metrics moving with traffic, robustness
against bad HTTP, and totals across workers (``workers: 2``)."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgguard.config import Settings
from pgguard.metrics import Tally
from pgguard.proxy import admin as admin_module
from pgguard.proxy.admin import AdminServer, Request, Response
from tests.support.gateway import Gateway, MakeGateway
from tests.support.ports import free_port
from tests.support.procmem import tree_pids

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]

DENY_DDL_POLICY = """\
version: 1
rules:
  - name: no-ddl
    match: {classes: [ddl]}
    action: deny
    message: no DDL through the gateway
"""


def http_get(
    port: int, path: str, *, method: str = "GET", timeout: float = 5.0
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path)
        response = conn.getresponse()
        headers = {k.lower(): v for k, v in response.getheaders()}
        return response.status, headers, response.read()
    finally:
        conn.close()


def raw_http(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data`` as is; everything the server answers before closing."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        s.shutdown(socket.SHUT_WR)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks)


def parse_metrics(text: str) -> Samples:
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return out


def scrape(gw: Gateway) -> tuple[Samples, str]:
    """(samples, the worker that answered)."""
    status, headers, body = http_get(gw.admin_port, "/metrics")
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain")
    return parse_metrics(body.decode()), headers.get("x-pgguard-worker", "")


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def wait_for(gw: Gateway, check: Callable[[Samples], bool], timeout: float = 10.0) -> Samples:
    """Scrape until ``check`` holds (the workers fold their counts once a second)."""
    deadline = time.monotonic() + timeout
    while True:
        samples, _ = scrape(gw)
        if check(samples):
            return samples
        if time.monotonic() > deadline:
            interesting = {k: v for k, v in samples.items() if v and not k[0].endswith("_bucket")}
            raise AssertionError(f"metrics never matched; last scrape: {interesting}")
        time.sleep(0.2)


def readyz(gw: Gateway) -> tuple[int, dict[str, Any]]:
    status, headers, body = http_get(gw.admin_port, "/readyz")
    assert headers["content-type"] == "application/json"
    return status, json.loads(body)


# --------------------------------------------------------------------------- health


def test_healthz_and_readyz(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    status, _, body = http_get(gw.admin_port, "/healthz")
    assert (status, body) == (200, b"ok\n")
    status, data = readyz(gw)
    assert status == 200, data
    assert data["status"] == "ready"
    assert data["failed"] == []
    assert data["checks"]["upstream"] == "ok"
    assert data["checks"]["policies"] == "ok"
    assert data["checks"]["audit"] == "not configured"


def test_readyz_fails_while_the_upstream_is_down(make_gateway: MakeGateway) -> None:
    gw = make_gateway(upstream={"port": free_port()})
    status, data = readyz(gw)
    assert status == 503
    assert data["status"] == "not ready"
    assert data["failed"] == ["upstream"]
    assert "upstream" in data["checks"]["upstream"]
    # Alive all the same.
    assert http_get(gw.admin_port, "/healthz")[0] == 200
    # A client's failed attempt is counted.
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(gw.dsn("alice"), connect_timeout=10)
    wait_for(
        gw,
        lambda s: (
            value(s, "pgguard_upstream_errors_total") >= 1
            and value(s, "pgguard_connections_total", result="upstream_failed") >= 1
        ),
    )


def test_readyz_reports_an_audit_store(make_gateway: MakeGateway, tmp_path: Path) -> None:
    gw = make_gateway(audit={"url": f"sqlite:///{tmp_path / 'audit.db'}"})
    status, data = readyz(gw)
    assert status == 200, data
    assert data["checks"]["audit"] == "ok"


def test_a_failed_policy_reload_keeps_readyz_ready(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """The previous policy stays in force, so the gateway stays in rotation: /readyz says the
    reload failed and why, and pgguard_policy_reload_failed is there to alert on."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(DENY_DDL_POLICY)
    gw = make_gateway(policies=[str(policy)])
    status, data = readyz(gw)
    assert status == 200 and data["checks"]["policies"] == "ok"
    assert value(scrape(gw)[0], "pgguard_policy_reload_failed") == 0
    assert gw.proc is not None
    policy.write_text("version: 1\nrules: [{name: broken, action: explode}]\n")
    os.kill(gw.proc.pid, signal.SIGHUP)
    wait_for(gw, lambda s: value(s, "pgguard_policy_reload_failed") == 1)
    status, data = readyz(gw)
    assert status == 200, data
    assert data["status"] == "ready" and data["failed"] == []
    check = data["checks"]["policies"]
    assert check.startswith("ok (reload failed: ") and check.endswith(")"), check
    assert "explode" in check, check
    # The policy in force still refuses DDL.
    with (
        psycopg.connect(gw.dsn("alice"), autocommit=True) as conn,
        pytest.raises(psycopg.errors.InsufficientPrivilege),
    ):
        conn.execute("create table t_after_bad_reload (x int)")
    policy.write_text(DENY_DDL_POLICY)
    os.kill(gw.proc.pid, signal.SIGHUP)
    wait_for(gw, lambda s: value(s, "pgguard_policy_reload_failed") == 0)
    assert readyz(gw)[1]["checks"]["policies"] == "ok"


# --------------------------------------------------------------------------- metrics


SPEC_FAMILIES = {
    "pgguard_client_connections": "gauge",
    "pgguard_connections": "counter",
    "pgguard_auth_failures": "counter",
    "pgguard_statements": "counter",
    "pgguard_statement_duration_seconds": "histogram",
    "pgguard_masked_values": "counter",
    "pgguard_approvals_pending": "gauge",
    "pgguard_audit_queue_depth": "gauge",
    "pgguard_audit_write_errors": "counter",
    "pgguard_upstream_errors": "counter",
    "pgguard_bytes": "counter",
}
# Beyond SPEC §7.
EXTRA_FAMILIES = {"pgguard_policy_reload_failed": "gauge"}


def test_metrics_endpoint_serves_the_spec_set(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    status, _, body = http_get(gw.admin_port, "/metrics")
    assert status == 200
    families = {f.name: f.type for f in text_string_to_metric_families(body.decode())}
    assert families == SPEC_FAMILIES | EXTRA_FAMILIES


def test_metrics_move_with_traffic(make_gateway: MakeGateway, tmp_path: Path) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(DENY_DDL_POLICY)
    gw = make_gateway(policies=[str(policy)], audit={"url": f"sqlite:///{tmp_path / 'audit.db'}"})
    before, _ = scrape(gw)
    accepted0 = value(before, "pgguard_connections_total", result="accepted")
    c2s0 = value(before, "pgguard_bytes_total", direction="client_to_server")
    s2c0 = value(before, "pgguard_bytes_total", direction="server_to_client")

    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        rows = conn.execute("select g from generate_series(1, 1000) g").fetchall()
        assert len(rows) == 1000
        assert conn.execute("select 1").fetchone() == (1,)
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("create table metrics_denied (i int)")
        during = wait_for(
            gw,
            lambda s: (
                value(s, "pgguard_client_connections") == 1
                and value(s, "pgguard_connections_total", result="accepted") == accepted0 + 1
                and value(s, "pgguard_statements_total", **{"class": "read", "decision": "allow"})
                >= 1
                and value(s, "pgguard_statements_total", **{"class": "ddl", "decision": "deny"})
                == 1
            ),
        )
    # Rows came back: thousands of bytes server to client, the statements' bytes the other way.
    assert value(during, "pgguard_bytes_total", direction="server_to_client") - s2c0 > 10_000
    assert value(during, "pgguard_bytes_total", direction="client_to_server") - c2s0 > 40
    assert value(during, "pgguard_statement_duration_seconds_count") >= 2

    # A token signed with another secret.
    bad = gw.dsn("mallory", password=_foreign_token())
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(bad, connect_timeout=10)
    after = wait_for(
        gw,
        lambda s: (
            value(s, "pgguard_auth_failures_total", reason="signature") == 1
            and value(s, "pgguard_connections_total", result="auth_failed") == 1
            and value(s, "pgguard_client_connections") == 0
        ),
    )
    # Never a label per user or per statement.
    labels = {name for (_, labelset) in after for name, _ in labelset}
    assert labels <= {"result", "reason", "class", "decision", "column", "direction", "le"}
    assert not any("alice" in v or "mallory" in v for (_, ls) in after for _, v in ls)


def test_statement_metrics_move_without_an_audit_trail(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """With the audit off (no statement tracker), statements are still counted, by class
    and decision, through the simple and the extended protocol."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(DENY_DDL_POLICY)
    gw = make_gateway(policies=[str(policy)])  # audit.url: null
    read, ddl = {"class": "read", "decision": "allow"}, {"class": "ddl", "decision": "deny"}
    before, _ = scrape(gw)
    reads0 = value(before, "pgguard_statements_total", **read)
    denied0 = value(before, "pgguard_statements_total", **ddl)
    observed0 = value(before, "pgguard_statement_duration_seconds_count")

    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        # Simple protocol (no parameters): one statement, then a multi-statement Query (two).
        assert conn.execute("select 1").fetchone() == (1,)
        conn.execute("select 1; select 2")
        # Extended protocol: a Parse/Bind/Execute/Sync, a prepared statement run twice (one
        # Parse, two Binds), and a pipeline of two statements before one Sync.
        assert conn.execute("select %s::int", (5,)).fetchone() == (5,)
        for _ in range(2):
            conn.execute("select %s::int + 1", (5,), prepare=True)
        with conn.pipeline():
            conn.execute("select %s::int", (1,))
            conn.execute("select %s::int", (2,))
        # Refused, through each protocol.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("create table metrics_denied (i int)")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("create table metrics_denied (i int)", binary=True)

    after = wait_for(
        gw,
        lambda s: (
            value(s, "pgguard_statements_total", **read) - reads0 >= 8
            and value(s, "pgguard_statements_total", **ddl) - denied0 >= 2
        ),
    )
    assert value(after, "pgguard_statements_total", **read) - reads0 == 8
    assert value(after, "pgguard_statements_total", **ddl) - denied0 == 2
    # One observation per statement.
    assert value(after, "pgguard_statement_duration_seconds_count") - observed0 == 10
    assert value(after, "pgguard_statement_duration_seconds_sum") > 0


def _foreign_token() -> str:
    from pgguard.identity import mint_token

    token: str = mint_token("not-the-gateway-secret-" + "x" * 20, "mallory", ttl=600)
    return token


def test_refusals_by_max_connections_are_counted(make_gateway: MakeGateway) -> None:
    gw = make_gateway(limits={"max_connections": 1})
    with psycopg.connect(gw.dsn("alice"), autocommit=True):
        with pytest.raises(psycopg.OperationalError):
            psycopg.connect(gw.dsn("bob"), connect_timeout=10)
        wait_for(gw, lambda s: value(s, "pgguard_connections_total", result="refused_limit") >= 1)


# --------------------------------------------------------------------------- robustness


def test_admin_http_robustness(make_gateway: MakeGateway) -> None:
    gw = make_gateway()
    port = gw.admin_port
    assert http_get(port, "/nope")[0] == 404
    status, headers, _ = http_get(port, "/metrics", method="POST")
    assert status == 405
    assert "GET" in headers["allow"]
    status, headers, body = http_get(port, "/healthz", method="HEAD")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == "3"
    assert http_get(port, "/healthz?verbose=1")[0] == 200

    assert raw_http(port, b"garbage\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_http(port, b"GET /healthz SPDY/3\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert raw_http(port, b"GET /healthz HTTP/2.0\r\n\r\n").startswith(b"HTTP/1.1 505 ")
    assert raw_http(port, b"GET /healthz HTTP/1.1\r\nno colon\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    huge = b"GET /healthz HTTP/1.1\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n"
    assert raw_http(port, huge).startswith(b"HTTP/1.1 431 ")
    assert raw_http(port, os.urandom(512) + b"\r\n\r\n").startswith(b"HTTP/1.1 4")
    assert raw_http(port, b"") == b""  # connect and leave

    # Slow clients hold nothing up: half a request, then a full one on another connection.
    with contextlib.ExitStack() as stack:
        for _ in range(5):
            s = stack.enter_context(socket.create_connection(("127.0.0.1", port), timeout=5))
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        assert http_get(port, "/healthz")[0] == 200
        assert time.monotonic() - started < 2

    assert gw.running
    assert http_get(port, "/metrics")[0] == 200


def _in_process_admin() -> AdminServer:
    """An admin server on an ephemeral port in front of a stand-in gateway."""
    settings = Settings(admin={"host": "127.0.0.1", "port": 0}, upstream={"port": free_port()})
    gateway = SimpleNamespace(
        settings=settings,
        worker_id=0,
        tally=Tally(),
        stats={"upstream_errors": 0},
        sessions=set(),
        audit=None,
        draining=False,
        policy_error=None,
        server=object(),
    )
    return AdminServer(settings, cast(Any, gateway))


def test_routes_added_by_other_features() -> None:
    async def approvals(request: Request) -> Response:
        return Response.json(
            200,
            {
                "method": request.method,
                "path": request.path,
                "query": request.query,
                "body": request.body.decode(),
            },
        )

    async def broken(request: Request) -> Response:
        raise RuntimeError("a bug in a handler")

    async def main() -> None:
        admin = _in_process_admin()
        admin.route("/api/approvals", approvals)
        admin.route("/approvals/", approvals)
        admin.route("/boom", broken)
        await admin.start()
        assert admin.port
        port = admin.port
        try:
            status, _, body = await asyncio.to_thread(http_get, port, "/api/approvals?state=p")
            assert status == 200
            assert json.loads(body) == {
                "method": "GET",
                "path": "/api/approvals",
                "query": {"state": ["p"]},
                "body": "",
            }
            post = (
                b"POST /api/approvals/abc123/approve HTTP/1.1\r\nHost: x\r\n"
                b"Content-Type: application/json\r\nContent-Length: 13\r\n\r\n"
                b'{"for":"30m"}'
            )
            answer = await asyncio.to_thread(raw_http, port, post)
            assert answer.startswith(b"HTTP/1.1 200 ")
            data = json.loads(answer.split(b"\r\n\r\n", 1)[1])
            assert data["path"] == "/api/approvals/abc123/approve"
            assert data["body"] == '{"for":"30m"}'
            assert (await asyncio.to_thread(http_get, port, "/approvals/x"))[0] == 200
            assert (await asyncio.to_thread(http_get, port, "/api/approvalsx"))[0] == 404
            assert (await asyncio.to_thread(http_get, port, "/boom"))[0] == 500
            assert (await asyncio.to_thread(http_get, port, "/healthz"))[0] == 200
            # Unreachable upstream: not ready, and the answer is cached for a moment.
            status, _, body = await asyncio.to_thread(http_get, port, "/readyz")
            assert status == 503
            assert json.loads(body)["failed"] == ["upstream"]
        finally:
            await admin.close()

    asyncio.run(main())


def test_slow_clients_time_out(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(admin_module, "READ_TIMEOUT", 0.3)

    async def main() -> None:
        admin = _in_process_admin()
        await admin.start()
        assert admin.port
        port = admin.port

        def slow() -> bytes:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                s.sendall(b"GET /metrics HTTP/1.1\r\n")
                return s.recv(1024)

        try:
            started = time.monotonic()
            assert (await asyncio.to_thread(slow)).startswith(b"HTTP/1.1 408 ")
            assert time.monotonic() - started < 3
            assert (await asyncio.to_thread(http_get, port, "/healthz"))[0] == 200
        finally:
            await admin.close()

    asyncio.run(main())


# --------------------------------------------------------------------------- workers


def _worker_pids(gw: Gateway) -> list[int]:
    assert gw.proc is not None
    return [p for p in tree_pids(gw.proc.pid) if p != gw.proc.pid]


def _established_by_pid(port: int, pids: list[int]) -> dict[int, int]:
    """Established TCP connections on local ``port`` held by each of ``pids`` (Linux /proc)."""
    inodes: dict[str, int] = {}
    for pid in pids:
        with contextlib.suppress(OSError):
            for fd in Path(f"/proc/{pid}/fd").iterdir():
                with contextlib.suppress(OSError):
                    link = os.readlink(fd)
                    if link.startswith("socket:["):
                        inodes[link[8:-1]] = pid
    counts = dict.fromkeys(pids, 0)
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                local_port = int(fields[1].rsplit(":", 1)[1], 16)
                if local_port == port and fields[3] == "01" and fields[9] in inodes:
                    counts[inodes[fields[9]]] += 1
    return counts


@pytest.fixture
def open_connections() -> Iterator[list[psycopg.Connection[Any]]]:
    conns: list[psycopg.Connection[Any]] = []
    yield conns
    for conn in conns:
        conn.close()


@pytest.mark.skipif(not Path("/proc/net/tcp").exists(), reason="needs Linux /proc")
def test_metrics_total_across_workers(
    make_gateway: MakeGateway, open_connections: list[psycopg.Connection[Any]]
) -> None:
    gw = make_gateway(workers=2)
    deadline = time.monotonic() + 10
    while True:
        pids = _worker_pids(gw)
        if len(pids) == 2 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert len(pids) == 2, pids

    # Open connections until both workers serve some (SO_REUSEPORT spreads them).
    conns = open_connections
    while len(conns) < 40:
        conn = psycopg.connect(gw.dsn(f"user{len(conns)}"), autocommit=True)
        conn.execute("select 1").fetchone()
        conns.append(conn)
        per_worker = _established_by_pid(gw.port, pids)
        if len(conns) >= 4 and all(per_worker.values()):
            break
    per_worker = _established_by_pid(gw.port, pids)
    assert all(per_worker.values()), f"one worker got no connection: {per_worker}"
    assert sum(per_worker.values()) == len(conns)
    n = len(conns)

    def totals(s: Samples) -> bool:
        return (
            value(s, "pgguard_connections_total", result="accepted") == n
            and value(s, "pgguard_client_connections") == n
            and value(s, "pgguard_bytes_total", direction="client_to_server") >= 14 * n
            # One "select 1" per connection, counted without an audit trail or a policy.
            and value(s, "pgguard_statements_total", **{"class": "unknown", "decision": "allow"})
            == n
            and value(s, "pgguard_statement_duration_seconds_count") == n
        )

    wait_for(gw, totals)
    # Whichever worker answers, it reports the totals of both.
    answered: set[str] = set()
    deadline = time.monotonic() + 15
    while answered != {"0", "1"} and time.monotonic() < deadline:
        samples, worker = scrape(gw)
        assert totals(samples), (worker, per_worker)
        answered.add(worker)
    assert answered == {"0", "1"}

    # Closing them brings the gauge of both workers back to 0; the counter stays.
    for conn in conns:
        conn.close()
    wait_for(
        gw,
        lambda s: (
            value(s, "pgguard_client_connections") == 0
            and value(s, "pgguard_connections_total", result="accepted") == n
        ),
    )
