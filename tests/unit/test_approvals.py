"""Approvals without a gateway: the model, the decision rules, the SQLite store's schema,
the webhook (against a local HTTP server) and the admin API handlers (called directly)."""

from __future__ import annotations

import asyncio
import http.server
import json
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from pgguard.approvals.api import SWEEP_GRACE, approval_routes, bearer_token
from pgguard.approvals.display import age, request_detail, request_table, window_table
from pgguard.approvals.model import ApprovalError, ApprovalRequest, Window
from pgguard.approvals.rules import (
    check_decider,
    check_revoker,
    clean_reason,
    is_approver,
    parse_window,
)
from pgguard.approvals.store import ApprovalStore
from pgguard.approvals.webhook import WebhookNotifier, payload, safe_url, summary
from pgguard.audit.store import SCHEMA_VERSION, SchemaError, SqlStore
from pgguard.config import IdentitySettings
from pgguard.identity import TokenValidator, mint_token
from pgguard.proxy.admin import Request, Response

T0 = 1_800_000_000.0
SECRET = "approvals-unit-test-secret-0123456789abcdef"


def req(**overrides: Any) -> ApprovalRequest:
    base = ApprovalRequest.new(
        requester="alice",
        groups=("developers",),
        statement="UPDATE orders SET status = 'void' WHERE id = 7",
        rule="orders-writes-need-approval",
        approvers=("dba",),
        now=T0,
        timeout=300.0,
        prompt_id="p-1",
        fingerprint="abc",
        params=("7", None),
        instance_id="host:6432:0",
        session_id="s-1",
        database="app",
    )
    return replace(base, **overrides)


# -- model -----------------------------------------------------------------------------------


def test_new_request_is_pending_with_an_unguessable_id() -> None:
    a, b = req(), req()
    assert a.status == "pending" and a.pending
    assert re.fullmatch(r"[0-9a-f]{16}", a.id) and a.id != b.id
    assert a.created == T0 and a.expires_at == T0 + 300
    assert not a.overdue(T0 + 299.9) and a.overdue(T0 + 300)
    assert not replace(a, status="approved").overdue(T0 + 1000)


def test_request_dict_round_trip_is_json() -> None:
    r = req(status="approved", decider="bob", reason="ok", decided_at=T0 + 5, window_until=T0 + 65)
    doc = json.loads(json.dumps(r.to_dict()))
    assert doc["groups"] == ["developers"] and doc["params"] == ["7", None]
    assert ApprovalRequest.from_dict(doc) == r
    with pytest.raises(ValueError, match="unknown approval status"):
        ApprovalRequest.from_dict({**doc, "status": "maybe"})


def test_window_active_and_dict() -> None:
    w = Window("w1", "alice", "r", T0 + 60, "bob", "req1", False, T0, ("dba",))
    assert w.active(T0 + 59) and not w.active(T0 + 60)
    assert not replace(w, revoked=True).active(T0)
    assert w.to_dict()["approvers"] == ["dba"]


def test_approval_error_carries_status_and_message() -> None:
    exc = ApprovalError(409, "already approved")
    assert exc.status == 409 and str(exc) == "already approved"
    with pytest.raises(ApprovalError):  # usable with contextlib (assigns __traceback__)
        try:
            raise exc
        finally:
            pass


# -- rules -----------------------------------------------------------------------------------


def test_decider_must_be_in_an_approver_group() -> None:
    refusal = check_decider(req(), "mallory", ("developers",), T0)
    assert refusal is not None and refusal.status == 403
    assert "only members of dba" in str(refusal)


def test_a_request_without_approvers_cannot_be_decided() -> None:
    refusal = check_decider(req(approvers=()), "bob", ("dba",), T0)
    assert refusal is not None and refusal.status == 403
    assert "no approver group" in str(refusal)


