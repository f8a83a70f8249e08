"""The relay's protocol state, byte for byte, without sockets."""

from __future__ import annotations

import itertools
import time

import pytest

from pgguard.policy.identity_guard import Hold, Refusal
from pgguard.protocol import messages as m
from pgguard.protocol.framing import MessageReader
from pgguard.protocol.relay import (
    SHUTTING_DOWN,
    TOKEN_EXPIRED,
    Counted,
    RelayCore,
    StatementHook,
)
from pgguard.protocol.statements import StatementTracker

LIMIT = 1 << 20


def joined(data: bytes) -> bytes:
    return data


def decode_all(data: bytes) -> list[m.Message]:
    reader = MessageReader(LIMIT)
    reader.feed(data)
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(m.decode_backend(*msg))
    return out


EXTENDED = (
    m.Parse("", "select $1", ()).encode()
    + m.Bind("", "", (), (b"1",), ()).encode()
    + m.Describe(b"P", "").encode()
    + m.Execute("", 0).encode()
    + m.Sync().encode()
)
REPLY = (
    m.ParseComplete().encode()
    + m.BindComplete().encode()
    + m.RowDescription((m.FieldDescription("x"),)).encode()
    + m.DataRow((b"1",)).encode()
    + m.CommandComplete("SELECT 1").encode()
    + m.ReadyForQuery(b"I").encode()
)


def test_bytes_pass_through_unchanged_whole_and_bytewise() -> None:
    for chunk in (len(EXTENDED), 1, 3):
        core = RelayCore(LIMIT)
        sent = b""
        for i in range(0, len(EXTENDED), chunk):
            sent += core.from_client(EXTENDED[i : i + chunk])
        assert sent == EXTENDED
        assert core.pending == 1
        got = b""
        for i in range(0, len(REPLY), chunk):
            got += joined(core.from_server(REPLY[i : i + chunk]))
        assert got == REPLY
        assert core.pending == 0 and core.idle()


def test_pipelined_syncs_are_counted() -> None:
    core = RelayCore(LIMIT)
    core.from_client(EXTENDED * 3 + m.Query("select 1").encode())
    assert core.pending == 4
    core.from_server(REPLY * 2)
    assert core.pending == 2 and not core.idle()


def test_transaction_status_tracked() -> None:
    core = RelayCore(LIMIT)
    core.from_client(m.Query("begin").encode())
    core.from_server(m.CommandComplete("BEGIN").encode() + m.ReadyForQuery(b"T").encode())
    assert core.status == b"T"


def test_token_expiry_when_idle_ends_now() -> None:
    core = RelayCore(LIMIT)
    out = core.end(TOKEN_EXPIRED)
    assert core.closing
    [err] = decode_all(out)
    assert isinstance(err, m.ErrorResponse)
    assert (err.severity, err.sqlstate, err.message) == ("FATAL", "28000", "pgguard: token expired")


def test_token_expiry_mid_statement_waits_for_ready_for_query() -> None:
    core = RelayCore(LIMIT)
    core.from_client(EXTENDED)
    assert core.end(TOKEN_EXPIRED) == b""
    assert not core.closing
    msgs = decode_all(joined(core.from_server(REPLY)))
    assert isinstance(msgs[-2], m.ReadyForQuery)
    assert isinstance(msgs[-1], m.ErrorResponse) and msgs[-1].sqlstate == "28000"
    assert core.closing


def test_shutdown_lets_an_open_transaction_finish() -> None:
    core = RelayCore(LIMIT)
    core.from_client(m.Query("begin").encode())
    core.from_server(m.CommandComplete("BEGIN").encode() + m.ReadyForQuery(b"T").encode())
    assert core.end(SHUTTING_DOWN) == b""
    core.from_client(m.Query("commit").encode())
    msgs = decode_all(
        joined(
            core.from_server(m.CommandComplete("COMMIT").encode() + m.ReadyForQuery(b"I").encode())
        )
    )
    assert isinstance(msgs[-1], m.ErrorResponse) and msgs[-1].sqlstate == "57P01"
    assert core.closing


