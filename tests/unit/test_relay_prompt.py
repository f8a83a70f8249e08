"""Prompt ids in the middle of an extended-protocol batch, without sockets: a set_config of
pgguard's own goes into the client's batch just before the statement, and its replies never
reach the client (nor the audit's statement tracker)."""

from __future__ import annotations

import pytest

from pgguard.audit.text import prompt_id_from_comment
from pgguard.policy.identity_guard import Hold, PromptSync, Refusal
from pgguard.protocol import messages as m
from pgguard.protocol.framing import MessageReader
from pgguard.protocol.relay import RelayCore
from pgguard.protocol.statements import StatementRun, StatementTracker
from pgguard.proxy.server import _NOT_AFTER_A_QUERY, prompt_effect

SET = "select pg_catalog.set_config('pgguard.prompt_id', $1, false)"


class Session:
    """What pgguard's session does with prompt ids (``Session._sync_prompt``), without I/O: a
    statement whose prompt id is not the one upstream is held; at the start of a batch a query
    of pgguard's own sets it, within one a statement injected into the batch."""

    def __init__(self, base: str = "base") -> None:
        self.core = RelayCore(1 << 20, self.judge)
        self.core.on_hold = self.on_hold
        self.base = base
        self.upstream: str | None = base
        self.settled: list[bool] = []
        self.to_server: list[bytes] = []  # released after pgguard's own query

    def known(self) -> str | None:
        return None if self.core.injected_in_flight else self.upstream

    def judge(self, sql: str) -> Refusal | None:
        prompt = prompt_id_from_comment(sql) or self.base
        return None if prompt == self.known() else PromptSync("prompt", prompt)

    def on_hold(self, hold: Hold, sql: str, message: bytes) -> None:
        core, prompt = self.core, hold.message
        if core.internal_clear():

            def done(_rows: list[tuple[str | None, ...]], error: str | None) -> None:
                if error is None:
                    self.upstream = prompt
                    core.forget_verdicts()
                self.to_server.append(core.release(None))

            core.internal_query(
                f"select pg_catalog.set_config('pgguard.prompt_id', '{prompt}', false)", done
            )
            if core.internal_now():
                self.to_server.extend(core.server_out)
                core.server_out.clear()
            return
        if core.can_inject():
            core.inject(SET, (prompt,), self.on_settled)
            self.upstream = prompt
            core.forget_verdicts()
        core.release(None)

    def on_settled(self, landed: bool) -> None:
        self.settled.append(landed)
        if not landed:
            self.upstream = None
            self.core.forget_verdicts()


def insert(note: str, prompt: str | None = None) -> str:
    comment = f"/* prompt_id='{prompt}' */ " if prompt else ""
    return f"{comment}insert into log(note) values ('{note}')"


def statement(sql: str) -> bytes:
    """One statement as psycopg sends it (unnamed statement and portal)."""
    return (
        m.Parse("", sql, ()).encode()
        + m.Bind("", "", (), (), ()).encode()
        + m.Describe(b"P", "").encode()
        + m.Execute("", 0).encode()
    )


def answer() -> bytes:
    """The server's replies to :func:`statement`."""
    return (
        m.ParseComplete().encode()
        + m.BindComplete().encode()
        + m.NoData().encode()
        + m.CommandComplete("INSERT 0 1").encode()
    )


def own_answer(prompt: str) -> bytes:
    """The server's replies to pgguard's injected set_config."""
    return (
        m.ParseComplete().encode()
        + m.BindComplete().encode()
        + m.DataRow((prompt.encode(),)).encode()
        + m.CommandComplete("SELECT 1").encode()
        + m.CloseComplete().encode()  # the portal
        + m.CloseComplete().encode()  # the statement
    )


def four_statement_replies() -> bytes:
    """The server's replies to plain, e-3, e-4, plain (the session's own back) in one batch."""
    return (
        answer()
        + own_answer("e-3")
        + answer()
        + own_answer("e-4")
        + answer()
        + own_answer("base")
        + answer()
        + ready()
    )


def error(sqlstate: str, message: str) -> bytes:
    return m.ErrorResponse(m.error_fields("ERROR", sqlstate, message)).encode()


def ready(status: bytes = b"I") -> bytes:
    return m.ReadyForQuery(status).encode()


def split(data: bytes) -> list[tuple[bytes, bytes]]:
    reader = MessageReader(1 << 20)
    reader.feed(data)
    out = []
    while (msg := reader.next_message()) is not None:
        out.append(msg)
    return out


