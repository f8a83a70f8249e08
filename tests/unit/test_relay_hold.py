"""Approval holds in the relay, without sockets: a held statement and everything the client
sends after it wait; the decision lets it run or refuses it in its place."""

from __future__ import annotations

from pgguard.policy.identity_guard import Hold, PromptSync, Refusal
from pgguard.protocol import messages as m
from pgguard.protocol.relay import RelayCore

HOLD = Hold("orders-need-approval", "writes to orders need approval", approvers=("dba",))
WRITE = "update orders set status = 'void' where id = 7"


def hook(sql: str) -> Refusal | None:
    return HOLD if sql.startswith("update orders") else None


def make() -> tuple[RelayCore, list[tuple[Hold, str]]]:
    core = RelayCore(1 << 20, hook)
    held: list[tuple[Hold, str]] = []
    core.on_hold = lambda hold, sql, message: held.append((hold, sql))
    return core, held


def test_simple_query_is_held_then_approved() -> None:
    core, held = make()
    first = m.Query("select 1").encode()
    sent = core.from_client(first + m.Query(WRITE).encode())
    assert sent == first  # the statement before the held one goes on
    assert held == [(HOLD, WRITE)]
    assert core.holding is HOLD and not core.idle()
    # Whatever the client sends meanwhile waits behind the held statement.
    assert core.from_client(m.Query("select 2").encode()) == b""
    out = core.release(None)
    assert out == m.Query(WRITE).encode() + m.Query("select 2").encode()
    assert core.holding is None and core.pending == 3
    # The approval was for that one execution: the same text is held again next time.
    core.from_server(m.ReadyForQuery(b"I").encode() * 3)
    assert core.from_client(m.Query(WRITE).encode()) == b""
    assert len(held) == 2


def test_denied_statement_fails_in_place_and_the_rest_runs() -> None:
    core, _ = make()
    core.from_client(m.Query(WRITE).encode())
    denial = Refusal("orders-need-approval", "denied by dana: not today")
    out = core.release(denial)
    sent = m.Query.decode_body(out[5:]).sql
    assert sent != WRITE and "pgguard_refused_" in sent  # the server fails it in order
    err = m.ErrorResponse(
        m.error_fields("ERROR", "42601", f'syntax error at or near "{sent}"')
    ).encode()
    back = core.from_server(err + m.ReadyForQuery(b"I").encode())
    reply = m.ErrorResponse.decode_body(back[5 : 1 + int.from_bytes(back[1:5], "big")])
    assert reply.sqlstate == "42501"
    assert reply.message == "pgguard: orders-need-approval: denied by dana: not today"


def test_extended_protocol_hold_keeps_the_pipeline_in_order() -> None:
    core, held = make()
    pipeline = (
        m.Parse("", WRITE, ()).encode()
        + m.Bind("", "", (), (), ()).encode()
        + m.Execute("", 0).encode()
    )
    tail = m.Sync().encode()
    parse = m.Parse("", WRITE, ()).encode()
    # Parsing runs nothing: the Bind that would execute the statement is held, and the Sync
    # arrives in pieces meanwhile.
    assert core.from_client(pipeline + tail[:2]) == parse
    assert core.from_client(tail[2:]) == b""
    assert held and core.pending == 0
    out = core.release(None)
    assert out == pipeline[len(parse) :] + tail
    assert core.pending == 1
    # The next execution of the prepared statement asks again.
    core.from_server(m.ReadyForQuery(b"I").encode())
    again = m.Bind("", "", (), (), ()).encode() + m.Execute("", 0).encode()
    assert core.from_client(again + m.Sync().encode()) == b""
    assert len(held) == 2


def test_parse_is_refused_where_statements_cannot_be_held() -> None:
    core = RelayCore(1 << 20, hook)  # no on_hold: a require_approval statement is refused
    parse = m.Parse("s1", WRITE, ()).encode() + m.Sync().encode()
    sent = core.from_client(parse)
    assert WRITE.encode() not in sent


def test_relay_without_hold_support_refuses() -> None:
    core = RelayCore(1 << 20, hook)
    sent = core.from_client(m.Query(WRITE).encode())
    assert WRITE.encode() not in sent and b"pgguard_refused_" in sent


def test_one_approval_runs_one_execution() -> None:
    core, held = make()
    core.from_client(m.Query(WRITE).encode() + m.Query(WRITE).encode())
    out = core.release(None)
    assert out == m.Query(WRITE).encode()  # the second copy is held again
    assert core.holding is HOLD and len(held) == 2


def test_a_bind_is_judged_for_every_text_its_name_may_stand_for() -> None:
    """A re-Parse of a taken name fails on the server, which keeps the first text: the
    Bind must not be judged as the second text alone."""
    core, held = make()
    core.from_client(m.Parse("s1", WRITE, ()).encode() + m.Sync().encode())
    core.from_server(m.ParseComplete().encode() + m.ReadyForQuery(b"I").encode())
    core.from_client(m.Parse("s1", "select 1", ()).encode() + m.Sync().encode())
    core.from_server(m.ReadyForQuery(b"I").encode())
    sent = core.from_client(
        m.Bind("", "s1", (), (), ()).encode() + m.Execute("", 0).encode() + m.Sync().encode()
    )
    assert sent == b"" and held and held[-1][1] == WRITE
    # After a Close, the name is free again and only the new text counts.
    core.release(Refusal("orders-need-approval", "no"))
    core.from_server(m.ReadyForQuery(b"I").encode())
    core.from_client(m.Close(b"S", "s1").encode() + m.Sync().encode())
    core.from_server(m.ReadyForQuery(b"I").encode())
    core.from_client(m.Parse("s1", "select 1", ()).encode() + m.Sync().encode())
    core.from_server(m.ReadyForQuery(b"I").encode())
    count = len(held)
    sent = core.from_client(m.Bind("", "s1", (), (), ()).encode() + m.Sync().encode())
    assert sent and len(held) == count