def test_terminate_closes() -> None:
    core = RelayCore(LIMIT)
    assert core.from_client(m.Terminate().encode()) == m.Terminate().encode()
    assert core.terminated and core.closing


def test_large_datarow_streams_without_buffering() -> None:
    core = RelayCore(LIMIT)
    row = m.DataRow((b"x" * 100_000,)).encode()
    out = core.from_server(row[:1000])
    assert joined(out) == row[:1000]  # forwarded before the row is complete
    assert joined(core.from_server(row[1000:])) == row[1000:]


def test_internal_query_runs_at_idle_and_is_hidden_from_the_client() -> None:
    core = RelayCore(LIMIT)
    results: list[object] = []
    core.from_client(EXTENDED)
    core.internal_query("show search_path", lambda rows, err: results.append((rows, err)))
    assert core.server_out == []  # a client request is outstanding: not yet
    out = core.from_server(REPLY)
    assert out == REPLY
    assert core.server_out == [m.Query("show search_path").encode()]
    core.server_out.clear()
    assert not core.idle()
    # The client sends its next request meanwhile; its reply comes after ours.
    core.from_client(m.Query("select 1").encode())
    ours = (
        m.RowDescription((m.FieldDescription("search_path"),)).encode()
        + m.DataRow((b'"$user", public',)).encode()
        + m.NotificationResponse(7, "chan", "hello").encode()
        + m.CommandComplete("SHOW").encode()
        + m.ReadyForQuery(b"I").encode()
    )
    theirs = (
        m.RowDescription((m.FieldDescription("x"),)).encode()
        + m.DataRow((b"1",)).encode()
        + m.CommandComplete("SELECT 1").encode()
        + m.ReadyForQuery(b"I").encode()
    )
    stream = ours + theirs
    got = b""
    for i in range(0, len(stream), 7):  # in awkward chunks
        got += core.from_server(stream[i : i + 7])
    assert got == m.NotificationResponse(7, "chan", "hello").encode() + theirs
    assert results == [([('"$user", public',)], None)]
    assert core.idle()


def test_internal_query_waits_out_a_failed_transaction() -> None:
    core = RelayCore(LIMIT)
    core.from_client(m.Query("select 1/0").encode())
    core.internal_query("show search_path", lambda rows, err: None)
    core.from_server(
        m.ErrorResponse(m.error_fields("ERROR", "22012", "division by zero")).encode()
        + m.ReadyForQuery(b"E").encode()
    )
    assert core.server_out == []
    core.from_client(m.Query("rollback").encode())
    core.from_server(m.CommandComplete("ROLLBACK").encode() + m.ReadyForQuery(b"I").encode())
    assert core.server_out == [m.Query("show search_path").encode()]


def _select_reply(rows: int, tag_rows: int | None = None) -> bytes:
    return (
        m.RowDescription((m.FieldDescription("x"),)).encode()
        + b"".join(m.DataRow((str(i).encode(),)).encode() for i in range(rows))
        + m.CommandComplete(f"SELECT {rows if tag_rows is None else tag_rows}").encode()
        + m.ReadyForQuery(b"I").encode()
    )


def test_row_limit_truncates_with_a_notice() -> None:
    core = RelayCore(LIMIT)
    core.set_row_limit(3, "truncate")
    core.from_client(m.Query("select x from t").encode())
    reply = _select_reply(10)
    got = b"".join(core.from_server(reply[i : i + 11]) for i in range(0, len(reply), 11))
    msgs = decode_all(got)
    rows = [msg for msg in msgs if isinstance(msg, m.DataRow)]
    assert [r.values for r in rows] == [(b"0",), (b"1",), (b"2",)]
    notice = next(msg for msg in msgs if isinstance(msg, m.NoticeResponse))
    assert "limits" in notice.message
    assert m.CommandComplete("SELECT 3") in msgs
    assert not core.cancel_requested
    # The next statement starts a fresh count.
    core.from_client(m.Query("select x from t").encode())
    assert decode_all(core.from_server(_select_reply(2))) == decode_all(_select_reply(2))