def injected(data: bytes, prompt: str) -> bytes:
    """Check that ``data`` starts with pgguard's set_config of ``prompt``; the rest of it."""
    (p, pb), (b, bb), (e, eb), (c, cb), (c2, cb2) = split(data)[:5]
    assert (p, b, e, c, c2) == (b"P", b"B", b"E", b"C", b"C")
    parse, bind = m.Parse.decode_body(pb), m.Bind.decode_body(bb)
    name = parse.name
    assert name.startswith("pgguard_") and parse.sql == SET
    assert (bind.portal, bind.statement, bind.params) == (name, name, (prompt.encode(),))
    assert m.Execute.decode_body(eb) == m.Execute(name, 0)
    assert m.Close.decode_body(cb) == m.Close(b"P", name)  # nothing left open
    assert m.Close.decode_body(cb2) == m.Close(b"S", name)
    return data[sum(5 + len(body) for _, body in split(data)[:5]) :]


def test_the_set_config_goes_into_the_batch_just_before_the_held_parse() -> None:
    s = Session()
    first, tagged = statement(insert("one")), statement(insert("two", "p-1"))
    sync = m.Sync().encode()
    out = s.core.from_client(first + tagged + sync)
    assert out.startswith(first)
    assert injected(out[len(first) :], "p-1") == tagged + sync
    # Names of pgguard's own: never the client's unnamed statement, different per session.
    other = Session()
    again = other.core.from_client(first + tagged + sync)
    assert split(out)[4][1] != split(again)[4][1]


@pytest.mark.parametrize("chunk", [0, 1, 7])
def test_its_replies_never_reach_the_client(chunk: int) -> None:
    s = Session()
    s.core.from_client(
        statement(insert("one")) + statement(insert("two", "p-1")) + m.Sync().encode()
    )
    assert s.core.injected_in_flight  # the batch is over: its outcome comes with its Z
    replies = answer() + own_answer("p-1") + answer() + ready()
    if chunk:
        got = b"".join(
            s.core.from_server(replies[i : i + chunk]) for i in range(0, len(replies), chunk)
        )
    else:
        got = s.core.from_server(replies)
    assert got == answer() + answer() + ready()
    assert s.settled == [True] and s.upstream == "p-1"
    assert s.core.idle() and not s.core.injected_in_flight
    # Nothing pending afterwards: the client's next replies pass as they are.
    s.core.from_client(statement(insert("three", "p-1")) + m.Sync().encode())
    assert s.core.from_server(m.ParseComplete().encode() * 3 + ready()) == (
        m.ParseComplete().encode() * 3 + ready()
    )


def test_several_statements_of_one_batch_each_get_their_prompt_id() -> None:
    s = Session()
    plain, three = statement(insert("plain")), statement(insert("three", "e-3"))
    four, after = statement(insert("four", "e-4")), statement(insert("after"))
    sync = m.Sync().encode()
    out = s.core.from_client(plain + three + four + after + sync)
    assert out.startswith(plain)
    rest = injected(out[len(plain) :], "e-3")
    assert rest.startswith(three)
    rest = injected(rest[len(three) :], "e-4")
    assert rest.startswith(four)
    assert injected(rest[len(four) :], "base") == after + sync
    assert s.core.from_server(four_statement_replies()) == answer() * 4 + ready()
    assert s.settled == [True, True, True] and s.upstream == "base"


def test_nothing_of_it_comes_back_after_an_earlier_error() -> None:
    # The server skips everything after a failed message up to the Sync, pgguard's own too.
    s = Session()
    s.core.from_client(
        statement(insert("one")) + statement(insert("two", "p-1")) + m.Sync().encode()
    )
    dup = error("23505", "duplicate key value violates unique constraint")
    replies = m.ParseComplete().encode() + m.BindComplete().encode() + m.NoData().encode() + dup
    assert s.core.from_server(replies + ready()) == replies + ready()
    assert s.settled == [False]
    assert s.upstream is None  # not known: the next statement sets it again
    s.core.from_client(statement(insert("three")) + m.Sync().encode())
    assert s.settled == [False] and s.core.holding is not None  # held at the batch start


@pytest.mark.parametrize("fails_at", ["execute", "parse"])
def test_its_own_error_reaches_the_client_as_the_next_statements(fails_at: str) -> None:
    s = Session()
    runs: list[StatementRun] = []
    s.core.track_statements(StatementTracker(lambda: 0.0), runs.extend)
    s.core.from_client(
        statement(insert("one")) + statement(insert("two", "p-1")) + m.Sync().encode()
    )
    cancelled = error("57014", "canceling statement due to user request")
    ran = m.ParseComplete().encode() + m.BindComplete().encode()
    own = ran if fails_at == "execute" else b""
    got = s.core.from_server(answer() + own + cancelled + ready())
    assert got == answer() + cancelled + ready()  # pgguard's ParseComplete/BindComplete: dropped
    assert s.settled == [False] and s.upstream is None
    assert [(r.statement, r.command_tag, r.sqlstate, r.executed) for r in runs] == [
        (insert("one"), "INSERT 0 1", None, True),
        (insert("two", "p-1"), None, "57014", True),
    ]
    # Failing after its Parse, its Closes were skipped: pgguard deallocates its statement
    # once the session is idle, unseen by the client and the tracker.
    out = s.core.server_out
    if fails_at == "execute":
        ((kind, body),) = split(b"".join(out))
        assert kind == b"Q"
        sql = m.Query.decode_body(body).sql
        assert sql.startswith("DEALLOCATE pgguard_") and sql.endswith("_1")
        out.clear()
        assert s.core.from_server(m.CommandComplete("DEALLOCATE").encode() + ready()) == b""
    assert out == []
    assert len(runs) == 2