def test_a_hold_waiting_on_pgguards_own_query_ends_when_the_transaction_fails() -> None:
    core, _ = make()
    results: list[object] = []
    core.internal_query("select 1", lambda rows, err: results.append(err))
    core.from_client(m.Query("select 1/0").encode() + m.Query(WRITE).encode())
    assert core.holding is HOLD
    err = m.ErrorResponse(m.error_fields("ERROR", "22012", "division by zero")).encode()
    core.from_server(err + m.ReadyForQuery(b"E").encode())
    assert results == ["the transaction has failed"]


def test_a_hold_ended_at_once_keeps_the_bytes_in_order() -> None:
    # A hold its callback ends before returning (no approvals store, a prompt id already
    # set): the bytes before the held message still go first.
    core = RelayCore(1 << 20, hook)
    core.on_hold = lambda hold, sql, message: sent.append(core.release(None))
    sent: list[bytes] = []
    first = m.Query("select 1").encode()
    out = core.from_client(first + m.Query(WRITE).encode() + m.Query("select 2").encode())
    assert sent == [b""]  # nothing handed out of order to the caller
    assert out == first + m.Query(WRITE).encode() + m.Query("select 2").encode()
    assert core.holding is None and core.pending == 3
    # The extended protocol: the Parse before the held Bind, then the Bind.
    core.from_server(m.ReadyForQuery(b"I").encode() * 3)
    batch = (
        m.Parse("", WRITE, ()).encode()
        + m.Bind("", "", (), (), ()).encode()
        + m.Execute("", 0).encode()
        + m.Sync().encode()
    )
    assert core.from_client(batch) == batch


def test_holds_that_end_at_once_nest_in_order() -> None:
    # Releasing one hold holds, and at once releases, the next: still in order.
    writes = [f"update orders set n = {i}" for i in range(3)]
    core = RelayCore(1 << 20, hook)
    core.on_hold = lambda hold, sql, message: core.release(None)
    stream = b"".join(m.Query(w).encode() + m.Query("select 1").encode() for w in writes)
    assert core.from_client(stream) == stream


def test_a_prompt_id_is_set_at_the_parse_that_starts_a_batch() -> None:
    # PromptSync holds at the Parse when nothing of the batch went to the server yet (so
    # pgguard's own query can run first), or where a statement of pgguard's own can go into
    # the batch before it (test_relay_prompt.py); otherwise at the Bind as before.
    sync = PromptSync("prompt", "p-1")
    core = RelayCore(1 << 20, lambda sql: sync if "p-1" in sql else None)
    held: list[str] = []
    synced: list[bool] = []

    def on_hold(hold: Hold, sql: str, message: bytes) -> None:
        held.append(sql)
        if synced:  # the prompt id is set upstream by now: the session lets it go at once
            core.release(None)

    core.on_hold = on_hold
    tagged = "/* prompt_id='p-1' */ select 1"
    parse = m.Parse("", tagged, ()).encode()
    rest = m.Bind("", "", (), (), ()).encode() + m.Execute("", 0).encode() + m.Sync().encode()
    assert core.from_client(parse + rest) == b""
    assert held == [tagged]
    synced.append(True)
    assert core.release(None) == parse + rest  # its Bind is held and let go at once
    assert held == [tagged, tagged]
    core.from_server(m.ReadyForQuery(b"I").encode())
    synced.clear()
    other = m.Parse("", "select 2", ()).encode() + m.Bind("", "", (), (), ()).encode()
    assert core.can_inject()
    assert core.from_client(other + parse + rest) == other
    assert len(held) == 3 and core.holding is sync
    core.release(None)  # (nothing injected) its Bind is held again
    assert len(held) == 4 and core.holding is sync
    # Part of the batch answered already (a Flush): pgguard cannot tell where replies to a
    # statement of its own would come, so the hold is at the Bind.
    core.release(None)
    core.from_server(m.ReadyForQuery(b"I").encode())
    flushed = m.Parse("", "select 2", ()).encode() + m.Flush().encode()
    assert core.from_client(flushed) == flushed
    core.from_server(m.ParseComplete().encode())
    assert not core.can_inject()
    assert core.from_client(parse + rest) == parse
    assert len(held) == 5 and core.holding is sync


def test_verdicts_of_a_transaction_block_can_be_forgotten_when_it_ends() -> None:
    # The session sets forget_at_idle when a verdict relied on something a ROLLBACK undoes
    # (a prompt id set inside the block): at the next idle ReadyForQuery, texts are judged
    # afresh; until then the cache answers.
    judged: list[str] = []
    core = RelayCore(1 << 20, lambda sql: judged.append(sql) or None)
    query = m.Query("select 1").encode()
    core.from_client(query)
    core.from_server(m.ReadyForQuery(b"T").encode())
    core.forget_at_idle = True
    core.from_client(query)
    core.from_server(m.ReadyForQuery(b"T").encode())
    assert judged == ["select 1"]
    core.from_client(query)
    core.from_server(m.ReadyForQuery(b"I").encode())
    core.from_client(query)
    assert judged == ["select 1", "select 1"] and not core.forget_at_idle