def test_row_limit_error_mode_cancels_and_reports() -> None:
    core = RelayCore(LIMIT)
    core.set_row_limit(2, "error")
    core.from_client(m.Query("select x from t").encode())
    head = m.RowDescription((m.FieldDescription("x"),)).encode() + b"".join(
        m.DataRow((b"v",)).encode() for _ in range(5)
    )
    got = core.from_server(head)
    assert core.cancel_requested
    cancelled = (
        m.ErrorResponse(m.error_fields("ERROR", "57014", "canceling statement")).encode()
        + m.ReadyForQuery(b"I").encode()
    )
    msgs = decode_all(got + core.from_server(cancelled))
    assert sum(isinstance(msg, m.DataRow) for msg in msgs) == 2
    err = next(msg for msg in msgs if isinstance(msg, m.ErrorResponse))
    assert err.sqlstate == "54000" and "limits" in err.message
    assert isinstance(msgs[-1], m.ReadyForQuery)


def test_no_row_limit_leaves_rows_alone() -> None:
    core = RelayCore(LIMIT)
    core.from_client(m.Query("select x from t").encode())
    reply = _select_reply(50)
    assert core.from_server(reply) == reply


def test_bind_of_a_prepared_statement_is_judged_again() -> None:
    from pgguard.policy.identity_guard import Refusal

    allowed = {"yes"}
    verdicts: list[str] = []

    def hook(sql: str) -> Refusal | None:
        verdicts.append(sql)
        return None if "yes" in allowed else Refusal("later-rule", "no longer allowed")

    epoch = [0]
    core = RelayCore(LIMIT, hook)
    core.epoch = epoch
    parse = m.Parse("s1", "select 1", ()).encode()
    bind = m.Bind("", "s1", (), (), ()).encode() + m.Execute("", 0).encode() + m.Sync().encode()
    assert core.from_client(parse + bind) == parse + bind
    # The policy changes (the epoch moves): the next Bind of s1 is refused.
    allowed.clear()
    epoch[0] += 1
    sent = core.from_client(bind)
    assert sent != bind
    reader = MessageReader(LIMIT)
    reader.feed(sent)
    first = reader.next_message()
    assert first is not None and first[0] == b"B"
    substituted = m.Bind.decode_body(first[1])
    assert substituted.statement.startswith("pgguard_refused_")
    error = m.ErrorResponse(
        m.error_fields(
            "ERROR", "26000", f'prepared statement "{substituted.statement}" does not exist'
        )
    ).encode()
    [err] = [x for x in decode_all(core.from_server(error)) if isinstance(x, m.ErrorResponse)]
    assert err.sqlstate == "42501"
    assert err.message == "pgguard: later-rule: no longer allowed"


def test_statement_tracking_reports_each_statement_with_refusals() -> None:
    import itertools

    from pgguard.policy.identity_guard import Refusal
    from pgguard.protocol.statements import StatementRun, StatementTracker

    def hook(sql: str) -> Refusal | None:
        return Refusal("no-deletes", "nope") if sql.startswith("delete") else None

    ticks = itertools.count()
    core = RelayCore(LIMIT, hook)
    runs: list[StatementRun] = []
    core.track_statements(StatementTracker(lambda: float(next(ticks))), runs.extend)
    core.from_client(m.Query("select 1; select 2").encode())
    core.from_server(_select_reply(1)[:-6] + _select_reply(1))
    sent = core.from_client(m.Query("delete from t").encode())
    token = m.Query.decode_body(sent[5:]).sql
    core.from_server(
        m.ErrorResponse(m.error_fields("ERROR", "42601", f'syntax error at "{token}"')).encode()
        + m.ReadyForQuery(b"I").encode()
    )
    extended = (
        m.Parse("s", "select $1", ()).encode()
        + m.Bind("", "s", (), (b"9",), ()).encode()
        + m.Execute("", 0).encode()
        + m.Sync().encode()
    )
    core.from_client(extended)
    core.from_server(REPLY)
    assert [(r.protocol, r.statement, r.command_tag, r.sqlstate) for r in runs] == [
        ("simple", "select 1", "SELECT 1", None),
        ("simple", "select 2", "SELECT 1", None),
        ("simple", "delete from t", None, "42501"),
        ("extended", "select $1", "SELECT 1", None),
    ]
    assert runs[2].error == "pgguard: no-deletes: nope"
    assert runs[3].params == (b"9",)