def test_nothing_is_injected_in_a_failed_transaction() -> None:
    # A failed transaction block: neither pgguard's own query nor an injected statement can
    # set the prompt id (the server refuses both until the block ends).
    s = Session()
    s.core.from_client(m.Query("begin").encode() + m.Query("select 1/0").encode())
    s.core.from_server(
        m.CommandComplete("BEGIN").encode()
        + ready(b"T")
        + error("22012", "division by zero")
        + ready(b"E")
    )
    # Nothing is injected: the server would refuse it and skip everything up to the Sync,
    # a ROLLBACK included; the statement runs under the prompt id upstream (its record still
    # carries its own).
    tagged, sync = statement(insert("two", "p-1")), m.Sync().encode()
    assert s.core.from_client(tagged + sync) == tagged + sync
    aborted = error("25P02", "current transaction is aborted")
    assert s.core.from_server(aborted + ready(b"E")) == aborted + ready(b"E")
    rollback = statement("rollback")
    assert s.core.from_client(rollback + sync) == rollback + sync
    assert s.settled == [] and s.upstream == "base"


def test_never_before_a_simple_query() -> None:
    # While pgguard's own query runs, a simple Query with another prompt id is released as it
    # is: an injected statement that failed would make the server skip the Query for good.
    s = Session()
    s.core.internal_query("select 1", lambda rows, error: None)
    assert s.core.internal_now()
    s.core.server_out.clear()
    tagged = m.Query(insert("one", "p-9")).encode()
    assert s.core.from_client(tagged) == tagged
    assert s.settled == [] and s.upstream == "base"


def test_a_rollback_after_it_leaves_the_prompt_id_unknown() -> None:
    s = Session()
    begin = m.Parse("", "begin", ()).encode() + m.Bind("", "", (), (), ()).encode()
    begin += m.Execute("", 0).encode()
    rollback = m.Parse("", "rollback", ()).encode() + m.Bind("", "", (), (), ()).encode()
    rollback += m.Execute("", 0).encode()
    s.core.from_client(begin + statement(insert("two", "p-1")) + rollback + m.Sync().encode())
    s.core.from_server(
        m.ParseComplete().encode()
        + m.BindComplete().encode()
        + m.CommandComplete("BEGIN").encode()
        + own_answer("p-1")
        + answer()
        + own_answer("base")  # the rollback has no comment: the session's own goes back
        + m.ParseComplete().encode()
        + m.BindComplete().encode()
        + m.CommandComplete("ROLLBACK").encode()
        + ready()
    )
    assert s.settled == [False, False] and s.upstream is None


def test_the_tracker_sees_only_the_clients_statements() -> None:
    s = Session()
    runs: list[StatementRun] = []
    s.core.track_statements(StatementTracker(lambda: 0.0), runs.extend)
    sqls = [insert("plain"), insert("three", "e-3"), insert("four", "e-4"), insert("after")]
    s.core.from_client(b"".join(statement(sql) for sql in sqls) + m.Sync().encode())
    s.core.from_server(four_statement_replies())
    assert [(r.statement, r.command_tag) for r in runs] == [(sql, "INSERT 0 1") for sql in sqls]


def test_a_prompt_id_starting_a_batch_is_still_set_by_pgguards_own_query() -> None:
    s = Session()
    tagged, plain, sync = (
        statement(insert("one", "p-1")),
        statement(insert("two")),
        m.Sync().encode(),
    )
    assert s.core.from_client(tagged + plain + sync) == b""
    (query,) = s.to_server
    assert m.Query.decode_body(query[5:]).sql.startswith("select pg_catalog.set_config(")
    s.to_server.clear()
    s.core.from_server(
        m.DataRow((b"p-1",)).encode() + m.CommandComplete("SELECT 1").encode() + ready()
    )
    (released,) = s.to_server
    # ... and the statement after it in the batch gets the session's own back by injection.
    assert released.startswith(tagged)
    assert injected(released[len(tagged) :], "base") == plain + sync


