"""Audit stores (SQLite and a real PostgreSQL), the JSON-lines sink, the writer, and the
query helpers behind ``pgguard audit search | tail | verify``.

Tampering is done the way an intruder would: SQL run directly against the store's tables.
"""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from pgguard.audit.chain import ZERO_HASH, ChainState, Link, seal, verify_stream
from pgguard.audit.query import (
    parse_time,
    render_table,
    search_store,
    search_text,
    table_name,
    tail,
    verify_jsonl,
    verify_store,
)
from pgguard.audit.records import JSON_KEYS, AuditRecord
from pgguard.audit.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    ChainConflictError,
    JsonlSink,
    SchemaError,
    SqlStore,
    StdoutSink,
    StoreError,
    open_stores,
    read_jsonl,
)
from pgguard.audit.writer import AuditQueueFull, AuditUnavailable, AuditWriter
from pgguard.embedded import EmbeddedError, EmbeddedPostgres

T0 = 1714564800.0  # 2024-05-01T12:00:00Z

# -- fixtures ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def embedded_pg() -> Iterator[EmbeddedPostgres]:
    """One private PostgreSQL for this module (a fresh database per test)."""
    try:
        pg = EmbeddedPostgres()
    except EmbeddedError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"no PostgreSQL server binaries: {exc}")
    pg.start()
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'audit.db'}"
    pg: EmbeddedPostgres = request.getfixturevalue("embedded_pg")
    name = "audit_" + uuid.uuid4().hex[:12]
    pg.psql(f"CREATE DATABASE {name}")
    return f"postgresql+psycopg://postgres:{pg.password}@127.0.0.1:{pg.port}/{name}"


@pytest.fixture
def store(url: str) -> Iterator[SqlStore]:
    s = SqlStore(url)
    try:
        yield s
    finally:
        s.close()


def sql(store: SqlStore, statement: str, **params: Any) -> list[Any]:
    """Run SQL directly against the store's database (as an intruder or a DBA would)."""
    with store.engine.connect() as conn, conn.begin():
        result = conn.execute(text(statement), params)
        return list(result) if result.returns_rows else []


def rec(k: int = 0, **overrides: Any) -> AuditRecord:
    base: dict[str, Any] = {
        "event": "statement",
        "ts": T0 + k,
        "session_id": f"s{k % 2}",
        "user": "alice",
        "groups": ("ai-agents",),
        "prompt_id": f"p{k % 3}",
        "prompt_source": "comment",
        "protocol": "simple",
        "statement": f"SELECT {k} FROM public.users",
        "fingerprint": f"fp{k % 2}",
        "class_": "read",
        "command": "SELECT",
        "objects": ("public.users",),
        "decision": "allow",
        "rows": k,
        "duration_ms": 0.5,
    }
    base.update(overrides)
    return AuditRecord(**base)


def sealed_chain(n: int, instance: str = "inst-a", start: int = 0) -> list[AuditRecord]:
    state = ChainState(instance)
    return [state.next(rec(start + k)) for k in range(n)]


def verify_ok(store: SqlStore) -> bool:
    ok, _report = verify_store(store)
    return ok


# -- schema --------------------------------------------------------------------------------


def test_schema_is_created_versioned_and_reopened(url: str) -> None:
    with SqlStore(url) as s:
        assert s.schema_version == SCHEMA_VERSION == len(MIGRATIONS)
        assert sql(s, "SELECT version FROM pgguard_schema") == [(SCHEMA_VERSION,)]
        s.append(sealed_chain(3))
    with SqlStore(url, migrate=False) as s:  # a read-only tool opens it as is
        assert s.count() == 3
        assert sql(s, "SELECT count(*) FROM pgguard_schema") == [(1,)]


def test_schema_newer_than_pgguard_is_refused(url: str) -> None:
    with SqlStore(url) as s:
        sql(s, "UPDATE pgguard_schema SET version = 99")
    with pytest.raises(SchemaError, match="schema version 99, newer"):
        SqlStore(url)


def test_missing_schema_without_migrate_is_refused(url: str) -> None:
    with pytest.raises(SchemaError, match="no pgguard audit schema"):
        SqlStore(url, migrate=False)


def test_concurrent_openers_create_the_schema_once(url: str) -> None:
    errors: list[BaseException] = []
    stores: list[SqlStore] = []

    def open_one() -> None:
        try:
            stores.append(SqlStore(url))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=open_one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sql(stores[0], "SELECT version FROM pgguard_schema") == [(SCHEMA_VERSION,)]
    for s in stores:
        s.close()


