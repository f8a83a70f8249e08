"""Held statements through real clients: approve, deny, expire, cancel, disconnect, windows;
simple and extended protocol, inside and outside transactions; two replicas sharing a store."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import errors

from pgguard.approvals.model import ApprovalRequest
from pgguard.approvals.store import ApprovalStore
from tests.support.gateway import Gateway, MakeGateway
from tests.support.pgcluster import PgServer

SCHEMA = """
DROP SCHEMA IF EXISTS appr CASCADE;
CREATE SCHEMA appr;
CREATE TABLE appr.orders (id int PRIMARY KEY, status text, card text);
INSERT INTO appr.orders
  SELECT g, 'open', '4111-0000-0000-' || (1000 + g) FROM generate_series(1, 10) g;
GRANT ALL ON SCHEMA appr TO PUBLIC;
GRANT ALL ON ALL TABLES IN SCHEMA appr TO PUBLIC;
"""

POLICY = """
version: 1
rules:
  - name: orders-need-approval
    when: {groups: [developers]}
    match: {classes: [write], tables: [appr.orders]}
    action: require_approval
    approvers: [dba]
    message: writes to appr.orders need a DBA's approval
masks:
  - column: appr.orders.card
    function: keep_last(4)
    exempt: {groups: [dba]}
defaults: {action: allow}
"""


@pytest.fixture(scope="module", autouse=True)
def schema(pg: PgServer) -> Iterator[None]:
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
        conn.execute(SCHEMA)
    yield


def status_of(pg: PgServer, order: int) -> str:
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as conn:
        row = conn.execute("select status from appr.orders where id = %s", (order,)).fetchone()
    assert row is not None
    return str(row[0])


def approving_gateway(
    make_gateway: MakeGateway, tmp_path: Path, url: str | None = None, **extra: Any
) -> Gateway:
    tmp_path.mkdir(parents=True, exist_ok=True)
    policy = tmp_path / "approvals.yaml"
    policy.write_text(POLICY)
    return make_gateway(
        policies=[str(policy)],
        audit={"url": url or f"sqlite:///{tmp_path / 'audit.db'}", "mode": "buffered"},
        **extra,
    )


def wait_pending(store: ApprovalStore, timeout: float = 10.0) -> ApprovalRequest:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pending = store.list(status="pending")
        if pending:
            return pending[0]
        time.sleep(0.05)
    raise AssertionError("no pending approval request appeared")


class Background:
    """Runs a client call in a thread, keeping its result or exception."""

    def __init__(self, call: Callable[[], Any]) -> None:
        self.result: Any = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, args=(call,), daemon=True)
        self.thread.start()

    def _run(self, call: Callable[[], Any]) -> None:
        try:
            self.result = call()
        except BaseException as exc:
            self.error = exc

    def join(self, timeout: float = 15.0) -> Background:
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "the held statement never finished"
        return self

    @property
    def done(self) -> bool:
        return not self.thread.is_alive()


def final_status(store: ApprovalStore, request_id: str, timeout: float = 10.0) -> str:
    """The request's status once it leaves pending (withdrawals land a moment later)."""
    deadline = time.monotonic() + timeout
    while True:
        got = store.get(request_id)
        assert got is not None
        if got.status != "pending" or time.monotonic() > deadline:
            return got.status
        time.sleep(0.05)


