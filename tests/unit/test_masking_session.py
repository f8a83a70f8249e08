"""The relay's masking state machine, without sockets: which result each reply belongs to."""

from __future__ import annotations

import struct

from pgguard.masking.lineage import CopyOptions
from pgguard.masking.plan import (
    OPAQUE_RESULT,
    ColumnMask,
    MaskerCache,
    ResultPlan,
    StatementPlan,
)
from pgguard.masking.session import SessionMasking
from pgguard.policy.model import MaskFunction
from pgguard.protocol import messages as m
from pgguard.protocol.relay import RelayCore

EMAIL = "alice.secret@example.com"
TEXT, INT4 = 25, 23
PARTIAL_EMAIL = MaskFunction(name="partial_email", args=(), text="partial_email")
REDACT = MaskFunction(name="redact", args=(), text="redact")
EMAIL_MASK = ColumnMask(PARTIAL_EMAIL, "public.customers.email", ("public.customers.email",))
# SELECT id, email FROM customers: the second column is masked.
SELECT_PLAN = StatementPlan(
    result=ResultPlan((None, EMAIL_MASK), None), returns_rows=True, scrub_errors=True
)
CLEAN_PLAN = StatementPlan()


def planner_for(plans: dict[str, tuple[StatementPlan, ...]]):  # type: ignore[no-untyped-def]
    def planner(sql: str) -> tuple[StatementPlan, ...]:
        return plans.get(sql, (CLEAN_PLAN,))

    return planner


def make(
    plans: dict[str, tuple[StatementPlan, ...]],
    origin=None,  # type: ignore[no-untyped-def]
) -> tuple[RelayCore, SessionMasking]:
    core = RelayCore(1 << 20)
    masking = SessionMasking(
        planner_for(plans), MaskerCache(b"secret"), origin or (lambda oid, att: None)
    )
    core.enable_masking(masking)
    return core, masking


def row_description(*types: int, fmt: int = 0, table_oid: int = 0) -> bytes:
    fields = tuple(
        m.FieldDescription(f"c{i}", table_oid, i + 1 if table_oid else 0, t, -1, -1, fmt)
        for i, t in enumerate(types)
    )
    return m.RowDescription(fields).encode()


def data_row(*values: bytes | None) -> bytes:
    return m.DataRow(values).encode()


def complete(tag: str = "SELECT 1") -> bytes:
    return m.CommandComplete(tag).encode()


READY = m.ReadyForQuery(b"I").encode()


def rows_of(stream: bytes) -> list[tuple[bytes | None, ...]]:
    out = []
    pos = 0
    while pos < len(stream):
        t = stream[pos : pos + 1]
        (length,) = struct.unpack_from("!I", stream, pos + 1)
        if t == b"D":
            out.append(m.DataRow.decode_body(stream[pos + 5 : pos + 1 + length]).values)
        pos += 1 + length
    return out


def types_of(stream: bytes) -> list[bytes]:
    out = []
    pos = 0
    while pos < len(stream):
        out.append(stream[pos : pos + 1])
        (length,) = struct.unpack_from("!I", stream, pos + 1)
        pos += 1 + length
    return out


def test_simple_query_masks_the_planned_column_only() -> None:
    core, _ = make({"select id, email from customers": (SELECT_PLAN,)})
    core.from_client(m.Query("select id, email from customers").encode())
    reply = (
        row_description(INT4, TEXT)
        + data_row(b"1", EMAIL.encode())
        + data_row(b"2", None)
        + complete("SELECT 2")
        + READY
    )
    out = core.from_server(reply)
    assert rows_of(out) == [(b"1", b"a****@example.com"), (b"2", None)]
    assert EMAIL.encode() not in out


def test_clean_result_is_forwarded_untouched() -> None:
    core, _ = make({})
    core.from_client(m.Query("select 1").encode())
    reply = row_description(TEXT) + data_row(EMAIL.encode()) + complete() + READY
    assert core.from_server(reply) == reply


