"""The gateway's side of the audit link when the writer falls behind: buffered mode drops
(a bounded queue), strict mode never drops the record of a statement that ran."""

from __future__ import annotations

from typing import Any

from pgguard.audit import link
from pgguard.protocol.statements import StatementRun
from pgguard.proxy.audit_link import AuditLink


class Backlogged:
    """A transport whose write buffer is far past the link's limit."""

    def __init__(self) -> None:
        self.written: list[bytes] = []

    def get_write_buffer_size(self) -> int:
        return 1 << 40

    def write(self, data: bytes) -> None:
        self.written.append(data)


def a_link(mode: str) -> AuditLink:
    audit = AuditLink(link.WriterConfig(url=None, jsonl=None, mode=mode, instance_id="i"))
    audit._transport = Backlogged()  # type: ignore[assignment]
    return audit


def run() -> StatementRun:
    return StatementRun("simple", "insert into t values (1)", 1.0).finished(1.1, "INSERT 0 1", 1)


def test_strict_mode_keeps_every_statement_event_however_far_behind() -> None:
    audit = a_link("strict")
    answers: list[Any] = []
    for _ in range(3):
        audit.statement("s", run(), (None, (), None, ()), None, answers.append)
    assert audit.dropped_here == 0
    assert [m[0] for m in audit._out] == [link.STATEMENT] * 3
    assert len(audit.tickets) == 3 and answers == []  # waiting for the writer, not refused


def test_buffered_mode_drops_past_its_bound() -> None:
    audit = a_link("buffered")
    audit.statement("s", run(), (None, (), None, ()), None)
    assert audit.dropped_here == 1 and audit._out == []