def store_of(gw: Gateway) -> ApprovalStore:
    return ApprovalStore(gw.config["audit"]["url"])


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_approve_runs_the_held_statement(
    make_gateway: MakeGateway, tmp_path: Path, pg: PgServer, protocol: str
) -> None:
    gw = approving_gateway(make_gateway, tmp_path)
    store = store_of(gw)
    notices: list[str] = []
    with psycopg.connect(gw.dsn("devi", groups=["developers"]), autocommit=True) as conn:
        conn.add_notice_handler(lambda d: notices.append(f"{d.message_primary} {d.message_hint}"))
        if protocol == "simple":
            job = Background(
                lambda: conn.execute(
                    b"update appr.orders set status = 'void' where id = 1 returning card"
                ).fetchall()
            )
        else:
            job = Background(
                lambda: conn.execute(
                    "update appr.orders set status = %s where id = %s returning card", ("void", 1)
                ).fetchall()
            )
        request = wait_pending(store)
        assert request.requester == "devi" and request.rule == "orders-need-approval"
        if protocol == "extended":  # psycopg sends the int in binary: base64 in the request
            assert request.params == ("void", "base64:AAE=")
        assert "appr.orders" in request.statement
        time.sleep(0.3)
        assert not job.done  # held: the client gets nothing yet
        assert status_of(pg, 1) == "open"
        store.decide(request.id, True, "dana", ("dba",), "looks fine", None, time.time())
        job.join()
        assert job.error is None, job.error
        assert job.result == [("****-****-****-1001",)]  # approved, and still masked
        assert status_of(pg, 1) == "void"
        assert any(request.id in n for n in notices), notices
        # The session goes on normally.
        assert conn.execute("select 1").fetchone() == (1,)
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        admin.execute("update appr.orders set status = 'open' where id = 1")


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_deny_fails_the_statement_with_the_reason(
    make_gateway: MakeGateway, tmp_path: Path, pg: PgServer, protocol: str
) -> None:
    gw = approving_gateway(make_gateway, tmp_path)
    store = store_of(gw)
    with psycopg.connect(gw.dsn("devi", groups=["developers"])) as conn:  # in a transaction
        conn.execute("select 1")
        if protocol == "simple":
            job = Background(
                lambda: conn.execute(b"update appr.orders set status = 'void' where id = 2")
            )
        else:
            job = Background(
                lambda: conn.execute("update appr.orders set status = %s where id = 2", ("v",))
            )
        request = wait_pending(store)
        store.decide(request.id, False, "dana", ("dba",), "not on a Friday", None, time.time())
        job.join()
        assert isinstance(job.error, errors.InsufficientPrivilege), job.error
        assert "not on a Friday" in str(job.error) and "orders-need-approval" in str(job.error)
        conn.rollback()
        assert conn.execute("select 2").fetchone() == (2,)
    assert status_of(pg, 2) == "open"


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_expired_request_fails_the_statement(
    make_gateway: MakeGateway, tmp_path: Path, pg: PgServer, protocol: str
) -> None:
    gw = approving_gateway(make_gateway, tmp_path, approvals={"timeout": "1s"})
    with psycopg.connect(gw.dsn("devi", groups=["developers"]), autocommit=True) as conn:
        with pytest.raises(errors.InsufficientPrivilege, match="expired"):
            if protocol == "simple":
                conn.execute(b"update appr.orders set status = 'void' where id = 3")
            else:
                conn.execute("update appr.orders set status = %s where id = 3", ("v",))
        assert conn.execute("select 3").fetchone() == (3,)
    assert status_of(pg, 3) == "open"
    [request] = store_of(gw).list(status="expired")
    assert request.status == "expired"


def _update(conn: psycopg.Connection[Any], order: int, protocol: str) -> Any:
    if protocol == "simple":
        sql = f"update appr.orders set status = 'void' where id = {order}"
        return conn.execute(sql.encode())
    return conn.execute("update appr.orders set status = %s where id = %s", ("void", order))


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_cancel_and_disconnect_withdraw_the_request(
    make_gateway: MakeGateway, tmp_path: Path, pg: PgServer, protocol: str
) -> None:
    gw = approving_gateway(make_gateway, tmp_path)
    store = store_of(gw)
    with psycopg.connect(gw.dsn("devi", groups=["developers"]), autocommit=True) as conn:
        job = Background(lambda: _update(conn, 4, protocol))
        request = wait_pending(store)
        conn.cancel()
        job.join()
        assert isinstance(job.error, errors.QueryCanceled), job.error
        assert conn.execute("select 4").fetchone() == (4,)
    assert final_status(store, request.id) == "withdrawn"

    conn = psycopg.connect(gw.dsn("devi", groups=["developers"]), autocommit=True)
    job = Background(lambda: _update(conn, 5, protocol))
    request = wait_pending(store)
    conn.pgconn.finish()  # the client goes away while its statement waits
    job.join()
    assert final_status(store, request.id) == "withdrawn"
    assert status_of(pg, 4) == "open" and status_of(pg, 5) == "open"