def test_a_prepared_statement_is_set_before_its_bind() -> None:
    s = Session()
    tagged = insert("two", "p-2")
    s.core.from_client(m.Parse("s1", tagged, ()).encode() + m.Sync().encode())
    s.core.from_server(m.CommandComplete("SELECT 1").encode() + ready())  # pgguard's query
    s.core.from_server(m.ParseComplete().encode() + ready())
    assert s.upstream == "p-2"
    # The next batch starts without a comment (pgguard's query sets the session's own back),
    # then runs the prepared statement: the set_config goes in before its Bind.
    plain = statement(insert("one"))
    bind = m.Bind("", "s1", (), (), ()).encode() + m.Execute("", 0).encode() + m.Sync().encode()
    s.to_server.clear()
    assert s.core.from_client(plain + bind) == b""
    s.to_server.clear()
    s.core.from_server(m.CommandComplete("SELECT 1").encode() + ready())
    (out,) = s.to_server
    assert out.startswith(plain)
    assert injected(out[len(plain) :], "p-2") == bind
    theirs = answer() + m.BindComplete().encode() + m.CommandComplete("INSERT 0 1").encode()
    got = s.core.from_server(
        answer()
        + own_answer("p-2")
        + m.BindComplete().encode()
        + m.CommandComplete("INSERT 0 1").encode()
        + ready()
    )
    assert got == theirs + ready()
    assert s.settled == [True] and s.upstream == "p-2"


def test_not_where_its_replies_could_not_be_told_apart() -> None:
    # Part of the batch came back already (a Flush): pgguard cannot tell how many of the
    # client's ParseCompletes it has seen, so nothing goes in; the statement runs as it is.
    s = Session()
    s.core.from_client(statement(insert("one")) + m.Flush().encode())
    assert s.core.from_server(m.ParseComplete().encode()) == m.ParseComplete().encode()
    assert not s.core.can_inject()
    rest = statement(insert("two", "p-1")) + m.Sync().encode()
    assert s.core.from_client(rest) == rest
    # An earlier request is still being answered: the same.
    s2 = Session()
    s2.core.from_client(m.Query("select pg_sleep(1)").encode())
    batch = statement(insert("one")) + statement(insert("two", "p-1")) + m.Sync().encode()
    assert s2.core.from_client(batch) == batch
    assert s.settled == s2.settled == []


def test_a_later_batch_waits_for_the_outcome() -> None:
    # Sent before the injecting batch is answered, a later batch cannot count on its
    # set_config having run (an error rolls it back): its statement is held and set again.
    s = Session()
    s.core.from_client(
        statement(insert("one")) + statement(insert("two", "p-1")) + m.Sync().encode()
    )
    assert s.upstream == "p-1" and s.core.injected_in_flight
    assert s.core.from_client(statement(insert("three", "p-1")) + m.Sync().encode()) == b""
    assert s.core.holding is not None and s.to_server == []  # pgguard's query waits for idle
    s.core.from_server(answer() + own_answer("p-1") + answer() + ready())
    assert s.settled == [True]
    (query,) = s.core.server_out  # at its ReadyForQuery, pgguard's own query goes
    assert m.Query.decode_body(query[5:]).sql.endswith("'p-1', false)")


@pytest.mark.parametrize(
    ("sql", "first"),
    [
        ("/* prompt_id='p' */ vacuum analyze t", True),
        ("-- pgguard_prompt_id='p'\nCREATE INDEX CONCURRENTLY i ON t (a)", True),
        ("/* prompt_id='p' */ set transaction isolation level serializable", True),
        ("/* prompt_id='p' */ insert into t values (1)", False),
        ("/* prompt_id='p' */ select * from vacuum_log", False),
        ("/* prompt_id='p' */ set search_path = public", False),
    ],
)
def test_statements_a_set_config_must_not_come_before(sql: str, first: bool) -> None:
    # They must come first in their transaction (or outside one, or outside a pipeline):
    # the session leaves the prompt id upstream as it is rather than make them fail.
    assert bool(_NOT_AFTER_A_QUERY.match(sql)) is first


@pytest.mark.parametrize(
    ("sql", "effect"),
    [
        ("set pgguard.prompt_id = 'x'", "sets"),
        ("RESET pgguard.prompt_id", "sets"),
        ("select set_config('pgguard.prompt_id', 'x', false)", "sets"),
        ("select SET_CONFIG( 'PGGUARD.PROMPT_ID' , 'x', true)", "sets"),
        ("select set_config(name, 'x', false) from names", "sets"),  # not a constant: unknown
        ("select set_config('app.tenant', '7', false)", None),  # row-level security keys
        (
            "select set_config('it''s', 'x', false), set_config('pgguard.prompt_id', 'y', false)",
            "sets",
        ),
        ("reset all", "resets"),
        ("DISCARD ALL", "resets"),
        ("select 1", None),
    ],
)
def test_what_a_statement_may_do_to_the_prompt_id(sql: str, effect: str | None) -> None:
    assert prompt_effect(sql) == effect
