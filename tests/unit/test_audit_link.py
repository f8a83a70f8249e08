"""The pipe to the audit writer process: frames, the wire forms of runs and sessions, the
tickets strict statements wait on, the records the writer builds, and the writer process's
loop (run in a thread over a socket pair, writing to a real SQLite store)."""

from __future__ import annotations

import json
import pickle
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgguard.audit import link
from pgguard.audit.chain import verify_stream
from pgguard.audit.daemon import Daemon
from pgguard.audit.events import (
    Fingerprints,
    RecordBuilder,
    RecordOptions,
    Redactions,
    SessionContext,
)
from pgguard.audit.recording import RecordedError, RecordedStatement
from pgguard.audit.records import AuditRecord
from pgguard.audit.store import JsonlSink, SqlStore
from pgguard.audit.text import fingerprint
from pgguard.identity import Identity
from pgguard.protocol.statements import StatementRun

# -- frames ---------------------------------------------------------------------------------

messages = st.lists(
    st.tuples(
        st.sampled_from([link.RECORD, link.STATEMENT, link.DURABLE]),
        st.integers(0, 2**40),
        st.text(max_size=40),
        st.binary(max_size=40),
    ),
    max_size=6,
)


@settings(max_examples=200, deadline=None)
@given(frames=st.lists(messages, max_size=5), cuts=st.lists(st.integers(1, 50), max_size=30))
def test_frames_survive_any_split(frames: list[list[Any]], cuts: list[int]) -> None:
    stream = b"".join(link.encode_frame(f) for f in frames)
    reader = link.FrameReader()
    got: list[Any] = []
    pos = 0
    for cut in cuts:
        got.extend(reader.feed(stream[pos : pos + cut]))
        pos += cut
    got.extend(reader.feed(stream[pos:]))
    assert got == [m for f in frames for m in f]
    assert reader.pending == 0


def test_frame_errors_are_reported() -> None:
    with pytest.raises(link.LinkError, match="frame of"):
        link.FrameReader().feed((link.MAX_FRAME + 1).to_bytes(4, "big"))
    body = pickle.dumps({"not": "a list"})
    with pytest.raises(link.LinkError, match="not a list"):
        link.FrameReader().feed(len(body).to_bytes(4, "big") + body)
    with pytest.raises(link.LinkError, match="unreadable"):
        link.FrameReader().feed(b"\x00\x00\x00\x03abc")


# -- wire forms -----------------------------------------------------------------------------


def a_run(**changes: Any) -> StatementRun:
    fields: dict[str, Any] = {
        "protocol": "extended",
        "statement": "select $1",
        "started": 1714564800.25,
        "statement_name": "s1",
        "portal": "p1",
        "params": (b"42", None, b"\x00\x01"),
        "param_formats": (0, 0, 1),
        "batch": 3,
        "ended": 1714564800.5,
        "command_tag": "SELECT 1",
        "rows": 1,
        "preview": RecordedStatement(
            "select $1",
            ("x",),
            (("42",), (None,)),
            True,
            7,
            "SELECT 7",
            RecordedError("22012", "division by zero"),
            99,
        ),
        "masked_columns": ("public.users.email",),
    }
    fields.update(changes)
    return StatementRun(**fields)


def test_runs_cross_the_wire_unchanged() -> None:
    for run in (
        a_run(),
        a_run(preview=None, sqlstate="42501", error="pgguard: r: no", executed=False),
        StatementRun("simple", "select 1", 1.0),
    ):
        wire = link.run_to_wire(run)
        assert link.run_from_wire(pickle.loads(pickle.dumps(wire))) == run


def identity(**changes: Any) -> Identity:
    fields: dict[str, Any] = {
        "user": "ana",
        "email": "ana@example.com",
        "groups": ("dev", "ai"),
        "agent": "cursor",
        "prompt_id": "from-jwt",
        "jti": "secret-jti",
        "issued_at": 1.0,
        "expires_at": 2.0,
        "claims": {"sub": "ana", "token_material": "x"},
    }
    fields.update(changes)
    return Identity(**fields)


def test_sessions_cross_the_wire_without_token_material() -> None:
    ctx = SessionContext("i", "s", "10.0.0.1:5", "app", "psql", "app_rw", identity(), "ana", "p")
    back = link.context_from_wire(pickle.loads(pickle.dumps(link.context_to_wire(ctx))))
    assert back.base("statement", ts=5.0) == ctx.base("statement", ts=5.0)
    assert back.prompt("select 1") == ("p", "startup")
    assert back.identity is not None and back.identity.claims == {}
    assert back.identity.jti is None
    anonymous = SessionContext("i", "s2", "10.0.0.2:6", user="bob")
    again = link.context_from_wire(link.context_to_wire(anonymous))
    assert again.base("auth_failure", ts=1.0) == anonymous.base("auth_failure", ts=1.0)


