"""Matching server replies to the statements the client sent (for one record per statement)."""

from __future__ import annotations

import itertools

from pgguard.protocol.statements import StatementTracker, rows_of, split_statements


def tracker() -> StatementTracker:
    ticks = itertools.count()
    return StatementTracker(lambda: float(next(ticks)))


def test_rows_of_command_tags() -> None:
    assert rows_of("SELECT 3") == 3
    assert rows_of("INSERT 0 5") == 5
    assert rows_of("CREATE TABLE") is None
    assert rows_of("BEGIN") is None


def test_split_statements_keeps_each_text() -> None:
    assert split_statements("select 1; select 'a;b';") == ["select 1", "select 'a;b'"]
    assert split_statements("selec oops") == ["selec oops"]


def test_multi_statement_query_gives_one_run_each() -> None:
    t = tracker()
    t.query("select 1; update t set x = 1; select 2")
    runs = t.complete("SELECT 1") + t.complete("UPDATE 4") + t.complete("SELECT 1") + t.ready()
    assert [(r.statement, r.command, r.rows, r.executed) for r in runs] == [
        ("select 1", "SELECT", 1, True),
        ("update t set x = 1", "UPDATE", 4, True),
        ("select 2", "SELECT", 1, True),
    ]
    assert all(r.duration_ms is not None and r.duration_ms >= 0 for r in runs)


def test_error_in_a_query_skips_the_rest() -> None:
    t = tracker()
    t.query("select 1; select 1/0; select 3")
    runs = t.complete("SELECT 1") + t.error("22012", "division by zero") + t.ready()
    assert [(r.statement, r.sqlstate, r.executed) for r in runs] == [
        ("select 1", None, True),
        ("select 1/0", "22012", True),
        ("select 3", None, False),
    ]
    assert t.pending() == 0


def test_extended_protocol_pipeline() -> None:
    t = tracker()
    t.parse("s1", "select $1")
    t.bind("", "s1", [b"7"], [0])
    t.execute("")
    t.sync()
    t.parse("", "delete from t where id = $1")
    t.bind("p2", "", [b"\x00\x00\x00\x01"], [1])
    t.execute("p2")
    t.sync()
    first = t.complete("SELECT 1") + t.ready()
    second = t.complete("DELETE 1") + t.ready()
    assert [(r.statement, r.params, r.statement_name, r.portal) for r in first] == [
        ("select $1", (b"7",), "s1", "")
    ]
    assert [(r.statement, r.param_formats, r.portal, r.rows) for r in second] == [
        ("delete from t where id = $1", (1,), "p2", 1)
    ]


def test_parse_error_without_execute_is_not_charged_to_the_next_batch() -> None:
    t = tracker()
    t.parse("bad", "selec")
    t.sync()  # batch 1: no Execute
    t.query("select 1")  # batch 2
    assert t.error("42601", "syntax error") == []
    assert t.ready() == []
    [run] = t.complete("SELECT 1") + t.ready()
    assert run.statement == "select 1" and run.sqlstate is None


def test_error_skips_later_executes_until_sync() -> None:
    t = tracker()
    for sql in ("select 1/0", "select 2"):
        t.parse("", sql)
        t.bind("", "", [], [])
        t.execute("")
    t.sync()
    runs = t.error("22012", "division by zero") + t.ready()
    assert [(r.statement, r.sqlstate, r.executed) for r in runs] == [
        ("select 1/0", "22012", True),
        ("select 2", None, False),
    ]


def test_empty_query_and_portal_suspension() -> None:
    t = tracker()
    t.query("")
    [empty] = t.empty() + t.ready()
    assert empty.rows == 0
    t.parse("", "select g from generate_series(1, 10) g")
    t.bind("c", "", [], [])
    t.execute("c")
    t.execute("c")
    t.sync()
    runs = t.suspended() + t.complete("SELECT 5") + t.ready()
    assert [r.command_tag for r in runs] == ["SUSPENDED", "SELECT 5"]


def test_statements_left_unanswered_are_finished_with_the_reason() -> None:
    tracker = StatementTracker(lambda: 1.0)
    tracker.query("insert into t values (1); select 2")
    runs = tracker.abandon(2.0, "08006", "the client disconnected")
    assert [(r.statement, r.sqlstate, r.error, r.ended) for r in runs] == [
        ("insert into t values (1)", "08006", "the client disconnected", 2.0),
        ("select 2", "08006", "the client disconnected", 2.0),
    ]
    assert tracker.abandon(3.0, "08006", "again") == []
    assert tracker.ready() == []