def test_approver_groups_are_policy_globs() -> None:
    assert check_decider(req(approvers=("dba-*",)), "bob", ("x", "dba-eu"), T0) is None
    assert is_approver(("dba",), ("dba",)) and not is_approver(("dba",), ("dbas", "Dba"))
    assert not is_approver((), ("dba",))


def test_nobody_decides_their_own_request() -> None:
    refusal = check_decider(req(), "alice", ("dba",), T0)
    assert refusal is not None and refusal.status == 403
    assert "their own request" in str(refusal)


@pytest.mark.parametrize("status", ["approved", "denied", "expired", "withdrawn"])
def test_only_pending_requests_are_decided(status: str) -> None:
    r = req(status=status, decider="carol" if status in ("approved", "denied") else None)
    refusal = check_decider(r, "bob", ("dba",), T0)
    assert refusal is not None and refusal.status == 409
    assert f"already {status}" in str(refusal)
    assert ("by carol" in str(refusal)) == (r.decider is not None)
    assert refusal.request == r


def test_an_overdue_request_is_expired() -> None:
    assert check_decider(req(), "bob", ("dba",), T0 + 299.9) is None
    refusal = check_decider(req(), "bob", ("dba",), T0 + 300)
    assert refusal is not None and refusal.status == 409 and "expired" in str(refusal)


def test_membership_is_checked_before_state() -> None:
    # someone who may not decide learns nothing about the request's state
    refusal = check_decider(req(status="approved"), "mallory", (), T0)
    assert refusal is not None and refusal.status == 403


def test_revokers() -> None:
    w = Window("w1", "alice", "r", T0 + 60, "bob", "req1", False, T0, ("dba",))
    assert check_revoker(w, "carol", ("dba",)) is None
    refused = check_revoker(w, "alice", ("developers",))
    assert refused is not None and refused.status == 403
    again = check_revoker(replace(w, revoked=True, revoked_by="carol"), "dave", ("dba",))
    assert again is not None and again.status == 409 and "by carol" in str(again)


def test_reasons() -> None:
    assert clean_reason("  because  ", required=True) == "because"
    assert clean_reason("   ", required=False) is None
    assert clean_reason(None, required=False) is None
    for missing in (None, "", "  "):
        with pytest.raises(ApprovalError) as info:
            clean_reason(missing, required=True)
        assert info.value.status == 400
    with pytest.raises(ApprovalError, match="too long"):
        clean_reason("x" * 2001, required=False)


def test_windows_parse_like_policy_durations() -> None:
    assert parse_window(None) is None and parse_window("") is None
    assert parse_window("30m") == 1800 and parse_window(90) == 90 and parse_window("1h30m") == 5400
    for bad in ("soon", 0, "-5m", float("inf"), float("nan"), True):
        with pytest.raises(ApprovalError) as info:
            parse_window(bad)
        assert info.value.status == 400


# -- terminal output -------------------------------------------------------------------------


def test_terminal_output_escapes_attacker_text() -> None:
    assert [age(s) for s in (5, 65, 3725, 90000)] == ["5s", "1m05s", "1h02m", "1d01h"]
    r = req(statement="SELECT 1;\x1b]0;pwned\x07\nDROP TABLE x", requester="eve\r\x1b[2J")
    table = request_table([r, replace(req(), status="denied", decider="bob")], T0 + 10)
    assert "\x1b" not in table and "\x07" not in table and "\r" not in table
    header, first, second = table.splitlines()
    assert header.split()[:2] == ["ID", "STATUS"] and r.id in first and "pending" in first
    assert "denied" in second and "bob" in second
    assert "overdue" in request_table([r], T0 + 301)
    assert request_table([], T0) == "no approval requests\n"
    detail = request_detail(replace(r, status="approved", decider="bob", window_until=T0), T0)
    assert "\x1b" not in detail and "decided by: bob" in detail and "window until" in detail
    w = Window("w1", "alice", "r", T0 + 60, "bob", "req1", False, T0, ("dba",))
    assert "active" in window_table([w], T0) and "over" in window_table([w], T0 + 61)
    revoked = replace(w, revoked=True, revoked_by="carol")
    assert "revoked by carol" in window_table([revoked], T0)
    assert window_table([], T0) == "no approval windows\n"