def test_internal_query_waits_for_the_sync_of_flushed_extended_messages() -> None:
    """asyncpg prepares with Parse/Describe/Flush: the replies come without a
    ReadyForQuery, and must not be taken for the reply to pgguard's own query."""
    from pgguard.protocol import messages as msgs

    core = RelayCore(1 << 20)
    got: list[object] = []
    core.from_client(msgs.Query("set x = 1").encode())
    core.internal_query("select 1", lambda rows, err: got.append(rows))
    core.internal_query("select 2", lambda rows, err: got.append(rows))
    ready = msgs.ReadyForQuery(b"I").encode()
    core.from_server(msgs.CommandComplete("SET").encode() + ready)
    assert core.server_out == [msgs.Query("select 1").encode()]
    core.server_out.clear()
    core.from_client(
        msgs.Parse("s", "select 3", ()).encode()
        + msgs.Describe(b"S", "s").encode()
        + msgs.Flush().encode()
    )
    internal_reply = msgs.CommandComplete("SELECT 0").encode() + ready
    client_reply = (
        msgs.ParseComplete().encode()
        + msgs.ParameterDescription(()).encode()
        + msgs.NoData().encode()
    )
    assert core.from_server(internal_reply + client_reply) == client_reply
    assert core.server_out == [] and got == [[]]
    core.from_client(msgs.Sync().encode())
    assert core.from_server(ready) == ready
    assert core.server_out == [msgs.Query("select 2").encode()]


# --------------------------------------------------------------------------- statement counting


def _counting(
    hook: StatementHook | None = None,
) -> tuple[RelayCore, list[tuple[list[Counted], float]]]:
    """A relay that counts statements, its clock ticking 1.0 per reading."""
    ticks = itertools.count()
    core = RelayCore(LIMIT, hook)
    counted: list[tuple[list[Counted], float]] = []
    core.count_statements(
        lambda noted, seconds: counted.append((noted, seconds)), lambda: float(next(ticks))
    )
    return core, counted


READY = m.ReadyForQuery(b"I").encode()


def test_counting_a_simple_query_at_its_ready_for_query() -> None:
    core, counted = _counting()
    core.from_client(m.Query("select 1").encode())
    assert counted == []  # the outcome is not known yet
    core.from_server(_select_reply(1))
    assert counted == [([(b"select 1", None)], 1.0)]


def test_counting_a_multi_statement_query_hands_over_the_whole_text() -> None:
    # One entry per Query: the session splits it into statements (as the audit trail does).
    core, counted = _counting()
    core.from_client(m.Query("select 1; select 2").encode())
    core.from_server(_select_reply(1)[:-6] + _select_reply(1))
    assert counted == [([(b"select 1; select 2", None)], 1.0)]


def test_counting_extended_pipelines_per_sync() -> None:
    core, counted = _counting()
    # Three Parse/Bind/Describe/Execute/Sync requests and a Query, sent at once.
    core.from_client(EXTENDED * 3 + m.Query("select 2").encode())
    core.from_server(REPLY * 2)
    assert [noted for noted, _ in counted] == [[(b"select $1", None)]] * 2
    core.from_server(REPLY + _select_reply(1))
    assert [noted for noted, _ in counted[2:]] == [[(b"select $1", None)], [(b"select 2", None)]]
    # Two executions of a prepared statement before one Sync: one request, two statements.
    counted.clear()
    bind = m.Bind("", "s", (), (), ()).encode() + m.Execute("", 0).encode()
    core.from_client(m.Parse("s", "select 3", ()).encode() + bind + bind + m.Sync().encode())
    core.from_server(READY)
    assert [noted for noted, _ in counted] == [[(b"select 3", None), (b"select 3", None)]]


