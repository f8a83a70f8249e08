"""Session recording: row-preview caps, JSON round trip, psql-like transcript."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgguard.audit.recording import (
    RecordedError,
    RecordedStatement,
    SessionRecorder,
    from_json,
    render_transcript,
    to_json,
)


def test_rows_cap() -> None:
    recorder = SessionRecorder(max_rows=3, max_bytes=10_000)
    recorder.start("select n from generate_series(1, 1000) n", ["n"])
    for n in range(1, 1001):
        recorder.row([str(n).encode()])
    recorder.finish("SELECT 1000")
    (entry,) = recorder.entries()
    assert entry.rows == (("1",), ("2",), ("3",))
    assert entry.row_count == 1000
    assert entry.dropped_rows == 997
    assert entry.truncated
    assert entry.command_tag == "SELECT 1000"
    assert entry.dropped_bytes == sum(len(str(n)) for n in range(4, 1001))


def test_bytes_cap_keeps_a_prefix() -> None:
    recorder = SessionRecorder(max_rows=100, max_bytes=10)
    recorder.start("select v from t", ["v"])
    recorder.row([b"aaaa"])  # 4
    recorder.row([b"bbbb"])  # 8
    recorder.row([b"ccc"])  # 11 > 10: dropped
    recorder.row([b"d"])  # would fit, but the preview stays a prefix
    recorder.row([None])
    recorder.finish("SELECT 5")
    (entry,) = recorder.entries()
    assert entry.rows == (("aaaa",), ("bbbb",))
    assert entry.truncated
    assert entry.row_count == 5
    assert entry.dropped_bytes == 4


def test_not_truncated_when_everything_fits() -> None:
    recorder = SessionRecorder(max_rows=2, max_bytes=8)
    recorder.start("select", ["a", "b"])
    recorder.row([b"ab", b"cd"])
    recorder.row([b"ef", None])
    recorder.finish("SELECT 2")
    (entry,) = recorder.entries()
    assert not entry.truncated
    assert entry.rows == (("ab", "cd"), ("ef", None))


def test_zero_caps_record_nothing_but_count() -> None:
    recorder = SessionRecorder(max_rows=0, max_bytes=0)
    recorder.start("select 1", ["?column?"])
    recorder.row([b"1"])
    recorder.finish("SELECT 1")
    (entry,) = recorder.entries()
    assert entry.rows == () and entry.row_count == 1 and entry.truncated


def test_binary_values() -> None:
    recorder = SessionRecorder(max_rows=10, max_bytes=10_000)
    recorder.start("select a, b, c", ["a", "b", "c"], formats=[0, 1, 1])
    recorder.row([b"text", b"\x00\x01\xff", b"x" * 100])
    recorder.finish("SELECT 1")
    (entry,) = recorder.entries()
    assert entry.rows == (("text", "\\x0001ff", "(binary 100 bytes)"),)


def test_invalid_utf8_replaced() -> None:
    recorder = SessionRecorder(max_rows=10, max_bytes=100)
    recorder.start("select", ["a"])
    recorder.row([b"\xff"])
    (entry,) = recorder.entries()
    assert entry.rows == (("\ufffd",),)


def test_lifecycle() -> None:
    recorder = SessionRecorder(max_rows=10, max_bytes=100)
    recorder.start("begin")
    recorder.finish("BEGIN")
    recorder.start("select * from nope", ["x"])
    recorder.error("42P01", 'relation "nope" does not exist')
    recorder.start("select 1", ["?column?"])  # left open, then superseded
    recorder.start("update t set a = 1")
    recorder.describe([])  # a late RowDescription / NoData
    recorder.finish("UPDATE 3")
    recorder.row([b"orphan"])  # no start: an unnamed statement, not lost
    entries = recorder.entries()
    assert [e.statement for e in entries] == [
        "begin",
        "select * from nope",
        "select 1",
        "update t set a = 1",
        "",
    ]
    assert entries[0].command_tag == "BEGIN"
    assert entries[1].error == RecordedError("42P01", 'relation "nope" does not exist')
    assert entries[1].command_tag is None
    assert entries[2].command_tag is None and entries[2].error is None
    assert entries[3].command_tag == "UPDATE 3"
    assert entries[4].rows == (("orphan",),)


def test_entries_are_frozen_snapshots() -> None:
    recorder = SessionRecorder(max_rows=10, max_bytes=100)
    recorder.start("select", ["a"])
    recorder.row([b"1"])
    before = recorder.entries()
    recorder.row([b"2"])
    assert before[0].rows == (("1",),)
    with pytest.raises(AttributeError):
        before[0].statement = "x"  # type: ignore[misc]


def _sample_session() -> SessionRecorder:
    recorder = SessionRecorder(max_rows=2, max_bytes=1000)
    recorder.start(
        "select id, name, email\n  from customers\n order by id", ["id", "name", "email"]
    )
    recorder.row([b"1", b"Alice", b"a***@example.com"])
    recorder.row([b"10", None, b"b***@example.com"])
    recorder.row([b"11", b"Carol", b"c***@example.com"])
    recorder.row([b"12", b"Dan", b"d***@example.com"])
    recorder.finish("SELECT 4")
    recorder.start("update customers set name = 'Bob' where id = 10")
    recorder.finish("UPDATE 1")
    recorder.start("select * from vault.keys", ["id"])
    recorder.error("42501", "pgguard: rule no-secrets denies access to vault.keys")
    recorder.start("select count(*) from orders where note = 'x'", ["count"])
    recorder.row([b"7"])
    recorder.finish("SELECT 1")
    recorder.start("select 1 where false", ["?column?"])
    recorder.finish("SELECT 0")
    return recorder


SESSION_META = {
    "session_id": "3f2a9c",
    "user": "alice",
    "email": "alice@example.com",
    "database": "shop",
    "started_at": datetime(2025, 3, 1, 9, 30, 0, tzinfo=UTC),
    "ended_at": datetime(2025, 3, 1, 9, 31, 5, tzinfo=UTC),
}

GOLDEN = """\
-- pgguard session 3f2a9c
-- user: alice
-- email: alice@example.com
-- database: shop
-- started: 2025-03-01 09:30:00+00:00
-- ended: 2025-03-01 09:31:05+00:00