def test_multi_statement_query_masks_each_result_by_its_statement() -> None:
    sql = "select id, name from c; select id, email from c"
    core, _ = make({sql: (CLEAN_PLAN, SELECT_PLAN)})
    core.from_client(m.Query(sql).encode())
    reply = (
        row_description(INT4, TEXT)
        + data_row(b"1", EMAIL.encode())
        + complete()
        + row_description(INT4, TEXT)
        + data_row(b"1", EMAIL.encode())
        + complete()
        + READY
    )
    out = core.from_server(reply)
    assert rows_of(out) == [(b"1", EMAIL.encode()), (b"1", b"a****@example.com")]


def test_extended_with_portal_describe_honours_binary_formats() -> None:
    sql = "select id, email from customers"
    core, _ = make({sql: (SELECT_PLAN,)})
    client = (
        m.Parse("", sql, ()).encode()
        + m.Bind("", "", (), (), (1, 1)).encode()
        + m.Describe(b"P", "").encode()
        + m.Execute("", 0).encode()
        + m.Sync().encode()
    )
    assert core.from_client(client) == client
    reply = (
        m.ParseComplete().encode()
        + m.BindComplete().encode()
        + row_description(INT4, TEXT, fmt=1)
        + data_row(struct.pack("!i", 7), EMAIL.encode())
        + complete()
        + READY
    )
    out = core.from_server(reply)
    assert rows_of(out) == [(struct.pack("!i", 7), b"a****@example.com")]


def test_execute_without_describe_gets_a_hidden_describe() -> None:
    sql = "select id, email from customers"
    core, _ = make({sql: (SELECT_PLAN,)})
    client = (
        m.Parse("s1", sql, ()).encode()
        + m.Bind("p1", "s1", (), (), ()).encode()
        + m.Execute("p1", 0).encode()
        + m.Sync().encode()
    )
    sent = core.from_client(client)
    assert types_of(sent) == [b"P", b"B", b"D", b"E", b"S"]
    assert m.Describe(b"P", "p1").encode() in sent
    reply = (
        m.ParseComplete().encode()
        + m.BindComplete().encode()
        + row_description(INT4, TEXT)
        + data_row(b"1", EMAIL.encode())
        + complete()
        + READY
    )
    out = core.from_server(reply)
    assert types_of(out) == [b"1", b"2", b"D", b"C", b"Z"]  # the RowDescription is kept back
    assert rows_of(out) == [(b"1", b"a****@example.com")]


def test_statement_describe_then_bind_formats() -> None:
    sql = "select id, email from customers"
    core, _ = make({sql: (SELECT_PLAN,)})
    core.from_client(
        m.Parse("q", sql, ()).encode() + m.Describe(b"S", "q").encode() + m.Sync().encode()
    )
    out = core.from_server(
        m.ParseComplete().encode()
        + m.ParameterDescription(()).encode()
        + row_description(INT4, TEXT)
        + READY
    )
    assert types_of(out) == [b"1", b"t", b"T", b"Z"]
    sent = core.from_client(
        m.Bind("", "q", (), (), (0, 1)).encode() + m.Execute("", 0).encode() + m.Sync().encode()
    )
    assert b"D" not in types_of(sent)  # described already: nothing slipped in
    out = core.from_server(
        m.BindComplete().encode() + data_row(b"1", EMAIL.encode()) + complete() + READY
    )
    assert rows_of(out) == [(b"1", b"a****@example.com")]


def test_error_skips_the_rest_of_the_batch() -> None:
    sql = "select id, email from customers"
    core, _ = make({sql: (SELECT_PLAN,)})
    core.from_client(
        m.Parse("", "bogus", ()).encode()
        + m.Bind("", "", (), (), ()).encode()
        + m.Describe(b"P", "").encode()
        + m.Execute("", 0).encode()
        + m.Sync().encode()
    )
    error = m.ErrorResponse(m.error_fields("ERROR", "42601", "syntax error")).encode()
    assert core.from_server(error + READY) == error + READY
    core.from_client(m.Query(sql).encode())
    out = core.from_server(
        row_description(INT4, TEXT) + data_row(b"1", EMAIL.encode()) + complete() + READY
    )
    assert rows_of(out) == [(b"1", b"a****@example.com")]