def test_indexes(store: SqlStore) -> None:
    from sqlalchemy import inspect

    names = {ix["name"]: ix for ix in inspect(store.engine).get_indexes("audit_records")}
    for column in ("ts", "username", "prompt_id", "decision", "fingerprint", "session_id"):
        assert f"audit_records_{column}" in names
    unique = names["audit_records_instance_seq"]
    assert unique["unique"] and unique["column_names"] == ["instance_id", "seq"]


def test_postgres_url_spellings_mean_psycopg(embedded_pg: EmbeddedPostgres) -> None:
    url = f"postgresql://postgres:{embedded_pg.password}@127.0.0.1:{embedded_pg.port}/postgres"
    with SqlStore(url) as s:
        assert s.url.startswith("postgresql+psycopg://")
        assert embedded_pg.password not in repr(s)
        # durability: an audit session never runs with synchronous_commit off
        assert sql(s, "SHOW synchronous_commit") == [("on",)]
    with SqlStore(url, fsync=False) as s:  # audit.sync: normal
        assert sql(s, "SHOW synchronous_commit") == [("off",)]


def test_sqlite_is_durable_wal(tmp_path: Path) -> None:
    with SqlStore(f"sqlite:///{tmp_path / 'audit.db'}") as store:
        assert sql(store, "PRAGMA journal_mode") == [("wal",)]
        assert sql(store, "PRAGMA synchronous") == [(2,)]  # FULL
        assert (tmp_path / "audit.db").stat().st_mode & 0o077 == 0  # private
    with pytest.raises(StoreError, match="missing"):
        SqlStore(f"sqlite:///{tmp_path / 'no' / 'such' / 'audit.db'}")


def test_audit_sync_normal_skips_the_flush_per_commit(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with SqlStore(f"sqlite:///{tmp_path / 'audit.db'}", fsync=False) as store:
        assert sql(store, "PRAGMA journal_mode") == [("wal",)]
        assert sql(store, "PRAGMA synchronous") == [(1,)]  # NORMAL
    synced: list[int] = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(fd))
    records = [seal(AuditRecord(event="statement", ts=1.0), "i", 1, ZERO_HASH)]
    JsonlSink(tmp_path / "normal.jsonl", fsync=False).append(records)
    assert synced == [] and (tmp_path / "normal.jsonl").read_text().count("\n") == 1
    JsonlSink(tmp_path / "full.jsonl").append(records)
    assert len(synced) == 1


# -- append, round trip, idempotence -------------------------------------------------------


def test_round_trip_of_every_field(store: SqlStore) -> None:
    tricky = rec(
        1,
        email="a@b.c",
        agent="cursor",
        client_addr="10.0.0.1:5",
        application_name="psql ✓",
        database="app",
        upstream_role="analyst",
        statement_name="s1",
        portal="",
        statement="SELECT '日本', '\x00', e'\\x01'",
        params=("1", None, "AAEC", "ünï"),
        masked_columns=("public.users.email",),
        sqlstate="42501",
        rule="no-secrets",
        approval_id="ap-1",
        rows=None,
        duration_ms=2,
        extra={"nested": {"a": [1, 2.5, None]}, "k": "v"},
        prompt_id="x" * 5000,  # capped, never unstorable
    )
    state = ChainState("inst-a")
    sealed = [state.next(tricky), state.next(rec(2, event="session_end", extra={}))]
    store.append(sealed)
    back = [r for _, r in store.chain()]
    assert back == sealed
    assert [r.to_json() for r in back] == [r.to_json() for r in sealed]
    assert verify_ok(store)


def test_append_is_one_transaction(store: SqlStore) -> None:
    chain = sealed_chain(3)
    bad = replace(chain[2], hash=None)
    with pytest.raises(ValueError):
        store.append([chain[0], chain[1], bad])
    assert store.count() == 0


def test_append_retry_after_a_lost_acknowledgement_is_idempotent(store: SqlStore) -> None:
    chain = sealed_chain(5)
    store.append(chain[:3])
    store.append(chain)  # the writer retries a batch whose first commit went through
    assert store.count() == 5 and verify_ok(store)
    forged = seal(rec(9, user="mallory"), "inst-a", 5, chain[3].hash or "")
    with pytest.raises(ChainConflictError, match="same instance id"):
        store.append([forged])


def test_last_link(store: SqlStore) -> None:
    assert store.last_link("inst-a") is None
    chain = sealed_chain(4)
    store.append(chain)
    store.append(sealed_chain(2, "inst-b"))
    assert store.last_link("inst-a") == Link(4, chain[-1].hash or "")
    assert store.instances() == ["inst-a", "inst-b"]


