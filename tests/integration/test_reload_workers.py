"""SIGHUP reloads the policy in every worker (``workers: 2``), tested with real processes.

The gateway also polls its policy files for changes (every 2 s, by path, mtime and size) and
there is no setting to turn that off. To prove that the *signal* reloads the policy, the new
policy is written with the same size and the old modification time restored: the watcher sees
nothing, so only SIGHUP can make it take effect. The log must then show the SIGHUP line of
each worker and no "policy files changed" line.

Which worker served a connection is read from the audit trail: each worker writes its own
hash chain, named ``host:port:worker`` (``audit.instance_id`` unset), and strict mode makes a
statement's record durable before its result reaches the client.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families
from psycopg import errors

from tests.support.gateway import Gateway, MakeGateway, readyz
from tests.support.procmem import child_pids

RULE = "no-deletes-after-reload"
MESSAGE = "deletes are off since the reload"
ALLOW_ALL = "version: 1\ndefaults: {action: allow}\n"
DENY_DELETES = f"""\
version: 1
defaults: {{action: allow}}
rules:
  - name: {RULE}
    match: {{commands: [DELETE]}}
    action: deny
    message: {MESSAGE}
"""
SIGHUP_EVENT = "SIGHUP: reloading the policy"
WATCHER_EVENT = "policy files changed: reloading"
MAX_CONNECTIONS = 40  # per phase; SO_REUSEPORT spreads them, two workers are reached quickly


def padded(text: str, size: int) -> str:
    """``text`` with a trailing YAML comment, ``size`` bytes in all."""
    missing = size - len(text.encode())
    assert missing >= 2, "the padding target is too small"
    return text + "#" * (missing - 1) + "\n"


POLICY_SIZE = max(len(ALLOW_ALL), len(DENY_DELETES)) + 16


def rewrite_unseen(path: Path, text: str) -> None:
    """Replace ``path``'s content keeping its size and modification time, so that the
    gateway's file watcher (which compares path, mtime and size) cannot notice."""
    before = path.stat()
    data = text.encode()
    assert len(data) == before.st_size
    path.write_bytes(data)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    after = path.stat()
    assert (after.st_mtime, after.st_size) == (before.st_mtime, before.st_size)


# --------------------------------------------------------------------------- reading the trail


