"""Session recording: row-preview caps, JSON round trip, psql-like transcript."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from datetime import UTC, datetime

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgguard.audit.recording import (
    PreviewCapture,
    RawPreview,
    RecordedError,
    RecordedStatement,
    from_json,
    render_transcript,
    to_json,
)
from pgguard.protocol import messages as m


def capture(
    columns: Sequence[str],
    rows: Sequence[Sequence[bytes | None]],
    *,
    max_rows: int = 10,
    max_bytes: int = 10_000,
    formats: Sequence[int] = (),
) -> PreviewCapture:
    """The relay's capture of a result: the wire bodies of its RowDescription and rows."""
    fields = tuple(
        m.FieldDescription(c, 0, 0, 25, -1, -1, formats[i] if formats else 0)
        for i, c in enumerate(columns)
    )
    preview = PreviewCapture(m.RowDescription(fields).encode()[5:], max_rows, max_bytes)
    for row in rows:
        preview.row(m.DataRow(tuple(row)).encode()[5:])
    return preview


def recorded(
    statement: str,
    columns: Sequence[str],
    rows: Sequence[Sequence[bytes | None]],
    tag: str | None,
    **caps: int,
) -> RecordedStatement:
    """What the audit writer records of it (decoded), under ``statement``."""
    return replace(capture(columns, rows, **caps).result(tag).decoded(), statement=statement)


def test_rows_cap() -> None:
    rows = [[str(n).encode()] for n in range(1, 1001)]
    entry = recorded("select n", ["n"], rows, "SELECT 1000", max_rows=3)
    assert entry.rows == (("1",), ("2",), ("3",))
    assert entry.row_count == 1000
    assert entry.dropped_rows == 997
    assert entry.truncated
    assert entry.command_tag == "SELECT 1000"
    assert entry.dropped_bytes == sum(len(str(n)) for n in range(4, 1001))


def test_rows_past_the_capture_are_counted_from_the_tag() -> None:
    # The relay stops looking at rows once the preview is full; the tag says how many came.
    preview = capture(["n"], [[b"1"], [b"2"]], max_rows=2).result("SELECT 500", 500)
    assert preview.row_count == 500 and preview.truncated
    entry = preview.decoded()
    assert entry.rows == (("1",), ("2",)) and entry.dropped_rows == 498


def test_bytes_cap_keeps_a_prefix() -> None:
    rows = [[b"aaaa"], [b"bbbb"], [b"ccc"], [b"d"], [None]]  # 4, 8, 11 > 10: dropped, ...
    entry = recorded("select v from t", ["v"], rows, "SELECT 5", max_rows=100, max_bytes=10)
    assert entry.rows == (("aaaa",), ("bbbb",))  # "d" would fit: the preview stays a prefix
    assert entry.truncated
    assert entry.row_count == 5
    assert entry.dropped_bytes == 4


def test_not_truncated_when_everything_fits() -> None:
    rows = [[b"ab", b"cd"], [b"ef", None]]
    entry = recorded("select", ["a", "b"], rows, "SELECT 2", max_rows=2, max_bytes=8)
    assert not entry.truncated
    assert entry.rows == (("ab", "cd"), ("ef", None))


def test_zero_caps_record_nothing_but_count() -> None:
    entry = recorded("select 1", ["?column?"], [[b"1"]], "SELECT 1", max_rows=0, max_bytes=0)
    assert entry.rows == () and entry.row_count == 1 and entry.truncated


def test_binary_values() -> None:
    rows = [[b"text", b"\x00\x01\xff", b"x" * 100]]
    entry = recorded("select a, b, c", ["a", "b", "c"], rows, "SELECT 1", formats=[0, 1, 1])
    assert entry.columns == ("a", "b", "c")
    assert entry.rows == (("text", "\\x0001ff", "(binary 100 bytes)"),)


def test_invalid_utf8_replaced() -> None:
    entry = recorded("select", ["a"], [[b"\xff"]], None)
    assert entry.rows == (("\ufffd",),)


def test_a_body_that_does_not_decode_leaves_the_rows_out() -> None:
    description = m.RowDescription((m.FieldDescription("a", 0, 0, 25, -1, -1, 0),)).encode()[5:]
    broken = RawPreview(description, (b"\x00\x01\x00\x00\x00\x09ab",), False, 1, "SELECT 1", 0)
    entry = broken.decoded()
    assert entry.rows == () and entry.truncated and entry.row_count == 1


def test_entries_are_frozen() -> None:
    entry = recorded("select", ["a"], [[b"1"]], "SELECT 1")
    with pytest.raises(AttributeError):
        entry.statement = "x"  # type: ignore[misc]


def _sample_session() -> list[RecordedStatement]:
    customers = [
        [b"1", b"Alice", b"a***@example.com"],
        [b"10", None, b"b***@example.com"],
        [b"11", b"Carol", b"c***@example.com"],
        [b"12", b"Dan", b"d***@example.com"],
    ]
    return [
        recorded(
            "select id, name, email\n  from customers\n order by id",
            ["id", "name", "email"],
            customers,
            "SELECT 4",
            max_rows=2,
            max_bytes=1000,
        ),
        RecordedStatement(
            "update customers set name = 'Bob' where id = 10", command_tag="UPDATE 1"
        ),
        RecordedStatement(
            "select * from vault.keys",
            ("id",),
            error=RecordedError("42501", "pgguard: rule no-secrets denies access to vault.keys"),
        ),
        recorded("select count(*) from orders where note = 'x'", ["count"], [[b"7"]], "SELECT 1"),
        recorded("select 1 where false", ["?column?"], [], "SELECT 0"),
    ]


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
    assert render_transcript(_sample_session(), SESSION_META) == GOLDEN


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
    entries = _sample_session()
    text = to_json(entries)
    assert from_json(text) == entries
    assert from_json(text.encode()) == entries


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
    entry = recorded(
        "select a, b",
        ["a", "b"],
        rows,
        f"SELECT {len(rows)}",
        max_rows=max_rows,
        max_bytes=max_bytes,
        formats=[0, 1],
    )
    assert len(entry.rows) <= max_rows
    kept = rows[: len(entry.rows)]
    assert sum(len(v) for row in kept for v in row if v is not None) <= max_bytes
    assert entry.row_count == len(rows)
    assert entry.truncated == (len(entry.rows) < len(rows))
    assert from_json(to_json([entry])) == [entry]
    render_transcript([entry], {"session_id": "s"})


def test_a_statement_that_never_ran_is_not_replayed_as_if_it_had() -> None:
    from pgguard.audit.records import AuditRecord
    from pgguard.audit.sessions import entry_of

    skipped = AuditRecord(
        event="statement", ts=1.0, statement="delete from t", command="DELETE",
        decision="deny", rule="no-deletes", extra={"executed": False},
    )  # fmt: skip
    assert entry_of(skipped).command_tag == "(not run: the request failed or was refused before it)"
    refused = AuditRecord(
        event="statement", ts=1.0, statement="delete from t", command="DELETE",
        decision="deny", rule="no-deletes", sqlstate="42501",
        extra={"executed": False, "error": "pgguard: no-deletes: deletes are not allowed"},
    )  # fmt: skip
    entry = entry_of(refused)
    assert entry.error is not None
    assert entry.error.message == "pgguard: no-deletes: deletes are not allowed"
    assert entry.command_tag is None
