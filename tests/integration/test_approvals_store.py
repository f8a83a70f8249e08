"""The approval store on SQLite and on a real PostgreSQL (the suite's private cluster, a fresh
database per test), racing deciders, LISTEN/NOTIFY, and ``pgguard approvals …`` run as a DBA
runs it (subprocesses)."""

from __future__ import annotations

import asyncio
import http.client
import http.server
import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import URL

from pgguard.approvals.api import approval_routes
from pgguard.approvals.model import ApprovalError, ApprovalRequest
from pgguard.approvals.store import NOTIFY_CHANNEL, ApprovalStore
from pgguard.approvals.webhook import WebhookNotifier
from pgguard.audit.store import SCHEMA_VERSION
from pgguard.config import IdentitySettings, Settings
from pgguard.identity import TokenValidator, mint_token
from pgguard.metrics import Tally
from pgguard.proxy.admin import AdminServer
from tests.support.pgcluster import PgServer
from tests.support.ports import free_port

PGGUARD = str(Path(sys.executable).parent / "pgguard")
REPO = Path(__file__).resolve().parents[2]
SECRET = "approvals-integration-secret-0123456789abcdef"


# -- fixtures --------------------------------------------------------------------------------


def _pg_url(pg: PgServer, database: str) -> str:
    params = conninfo_to_dict(pg.superuser_dsn)
    return URL.create(
        "postgresql+psycopg",
        username=str(params.get("user") or pg.superuser),
        password=None if params.get("password") is None else str(params["password"]),
        host=pg.host,
        port=pg.port,
        database=database,
    ).render_as_string(hide_password=False)