def test_cursor_fetch_uses_the_declared_plan_and_unknown_cursors_are_masked() -> None:
    declare = StatementPlan(result=ResultPlan((None, EMAIL_MASK), None), declares=("cursor", "c"))
    fetch = StatementPlan(returns_rows=True, reference=("cursor", "c"))
    other = StatementPlan(returns_rows=True, reference=("cursor", "other"))
    core, _ = make({"declare": (declare,), "fetch": (fetch,), "fetch other": (other,)})
    core.from_client(m.Query("declare").encode())
    core.from_server(complete("DECLARE CURSOR") + m.ReadyForQuery(b"T").encode())
    core.from_client(m.Query("fetch").encode())
    out = core.from_server(
        row_description(INT4, TEXT)
        + data_row(b"1", EMAIL.encode())
        + complete("FETCH 1")
        + m.ReadyForQuery(b"T").encode()
    )
    assert rows_of(out) == [(b"1", b"a****@example.com")]
    core.from_client(m.Query("fetch other").encode())
    out = core.from_server(
        row_description(INT4, TEXT)
        + data_row(b"1", EMAIL.encode())
        + complete("FETCH 1")
        + m.ReadyForQuery(b"T").encode()
    )
    assert rows_of(out) == [(b"0", b"****")]  # unknown origin: redacted, type-safe


def test_row_description_origin_masks_what_the_plan_missed() -> None:
    def origin(table_oid: int, attnum: int) -> ColumnMask | None:
        return EMAIL_MASK if (table_oid, attnum) == (500, 2) else None

    core, _ = make({}, origin)
    core.from_client(m.Query("select * from customers").encode())
    out = core.from_server(
        row_description(INT4, TEXT, table_oid=500)
        + data_row(b"1", EMAIL.encode())
        + complete()
        + READY
    )
    assert rows_of(out) == [(b"1", b"a****@example.com")]


def test_copy_out_csv_with_header() -> None:
    plan = StatementPlan(
        result=ResultPlan(
            (None, ColumnMask(PARTIAL_EMAIL, "e", ("public.customers.email",), (TEXT, -1))),
            None,
        ),
        returns_rows=True,
        copy=CopyOptions(format="csv", header=True),
    )
    core, _ = make({"copy": (plan,)})
    core.from_client(m.Query("copy").encode())
    out = core.from_server(
        m.CopyOutResponse(0, (0, 0)).encode()
        + m.CopyData(b"id,email\n").encode()
        + m.CopyData(b"1," + EMAIL.encode() + b"\n").encode()
        + m.CopyDone().encode()
        + complete("COPY 1")
        + READY
    )
    assert EMAIL.encode() not in out
    assert b"id,email\n" in out
    assert b"1,a****@example.com\n" in out


def test_error_text_is_scrubbed_for_statements_reading_masked_columns() -> None:
    core, _ = make({"select email::int from customers": (SELECT_PLAN,)})
    core.from_client(m.Query("select email::int from customers").encode())
    message = f'invalid input syntax for type integer: "{EMAIL}"'
    fields = (*m.error_fields("ERROR", "22P02", message), ("D", f"Key (email)=({EMAIL})"))
    out = core.from_server(m.ErrorResponse(fields).encode() + READY)
    assert EMAIL.encode() not in out
    err = m.ErrorResponse.decode_body(out[5 : 1 + struct.unpack_from("!I", out, 1)[0]])
    assert err.sqlstate == "22P02"
    assert "invalid input syntax for type integer" in err.message


def test_opaque_result_masks_every_column() -> None:
    core, _ = make({"select f()": (StatementPlan(result=OPAQUE_RESULT, returns_rows=True),)})
    core.from_client(m.Query("select f()").encode())
    out = core.from_server(
        row_description(TEXT, INT4) + data_row(EMAIL.encode(), b"42") + complete() + READY
    )
    assert rows_of(out) == [(b"****", b"0")]


def test_masked_counts_and_audit_columns() -> None:
    core, masking = make({"q": (SELECT_PLAN,)})
    core.from_client(m.Query("q").encode())
    core.from_server(
        row_description(INT4, TEXT)
        + data_row(b"1", EMAIL.encode())
        + data_row(b"2", EMAIL.encode())
        + complete()
        + READY
    )
    assert masking.take_counts() == {"public.customers.email": 2}
    assert masking.last_masked == ("public.customers.email",)