def audit_records(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        if line.strip():
            records.append(json.loads(line))
    return records


def worker_of(instance_id: str) -> str:
    """The worker number at the end of the default instance id ``host:port:worker``."""
    return instance_id.rsplit(":", 1)[1]


def log_events(gw: Gateway) -> list[dict[str, Any]]:
    """The gateway's JSON log lines (anything else, such as a traceback, is skipped)."""
    events = []
    for line in gw.read_log().splitlines():
        if line.startswith("{"):
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
    return events


def wait_until(check: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def metric(gw: Gateway, name: str, **labels: str) -> float:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", gw.admin_port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        body = conn.getresponse().read().decode()
    finally:
        conn.close()
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return 0.0


# --------------------------------------------------------------------------- the test


@pytest.fixture
def connections() -> Iterator[list[psycopg.Connection[Any]]]:
    conns: list[psycopg.Connection[Any]] = []
    yield conns
    for conn in conns:
        conn.close()


def test_sighup_reloads_the_policy_in_every_worker(
    make_gateway: MakeGateway,
    tmp_path: Path,
    connections: list[psycopg.Connection[Any]],
) -> None:
    policy = tmp_path / "policy.yaml"
    policy.write_text(padded(ALLOW_ALL, POLICY_SIZE))
    trail = tmp_path / "audit.jsonl"
    # Both workers have installed their signal handlers once they logged that they listen
    # (the handler is set up right after that line, with no await in between).
    gw, _ = start_two_workers(make_gateway, policy, trail)
    assert gw.proc is not None

    def served_by(tag: str) -> set[str]:
        """Workers whose audit trail holds a statement of the connection tagged ``tag``."""
        return {
            worker_of(r["instance_id"])
            for r in audit_records(trail)
            if r.get("event") == "statement" and r.get("application_name") == tag
        }

    # Before: deletes are allowed, on connections that reach both workers.
    before: dict[str, psycopg.Connection[Any]] = {}  # worker -> an open connection it serves
    for i in range(MAX_CONNECTIONS):
        tag = f"before-{i}"
        conn = psycopg.connect(gw.dsn(f"user{i}", application_name=tag), autocommit=True)
        connections.append(conn)
        conn.execute("create temp table t (x int)")
        conn.execute("insert into t values (1)")
        assert conn.execute("delete from t").rowcount == 1
        (worker,) = served_by(tag)
        before.setdefault(worker, conn)
        if len(before) == 2:
            break
    assert set(before) == {"0", "1"}, f"every connection went to worker(s) {sorted(before)}"
    allowed_before = sum(
        1
        for r in audit_records(trail)
        if r.get("command") == "DELETE" and r.get("decision") == "allow"
    )
    assert allowed_before >= 2
    assert not [e for e in log_events(gw) if e.get("event") in (SIGHUP_EVENT, WATCHER_EVENT)]
    assert not [r for r in audit_records(trail) if r.get("event") == "policy_reload"]

    # Reload: a deny rule, written so that only SIGHUP can bring it in.
    rewrite_unseen(policy, padded(DENY_DELETES, POLICY_SIZE))
    time.sleep(2.5)  # one watcher poll: it must not reload (nothing it looks at changed)
    for conn in before.values():
        conn.execute("insert into t values (2)")
        assert conn.execute("delete from t").rowcount == 1, "the policy changed without SIGHUP"
    gw.proc.send_signal(signal.SIGHUP)

    def reloads() -> dict[str, dict[str, Any]]:
        return {
            worker_of(r["instance_id"]): r
            for r in audit_records(trail)
            if r.get("event") == "policy_reload"
        }

    wait_until(lambda: set(reloads()) == {"0", "1"}, "a policy_reload record from each worker")
    for worker, record in reloads().items():
        assert record["extra"]["applied"] is True, (worker, record)
        assert record["extra"]["errors"] == [], (worker, record)
    sighups = [e for e in log_events(gw) if e.get("event") == SIGHUP_EVENT]
    assert sorted(int(e["worker"]) for e in sighups) == [0, 1], sighups
    assert not [e for e in log_events(gw) if e.get("event") == WATCHER_EVENT]
    assert gw.running

    # Sessions opened before the reload, on both workers, are judged by the new policy.
    refused = 0
    for conn in before.values():
        conn.execute("insert into t values (3)")
        with pytest.raises(errors.InsufficientPrivilege) as info:
            conn.execute("delete from t")
        assert str(info.value).startswith(f"pgguard: {RULE}: {MESSAGE}"), str(info.value)
        refused += 1
        assert conn.execute("select count(*) from t").fetchone() == (1,)  # the session goes on

    # New connections, enough to reach both workers: every one is refused by the new rule.
    after: set[str] = set()
    for i in range(MAX_CONNECTIONS):
        tag = f"after-{i}"
        conn = psycopg.connect(gw.dsn(f"late{i}", application_name=tag), autocommit=True)
        connections.append(conn)
        conn.execute("create temp table t (x int)")
        conn.execute("insert into t values (1)")
        with pytest.raises(errors.InsufficientPrivilege) as info:
            conn.execute("delete from t")
        assert str(info.value).startswith(f"pgguard: {RULE}: {MESSAGE}"), str(info.value)
        refused += 1
        assert conn.execute("select count(*) from t").fetchone() == (1,)
        after |= served_by(tag)
        if after == {"0", "1"}:
            break
    assert after == {"0", "1"}, f"every new connection went to worker(s) {sorted(after)}"

    # The audit trail names the rule for each refusal, from both workers' chains.
    denied = [
        r
        for r in audit_records(trail)
        if r.get("command") == "DELETE" and r.get("decision") == "deny"
    ]
    assert len(denied) == refused
    assert {r.get("rule") for r in denied} == {RULE}
    assert {worker_of(r["instance_id"]) for r in denied} == {"0", "1"}

    # /metrics (totals across the workers) counts the refusals.
    wait_until(
        lambda: (
            metric(gw, "pgguard_statements_total", **{"class": "write", "decision": "deny"})
            == refused
        ),
        f"/metrics to count {refused} denied writes",
    )


# --------------------------------------------------------------------------- replaced workers


def start_two_workers(
    make_gateway: MakeGateway, policy: Path, trail: Path
) -> tuple[Gateway, set[int]]:
    gw = make_gateway(
        workers=2,
        policies=[str(policy)],
        audit={"url": None, "jsonl": str(trail), "mode": "strict"},
        log={"format": "json", "level": "info"},
    )
    assert gw.proc is not None
    parent = gw.proc.pid
    wait_until(
        lambda: (
            sum(1 for e in log_events(gw) if str(e.get("event")).startswith("pgguard lis")) == 2
            and len(child_pids(parent)) == 2
        ),
        "both workers to listen",
    )
    return gw, child_pids(parent)


def kill_a_worker(gw: Gateway, workers: set[int]) -> str:
    """kill -9 one worker; the id of the worker it was (from the parent's log)."""
    victim = min(workers)
    os.kill(victim, signal.SIGKILL)
    prefix = f"(pid {victim}) was killed by SIGKILL"
    wait_until(
        lambda: any(prefix in str(e.get("event")) for e in log_events(gw)),
        "the parent to notice the dead worker",
    )
    (event,) = [str(e["event"]) for e in log_events(gw) if prefix in str(e.get("event"))]
    return event.split()[1]


def test_a_replaced_worker_serves_the_policy_in_force(
    make_gateway: MakeGateway, tmp_path: Path, connections: list[psycopg.Connection[Any]]
) -> None:
    """A worker that replaces a dead one loads the policy files as they are now, not the
    policy the parent started with: here only SIGHUP brought the new rule in (the file watch
    cannot see it), so the start-up policy would let DELETE through."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(padded(ALLOW_ALL, POLICY_SIZE))
    trail = tmp_path / "audit.jsonl"
    gw, workers = start_two_workers(make_gateway, policy, trail)
    assert gw.proc is not None
    rewrite_unseen(policy, padded(DENY_DELETES, POLICY_SIZE))
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: len([r for r in audit_records(trail) if r.get("event") == "policy_reload"]) == 2,
        "a policy_reload record from each worker",
    )
    worker_id = kill_a_worker(gw, workers)
    wait_until(
        lambda: any(
            str(e.get("event")).startswith(f"worker {worker_id} restarted") for e in log_events(gw)
        ),
        "the replacement",
    )

    # New connections until the replacement serves one: every one refuses DELETE.
    served: set[str] = set()
    for i in range(MAX_CONNECTIONS):
        tag = f"after-restart-{i}"
        conn = psycopg.connect(gw.dsn(f"user{i}", application_name=tag), autocommit=True)
        connections.append(conn)
        conn.execute("create temp table t (x int)")
        with pytest.raises(errors.InsufficientPrivilege) as info:
            conn.execute("delete from t")
        assert str(info.value).startswith(f"pgguard: {RULE}: {MESSAGE}"), str(info.value)
        served |= {
            worker_of(r["instance_id"])
            for r in audit_records(trail)
            if r.get("application_name") == tag
        }
        if worker_id in served:
            break
    assert worker_id in served, f"the replacement served none of {MAX_CONNECTIONS} connections"


def test_an_invalid_policy_keeps_a_dead_worker_down_until_fixed(
    make_gateway: MakeGateway, tmp_path: Path
) -> None:
    """After a failed reload the gateway stays ready (the old policy is in force) and says
    so in /readyz and /metrics; a worker that dies meanwhile is not started with a policy
    that does not load, but tried again with back-off until the files are fixed."""
    policy = tmp_path / "policy.yaml"
    policy.write_text(DENY_DELETES)
    trail = tmp_path / "audit.jsonl"
    gw, workers = start_two_workers(make_gateway, policy, trail)
    assert gw.proc is not None
    assert metric(gw, "pgguard_policy_reload_failed") == 0

    policy.write_text("version: 1\nrules: [{name: broken, action: explode}]\n")
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(
        lambda: (
            len(
                [
                    r
                    for r in audit_records(trail)
                    if r.get("event") == "policy_reload" and not r["extra"]["applied"]
                ]
            )
            >= 2
        ),
        "both workers to refuse the reload",
    )
    wait_until(lambda: metric(gw, "pgguard_policy_reload_failed") == 1, "the reload gauge")
    status, ready = readyz(gw)
    assert status == 200, ready
    assert ready["failed"] == []
    assert ready["checks"]["policies"].startswith("ok (reload failed: ")

    worker_id = kill_a_worker(gw, workers)
    cannot = f"cannot start worker {worker_id}: the policy is invalid"
    wait_until(
        lambda: sum(1 for e in log_events(gw) if str(e.get("event")).startswith(cannot)) >= 2,
        "two refused restarts",
    )
    assert gw.proc is not None and len(child_pids(gw.proc.pid)) == 1
    # The surviving worker still refuses DELETE: the policy in force did not change.
    with psycopg.connect(gw.dsn("alice"), autocommit=True) as conn:
        conn.execute("create temp table t (x int)")
        with pytest.raises(errors.InsufficientPrivilege):
            conn.execute("delete from t")

    policy.write_text(DENY_DELETES + "# fixed\n")
    wait_until(
        lambda: any(
            str(e.get("event")).startswith(f"worker {worker_id} restarted") for e in log_events(gw)
        ),
        "the replacement once the policy is fixed",
        timeout=20,
    )
    wait_until(lambda: len(child_pids(gw.proc.pid)) == 2, "two workers again")
    wait_until(lambda: metric(gw, "pgguard_policy_reload_failed") == 0, "the gauge to clear")
    assert readyz(gw)[1]["checks"]["policies"] == "ok"