def test_counting_nothing_for_a_parse_alone() -> None:
    core, counted = _counting()
    core.from_client(m.Parse("s", "select 1", ()).encode() + m.Sync().encode())
    core.from_server(m.ParseComplete().encode() + READY)
    assert counted == [] and core.pending == 0
    # A Bind of a statement pgguard never saw: no SQL to count (the server fails it).
    core.from_client(m.Bind("", "nope", (), (), ()).encode() + m.Sync().encode())
    core.from_server(READY)
    assert counted == []


def test_counting_a_refused_statement_with_its_refusal() -> None:
    refusal = Refusal("no-deletes", "nope")
    core, counted = _counting(lambda sql: refusal if sql.startswith("delete") else None)
    sent = core.from_client(m.Query("delete from t").encode())
    assert m.Query.decode_body(sent[5:]).sql.startswith("pgguard_refused_")
    core.from_server(
        m.ErrorResponse(m.error_fields("ERROR", "42601", "syntax error")).encode() + READY
    )
    assert counted == [([(b"delete from t", refusal)], 1.0)]


def test_counting_a_held_statement_once_with_its_final_verdict() -> None:
    hold = Hold("orders-need-approval", "needs approval", approvers=("dba",))
    write = "update orders set status = 'void'"
    core, counted = _counting(lambda sql: hold if sql.startswith("update") else None)
    held: list[str] = []
    core.on_hold = lambda _hold, sql, _message: held.append(sql)
    # Held while the statement before it runs: that one alone is counted.
    core.from_client(m.Query("select 1").encode() + m.Query(write).encode())
    core.from_server(_select_reply(1))
    assert held == [write] and counted == [([(b"select 1", None)], 1.0)]
    core.release(None)  # approved: it runs
    core.from_server(m.CommandComplete("UPDATE 1").encode() + READY)
    assert counted[1:] == [([(write.encode(), None)], 1.0)]
    # Extended protocol, denied: the Bind is held, then counted once with the refusal.
    counted.clear()
    denial = Refusal("orders-need-approval", "denied by dana")
    core.from_client(
        m.Parse("", write, ()).encode()
        + m.Bind("", "", (), (), ()).encode()
        + m.Execute("", 0).encode()
        + m.Sync().encode()
    )
    assert len(held) == 2 and core.pending == 0
    core.release(denial)
    core.from_server(m.ErrorResponse(m.error_fields("ERROR", "26000", "x")).encode() + READY)
    assert [noted for noted, _ in counted] == [[(write.encode(), denial)]]


def test_counting_is_off_by_default_and_never_with_the_tracker() -> None:
    core = RelayCore(LIMIT, lambda sql: None)
    core.from_client(m.Query("select 1").encode())
    core.from_server(_select_reply(1))
    assert core.on_counted is None
    core.track_statements(StatementTracker(time.time), lambda runs: None)
    with pytest.raises(AssertionError):
        core.count_statements(lambda noted, seconds: None, time.monotonic)


def test_counting_skips_replies_already_due_when_it_starts() -> None:
    core = RelayCore(LIMIT)
    core.from_client(m.Query("select 1").encode())
    counted: list[list[Counted]] = []
    core.count_statements(lambda noted, _seconds: counted.append(noted), time.monotonic)
    core.from_client(m.Query("select 2").encode())
    core.from_server(_select_reply(1) + _select_reply(1))
    assert counted == [[(b"select 2", None)]]


# --------------------------------------------------------------------------- COPY FROM STDIN


def _message(kind: bytes, body: bytes = b"") -> bytes:
    return kind + (4 + len(body)).to_bytes(4, "big") + body


COPY_IN = _message(b"G", b"\x00\x00\x00")  # text format, no columns
COPY_DATA = _message(b"d", b"1\tone\n")
COPY_DONE = _message(b"c")
COPY_FAIL = _message(b"f", b"stop!\x00")