def test_tickets_are_answered_once() -> None:
    book = link.TicketBook()
    seen: list[tuple[int, BaseException | None]] = []
    tickets = [book.issue(lambda e, i=i: seen.append((i, e))) for i in range(4)]
    assert len(set(tickets)) == 4 and len(book) == 4
    for cb in book.take([tickets[1], tickets[1], 999]):
        cb(None)
    assert seen == [(1, None)]
    rest = book.take_all()
    assert len(rest) == 3 and len(book) == 0 and book.take(tickets) == []


# -- records the writer builds --------------------------------------------------------------


def test_builder_follows_the_session() -> None:
    builder = RecordBuilder()
    builder.session(SessionContext("i", "s", "10.0.0.1:5", "app", identity=identity()))
    nothing: tuple[Any, ...] = (None, (), None, ())
    set_run = StatementRun("simple", "set pgguard.prompt_id = 'p-7'", 1.0, ended=1.1)
    builder.statement("s", set_run.finished(1.1, "SET"), nothing, None)
    run = StatementRun("simple", "update t set x = 1", 2.0).finished(2.5, "UPDATE 3", 3)
    about = ("write", ("public.t",), "UPDATE", ())
    record = builder.statement("s", run, about, ("req-1", "updates-need-approval"))
    assert (record.user, record.email, record.groups, record.agent) == (
        "ana",
        "ana@example.com",
        ("dev", "ai"),
        "cursor",
    )
    assert (record.prompt_id, record.prompt_source) == ("p-7", "set")
    assert (record.class_, record.objects, record.command) == ("write", ("public.t",), "UPDATE")
    assert (record.decision, record.rule, record.approval_id, record.rows) == (
        "approved",
        "updates-need-approval",
        "req-1",
        3,
    )
    assert record.duration_ms == pytest.approx(500.0)
    refused = (
        StatementRun("simple", "drop table t", 3.0)
        .finished(3.1, sqlstate="42501", error="pgguard: no-drops: not allowed", executed=False)
        ._replace(refused=("no-drops", "deny", None))
    )
    denied = builder.statement("s", refused, ("ddl", (), None, ("watch",)), None)
    assert (denied.decision, denied.rule, denied.approval_id) == ("deny", "no-drops", None)
    turned_down = builder.statement(
        "s", refused._replace(refused=("drops-need-approval", "approval_denied", "req-2")),
        nothing, None,
    )  # fmt: skip
    assert (turned_down.decision, turned_down.rule, turned_down.approval_id) == (
        "approval_denied",
        "drops-need-approval",
        "req-2",
    )
    # Only the relay says what pgguard refused: an error that reads like a refusal (a
    # function can raise any text) is the server's.
    spoof = StatementRun("simple", "select f()", 4.0).finished(
        4.1, sqlstate="42501", error="pgguard: admin: refused"
    )
    spoofed = builder.statement("s", spoof, nothing, None)
    assert (spoofed.decision, spoofed.rule) == ("allow", None)
    assert spoofed.extra["error"] == "pgguard: admin: refused"
    audited = builder.statement("s", run, ("write", (), None, ("watch",)), None)
    assert (audited.decision, audited.rule) == ("audit_only", "watch")
    builder.forget("s")
    orphan = builder.statement("s", run, nothing, None)  # never lost, even unannounced
    assert orphan.session_id == "s" and orphan.user is None
    assert builder.sessions == {}  # and nothing kept for it


def test_builder_redaction_options() -> None:
    run = a_run(statement="select 'secret', 42 where x = $1")
    plain = RecordBuilder().statement("s", run, (None, (), None, ()), None)
    assert plain.statement == "select 'secret', 42 where x = $1"
    assert plain.params == ("42", None, "base64:AAE=")
    hidden = RecordBuilder(RecordOptions(param_cap=1, redact_literals=True, redact_params=True))
    record = hidden.statement("s", run, (None, (), None, ()), None)
    assert record.statement == "select ?, ? where x = $1"
    assert record.extra["preview"]["statement"] == record.statement
    assert record.params == ("***", None, "***")
    assert record.fingerprint == plain.fingerprint
    capped = RecordBuilder(RecordOptions(param_cap=1)).statement(
        "s", a_run(params=(b"12345",), param_formats=()), (None, (), None, ()), None
    )
    assert capped.params[0] is not None and capped.params[0].startswith("1…")