@pytest.fixture
def pg_url(pg: PgServer) -> Iterator[str]:
    """A fresh database on the suite's PostgreSQL (no clash with other tests' tables)."""
    name = "approvals_" + uuid.uuid4().hex[:12]
    with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    try:
        yield _pg_url(pg, name)
    finally:
        with psycopg.connect(pg.superuser_dsn, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def store(url: str) -> Iterator[ApprovalStore]:
    s = ApprovalStore(url)
    try:
        yield s
    finally:
        s.close()


NOW = time.time()


def held(store: ApprovalStore, at: float = NOW, **overrides: Any) -> ApprovalRequest:
    r = ApprovalRequest.new(
        requester="alice",
        groups=("developers",),
        statement="UPDATE orders SET status = 'void' WHERE id = $1",
        rule="orders-writes-need-approval",
        approvers=("dba",),
        now=at,
        timeout=300.0,
        prompt_id="prompt-1",
        fingerprint="f00",
        params=("7",),
        instance_id="replica-a",
        session_id="sess-1",
        database="app",
    )
    r = replace(r, **overrides)
    store.create(r)
    return r


def refused(call: Callable[[], Any]) -> ApprovalError:
    with pytest.raises(ApprovalError) as info:
        call()
    return info.value


# -- the store, on both backends -------------------------------------------------------------


def test_schema_and_round_trip(store: ApprovalStore) -> None:
    assert store.sql.schema_version == SCHEMA_VERSION == 2
    r = held(
        store,
        statement="SELECT '\u00e9\U0001f600' /* prompt_id='x' */",
        params=("a\x00b", None, "base64:AAE="),
        groups=("developers", "on-call"),
        prompt_id=None,
    )
    got = store.get(r.id)
    assert got is not None
    # NUL cannot be stored in PostgreSQL text: it becomes U+FFFD on both backends
    assert got == replace(r, params=("a\ufffdb", None, "base64:AAE="))
    assert store.get("0000000000000000") is None


def test_list_filters_and_order(store: ApprovalStore) -> None:
    first = held(store, at=NOW - 30)
    second = held(store, at=NOW - 20)
    third = held(store, at=NOW - 10)
    store.decide(second.id, False, "bob", ("dba",), "no", now=NOW)
    store.expire(third.id, now=NOW)
    ids = lambda rs: [r.id for r in rs]  # noqa: E731
    assert ids(store.list()) == [third.id, second.id, first.id]
    assert ids(store.list("all")) == ids(store.list(None))
    assert ids(store.list("pending")) == [first.id]
    assert ids(store.list("decided")) == [third.id, second.id]
    assert ids(store.list("denied")) == [second.id]
    assert ids(store.list(["denied", "expired"])) == [third.id, second.id]
    assert ids(store.list(limit=2)) == [third.id, second.id]
    assert ids(store.list(since=NOW - 20)) == [third.id, second.id]
    with pytest.raises(ValueError, match="unknown status"):
        store.list("maybe")


def test_decisions_and_refusals(store: ApprovalStore) -> None:
    r = held(store)
    assert refused(lambda: store.decide("ffffffffffffffff", True, "bob", ("dba",))).status == 404
    e = refused(lambda: store.decide(r.id, True, "alice", ("dba",)))
    assert e.status == 403 and "own request" in str(e)
    e = refused(lambda: store.decide(r.id, True, "mallory", ("developers",)))
    assert e.status == 403 and "only members of dba" in str(e)
    assert refused(lambda: store.decide(r.id, False, "bob", ("dba",), "  ")).status == 400
    e = refused(lambda: store.decide(r.id, False, "bob", ("dba",), "no", window_seconds=60))
    assert e.status == 400
    e = refused(lambda: store.decide(r.id, True, "bob", ("dba",), window_seconds=0))
    assert e.status == 400
    e = refused(lambda: store.decide(r.id, True, "bob", ("dba",), now=r.expires_at))
    assert e.status == 409 and "expired" in str(e)
    assert store.get(r.id) == r  # every refusal left it alone

    decided = store.decide(r.id, False, "bob", ("dba",), " not today ", now=NOW + 5)
    assert (decided.status, decided.decider, decided.reason) == ("denied", "bob", "not today")
    assert decided.decided_at == NOW + 5 and decided.window_until is None
    assert store.get(r.id) == decided
    e = refused(lambda: store.decide(r.id, True, "carol", ("dba",), now=NOW + 6))
    assert e.status == 409 and "already denied by bob" in str(e)
    assert store.windows(active_only=False) == []


def test_windows(store: ApprovalStore) -> None:
    r1 = held(store)
    approved = store.decide(r1.id, True, "bob", ("dba",), "ok", window_seconds=600, now=NOW)
    assert approved.window_until == NOW + 600
    window = store.active_window("alice", r1.rule, NOW + 1)
    assert window is not None
    assert (window.user, window.rule, window.until) == ("alice", r1.rule, NOW + 600)
    assert (window.granted_by, window.request_id, window.approvers) == ("bob", r1.id, ("dba",))
    assert store.active_window("alice", r1.rule, NOW + 600) is None  # over
    assert store.active_window("zed", r1.rule, NOW + 1) is None  # someone else
    assert store.active_window("alice", "another-rule", NOW + 1) is None
    # a longer second window wins
    r2 = held(store)
    store.decide(r2.id, True, "carol", ("dba",), window_seconds=1200, now=NOW + 10)
    longest = store.active_window("alice", r1.rule, NOW + 11)
    assert longest is not None and longest.request_id == r2.id
    assert [w.request_id for w in store.windows(now=NOW + 11)] == [r2.id, r1.id]
    assert [w.request_id for w in store.windows(now=NOW + 700)] == [r2.id]

    e = refused(lambda: store.revoke_window(longest.id, "alice", ("developers",)))
    assert e.status == 403
    revoked = store.revoke_window(longest.id, "dave", ("dba",), now=NOW + 12)
    assert revoked.revoked and revoked.revoked_by == "dave" and revoked.revoked_at == NOW + 12
    assert store.get_window(longest.id) == revoked
    assert refused(lambda: store.revoke_window(longest.id, "dave", ("dba",))).status == 409
    assert refused(lambda: store.revoke_window("nope", "dave", ("dba",))).status == 404
    still = store.active_window("alice", r1.rule, NOW + 13)
    assert still is not None and still.request_id == r1.id
    assert len(store.windows(active_only=False)) == 2


def test_expire_and_withdraw(store: ApprovalStore) -> None:
    a, b, c = held(store), held(store), held(store)
    expired = store.expire(a.id, now=NOW + 300)
    assert expired is not None and expired.status == "expired" and expired.decided_at == NOW + 300
    assert store.expire(a.id) is None  # nothing left to change
    withdrawn = store.withdraw(b.id, "client cancelled", now=NOW + 1)
    assert withdrawn is not None and withdrawn.status == "withdrawn"
    assert store.get(b.id) == withdrawn and withdrawn.reason == "client cancelled"
    store.decide(c.id, True, "bob", ("dba",), now=NOW + 2)
    # the decision won the race with the timeout: expire changes nothing, the holder reads it
    assert store.expire(c.id, now=NOW + 300) is None
    assert store.statuses([c.id])[c.id].status == "approved"
    assert store.withdraw(c.id, "left") is None
    assert store.expire("ffffffffffffffff") is None
    assert refused(lambda: store.decide(a.id, True, "bob", ("dba",), now=NOW + 3)).status == 409


def test_statuses_and_overdue_sweep(store: ApprovalStore) -> None:
    requests = [held(store, at=NOW - 400 + i) for i in range(3)] + [held(store)]
    assert store.statuses([]) == {}
    got = store.statuses([r.id for r in requests] + ["unknown"])
    assert set(got) == {r.id for r in requests}
    assert all(s.status == "pending" for s in got.values())
    swept = store.expire_overdue(now=NOW, grace=99.5)
    assert [r.id for r in swept] == [requests[0].id]  # due at NOW-100; the next at NOW-99
    swept = store.expire_overdue(now=NOW)
    assert sorted(r.id for r in swept) == sorted(r.id for r in requests[1:3])
    assert store.expire_overdue(now=NOW) == []
    assert [r.id for r in store.list("pending")] == [requests[3].id]
    many = [f"{i:016x}" for i in range(1200)]  # more ids than one IN list takes
    assert set(store.statuses([*many, requests[3].id])) == {requests[3].id}


def test_a_request_held_by_one_replica_is_decided_through_another(url: str) -> None:
    with ApprovalStore(url) as replica_a, ApprovalStore(url) as replica_b:
        r = held(replica_a)
        assert [x.id for x in replica_b.list("pending")] == [r.id]
        replica_b.decide(r.id, True, "bob", ("dba",))
        assert replica_a.statuses([r.id])[r.id].status == "approved"


def test_two_deciders_racing_exactly_one_wins(url: str) -> None:
    rounds = 8
    with ApprovalStore(url) as one, ApprovalStore(url) as two:
        requests = [held(one) for _ in range(rounds)]
        results: dict[tuple[str, str], Any] = {}

        def decider(
            store: ApprovalStore, user: str, approve: bool, gate: threading.Barrier
        ) -> None:
            for r in requests:
                gate.wait(10)
                try:
                    results[(r.id, user)] = store.decide(r.id, approve, user, ("dba",), "race")
                except ApprovalError as exc:
                    results[(r.id, user)] = exc

        gate = threading.Barrier(2)
        threads = [
            threading.Thread(target=decider, args=(one, "bob", True, gate)),
            threading.Thread(target=decider, args=(two, "carol", False, gate)),
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        for r in requests:
            bob, carol = results[(r.id, "bob")], results[(r.id, "carol")]
            winners = [x for x in (bob, carol) if isinstance(x, ApprovalRequest)]
            losers = [x for x in (bob, carol) if isinstance(x, ApprovalError)]
            assert len(winners) == 1 and len(losers) == 1, (bob, carol)
            winner = winners[0]
            assert losers[0].status == 409
            assert f"already {winner.status} by {winner.decider}" in str(losers[0])
            assert one.get(r.id) == winner


def test_postgres_notifies_each_state_change(pg_url: str) -> None:
    with ApprovalStore(pg_url) as store:
        a, b = held(store), held(store)
        dsn = store.engine.url.set(drivername="postgresql").render_as_string(hide_password=False)
        with psycopg.connect(dsn, autocommit=True) as listener:
            listener.execute(f"LISTEN {NOTIFY_CHANNEL}")
            store.decide(a.id, True, "bob", ("dba",))
            store.withdraw(b.id, "gone")
            got = [n.payload for n in listener.notifies(timeout=5, stop_after=2)]
        assert got == [a.id, b.id]


# -- the admin API over HTTP ----------------------------------------------------------------


def _http(
    port: int, method: str, path: str, token: str | None = None, body: Any = None
) -> tuple[int, dict[str, str], bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = None if body is None else json.dumps(body).encode()
    if data is not None:
        headers["Content-Type"] = "application/json"
    try:
        conn.request(method, path, body=data, headers=headers)
        response = conn.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        conn.close()


def test_admin_http_decides_a_request_held_by_another_replica(
    pg_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("APPROVALS_TEST_SECRET", SECRET)
    settings = Settings(admin={"host": "127.0.0.1", "port": 0}, upstream={"port": free_port()})
    stand_in = SimpleNamespace(
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
    validator = TokenValidator(IdentitySettings(secret_env="APPROVALS_TEST_SECRET"))
    bob = mint_token(SECRET, "bob", groups=["dba"], ttl=300)

    async def main(replica_b: ApprovalStore, r: ApprovalRequest) -> None:
        admin = AdminServer(settings, cast(Any, stand_in))
        for prefix, handler in approval_routes(replica_b, validator, WebhookNotifier(None)).items():
            admin.route(prefix, handler)
        await admin.start()
        assert admin.port
        port = admin.port
        try:
            status, headers, page = await asyncio.to_thread(_http, port, "GET", "/approvals")
            assert status == 200 and b"pgguard approvals" in page
            assert "nonce-" in headers["content-security-policy"]
            status, headers, _ = await asyncio.to_thread(_http, port, "GET", "/api/approvals")
            assert status == 401 and headers["www-authenticate"].startswith("Bearer")
            status, _, body = await asyncio.to_thread(_http, port, "GET", "/api/approvals", bob)
            assert status == 200 and [d["id"] for d in json.loads(body)] == [r.id]
            status, _, body = await asyncio.to_thread(
                _http, port, "POST", f"/api/approvals/{r.id}/approve", bob, {"for": "10m"}
            )
            assert status == 200, body
            assert json.loads(body)["status"] == "approved"
        finally:
            await admin.close()

    with ApprovalStore(pg_url) as replica_a, ApprovalStore(pg_url) as replica_b:
        r = held(replica_a, at=time.time())
        asyncio.run(main(replica_b, r))
        # the holding replica's poll sees the decision
        assert replica_a.statuses([r.id])[r.id].status == "approved"
        assert replica_a.active_window("alice", r.rule) is not None


# -- the CLI ---------------------------------------------------------------------------------


class _Hook(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        self.server.received.append(json.loads(body))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def hook() -> Iterator[Any]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


class Cli:
    """``pgguard approvals …`` against a config whose audit store is ``url``: as subprocesses
    (``run``, ``many``: what a DBA runs) or in-process (``invoke``: the same click command,
    for the cheap refusal checks; a subprocess costs ~2 s of imports on a small machine)."""

    def __init__(self, tmp_path: Path, url: str, webhook_url: str | None = None) -> None:
        self.url = url
        self.config = tmp_path / "pgguard.yaml"
        doc: dict[str, Any] = {
            "audit": {"url": url},
            "identity": {"algorithms": ["HS256"], "secret_env": "PGGUARD_JWT_SECRET"},
            "policies": [str(REPO / "policies" / "demo.yaml")],
            "approvals": {"timeout": "5m", "webhook_url": webhook_url},
        }
        self.config.write_text(json.dumps(doc))  # JSON is YAML
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("PGGUARD_")}
        self.env["PGGUARD_JWT_SECRET"] = SECRET

    @staticmethod
    def token(sub: str, *groups: str) -> str:
        return mint_token(SECRET, sub, groups=list(groups), ttl=300)

    def _argv(self, args: tuple[str, ...]) -> list[str]:
        return ["approvals", args[0], "--config", str(self.config), *args[1:]]

    def start(self, *args: str, token: str | None = None) -> subprocess.Popen[str]:
        env = dict(self.env)
        if token is not None:
            env["PGGUARD_TOKEN"] = token
        return subprocess.Popen(
            [PGGUARD, *self._argv(args)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )

    def run(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        return self.many([(args, token)])[0]

    def many(
        self, calls: list[tuple[tuple[str, ...], str | None]]
    ) -> list[subprocess.CompletedProcess[str]]:
        """Run several processes at once."""
        procs = [(args, self.start(*args, token=token)) for args, token in calls]
        out = []
        for args, proc in procs:
            stdout, stderr = proc.communicate(timeout=60)
            out.append(subprocess.CompletedProcess(list(args), proc.returncode, stdout, stderr))
        return out

    def invoke(self, *args: str, token: str | None = None) -> subprocess.CompletedProcess[str]:
        from click.testing import CliRunner

        from pgguard.cli import main

        env: dict[str, str | None] = {k: None for k in os.environ if k.startswith("PGGUARD_")}
        env.update(PGGUARD_JWT_SECRET=SECRET, PGGUARD_TOKEN=token)
        result = CliRunner().invoke(main, self._argv(args), env=env)
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            raise result.exception
        return subprocess.CompletedProcess(
            list(args), result.exit_code, result.stdout, result.stderr
        )


def test_cli_lists_approves_with_a_window_and_revokes(tmp_path: Path, hook: Any) -> None:
    webhook = f"http://127.0.0.1:{hook.server_port}/x"
    cli = Cli(tmp_path, f"sqlite:///{tmp_path / 'audit.db'}", webhook)
    with ApprovalStore(cli.url) as store:
        r = held(store, statement="UPDATE orders SET note = 'a\x1b[31mred' WHERE id = 1")
        other = held(store, at=NOW - 5, requester="zed")
        listed = cli.run("list")
        assert listed.returncode == 0, listed.stderr
        lines = listed.stdout.splitlines()
        assert lines[0].split()[:3] == ["ID", "STATUS", "AGE"]
        assert r.id in lines[1] and other.id in lines[2]  # newest first
        assert "\x1b" not in listed.stdout and "\\x1b[31mred" in listed.stdout
        docs = [json.loads(line) for line in cli.invoke("list", "--json").stdout.splitlines()]
        assert [d["id"] for d in docs] == [r.id, other.id]
        assert docs[0]["statement"] == r.statement
        assert cli.invoke("windows").stdout == "no approval windows\n"

        approved = cli.run(
            "approve",
            r.id,
            "--reason",
            "looks right",
            "--for",
            "30m",
            token=cli.token("bob", "dba"),
        )
        assert approved.returncode == 0, approved.stderr
        assert f"request {r.id}: approved" in approved.stdout
        assert "decided by: bob" in approved.stdout and "window until" in approved.stdout
        state = store.get(r.id)
        assert state is not None and state.status == "approved" and state.reason == "looks right"
        window = store.active_window("alice", r.rule)
        assert window is not None and window.until == pytest.approx(time.time() + 1800, abs=60)
        # the CLI announces its decision like the API does
        assert [(d["event"], d["request"]["id"]) for d in hook.received] == [("decided", r.id)]

        windows = cli.invoke("windows", "--json")
        assert [json.loads(line)["id"] for line in windows.stdout.splitlines()] == [window.id]
        not_approver, revoked = cli.many(
            [
                (("revoke", window.id), cli.token("alice", "developers")),
                (("revoke", window.id), cli.token("carol", "dba")),
            ]
        )
        assert not_approver.returncode == 1 and "only members of dba" in not_approver.stderr
        assert revoked.returncode == 0 and f"window {window.id} revoked" in revoked.stdout
        assert store.active_window("alice", r.rule) is None
        assert "revoked by carol" in cli.invoke("windows", "--all").stdout
        denied = cli.invoke(
            "deny", other.id, "--reason", "no", "--json", token=cli.token("carol", "dba")
        )
        assert denied.returncode == 0, denied.stderr
        assert json.loads(denied.stdout)["status"] == "denied"
        decided = cli.invoke("list", "--status", "decided")
        assert "approved" in decided.stdout and "denied" in decided.stdout
        assert len(hook.received) == 2


def test_cli_goes_through_the_same_rules(tmp_path: Path) -> None:
    cli = Cli(tmp_path, f"sqlite:///{tmp_path / 'audit.db'}")
    with ApprovalStore(cli.url) as store:
        r = held(store)
        gone = held(store)
        store.decide(gone.id, False, "bob", ("dba",), "no")
        forged = mint_token("a-different-secret-of-enough-length-0123456789", "bob", groups=["dba"])
        checks: list[tuple[tuple[str, ...], str | None, int, str]] = [
            (("approve", r.id), cli.token("alice", "dba"), 1, "their own request"),
            (("approve", r.id), cli.token("mallory", "developers"), 1, "only members of dba"),
            (("approve", r.id), forged, 1, "token refused: token signature invalid"),
        ]
        # the same refusals from a real process, then the rest in-process
        results = cli.many([(args, token) for args, token, _, _ in checks])
        more: list[tuple[tuple[str, ...], str | None, int, str]] = [
            (("approve", r.id), None, 2, "a token is required"),
            (("deny", r.id), cli.token("bob", "dba"), 2, "Missing option '--reason'"),
            (("deny", r.id, "--reason", " "), cli.token("bob", "dba"), 1, "a reason is required"),
            (("approve", r.id, "--for", "a while"), cli.token("bob", "dba"), 2, "invalid window"),
            (("approve", "f" * 16), cli.token("bob", "dba"), 1, f"no approval request {'f' * 16}"),
            (("approve", gone.id), cli.token("carol", "dba"), 1, "already denied by bob"),
            (("revoke", "nope"), cli.token("carol", "dba"), 1, "no window nope"),
        ]
        results += [cli.invoke(*args, token=token) for args, token, _, _ in more]
        for result, (_, _, code, message) in zip(results, checks + more, strict=True):
            assert (result.returncode, message in result.stderr) == (code, True), result
            assert forged not in result.stderr + result.stdout
        assert store.get(r.id) == r


def test_cli_refuses_a_store_pgguard_has_not_migrated(tmp_path: Path) -> None:
    cli = Cli(tmp_path, f"sqlite:///{tmp_path / 'never-served.db'}")
    result = cli.invoke("list")
    assert result.returncode == 2 and "start pgguard serve" in result.stderr


def test_two_cli_processes_racing_on_postgres(tmp_path: Path, pg_url: str) -> None:
    cli = Cli(tmp_path, pg_url)
    with ApprovalStore(pg_url) as store:
        r = held(store)
        results = cli.many(
            [
                (("approve", r.id), cli.token("bob", "dba")),
                (("deny", r.id, "--reason", "race"), cli.token("carol", "dba")),
            ]
        )
        assert sorted(x.returncode for x in results) == [0, 1], results
        loser = next(x for x in results if x.returncode == 1)
        final = store.get(r.id)
        assert final is not None and final.status in ("approved", "denied")
        assert f"already {final.status} by {final.decider}" in loser.stderr