def _extended_copy(sync_with_execute: bool) -> bytes:
    """A COPY FROM STDIN as libpq's PQexecParams sends it (a Sync with the Execute) or as
    drivers that wait for the CopyInResponse first do."""
    return (
        m.Parse("", "copy t from stdin", ()).encode()
        + m.Bind("", "", (), (), ()).encode()
        + m.Execute("", 0).encode()
        + (m.Sync().encode() if sync_with_execute else m.Flush().encode())
    )


@pytest.mark.parametrize("sync_with_execute", [True, False])
@pytest.mark.parametrize("end", [COPY_DONE, COPY_FAIL], ids=["CopyDone", "CopyFail"])
def test_syncs_a_copy_in_server_ignores_are_not_waited_for(
    sync_with_execute: bool, end: bytes
) -> None:
    """The server ignores a Sync it gets in copy-in mode: only the Sync after CopyDone (or
    CopyFail) gets a ReadyForQuery, so pgguard's own queries must not wait for another."""
    core = RelayCore(LIMIT)
    runs: list[object] = []
    tracker = StatementTracker(lambda: 0.0)
    core.track_statements(tracker, runs.extend)
    got: list[object] = []
    core.from_client(_extended_copy(sync_with_execute))
    core.from_server(m.ParseComplete().encode() + m.BindComplete().encode() + COPY_IN)
    core.from_client(COPY_DATA + end + m.Sync().encode())
    assert core.pending == 1
    core.internal_query("select 1", lambda rows, err: got.append(rows))
    if end == COPY_DONE:
        tail = m.CommandComplete("COPY 1").encode()
    else:
        tail = m.ErrorResponse(m.error_fields("ERROR", "57014", "COPY from stdin failed")).encode()
    assert core.from_server(tail + READY) == tail + READY
    assert core.pending == 0
    assert core.server_out == [m.Query("select 1").encode()]  # pgguard's own query runs now
    assert [(r.statement, r.command_tag, r.executed) for r in runs] == [  # type: ignore[attr-defined]
        ("copy t from stdin", "COPY 1" if end == COPY_DONE else None, True)
    ]
    # The next statement's outcome is its own (the batches stay in step).
    core.server_out.clear()
    core.from_server(m.CommandComplete("SELECT 1").encode() + READY)
    core.from_client(m.Query("select 2").encode())
    core.from_server(_select_reply(2))
    assert [r.statement for r in runs][-1] == "select 2"  # type: ignore[attr-defined]
    assert runs[-1].executed and runs[-1].command_tag == "SELECT 2"  # type: ignore[attr-defined]


def test_a_copy_that_never_started_keeps_its_sync() -> None:
    """An error at the COPY's Execute: no copy-in mode, so the Sync sent with it counts
    (a stray CopyDone after it, which the server drops, changes nothing)."""
    core = RelayCore(LIMIT)
    core.from_client(_extended_copy(True))
    error = m.ErrorResponse(m.error_fields("ERROR", "42P01", 'relation "t" does not exist'))
    core.from_client(COPY_DONE)
    assert core.pending == 1
    core.from_server(m.ParseComplete().encode() + error.encode() + READY)
    assert core.pending == 0


def test_a_simple_query_copy_is_counted_once() -> None:
    core = RelayCore(LIMIT)
    core.from_client(m.Query("copy t from stdin").encode())
    core.from_server(COPY_IN)
    core.from_client(COPY_DATA + COPY_DONE)
    assert core.pending == 1
    core.from_server(m.CommandComplete("COPY 1").encode() + READY)
    assert core.pending == 0 and core.idle()


def test_counting_a_copy_charges_its_statement_to_the_sync_that_ends_it() -> None:
    core, counted = _counting()
    core.from_client(_extended_copy(True))
    core.from_server(m.ParseComplete().encode() + m.BindComplete().encode() + COPY_IN)
    core.from_client(COPY_DATA + COPY_DONE + m.Sync().encode())
    core.from_server(m.CommandComplete("COPY 1").encode() + READY)
    assert [noted for noted, _ in counted] == [[(b"copy t from stdin", None)]]