def test_secrets_never_reach_the_preview() -> None:
    sql = "select * from dblink('host=db password=hunter2', 'select 1') as t(x int)"
    run = a_run(statement=sql, preview=RecordedStatement(sql, ("x",), (("1",),)))
    record = RecordBuilder().statement("s", run, (None, (), None, ()), None)
    assert "hunter2" not in (record.statement or "")
    assert "hunter2" not in str(record.extra)


def test_fingerprints_cache_by_shape() -> None:
    fps = Fingerprints(size=2)
    for sql in (
        "select * from t where id = 1",
        "select * from t where id = 22",
        "select * from t where id = 'x'",
        "select * from u where id = 1.5e3",
        "select * from t1 where id = 1",
        "not sql at all (",
    ):
        assert fps(sql) == fingerprint(sql)
    assert fps("select * from t where id = 1") == fps("select * from t where id = 999")


def test_parameterised_texts_are_fingerprinted_and_redacted_once(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import pgguard.audit.events as events

    calls: list[str] = []
    real_fingerprint, real_redact = events.fingerprint, events.redact_secrets
    monkeypatch.setattr(
        events, "fingerprint", lambda sql: calls.append(sql) or real_fingerprint(sql)
    )
    monkeypatch.setattr(events, "redact_secrets", lambda sql: calls.append(sql) or real_redact(sql))
    fps, redactions = Fingerprints(), Redactions()
    sql = "select * from t where id = $1"
    assert fps(sql) == fps(sql) == real_fingerprint(sql)
    same = "".join(["select * from t where id = ", "$1"])  # equal, another object
    assert redactions(sql) is sql and redactions(same) is same  # unchanged: the caller's own
    assert calls == [sql, sql]  # one fingerprint, one redaction
    long = "select * from t where note = '" + "x" * 5000 + "' and id = $1"
    calls.clear()
    fps(long), fps(long)
    assert len(calls) == 2  # long texts are not kept
    secret = "alter role app password 'hunter2'"
    assert "hunter2" not in redactions(secret) and redactions(secret) == redactions(secret)


# -- the writer process's loop --------------------------------------------------------------


class Writer:
    """A :class:`Daemon` running in a thread on one end of a socket pair; the test is the
    gateway on the other end."""

    def __init__(self, config: link.WriterConfig) -> None:
        self.ours, theirs = socket.socketpair()
        self.daemon = Daemon(theirs, config)
        self.reader = link.FrameReader()
        self.answers: list[Any] = []
        self.daemon.open()
        self.thread = threading.Thread(target=self.daemon.run, args=(link.FrameReader(),))
        self.thread.start()

    def send(self, *messages: Any) -> None:
        self.ours.sendall(link.encode_frame(list(messages)))

    def wait_for(self, kind: str, timeout: float = 10.0) -> list[Any]:
        deadline = time.monotonic() + timeout
        self.ours.settimeout(0.2)
        while time.monotonic() < deadline:
            found = [a for a in self.answers if a[0] == kind]
            if found:
                return found
            try:
                data = self.ours.recv(1 << 16)
            except TimeoutError:
                continue
            self.answers.extend(self.reader.feed(data))
        raise AssertionError(f"no {kind} answer; got {self.answers!r}")

    def close(self) -> link.WriterStatus:
        self.send((link.CLOSE, 5.0))
        closed = self.wait_for(link.CLOSED)[0]
        self.thread.join(10)
        self.ours.close()
        return link.WriterStatus.from_wire(closed[1])


@pytest.fixture
def writer_config(tmp_path: Path) -> Iterator[link.WriterConfig]:
    yield link.WriterConfig(
        url=f"sqlite:///{tmp_path / 'audit.db'}", jsonl=None, mode="strict", instance_id="w"
    )


def stored(config: link.WriterConfig) -> list[AuditRecord]:
    assert config.url is not None
    with SqlStore(config.url, migrate=False) as store:
        return store.search(limit=1000, order="asc")


def test_strict_records_are_answered_when_durable(writer_config: link.WriterConfig) -> None:
    ctx = SessionContext("w", "s1", "10.0.0.1:5", "app", identity=identity())
    run = StatementRun("simple", "select 1", 10.0).finished(10.1, "SELECT 1", 1)
    w = Writer(writer_config)
    w.send(
        (link.SESSION, link.context_to_wire(ctx)),
        (link.RECORD, 1, ctx.base("session_start", ts=9.0)),
        (link.STATEMENT, 2, "s1", link.run_to_wire(run), (None, (), None, ()), None),
        (link.STATEMENT, 0, "s1", link.run_to_wire(run), (None, (), None, ()), None),
    )
    durable = {t for a in w.wait_for(link.DURABLE) for t in a[1]}
    while durable != {1, 2}:
        w.answers = [a for a in w.answers if a[0] != link.DURABLE]
        durable |= {t for a in w.wait_for(link.DURABLE) for t in a[1]}
    status = w.close()
    assert status.written == 3 and status.abandoned == 0 and status.healthy
    records = stored(writer_config)
    assert [r.event for r in records] == ["session_start", "statement", "statement"]
    assert records[1].user == "ana" and records[1].statement == "select 1"
    assert verify_stream(enumerate(records)).ok


def test_audit_sync_normal_reaches_the_writers_stores(tmp_path: Path) -> None:
    config = link.WriterConfig(
        url=f"sqlite:///{tmp_path / 'audit.db'}",
        jsonl=str(tmp_path / "audit.jsonl"),
        mode="strict",
        instance_id="n",
        sync="normal",
    )
    w = Writer(config)
    sql_store, sink = w.daemon.stores
    assert isinstance(sql_store, SqlStore) and isinstance(sink, JsonlSink)
    with sql_store.engine.connect() as conn:
        assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 1  # NORMAL
    assert sink.fsync is False
    w.send((link.RECORD, 3, AuditRecord(event="policy_reload", ts=1.0)))
    assert w.wait_for(link.DURABLE)[0][1] == [3]
    assert w.close().written == 1


def test_a_store_that_cannot_open_fails_strict_statements_then_catches_up(
    tmp_path: Path,
) -> None:
    missing = tmp_path / "later"
    config = link.WriterConfig(
        url=f"sqlite:///{missing / 'audit.db'}", jsonl=None, mode="strict", instance_id="w"
    )
    w = Writer(config)
    w.send((link.RECORD, 7, AuditRecord(event="policy_reload", ts=1.0)))
    failed = w.wait_for(link.FAILED)[0]
    assert failed[1] == [7] and "unavailable" in failed[2]
    status = w.wait_for(link.STATUS)[-1]
    assert link.WriterStatus.from_wire(status[1]).healthy is False
    missing.mkdir()  # the store comes back: the record kept meanwhile is written
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and w.daemon.writer is None:
        time.sleep(0.1)
    final = w.close()
    assert final.abandoned == 0 and final.written == 1
    assert [r.event for r in stored(config)] == ["policy_reload"]


def test_buffered_records_are_gathered_and_flushed_on_close(tmp_path: Path) -> None:
    config = link.WriterConfig(
        url=f"sqlite:///{tmp_path / 'audit.db'}",
        jsonl=str(tmp_path / "audit.jsonl"),
        mode="buffered",
        instance_id="b",
    )
    w = Writer(config)
    for i in range(300):
        w.send((link.RECORD, 0, AuditRecord(event="statement", ts=float(i), statement=f"s{i}")))
    status = w.close()
    assert status.written == 300 and status.abandoned == 0
    records = stored(config)
    assert [r.statement for r in records] == [f"s{i}" for i in range(300)]
    assert verify_stream(enumerate(records)).ok
    assert len((tmp_path / "audit.jsonl").read_text().splitlines()) == 300


def test_a_refused_multi_statement_query_is_denied_as_a_unit() -> None:
    builder = RecordBuilder()
    builder.session(SessionContext("i", "s", "10.0.0.1:5"))
    nothing: tuple[Any, ...] = (None, (), None, ())

    def run(sql: str, batch: int) -> StatementRun:
        return StatementRun("simple", sql, 1.0, batch=batch)

    refused = (
        run("select 1", 5)
        .finished(1.1, sqlstate="42501", error="pgguard: no-ddl: no", executed=False)
        ._replace(refused=("no-ddl", "deny", None))
    )
    skipped = run("drop table t", 5).finished(1.1, executed=False)  # kept from running
    failed = run("select 1/0", 6).finished(1.2, sqlstate="22012", error="division by zero")
    after = run("select 2", 6).finished(1.2, executed=False)
    decisions = [
        (r.decision, r.rule)
        for r in (
            builder.statement("s", x, nothing, None) for x in (refused, skipped, failed, after)
        )
    ]
    assert decisions == [("deny", "no-ddl"), ("deny", "no-ddl"), ("allow", None), ("allow", None)]


def test_records_made_elsewhere_get_the_same_redaction() -> None:
    request = AuditRecord(
        event="approval_request",
        ts=1.0,
        statement="update t set pin = '1234' where id = 7",
        params=("secret", None),
    )
    assert RecordBuilder().redacted(request) is request
    hidden = RecordBuilder(RecordOptions(redact_literals=True, redact_params=True))
    record = hidden.redacted(request)
    assert record.statement == "update t set pin = ? where id = ?"
    assert record.params == ("***", None)


def test_redacted_literals_stay_out_of_data_errors() -> None:
    message = 'invalid input syntax for type integer: "4111-1111"'
    run = StatementRun("simple", "select '4111-1111'::int", 1.0).finished(
        1.1, sqlstate="22P02", error=message
    )
    nothing: tuple[Any, ...] = (None, (), None, ())
    assert RecordBuilder().statement("s", run, nothing, None).extra["error"] == message
    hidden = RecordBuilder(RecordOptions(redact_literals=True)).statement("s", run, nothing, None)
    assert hidden.extra["error"] == 'invalid input syntax for type integer: "?"'
    assert hidden.statement == "select ?::int"


def test_secrets_stay_out_of_errors_and_previews() -> None:
    # pgguard's parser (or the server) quotes the broken statement: the secret with it.
    message = 'pgguard: parser: unterminated quoted string at or near "\'leak4"'
    run = StatementRun("simple", "CREATE ROLE r3 PASSWORD 'leak4", 1.0).finished(
        1.1, sqlstate="42601", error=message
    )
    nothing: tuple[Any, ...] = (None, (), None, ())
    record = RecordBuilder().statement("s", run, nothing, None)
    assert record.statement == "CREATE ROLE r3 PASSWORD '***'"
    assert "leak4" not in json.dumps(record.to_json())


@pytest.mark.parametrize(
    ("statements", "expected"),
    [
        # (statement, command tag) in the order they ran → the prompt id a next statement gets
        ([("SET pgguard.prompt_id = 'p'", "SET")], ("p", "set")),
        ([("SET pgguard.prompt_id = unquoted_p", "SET")], ("unquoted_p", "set")),
        ([("/* note */ SET pgguard.prompt_id='x'", "SET")], ("x", "set")),
        ([("select set_config('pgguard.prompt_id', 'c', false)", "SELECT 1")], ("c", "set")),
        ([("SET pgguard.prompt_id = 'p'", "SET"), ("RESET ALL", "RESET")], ("tok", "jwt")),
        ([("SET pgguard.prompt_id = 'p'", "SET"), ("DISCARD ALL", "DISCARD ALL")], ("tok", "jwt")),
        ([("SET pgguard.prompt_id = 'p'", "SET"), ("SET pgguard.prompt_id TO DEFAULT", "SET")],
         ("tok", "jwt")),
        # a transaction block undone, or only local to it
        ([("SET pgguard.prompt_id = 'kept'", "SET"), ("BEGIN", "BEGIN"),
          ("SET pgguard.prompt_id = 'rolled'", "SET"), ("ROLLBACK", "ROLLBACK")], ("kept", "set")),
        ([("BEGIN", "BEGIN"), ("SET pgguard.prompt_id = 'committed'", "SET"),
          ("COMMIT", "COMMIT")], ("committed", "set")),
        ([("BEGIN", "BEGIN"), ("SET LOCAL pgguard.prompt_id = 'local'", "SET"),
          ("COMMIT", "COMMIT")], ("tok", "jwt")),
        ([("BEGIN", "BEGIN"), ("SET LOCAL pgguard.prompt_id = 'local'", "SET")], ("local", "set")),
        ([("SET LOCAL pgguard.prompt_id = 'nothing'", "SET")], ("tok", "jwt")),  # no block
        ([("BEGIN", "BEGIN"), ("SET pgguard.prompt_id = 'in'", "SET"),
          ("ROLLBACK TO SAVEPOINT s", "ROLLBACK")], ("in", "set")),
    ],
)  # fmt: skip
def test_the_set_prompt_id_follows_what_the_server_did(
    statements: list[tuple[str, str]], expected: tuple[str, str]
) -> None:
    ctx = SessionContext("i", "s", "10.0.0.1:5", identity=identity(prompt_id="tok"))
    for sql, tag in statements:
        ctx.note_statement(StatementRun("simple", sql, 1.0).finished(1.1, tag))
    assert ctx.prompt("select 1") == expected


def test_prompt_ids_from_the_startup_and_the_token_are_cleaned_like_comments() -> None:
    hostile = "p-1\x1b[2J\x07\u202e" + "x" * 600
    ctx = SessionContext("i", "s", "a", identity=identity(prompt_id=hostile))
    prompt, source = ctx.prompt("select 1")
    assert source == "jwt" and prompt is not None
    assert prompt.startswith("p-1[2J") and len(prompt) == 256
    ctx.startup_prompt_id = "\x00\x1b"  # nothing left: the next source answers
    assert ctx.prompt("select 1")[1] == "jwt"