# -- tampering, detected by verify ---------------------------------------------------------


def _stored(store: SqlStore, n: int = 6) -> list[AuditRecord]:
    chain = sealed_chain(n)
    store.append(chain)
    store.append(sealed_chain(3, "inst-b"))  # an intact neighbour chain
    ok, report = verify_store(store)
    assert ok, report
    return chain


def _first_break(store: SqlStore) -> Any:
    ok, report = verify_store(store)
    assert not ok
    result = verify_stream(store.chain())
    assert [b.instance_id for b in result.breaks] == ["inst-a"], report
    return result.first, report


def test_verify_detects_an_edited_row(store: SqlStore) -> None:
    _stored(store)
    sql(
        store,
        "UPDATE audit_records SET statement = 'SELECT 1' WHERE instance_id = 'inst-a' AND seq = 3",
    )
    first, report = _first_break(store)
    assert (first.kind, first.seq, first.position) == ("edited", 3, 2)
    assert "BROKEN" in report and "edited" in report


def test_verify_detects_an_edited_timestamp_or_user(store: SqlStore) -> None:
    _stored(store)
    sql(store, "UPDATE audit_records SET ts = ts + 0.001 WHERE instance_id = 'inst-a' AND seq = 2")
    first, _ = _first_break(store)
    assert (first.kind, first.seq) == ("edited", 2)
    sql(store, "UPDATE audit_records SET ts = ts - 0.001 WHERE instance_id = 'inst-a' AND seq = 2")
    assert verify_ok(store)
    sql(store, "UPDATE audit_records SET username = 'bob' WHERE instance_id = 'inst-a' AND seq = 5")
    first, _ = _first_break(store)
    assert (first.kind, first.seq) == ("edited", 5)


def test_verify_detects_a_deleted_row(store: SqlStore) -> None:
    _stored(store)
    sql(store, "DELETE FROM audit_records WHERE instance_id = 'inst-a' AND seq = 4")
    first, report = _first_break(store)
    assert first.kind == "deleted" and "seq 4 missing" in first.reason
    assert "deleted" in report


def test_verify_detects_an_inserted_row(store: SqlStore) -> None:
    chain = _stored(store)
    # make room between the 3rd and 4th rows, then slip a forged one in
    third = sql(store, "SELECT id FROM audit_records WHERE instance_id = 'inst-a' AND seq = 3")
    pos = third[0][0]
    sql(store, "UPDATE audit_records SET id = id + 1000 WHERE id > :p", p=pos)
    sql(
        store,
        "INSERT INTO audit_records (id, event, ts, instance_id, seq, username, groups, params,"
        " objects, masked_columns, statement, decision, prev_hash, hash)"
        " VALUES (:id, 'statement', :ts, 'inst-a', 100, 'alice', '[]', '[]', '[]', '[]',"
        " 'SELECT 1', 'allow', :prev, :hash)",
        id=pos + 1,
        ts=T0,
        prev=chain[2].hash,
        hash="ab" * 32,
    )
    first, report = _first_break(store)
    assert (first.kind, first.ref, first.seq) == ("inserted", pos + 1, 100)
    assert "inserted" in report


def test_verify_detects_a_forged_copy(store: SqlStore) -> None:
    _stored(store)
    # a second, well-formed record under an existing seq (the intruder drops the index)
    sql(store, "DROP INDEX audit_records_instance_seq")
    sql(
        store,
        "INSERT INTO audit_records (event, ts, instance_id, seq, username, groups, params,"
        " objects, masked_columns, statement, prev_hash, hash)"
        " SELECT event, ts, instance_id, seq, 'mallory', groups, params, objects,"
        " masked_columns, statement, prev_hash, hash FROM audit_records"
        " WHERE instance_id = 'inst-a' AND seq = 2",
    )
    first, _ = _first_break(store)
    assert first.kind == "inserted"


def test_verify_detects_swapped_rows(store: SqlStore) -> None:
    _stored(store)
    ids = dict(sql(store, "SELECT seq, id FROM audit_records WHERE instance_id = 'inst-a'"))
    a, b = ids[2], ids[5]
    sql(store, "UPDATE audit_records SET id = -1 WHERE id = :a", a=a)
    sql(store, "UPDATE audit_records SET id = :a WHERE id = :b", a=a, b=b)
    sql(store, "UPDATE audit_records SET id = :b WHERE id = -1", b=b)
    first, report = _first_break(store)
    assert (first.kind, first.seq) == ("reordered", 5)
    assert "reordered" in report