# --------------------------------------------------------------------------- refusals, tracked


def _refusing_core(runs: list[object]) -> RelayCore:
    def hook(sql: str) -> Refusal | None:
        return Refusal("no-deletes", "deletes are not allowed") if "delete" in sql else None

    core = RelayCore(LIMIT, hook)
    core.track_statements(StatementTracker(lambda: 0.0), runs.extend)
    return core


def _server_fails(sent: bytes) -> bytes:
    """The server's reply to pgguard's stand-in for a refused message (a syntax error)."""
    kind, body = next(iter(_split(sent)))
    text = m.Query.decode_body(body).sql if kind == b"Q" else m.Parse.decode_body(body).sql
    return m.ErrorResponse(
        m.error_fields("ERROR", "42601", f'syntax error at or near "{text}"')
    ).encode()


def _split(data: bytes) -> list[tuple[bytes, bytes]]:
    reader = MessageReader(LIMIT)
    reader.feed(data)
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    return out


def test_every_statement_of_a_refused_query_is_marked_refused_and_not_run() -> None:
    runs: list[object] = []
    core = _refusing_core(runs)
    sent = core.from_client(m.Query("select 1; delete from t; select 2").encode())
    got = core.from_server(_server_fails(sent) + READY)
    assert isinstance(decode_all(got)[0], m.ErrorResponse)
    refusal = ("no-deletes", "deny", None)
    message = "pgguard: no-deletes: deletes are not allowed"
    assert [(r.statement, r.executed, r.sqlstate, r.error, r.refused) for r in runs] == [  # type: ignore[attr-defined]
        ("select 1", False, "42501", message, refusal),
        ("delete from t", False, "42501", message, refusal),
        ("select 2", False, "42501", message, refusal),
    ]


def test_a_refused_parse_marks_its_statement_only() -> None:
    runs: list[object] = []
    core = _refusing_core(runs)
    sent = core.from_client(
        m.Parse("", "delete from t", ()).encode()
        + m.Bind("", "", (), (), ()).encode()
        + m.Execute("", 0).encode()
        + m.Parse("", "select 2", ()).encode()
        + m.Bind("", "", (), (), ()).encode()
        + m.Execute("", 0).encode()
        + m.Sync().encode()
    )
    core.from_server(_server_fails(sent) + READY)
    assert [(r.statement, r.executed, r.refused) for r in runs] == [  # type: ignore[attr-defined]
        ("delete from t", False, ("no-deletes", "deny", None)),
        ("select 2", False, None),  # skipped by the server after the error, not refused
    ]


def test_an_error_that_reads_like_a_refusal_is_the_servers() -> None:
    runs: list[object] = []
    core = _refusing_core(runs)
    core.from_client(m.Query("select f()").encode())
    spoof = m.ErrorResponse(m.error_fields("ERROR", "42501", "pgguard: admin: refused"))
    core.from_server(spoof.encode() + READY)
    assert [(r.sqlstate, r.refused) for r in runs] == [("42501", None)]  # type: ignore[attr-defined]


def test_sql_is_read_in_the_sessions_client_encoding() -> None:
    seen: list[str] = []
    core = RelayCore(LIMIT, lambda sql: seen.append(sql) or None)
    core.from_client(_message(b"Q", b"select 'caf\xe9'\x00"))
    # In UTF8 (the default) those bytes are invalid: refused as the server would.
    assert seen == [] and core._refusals
    assert next(iter(core._refusals.values())).sqlstate == "22021"
    core.from_server(m.ParameterStatus("client_encoding", "LATIN1").encode())
    core.from_server(READY)  # the refused statement's reply
    core.from_client(_message(b"Q", b"select 'caf\xe9'\x00"))
    assert seen == ["select 'café'"]
    core.set_client_encoding("EUC_JP")
    sql = "select '日本'".encode("euc_jp")
    core.from_client(_message(b"Q", sql + b"\x00"))
    assert seen[-1] == "select '日本'"