# -- the SQLite store's schema ---------------------------------------------------------------


def _sql(store: SqlStore, statement: str) -> list[Any]:
    with store.engine.connect() as conn, conn.begin():
        result = conn.execute(text(statement))
        return list(result) if result.returns_rows else []


def test_migration_2_adds_the_approval_tables(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    with SqlStore(url) as s:
        assert s.schema_version == SCHEMA_VERSION == 2
        names = {r[0] for r in _sql(s, "SELECT name FROM sqlite_master WHERE type = 'table'")}
        assert {"audit_records", "pgguard_approvals", "pgguard_approval_windows"} <= names
        # back to a version-1 database, as an older pgguard left it
        _sql(s, "DROP TABLE pgguard_approvals")
        _sql(s, "DROP TABLE pgguard_approval_windows")
        _sql(s, "UPDATE pgguard_schema SET version = 1")
    with pytest.raises(SchemaError, match="schema version 1"):
        ApprovalStore(url, migrate=False)  # the CLI does not migrate
    with ApprovalStore(url) as store:  # the gateway does
        assert store.sql.schema_version == 2
        store.create(req())
        assert len(store.list()) == 1


def test_store_shares_an_open_sql_store(tmp_path: Path) -> None:
    with SqlStore(f"sqlite:///{tmp_path / 'a.db'}") as sql:
        store = ApprovalStore.on(sql)
        store.create(req())
        store.close()  # leaves the audit store open
        assert sql.count() == 0 and len(ApprovalStore.on(sql).list()) == 1


# -- webhook ---------------------------------------------------------------------------------


class _Hook(http.server.BaseHTTPRequestHandler):
    server: _HookServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = self.rfile.read(length)
        srv = self.server
        with srv.lock:
            srv.hits += 1
            status = srv.statuses.pop(0) if srv.statuses else 200
            if status == 200:
                srv.received.append(
                    (self.path, self.headers.get("Content-Type", ""), json.loads(body))
                )
        self.send_response(status)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"ok")

    def log_message(self, *args: Any) -> None:
        pass