def test_verify_detects_a_rewritten_and_rehashed_row(store: SqlStore) -> None:
    chain = _stored(store)
    forged = seal(rec(2, user="mallory"), "inst-a", 3, chain[1].hash or "")
    sql(
        store,
        "UPDATE audit_records SET username = 'mallory', hash = :h WHERE instance_id = 'inst-a'"
        " AND seq = 3",
        h=forged.hash,
    )
    first, _ = _first_break(store)
    assert (first.kind, first.seq) == ("edited", 3)


def test_verify_detects_a_truncated_tail_against_an_anchor(store: SqlStore) -> None:
    chain = _stored(store)
    anchors = {"inst-a": Link(6, chain[-1].hash or "")}  # e.g. the head a previous run printed
    assert verify_store(store, anchors)[0]
    sql(store, "DELETE FROM audit_records WHERE instance_id = 'inst-a' AND seq = 6")
    assert verify_ok(store)  # a shorter chain is still a valid chain...
    ok, report = verify_store(store, anchors)
    assert not ok and "missing" in report  # ...but not one that reaches the anchor


# -- search --------------------------------------------------------------------------------


def test_search_filters(store: SqlStore) -> None:
    state = ChainState("inst-a")
    rows = [
        rec(0),
        rec(1, user="bob", decision="deny", rule="no-secrets", objects=("vault.keys",)),
        rec(2, prompt_id="p-special", objects=("public.users", "public.orders")),
        rec(3, decision="approved", objects=("users",)),
        rec(4, event="session_start", statement=None, decision=None, objects=()),
        rec(5, objects=("public.users_archive",), fingerprint="fp-x"),
    ]
    store.append([state.next(r) for r in rows])

    def seqs(**kw: Any) -> list[int | None]:
        return [r.seq for r in store.search(**kw)]

    assert seqs() == [1, 2, 3, 4, 5, 6]
    assert seqs(user="bob") == [2]
    assert seqs(prompt_id="p-special") == [3]
    assert seqs(decision="deny") == [2]
    assert seqs(decision=["deny", "approved"]) == [2, 4]
    assert seqs(table="public.users") == [1, 3]
    assert seqs(table="users") == [1, 3, 4]  # a bare name: any schema, or unqualified
    assert seqs(table="vault.keys") == [2]
    assert seqs(table="use") == []  # whole names only
    assert seqs(fingerprint="fp-x") == [6]
    assert seqs(session_id="s1") == [2, 4, 6]
    assert seqs(event="session_start") == [5]
    assert seqs(since=T0 + 2, until=T0 + 4) == [3, 4]
    assert seqs(limit=2, order="desc") == [6, 5]
    assert seqs(user="alice", decision="allow", table="users") == [1, 3]
    assert seqs(user="nobody") == []
    assert seqs(instance_id="inst-a", limit=1) == [1]


def test_search_store_takes_cli_times(store: SqlStore) -> None:
    now = time.time()
    state = ChainState("inst-a")
    store.append(
        [state.next(rec(0, ts=now - 7200)), state.next(rec(1, ts=now - 60)), state.next(rec(2))]
    )
    assert [r.seq for r in search_store(store, since="1h", now=now)] == [2]
    assert [r.seq for r in search_store(store, since="3h", until="30s", now=now)] == [1, 2]
    assert [r.seq for r in search_store(store, until="2024-05-01T12:00:03Z")] == [3]
    # a limit keeps the newest, shown oldest first
    assert [r.seq for r in search_store(store, limit=2)] == [1, 2]
    assert [r.seq for r in search_store(store, limit=2, order="asc")] == [3, 1]


# -- tail ----------------------------------------------------------------------------------


def test_tail_shows_the_last_records_then_follows(store: SqlStore) -> None:
    state = ChainState("inst-a")
    store.append([state.next(rec(k)) for k in range(5)])
    assert [r.seq for r in tail(store, follow=False, last=2)] == [4, 5]
    follower = tail(store, last=1, poll_interval=0.01, idle_timeout=1.0)
    assert next(follower).seq == 5
    store.append([state.next(rec(k)) for k in range(5, 8)])
    assert [next(follower).seq for _ in range(3)] == [6, 7, 8]
    store.append([state.next(rec(8))])
    assert next(follower).seq == 9
    assert list(follower) == []  # stops after idle_timeout without news