def test_masks_apply_when_messages_arrive_byte_by_byte() -> None:
    sql = "select id, email from customers"
    core, _ = make({sql: (SELECT_PLAN,)})
    client = m.Parse("", sql, ()).encode() + m.Bind("", "", (), (), ()).encode()
    client += m.Execute("", 0).encode() + m.Sync().encode()
    sent = b"".join(core.from_client(client[i : i + 1]) for i in range(len(client)))
    assert m.Describe(b"P", "").encode() in sent
    reply = (
        m.ParseComplete().encode()
        + m.BindComplete().encode()
        + row_description(INT4, TEXT)
        + data_row(b"1", EMAIL.encode())
        + complete()
        + READY
    )
    out = b"".join(core.from_server(reply[i : i + 1]) for i in range(len(reply)))
    assert EMAIL.encode() not in out
    assert rows_of(out) == [(b"1", b"a****@example.com")]


def error(code: str, text: str) -> bytes:
    return m.ErrorResponse(m.error_fields("ERROR", code, text)).encode()


def test_a_failed_re_parse_of_a_taken_name_masks_that_statement_whole() -> None:
    """The server keeps the first text when a re-Parse of the name fails (42P05): pgguard
    cannot tell which text runs, so the results are masked entirely."""
    masked, clean = "select id, email from customers", "select 1 as id, 'x' as email"
    core, _ = make({masked: (SELECT_PLAN,)})
    core.from_client(m.Parse("s1", masked, ()).encode() + m.Sync().encode())
    core.from_server(m.ParseComplete().encode() + READY)
    core.from_client(m.Parse("s1", clean, ()).encode() + m.Sync().encode())
    core.from_server(error("42P05", 'prepared statement "s1" already exists') + READY)
    sent = core.from_client(
        m.Bind("", "s1", (), (), ()).encode() + m.Execute("", 0).encode() + m.Sync().encode()
    )
    assert m.Describe(b"P", "").encode() in sent
    back = core.from_server(
        m.BindComplete().encode()
        + row_description(INT4, TEXT)
        + data_row(b"1", EMAIL.encode())
        + complete()
        + READY
    )
    assert EMAIL.encode() not in back and rows_of(back) == [(b"0", b"****")]


def test_statements_prepared_before_masking_started_are_masked() -> None:
    masked = "select id, email from customers"
    core = RelayCore(1 << 20, lambda sql: None)
    masking = SessionMasking(
        planner_for({masked: (SELECT_PLAN,)}), MaskerCache(b"k"), lambda oid, att: None
    )
    core.from_client(m.Parse("s1", masked, ()).encode() + m.Sync().encode())
    core.from_server(m.ParseComplete().encode() + READY)
    core.masking_wanted = masking  # a reload added masks: masking starts at the next idle point
    core.from_client(m.Query("select 1").encode())
    core.from_server(complete() + READY)
    assert core.masking is masking
    sent = core.from_client(
        m.Bind("", "s1", (), (), ()).encode() + m.Execute("", 0).encode() + m.Sync().encode()
    )
    assert m.Describe(b"P", "").encode() in sent
    back = core.from_server(
        m.BindComplete().encode()
        + row_description(INT4, TEXT)
        + data_row(b"1", EMAIL.encode())
        + complete()
        + READY
    )
    assert rows_of(back) == [(b"1", b"a****@example.com")]


def test_row_description_origins_apply_to_executes_too() -> None:
    """The safety net under the lineage analysis: a portal described by the client carries
    its fields' table OIDs, and a column straight from a masked one is masked on Execute."""

    def origin(table_oid: int, attnum: int) -> ColumnMask | None:
        return EMAIL_MASK if (table_oid, attnum) == (500, 2) else None

    core, _ = make({}, origin)
    core.from_client(
        m.Parse("", "select * from customers", ()).encode()
        + m.Bind("", "", (), (), ()).encode()
        + m.Describe(b"P", "").encode()
        + m.Execute("", 0).encode()
        + m.Sync().encode()
    )
    out = core.from_server(
        m.ParseComplete().encode()
        + m.BindComplete().encode()
        + row_description(INT4, TEXT, table_oid=500)
        + data_row(b"1", EMAIL.encode())
        + complete()
        + READY
    )
    assert rows_of(out) == [(b"1", b"a****@example.com")]