=> select id, name, email
->   from customers
->  order by id
 id | name  |      email
----+-------+------------------
  1 | Alice | a***@example.com
 10 |       | b***@example.com
… 2 more rows not recorded
(4 rows)

=> update customers set name = 'Bob' where id = 10
UPDATE 1

=> select * from vault.keys
ERROR:  pgguard: rule no-secrets denies access to vault.keys
(SQLSTATE 42501)

=> select count(*) from orders where note = 'x'
 count
-------
     7
(1 row)

=> select 1 where false
 ?column?
----------
(0 rows)
"""


def test_transcript_golden() -> None:
    assert render_transcript(_sample_session().entries(), SESSION_META) == GOLDEN


def test_transcript_open_session_and_epoch_times() -> None:
    text = render_transcript([], {"session_id": "s", "started_at": 0})
    assert text.splitlines() == [
        "-- pgguard session s",
        "-- started: 1970-01-01 00:00:00+00:00",
        "-- ended: (still open)",
    ]


def test_transcript_escapes_control_characters() -> None:
    entry = RecordedStatement(
        statement="select '\x1b[2J'",
        columns=("v\u202e",),
        rows=(("line1\nline2\t\x1b]0;pwned\x07",),),
        row_count=1,
        command_tag="SELECT 1",
    )
    text = render_transcript([entry], {"session_id": "s"})
    assert "\x1b" not in text and "\x07" not in text and "\u202e" not in text
    assert "line1\\nline2\\t\\x1b]0;pwned\\x07" in text
    assert "=> select '\\x1b[2J'" in text


def test_transcript_wide_characters_align() -> None:
    entry = RecordedStatement(
        statement="select name", columns=("name",), rows=(("日本",), ("ab",)), row_count=2
    )
    lines = render_transcript([entry], {"session_id": "s"}).splitlines()
    table = lines[lines.index("=> select name") + 1 :]
    assert table[:4] == [" name", "------", " 日本", " ab"]


def test_transcript_no_result() -> None:
    entries = [
        RecordedStatement(statement="select pg_sleep(100)"),
        RecordedStatement("", command_tag=""),
    ]
    text = render_transcript(entries, {"session_id": "s"})
    assert "=> select pg_sleep(100)\n(no result recorded)" in text
    assert "=> \n(empty query)" in text


def test_json_round_trip() -> None:
    entries = _sample_session().entries()
    text = to_json(entries)
    assert from_json(text) == entries
    assert from_json(text.encode()) == entries
    assert from_json(_sample_session().to_json()) == entries


def test_from_json_rejects_other_documents() -> None:
    with pytest.raises(ValueError):
        from_json("[]")
    with pytest.raises(ValueError):
        from_json('{"version": 2, "statements": []}')
    with pytest.raises(ValueError):
        from_json('{"version": 1, "statements": [{"columns": []}]}')


_values = st.one_of(st.none(), st.binary(max_size=40))


@settings(max_examples=200, deadline=None)
@given(
    st.integers(min_value=0, max_value=5),
    st.integers(min_value=0, max_value=100),
    st.lists(st.lists(_values, min_size=2, max_size=2), max_size=20),
)
def test_caps_hold_and_json_round_trips(
    max_rows: int, max_bytes: int, rows: list[list[bytes | None]]
) -> None:
    recorder = SessionRecorder(max_rows=max_rows, max_bytes=max_bytes)
    recorder.start("select a, b", ["a", "b"], formats=[0, 1])
    for row in rows:
        recorder.row(row)
    recorder.finish(f"SELECT {len(rows)}")
    (entry,) = recorder.entries()
    assert len(entry.rows) <= max_rows
    kept = rows[: len(entry.rows)]
    assert sum(len(v) for row in kept for v in row if v is not None) <= max_bytes
    assert entry.row_count == len(rows)
    assert entry.truncated == (len(entry.rows) < len(rows))
    assert from_json(recorder.to_json()) == [entry]
    render_transcript([entry], {"session_id": "s"})