def test_tail_from_an_empty_store_and_late_commits(store: SqlStore) -> None:
    follower = tail(store, poll_interval=0.01, idle_timeout=1.0, hole_timeout=5.0)
    # row id 2 commits after row id 3 (two replicas' transactions): tail still shows it
    sql(
        store,
        "INSERT INTO audit_records (id, event, ts, instance_id, seq, groups, params, objects,"
        " masked_columns, prev_hash, hash) VALUES (1, 'statement', 1, 'x', 1, '[]', '[]', '[]',"
        " '[]', :z, 'h1'), (3, 'statement', 3, 'x', 3, '[]', '[]', '[]', '[]', 'h2', 'h3')",
        z=ZERO_HASH,
    )
    assert [next(follower).seq for _ in range(2)] == [1, 3]
    sql(
        store,
        "INSERT INTO audit_records (id, event, ts, instance_id, seq, groups, params, objects,"
        " masked_columns, prev_hash, hash) VALUES (2, 'statement', 2, 'x', 2, '[]', '[]', '[]',"
        " '[]', 'h1', 'h2')",
    )
    assert next(follower).seq == 2
    assert list(follower) == []


# -- the writer: strict mode ---------------------------------------------------------------


class Durable:
    """Collects on_durable results (called from the writer thread)."""

    def __init__(self) -> None:
        self.results: dict[int, BaseException | None] = {}
        self.done = threading.Condition()

    def cb(self, key: int, check: Callable[[], None] | None = None) -> Callable[[Any], None]:
        def callback(error: BaseException | None) -> None:
            if check is not None and error is None:
                check()
            with self.done:
                self.results[key] = error
                self.done.notify_all()

        return callback

    def wait(self, keys: range | list[int], timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        with self.done:
            while not all(k in self.results for k in keys):
                left = deadline - time.monotonic()
                assert left > 0, f"on_durable not called for {set(keys) - set(self.results)}"
                self.done.wait(left)


def test_strict_acknowledges_after_commit(store: SqlStore) -> None:
    durable = Durable()
    seen_in_store: list[bool] = []
    with AuditWriter([store], mode="strict", instance_id="inst-a") as writer:
        for k in range(50):

            def check(k: int = k) -> None:
                # called only once the record is committed: another connection sees it
                seen_in_store.append(bool(store.search(session_id=f"sess-{k}")))

            writer.submit(rec(k, session_id=f"sess-{k}"), durable.cb(k, check))
        durable.wait(range(50))
        assert all(v is None for v in durable.results.values())
        assert seen_in_store == [True] * 50
        assert writer.written == 50 and writer.errors == 0 and writer.dropped == 0
        assert writer.batches <= 50  # group commit
    records = [r for _, r in store.chain()]
    assert [r.seq for r in records] == list(range(1, 51))
    assert all(r.instance_id == "inst-a" for r in records)
    assert verify_ok(store)


def test_strict_store_failure_then_recovery_loses_nothing(store: SqlStore) -> None:
    durable = Durable()
    writer = AuditWriter([store], mode="strict", instance_id="inst-a", retry_max=0.1)
    try:
        for k in range(3):
            writer.submit(rec(k), durable.cb(k))
        durable.wait(range(3))
        assert writer.healthy
        sql(store, "ALTER TABLE audit_records RENAME TO audit_records_away")  # the store fails
        for k in range(3, 6):
            writer.submit(rec(k), durable.cb(k))
        durable.wait(range(3, 6))
        assert all(isinstance(durable.results[k], AuditUnavailable) for k in range(3, 6))
        assert not writer.healthy and writer.errors >= 1 and writer.last_error is not None
        # while failing, a new statement is refused at once; its record still waits
        writer.submit(rec(6), durable.cb(6))
        durable.wait([6], timeout=1.0)
        assert isinstance(durable.results[6], AuditUnavailable)
        assert writer.depth == 4
        sql(store, "ALTER TABLE audit_records_away RENAME TO audit_records")  # it recovers
        assert writer.flush(20.0)
        assert writer.healthy and writer.depth == 0
        writer.submit(rec(7), durable.cb(7))
        durable.wait([7])
        assert durable.results[7] is None
    finally:
        writer.close()
    records = [r for _, r in store.chain()]
    assert [r.seq for r in records] == list(range(1, 9))
    assert [r.rows for r in records] == list(range(8))  # every record, in submission order
    assert verify_ok(store)


class FlakyStore:
    """Wraps a store; fails ``fail`` times (after optionally committing: a lost ack)."""

    def __init__(self, inner: Any, fail: int, commit_first: bool = False) -> None:
        self.inner, self.fail, self.commit_first = inner, fail, commit_first
        self.calls = 0

    def append(self, records: Any) -> None:
        self.calls += 1
        if self.fail > 0:
            self.fail -= 1
            if self.commit_first:
                self.inner.append(records)
            raise OSError("connection lost")
        self.inner.append(records)

    def last_link(self, instance_id: str) -> Link | None:
        return self.inner.last_link(instance_id)  # type: ignore[no-any-return]

    def close(self) -> None:
        self.inner.close()


def test_strict_retry_after_a_lost_commit_acknowledgement(store: SqlStore) -> None:
    flaky = FlakyStore(store, fail=2, commit_first=True)
    durable = Durable()
    with AuditWriter([flaky], instance_id="inst-a", retry_initial=0.01) as writer:
        writer.submit(rec(0), durable.cb(0))
        durable.wait([0])
        assert isinstance(durable.results[0], AuditUnavailable)
        assert writer.flush(10.0)
    assert store.count() == 1 and verify_ok(store)


def test_several_stores_each_get_every_record_once(store: SqlStore, tmp_path: Path) -> None:
    jsonl = JsonlSink(tmp_path / "audit.jsonl")
    flaky_jsonl = FlakyStore(jsonl, fail=2)
    with AuditWriter([store, flaky_jsonl], instance_id="inst-a", retry_initial=0.01) as w:
        for k in range(20):
            w.submit(rec(k))
        assert w.flush(10.0)
    jsonl.close()
    assert store.count() == 20
    lines = list(read_jsonl(tmp_path / "audit.jsonl"))
    assert [r.seq for _, r in lines] == list(range(1, 21))
    assert verify_ok(store)
    ok, report = verify_jsonl(tmp_path / "audit.jsonl")
    assert ok, report


def test_restart_continues_the_chain(store: SqlStore) -> None:
    for run in range(3):
        with AuditWriter([store], instance_id="inst-a") as w:
            for k in range(4):
                w.submit(rec(10 * run + k))
            assert w.flush(10.0)
    with AuditWriter([store], instance_id="inst-b") as w:
        w.submit(rec(99))
        assert w.flush(10.0)
    a = [r for _, r in store.chain("inst-a")]
    assert [r.seq for r in a] == list(range(1, 13))
    assert all(b.prev_hash == x.hash for x, b in itertools.pairwise(a))
    assert store.last_link("inst-b") == Link(1, store.search(instance_id="inst-b")[0].hash or "")
    assert verify_ok(store)


def test_strict_queue_full_refuses(tmp_path: Path) -> None:
    gate, entered = threading.Event(), threading.Event()
    blocking = GatedStore(gate, entered)
    durable = Durable()
    writer = AuditWriter([blocking], instance_id="i", queue_size=2)
    try:
        writer.submit(rec(0), durable.cb(0))
        assert entered.wait(5)
        for k in range(1, 5):
            writer.submit(rec(k), durable.cb(k))
        durable.wait([3, 4], timeout=1.0)
        assert isinstance(durable.results[3], AuditQueueFull)
        assert writer.dropped == 2
    finally:
        gate.set()
        writer.close()
    assert [r.seq for r in blocking.records] == [1, 2, 3]


# -- the writer: buffered mode -------------------------------------------------------------


class GatedStore:
    """A store whose append waits for ``gate``."""

    def __init__(self, gate: threading.Event, entered: threading.Event) -> None:
        self.gate, self.entered = gate, entered
        self.records: list[AuditRecord] = []

    def append(self, records: Any) -> None:
        self.entered.set()
        assert self.gate.wait(30)
        self.records.extend(records)

    def last_link(self, instance_id: str) -> Link | None:
        return None

    def close(self) -> None:
        pass


def test_buffered_never_blocks_and_counts_drops() -> None:
    gate, entered = threading.Event(), threading.Event()
    store = GatedStore(gate, entered)
    acks: list[BaseException | None] = []
    writer = AuditWriter([store], mode="buffered", instance_id="i", queue_size=10)
    try:
        writer.submit(rec(0), acks.append)
        assert entered.wait(5)  # the writer is stuck in the store
        started = time.perf_counter()
        for k in range(1, 31):
            writer.submit(rec(k), acks.append)
        elapsed = time.perf_counter() - started
        assert elapsed < 0.5  # never waits for the store
        assert acks == [None] * 31  # acknowledged at once, even when dropped
        assert writer.dropped == 20 and writer.depth == 11
    finally:
        gate.set()
    assert writer.flush(10.0)
    writer.close()
    assert [r.seq for r in store.records] == list(range(1, 12))
    assert writer.written == 11 and writer.depth == 0


def test_buffered_flush_and_close_write_everything(store: SqlStore) -> None:
    writer = AuditWriter([store], mode="buffered", instance_id="inst-a")
    for k in range(300):
        writer.submit(rec(k))
    assert writer.close(timeout=20.0)
    assert store.count() == 300 and verify_ok(store)
    acks: list[BaseException | None] = []
    writer.submit(rec(0), acks.append)  # after close: not written, never blocks
    assert acks == [None] and writer.dropped == 1


def test_flush_under_load_waits_only_for_earlier_records(store: SqlStore) -> None:
    stop = threading.Event()
    with AuditWriter([store], mode="buffered", instance_id="inst-a") as writer:

        def pump() -> None:
            k = 0
            while not stop.is_set():
                writer.submit(rec(k))
                k += 1
                time.sleep(0.0005)

        thread = threading.Thread(target=pump)
        thread.start()
        try:
            time.sleep(0.1)
            before = writer.submitted
            assert writer.flush(10.0)  # returns although records keep coming
            assert writer.written >= before
        finally:
            stop.set()
            thread.join()
    assert verify_ok(store)


def test_close_gives_up_on_a_dead_store() -> None:
    durable = Durable()
    dead = FlakyStore(None, fail=10**9)
    writer = AuditWriter([dead], instance_id="i", retry_initial=0.01, retry_max=0.02)
    writer.submit(rec(0), durable.cb(0))
    durable.wait([0])
    assert not writer.close(timeout=0.3)
    assert writer.dropped == 1


# -- a crash in strict mode ----------------------------------------------------------------

CHILD = """
import sys, time
from pgguard.audit.store import SqlStore
from pgguard.audit.writer import AuditWriter
from pgguard.audit.records import AuditRecord

store = SqlStore(sys.argv[1])
writer = AuditWriter([store], mode="strict", instance_id="crash")
k = 0
while True:
    key = k
    def ack(err, key=key):
        if err is None:
            sys.stdout.write(f"{key}\\n")
            sys.stdout.flush()
    writer.submit(AuditRecord(event="statement", ts=time.time(), statement=f"k={key}"), ack)
    k += 1
    if k % 50 == 0:
        time.sleep(0.005)
"""


def test_kill_9_in_strict_mode_loses_no_acknowledged_record(url: str) -> None:
    SqlStore(url).close()  # schema first, so the child starts writing at once
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen(
        [sys.executable, "-c", CHILD, url], stdout=subprocess.PIPE, text=True, env=env
    )
    acked: list[int] = []
    assert proc.stdout is not None
    try:
        for line in proc.stdout:
            acked.append(int(line))
            if len(acked) >= 500:
                break
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    assert len(acked) >= 500
    with SqlStore(url) as s:
        stored = {r.statement for _, r in s.chain("crash")}
        assert {f"k={k}" for k in acked} <= stored
        assert verify_ok(s)
        with AuditWriter([s], instance_id="crash") as w:  # the restarted instance goes on
            w.submit(rec(0))
            assert w.flush(10.0)
        assert verify_ok(s)
        assert s.last_link("crash") == Link(len(stored) + 1, s.last(1)[0][1].hash or "")


# -- JSON lines ----------------------------------------------------------------------------


def test_jsonl_sink_contents(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path)
    chain = sealed_chain(3)
    sink.append(chain[:2])
    sink.append(chain[2:])
    lines = path.read_text().splitlines()
    assert len(lines) == 3
    objects = [json.loads(line) for line in lines]
    assert all(tuple(o) == JSON_KEYS for o in objects)
    assert objects[0]["ts"] == "2024-05-01T12:00:00.000000Z" and objects[0]["class"] == "read"
    assert [AuditRecord.from_json(o) for o in objects] == chain
    assert sink.last_link("inst-a") == Link(3, chain[-1].hash or "")
    assert sink.last_link("other") is None
    assert path.stat().st_mode & 0o077 == 0
    sink.close()
    ok, report = verify_jsonl(path)
    assert ok, report
    # tamper with a line: verify names it by line number
    objects[1]["user"] = "mallory"
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    ok, report = verify_jsonl(path)
    assert not ok and "store position 2" in report and "edited" in report


def test_jsonl_last_link_reads_backwards_through_big_files(tmp_path: Path) -> None:
    path = tmp_path / "big.jsonl"
    sink = JsonlSink(path)
    a = sealed_chain(400, "inst-a")
    sink.append(a)
    sink.append(sealed_chain(400, "inst-b"))
    assert sink.last_link("inst-a") == Link(400, a[-1].hash or "")
    sink.close()


def test_jsonl_failed_batch_is_cut_off_and_not_duplicated(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    sink = JsonlSink(path)
    chain = sealed_chain(4)
    sink.append(chain[:2])
    real_fsync = os.fsync
    failures = [OSError("disk full")]

    def flaky_fsync(fd: int) -> None:
        if failures:
            raise failures.pop()
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", flaky_fsync)
    with pytest.raises(OSError):
        sink.append(chain[2:])
    assert len(path.read_text().splitlines()) == 2  # the failed batch was cut off
    sink.append(chain[2:])  # the retry
    sink.close()
    assert [r.seq for _, r in read_jsonl(path)] == [1, 2, 3, 4]


def test_stdout_sink(capsys: pytest.CaptureFixture[str]) -> None:
    sink = StdoutSink()
    sink.append(sealed_chain(2))
    out = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["seq"] for line in out] == [1, 2]
    assert sink.last_link("inst-a") is None
    kinds = [type(s).__name__ for s in open_stores(None, "-")]
    assert kinds == ["StdoutSink"]


# -- query helpers -------------------------------------------------------------------------


def test_parse_time() -> None:
    assert parse_time("1h", now=10_000.0) == 6400.0
    assert parse_time("90s", now=100.0) == 10.0
    assert parse_time("now", now=5.0) == 5.0
    assert parse_time("2024-05-01T12:00:00Z") == T0
    assert parse_time("2024-05-01 14:00:00+02:00") == T0
    assert parse_time("2024-05-01") == T0 - 12 * 3600
    assert parse_time(None) is None
    with pytest.raises(ValueError, match="not a time"):
        parse_time("last tuesday")


def test_search_text_table_and_json() -> None:
    hostile = rec(5, statement="SELECT 1;\n\x1b[2J-- \u202eevil", user="b\x07ob")
    failure = rec(6, event="auth_failure", statement=None, extra={"reason": "bad token"})
    records = [*sealed_chain(2), seal(hostile, "x", 1, ZERO_HASH), seal(failure, "x", 2, "0" * 64)]
    table = render_table(records, width=160)
    assert "\x1b" not in table and "\u202e" not in table and "\x07" not in table
    assert "\\x1b[2J" in table and "\\u202e" in table and "b\\x07ob" in table
    assert "(auth_failure)" in table and "reason=bad token" in table
    assert table.rstrip().endswith("(4 records)")
    assert max(len(line) for line in table.splitlines()) <= 160
    narrow = render_table(records, width=100)  # the statement column gives way (down to 20)
    assert "\u2026" in narrow
    assert max(map(len, narrow.splitlines())) < max(map(len, table.splitlines()))
    lines = search_text(records, as_json=True).splitlines()
    assert [AuditRecord.from_json(json.loads(line)) for line in lines] == records
    assert "\x1b" not in "".join(lines) and "\u202e" not in "".join(lines)
    assert search_text([], as_json=True) == ""
    assert "(0 records)" in search_text([])


def test_verify_store_report(store: SqlStore) -> None:
    store.append(sealed_chain(3))
    ok, report = verify_store(store)
    assert ok and report.startswith("OK:") and "3 record(s)" in report
    assert "inst-a" in report


@pytest.mark.parametrize(
    ("given", "named"),
    [
        ("public.CUSTOMERS", "public.customers"),
        ("Orders", "orders"),
        ('"Sales"."Q1"', "Sales.Q1"),
        ('public."Odd""Name"', 'public.Odd"Name'),
    ],
)
def test_a_table_filter_is_read_as_sql_reads_names(given: str, named: str) -> None:
    assert table_name(given) == named


def test_search_by_table_folds_an_unquoted_name(tmp_path: Path) -> None:
    store = SqlStore(f"sqlite:///{tmp_path / 'a.db'}")
    state = ChainState("i")
    store.append(
        [
            state.next(AuditRecord("statement", 1.0, objects=("public.customers",))),
            state.next(AuditRecord("statement", 2.0, objects=("public.Customers",))),
        ]
    )
    found = search_store(store, table="public.CUSTOMERS")
    assert [r.objects for r in found] == [("public.customers",)]
    assert [r.objects for r in search_store(store, table='public."Customers"')] == [
        ("public.Customers",)
    ]
    store.close()