@pytest.mark.parametrize("protocol", ["simple", "extended"])
def test_window_lets_the_same_rule_run_without_asking(
    make_gateway: MakeGateway, tmp_path: Path, pg: PgServer, protocol: str
) -> None:
    gw = approving_gateway(make_gateway, tmp_path)
    store = store_of(gw)
    with psycopg.connect(gw.dsn("devi", groups=["developers"]), autocommit=True) as conn:
        job = Background(lambda: _update(conn, 6, protocol))
        request = wait_pending(store)
        store.decide(request.id, True, "dana", ("dba",), "for the migration", 60.0, time.time())
        job.join()
        assert job.error is None
        # Within the window: runs at once, no new request.
        _update(conn, 7, protocol)
        assert store.list(status="pending") == []
    assert status_of(pg, 6) == "void" and status_of(pg, 7) == "void"
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        admin.execute("update appr.orders set status = 'open' where id in (6, 7)")


def test_two_replicas_share_the_store(
    make_gateway: MakeGateway, tmp_path: Path, pg: PgServer
) -> None:
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as admin:
        admin.execute("drop database if exists approvals_shared")
        admin.execute("create database approvals_shared")
    url = pg.dsn(pg.superuser, dbname="approvals_shared")
    from psycopg.conninfo import conninfo_to_dict

    info = conninfo_to_dict(url)
    sa_url = (
        f"postgresql+psycopg://{info['user']}:{info['password']}@{info['host']}:{info['port']}"
        "/approvals_shared"
    )
    a = approving_gateway(make_gateway, tmp_path / "a", url=sa_url)
    b = approving_gateway(make_gateway, tmp_path / "b", url=sa_url)
    with psycopg.connect(a.dsn("devi", groups=["developers"]), autocommit=True) as conn:
        job = Background(
            lambda: conn.execute("update appr.orders set status = 'void' where id = 8")
        )
        request = wait_pending(ApprovalStore(sa_url))
        token = b.token("dana", groups=["dba"])
        http = urllib.request.Request(
            f"http://127.0.0.1:{b.admin_port}/api/approvals/{request.id}/approve",
            data=json.dumps({"reason": "ok from replica b"}).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(http, timeout=10) as response:
            assert response.status == 200
        job.join()
        assert job.error is None, job.error
    assert status_of(pg, 8) == "void"
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        admin.execute("update appr.orders set status = 'open' where id = 8")


NODE_DIR = Path(__file__).resolve().parents[1] / "node"


def _browser_missing() -> str | None:
    import shutil

    if shutil.which("node") is None:
        return "node is not installed"
    if not (NODE_DIR / "node_modules" / "playwright-core").is_dir():
        return "playwright-core is not installed in tests/node (run `make node`)"
    if not Path("/usr/bin/chromium").exists() and shutil.which("chromium") is None:
        return "Debian's chromium package could not be installed"
    return None


def test_approve_by_clicking_in_the_page(
    make_gateway: MakeGateway, tmp_path: Path, pg: PgServer
) -> None:
    import subprocess

    missing = _browser_missing()
    if missing is not None:
        pytest.skip(f"headless browser test skipped: {missing}")
    gw = approving_gateway(make_gateway, tmp_path)
    store = store_of(gw)
    with psycopg.connect(gw.dsn("devi", groups=["developers"]), autocommit=True) as conn:
        job = Background(
            lambda: conn.execute("update appr.orders set status = 'void' where id = 9")
        )
        request = wait_pending(store)
        env = {
            "PATH": "/usr/bin:/bin:/usr/local/bin",
            "HOME": str(tmp_path),
            "PGGUARD_TOKEN": gw.token("dana", groups=["dba"]),
        }
        proc = subprocess.run(
            ["node", str(NODE_DIR / "approve_in_browser.js"),
             f"http://127.0.0.1:{gw.admin_port}", request.id],
            capture_output=True, text=True, env=env, cwd=NODE_DIR, timeout=90, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert "appr.orders" in json.loads(proc.stdout)["statement"]
        job.join()
        assert job.error is None, job.error
    decided = store.get(request.id)
    assert decided is not None and decided.status == "approved" and decided.decider == "dana"
    assert status_of(pg, 9) == "void"
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        admin.execute("update appr.orders set status = 'open' where id = 9")


def test_asyncpg_and_psql_are_held_too_and_everything_is_audited(
    make_gateway: MakeGateway, tmp_path: Path, pg: PgServer
) -> None:
    """asyncpg (named prepared statements, binary) and psql (simple protocol); the webhook
    hears about the request and the audit trail links the statement to its approval."""
    import asyncio
    import http.server
    import subprocess

    import asyncpg

    from pgguard.audit.store import SqlStore

    hooks: list[dict[str, Any]] = []

    class Hook(http.server.BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers["Content-Length"]))
            hooks.append(json.loads(body))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        gw = approving_gateway(
            make_gateway,
            tmp_path,
            approvals={"webhook_url": f"http://127.0.0.1:{server.server_address[1]}/hook"},
        )
        store = store_of(gw)

        async def via_asyncpg() -> str:
            conn = await asyncpg.connect(
                host="127.0.0.1", port=gw.port, user="devi", database=pg.dbname,
                password=gw.token("devi", groups=["developers"]),
            )  # fmt: skip
            try:
                stmt = await conn.prepare("update appr.orders set status = $1 where id = $2")
                return str(await stmt.fetch("void", 10) or "done")
            finally:
                await conn.close()

        job = Background(lambda: asyncio.run(via_asyncpg()))
        request = wait_pending(store)
        store.decide(request.id, True, "dana", ("dba",), "ok", None, time.time())
        job.join()
        assert job.error is None, job.error
        assert status_of(pg, 10) == "void"

        env = {"PGPASSWORD": gw.token("devi", groups=["developers"]), "PATH": "/usr/bin:/bin"}
        psql = [
            str(pg.bindir / "psql") if pg.bindir else "psql",
            "-X", "-v", "ON_ERROR_STOP=1", "-h", "127.0.0.1", "-p", str(gw.port),
            "-U", "devi", "-d", pg.dbname, "-c",
            "update appr.orders set status = 'open' where id = 10",
        ]  # fmt: skip
        job = Background(
            lambda: subprocess.run(psql, capture_output=True, text=True, env=env, timeout=30)
        )
        second = wait_pending(store)
        assert second.id != request.id
        store.decide(second.id, False, "dana", ("dba",), "leave it void", None, time.time())
        job.join()
        proc = job.result
        assert proc.returncode != 0
        assert "leave it void" in proc.stderr and second.id in proc.stderr
        assert status_of(pg, 10) == "void"
    finally:
        server.shutdown()
    with psycopg.connect(pg.superuser_app_dsn(), autocommit=True) as admin:
        admin.execute("update appr.orders set status = 'open' where id = 10")

    deadline = time.monotonic() + 10
    while len([h for h in hooks if h.get("event") == "requested"]) < 2:
        assert time.monotonic() < deadline, hooks
        time.sleep(0.1)
    assert {h["request"]["id"] for h in hooks if h["event"] == "requested"} == {
        request.id,
        second.id,
    }

    audit = SqlStore(gw.config["audit"]["url"], migrate=False)
    try:
        deadline = time.monotonic() + 10
        while True:
            records = audit.search(limit=10_000, order="asc", user="devi")
            events = [(r.event, r.approval_id, r.decision) for r in records]
            if (("approval_decision", second.id, "approval_denied") in events) or (
                time.monotonic() > deadline
            ):
                break
            time.sleep(0.1)
    finally:
        audit.close()
    assert ("approval_request", request.id, None) in events
    assert ("approval_decision", request.id, "approved") in events
    assert ("statement", request.id, "approved") in events, events
    assert ("approval_decision", second.id, "approval_denied") in events
    # The statements' own records: the rule that asked for the approval, and how it ended.
    ran = [r for r in records if r.event == "statement" and r.approval_id is not None]
    assert [(r.approval_id, r.decision, r.rule) for r in ran] == [
        (request.id, "approved", request.rule),
        (second.id, "approval_denied", second.rule),
    ]
    assert ran[1].extra.get("executed") is False