class _HookServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Hook)
        self.lock = threading.Lock()
        self.hits = 0
        self.statuses: list[int] = []
        self.received: list[tuple[str, str, dict[str, Any]]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/services/T000/B000/s3cr3t-token"


@pytest.fixture
def hook() -> Iterator[_HookServer]:
    server = _HookServer()
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()


def test_webhook_posts_slack_compatible_json(hook: _HookServer) -> None:
    notifier = WebhookNotifier(hook.url, page_url="http://gw:9187/approvals", backoff=(0.01,))
    r = req(statement="DELETE FROM t WHERE x = '<!channel>' AND y = '&'")
    notifier.notify("requested", r)
    assert notifier.flush(5)
    notifier.close()
    (path, content_type, doc) = hook.received[0]
    assert path.endswith("/s3cr3t-token") and content_type == "application/json"
    assert doc["event"] == "requested" and doc["request"] == r.to_dict()
    assert r.id in doc["text"] and "alice" in doc["text"] and "dba" in doc["text"]
    assert "http://gw:9187/approvals" in doc["text"]
    assert f"pgguard approvals approve {r.id}" in doc["text"]
    # a statement cannot ping a channel or forge a link in Slack
    assert "<!channel>" not in doc["text"] and "&lt;!channel&gt;" in doc["text"]
    assert notifier.delivered == 1 and notifier.failed == 0


def test_webhook_texts_for_each_event() -> None:
    decided = req(status="approved", decider="bob", reason="fine", decided_at=T0 + 1)
    assert "approved" in summary("decided", decided) and "bob" in summary("decided", decided)
    windowed = replace(decided, window_until=T0 + 1801)
    assert "window of 30m" in summary("decided", windowed)
    denied = req(status="denied", decider="bob", reason="no <b>")
    assert "denied" in summary("decided", denied) and "no &lt;b&gt;" in summary("decided", denied)
    assert "expired" in summary("expired", req(status="expired"))
    assert "withdrawn: client left" in summary(
        "withdrawn", req(status="withdrawn", reason="client left")
    )
    long = req(statement="x" * 5000)
    assert "more characters" in summary("requested", long)
    assert json.loads(payload("requested", long))["request"]["statement"] == "x" * 5000


def test_webhook_retries_after_a_server_error(hook: _HookServer) -> None:
    hook.statuses = [500, 503]
    notifier = WebhookNotifier(hook.url, backoff=(0.05, 0.05, 0.05))
    notifier.notify("decided", req(status="approved", decider="bob"))
    assert notifier.flush(5)
    assert hook.hits == 3 and len(hook.received) == 1
    assert notifier.delivered == 1


def test_webhook_does_not_retry_a_client_error(hook: _HookServer) -> None:
    hook.statuses = [404]
    notifier = WebhookNotifier(hook.url, backoff=(0.05, 0.05))
    notifier.notify("expired", req(status="expired"))
    assert notifier.flush(5)
    assert hook.hits == 1 and notifier.failed == 1


def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_a_dead_webhook_never_blocks_and_never_logs_the_token(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://127.0.0.1:{_dead_port()}/services/T/B/s3cr3t-token"
    notifier = WebhookNotifier(url, backoff=(0.05, 0.05, 0.05), timeout=1.0)
    caplog.set_level(logging.WARNING, logger="pgguard.approvals.webhook")
    started = time.monotonic()
    for _ in range(5):
        notifier.notify("requested", req())
    assert time.monotonic() - started < 0.1  # notify only queues
    assert notifier.flush(10)
    assert notifier.failed == 5 and notifier.delivered == 0
    assert "giving up" in caplog.text and "127.0.0.1" in caplog.text
    assert "s3cr3t" not in caplog.text and "/services" not in caplog.text
    notifier.close()


def test_a_full_webhook_queue_drops_instead_of_blocking(
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = f"http://127.0.0.1:{_dead_port()}/hook"
    notifier = WebhookNotifier(url, backoff=(5.0,), queue_size=1, timeout=1.0)
    started = time.monotonic()
    for _ in range(5):
        notifier.notify("requested", req())
    assert time.monotonic() - started < 0.1
    assert "queue full" in caplog.text
    started = time.monotonic()
    notifier.close(timeout=0.2)  # cuts the back-off short
    assert time.monotonic() - started < 3


def test_webhook_without_url_and_with_a_bad_url() -> None:
    off = WebhookNotifier(None)
    assert not off.enabled
    off.notify("requested", req())  # a no-op
    off.close()
    with pytest.raises(ValueError, match="http"):
        WebhookNotifier("file:///etc/passwd")
    assert safe_url("https://user:pw@hooks.example.com:8443/a/b?c") == (
        "https://hooks.example.com:8443"
    )


# -- the admin API, handlers called directly -------------------------------------------------


class Api:
    """The handlers over a SQLite store, with tokens for a few people."""

    def __init__(self, tmp_path: Path, hook_url: str | None = None) -> None:
        secret_file = tmp_path / "jwt.secret"
        secret_file.write_text(SECRET)
        self.validator = TokenValidator(IdentitySettings(secret_env=None, secret_file=secret_file))
        self.store = ApprovalStore(f"sqlite:///{tmp_path / 'audit.db'}")
        self.notifier = WebhookNotifier(hook_url, backoff=(0.01,))
        self.now = time.time()
        routes = approval_routes(self.store, self.validator, self.notifier, clock=lambda: self.now)
        self.api = routes["/api/approvals"]
        self.page = routes["/approvals"]

    @staticmethod
    def token(sub: str, *groups: str) -> str:
        return mint_token(SECRET, sub, groups=list(groups), ttl=300)

    def call(
        self,
        method: str,
        path: str,
        token: str | None = None,
        body: Any = None,
        handler: Any = None,
    ) -> tuple[int, Any, Response]:
        target = path
        path, _, query = target.partition("?")
        params: dict[str, list[str]] = {}
        for pair in filter(None, query.split("&")):
            k, _, v = pair.partition("=")
            params.setdefault(k, []).append(v)
        headers = {"authorization": f"Bearer {token}"} if token else {}
        raw = (
            body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
        )
        request = Request(method, target, path, params, headers, raw, "127.0.0.1:1")
        response = asyncio.run((handler or self.api)(request))
        data: Any = None
        if response.content_type == "application/json":
            data = json.loads(response.body)
        return response.status, data, response

    def held(self, **overrides: Any) -> ApprovalRequest:
        r = replace(req(), created=self.now, expires_at=self.now + 300, **overrides)
        self.store.create(r)
        return r


@pytest.fixture
def api(tmp_path: Path) -> Iterator[Api]:
    a = Api(tmp_path)
    try:
        yield a
    finally:
        a.store.close()


ALICE = ("alice", "developers")
BOB = ("bob", "dba")
CAROL = ("carol", "dba")
MALLORY = ("mallory", "developers")


def test_api_needs_a_valid_bearer_token(api: Api) -> None:
    status, data, response = api.call("GET", "/api/approvals")
    assert status == 401 and "Bearer" in data["error"]
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    forged = mint_token("another-secret-of-sufficient-length-123456", "bob", groups=["dba"])
    status, data, _ = api.call("GET", "/api/approvals", forged)
    assert status == 401 and data["error"].startswith("token refused: ")
    assert forged not in json.dumps(data)
    expired = mint_token(SECRET, "bob", groups=["dba"], ttl=60, now=time.time() - 3600)
    assert api.call("GET", "/api/approvals", expired)[0] == 401


def test_bearer_header_parsing() -> None:
    def r(value: str) -> Request:
        return Request("GET", "/", "/", {}, {"authorization": value})

    assert bearer_token(r("Bearer abc")) == "abc" and bearer_token(r("bearer  abc ")) == "abc"
    assert bearer_token(r("Basic abc")) is None and bearer_token(r("Bearer ")) is None
    assert bearer_token(Request("GET", "/", "/", {}, {})) is None


def test_api_lists_what_each_person_may_see(api: Api) -> None:
    mine = api.held()
    other = api.held(requester="zed", approvers=("secops",))
    bob = api.token(*BOB)
    status, data, _ = api.call("GET", "/api/approvals", bob)
    assert status == 200 and [d["id"] for d in data] == [mine.id]
    assert data[0]["can_decide"] is True and data[0]["statement"] == mine.statement
    _, data, _ = api.call("GET", "/api/approvals", api.token(*ALICE))
    assert [d["id"] for d in data] == [mine.id] and data[0]["can_decide"] is False
    _, data, _ = api.call("GET", "/api/approvals", api.token(*MALLORY))
    assert data == []
    _, data, _ = api.call("GET", "/api/approvals?status=all", api.token("sam", "secops"))
    assert [d["id"] for d in data] == [other.id]
    assert api.call("GET", "/api/approvals?status=bogus", bob)[0] == 400
    assert api.call("GET", "/api/approvals?limit=x", bob)[0] == 400


def test_api_get_one(api: Api) -> None:
    r = api.held()
    status, data, _ = api.call("GET", f"/api/approvals/{r.id}", api.token(*BOB))
    assert status == 200 and data["id"] == r.id and data["age"] == 0
    # unknown, or not yours to see: the same 404
    assert api.call("GET", "/api/approvals/ffff", api.token(*BOB))[0] == 404
    assert api.call("GET", f"/api/approvals/{r.id}", api.token(*MALLORY))[0] == 404
    status, data, _ = api.call("GET", "/api/approvals/whoami", api.token(*BOB))
    assert data == {"user": "bob", "groups": ["dba"]}


def test_api_approve_with_a_window(api: Api, hook: _HookServer) -> None:
    api.notifier = WebhookNotifier(hook.url, backoff=(0.01,))
    api.api = approval_routes(api.store, api.validator, api.notifier, clock=lambda: api.now)[
        "/api/approvals"
    ]
    r = api.held()
    status, data, _ = api.call(
        "POST", f"/api/approvals/{r.id}/approve", api.token(*BOB), {"reason": "ok", "for": "30m"}
    )
    assert status == 200, data
    assert data["status"] == "approved" and data["decider"] == "bob" and data["reason"] == "ok"
    assert data["window_until"] == pytest.approx(api.now + 1800)
    assert api.store.active_window("alice", r.rule, api.now + 1799) is not None
    assert api.notifier.flush(5)
    assert [doc["event"] for _, _, doc in hook.received] == ["decided"]
    # again: 409, naming the decider
    status, data, _ = api.call("POST", f"/api/approvals/{r.id}/approve", api.token(*CAROL))
    assert status == 409 and "already approved by bob" in data["error"]


def test_api_refusals(api: Api) -> None:
    r = api.held()
    url = f"/api/approvals/{r.id}"
    cases = [
        (api.token(*ALICE), "approve", None, 403, "only members of dba"),
        (api.token("alice", "dba"), "approve", None, 403, "own request"),
        (api.token(*MALLORY), "approve", None, 403, "only members of dba"),
        (api.token(*BOB), "deny", None, 400, "reason is required"),
        (api.token(*BOB), "deny", {"reason": "  "}, 400, "reason is required"),
        (api.token(*BOB), "deny", {"reason": "no", "for": "5m"}, 400, "window"),
        (api.token(*BOB), "approve", {"for": "sometime"}, 400, "invalid window"),
        (api.token(*BOB), "approve", {"reason": 5}, 400, "string"),
        (api.token(*BOB), "approve", b"not json", 400, "JSON object"),
        (api.token(*BOB), "approve", [1], 400, "JSON object"),
    ]
    for token, action, body, status, text_ in cases:
        got, data, _ = api.call("POST", f"{url}/{action}", token, body)
        assert (got, text_ in data["error"]) == (status, True), (action, body, data)
    assert api.store.get(r.id) == r  # nothing changed
    assert api.call("POST", "/api/approvals/ffff/approve", api.token(*BOB))[0] == 404
    got, _, response = api.call("GET", f"{url}/approve", api.token(*BOB))
    assert got == 405 and response.headers["Allow"] == "POST"
    assert api.call("POST", "/api/approvals", api.token(*BOB))[0] == 405
    assert api.call("GET", f"{url}/frobnicate", api.token(*BOB))[0] == 404


def test_api_deny(api: Api) -> None:
    r = api.held()
    status, data, _ = api.call(
        "POST", f"/api/approvals/{r.id}/deny", api.token(*BOB), {"reason": "not on a Friday"}
    )
    assert status == 200 and data["status"] == "denied" and data["reason"] == "not on a Friday"
    _, data, _ = api.call("GET", "/api/approvals?status=decided", api.token(*BOB))
    assert [d["id"] for d in data] == [r.id]
    _, data, _ = api.call("GET", "/api/approvals", api.token(*BOB))
    assert data == []


def test_api_decision_after_the_deadline_is_refused(api: Api) -> None:
    r = api.held()
    api.now += 301
    status, data, _ = api.call("POST", f"/api/approvals/{r.id}/approve", api.token(*BOB))
    assert status == 409 and "expired" in data["error"]
    # the pending list leaves it out; the holder expires it
    assert api.call("GET", "/api/approvals", api.token(*BOB))[1] == []


def test_api_listing_expires_requests_whose_holder_is_gone(api: Api) -> None:
    r = api.held()
    api.now += 300 + SWEEP_GRACE + 1
    _, data, _ = api.call("GET", "/api/approvals?status=all", api.token(*BOB))
    assert [(d["id"], d["status"]) for d in data] == [(r.id, "expired")]


def test_api_windows_list_and_revoke(api: Api) -> None:
    r = api.held()
    api.call("POST", f"/api/approvals/{r.id}/approve", api.token(*BOB), {"for": "1h"})
    status, data, _ = api.call("GET", "/api/approvals/windows", api.token(*CAROL))
    assert status == 200 and len(data) == 1
    window = data[0]
    assert window["user"] == "alice" and window["granted_by"] == "bob"
    assert window["request_id"] == r.id and window["approvers"] == ["dba"]
    assert len(api.call("GET", "/api/approvals/windows", api.token(*ALICE))[1]) == 1
    assert api.call("GET", "/api/approvals/windows", api.token(*MALLORY))[1] == []
    revoke = f"/api/approvals/windows/{window['id']}/revoke"
    assert api.call("POST", revoke, api.token(*ALICE))[0] == 403
    assert api.call("GET", revoke, api.token(*CAROL))[0] == 405
    status, data, _ = api.call("POST", revoke, api.token(*CAROL))
    assert status == 200 and data["revoked"] is True and data["revoked_by"] == "carol"
    assert api.call("POST", revoke, api.token(*CAROL))[0] == 409
    assert api.call("POST", "/api/approvals/windows/nope/revoke", api.token(*CAROL))[0] == 404
    assert api.call("GET", "/api/approvals/windows", api.token(*CAROL))[1] == []
    _, data, _ = api.call("GET", "/api/approvals/windows?active=0", api.token(*CAROL))
    assert len(data) == 1
    assert api.store.active_window("alice", r.rule, api.now) is None


def test_api_store_failure_is_503(api: Api) -> None:
    api.store.sql.engine.dispose()
    Path(api.store.sql.engine.url.database or "").unlink()
    Path(api.store.sql.engine.url.database or "").mkdir()  # now the database cannot open
    status, data, _ = api.call("GET", "/api/approvals", api.token(*BOB))
    assert status == 503 and data == {"error": "the approval store is unavailable"}


def test_page_is_self_contained_and_locked_down(api: Api) -> None:
    status, _, response = api.call("GET", "/approvals", handler=api.page)
    assert status == 200 and response.content_type.startswith("text/html")
    html = response.body.decode()
    csp = response.headers["Content-Security-Policy"]
    nonce = re.search(r"'nonce-([^']+)'", csp)
    assert nonce is not None and f'<script nonce="{nonce.group(1)}">' in html
    assert "default-src 'none'" in csp and "frame-ancestors 'none'" in csp
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    # no external assets; rendering never goes through innerHTML
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert "innerHTML" not in html and "outerHTML" not in html and "eval(" not in html
    for hook_id in ("token", "save-token", "pending-body", "recent-body", "windows-body"):
        assert f'id="{hook_id}"' in html
    assert '"approve-" + id' in html and '"data-request-id": id' in html
    assert "sessionStorage" in html and "setInterval(refresh, 2000)" in html
    other = api.call("GET", "/approvals", handler=api.page)[2]
    assert other.headers["Content-Security-Policy"] != csp  # a fresh nonce each time
    assert api.call("GET", "/approvals/", handler=api.page)[0] == 200
    assert api.call("GET", "/approvals/x", handler=api.page)[0] == 404
    assert api.call("POST", "/approvals", handler=api.page)[0] == 405
