"""The pipe between a gateway process and its audit writer process. Pure: no I/O.

A gateway process hands its audit events to a writer process (:mod:`pgguard.audit.daemon`)
over a private socket pair, so that building, sealing and storing records runs on another
core and never holds the gateway's GIL. Both ends are pgguard's own processes, so frames are
pickles: a 4-byte length, then a pickled list of messages. Hot messages are plain tuples
(pickling a tuple costs a twentieth of a dataclass); each has a ``to_wire``/``from_wire`` pair
here, so both ends agree on one definition.

Gateway → writer: ``(CONFIG, WriterConfig)`` first, then ``(RECORD, ticket, AuditRecord)``,
``(SESSION, wire SessionContext)``, ``(STATEMENT, ticket, session_id, wire StatementRun,
described, approval)`` (approval: None, or the request id and rule it ran under),
``(FORGET, session_id)`` and ``(CLOSE, timeout)``. Ticket 0 asks for no answer; any other
ticket is answered exactly once, by ``(DURABLE, [tickets])`` once its record is committed in
every store, or ``(FAILED, [tickets], message)``.
Writer → gateway also: ``(STATUS, wire WriterStatus)`` whenever it changes, and
``(CLOSED, WriterStatus)`` as its last word.
"""

from __future__ import annotations

import pickle
import struct
from collections.abc import Callable
from dataclasses import dataclass, fields
from operator import attrgetter
from typing import Any

from pgguard.audit.events import SessionContext
from pgguard.audit.recording import RawPreview, RecordedError, RecordedStatement
from pgguard.identity import Identity
from pgguard.protocol.statements import StatementRun

CONFIG = "config"
RECORD = "record"
SESSION = "session"
STATEMENT = "stmt"
FORGET = "forget"
CLOSE = "close"
DURABLE = "durable"
FAILED = "failed"
STATUS = "status"
CLOSED = "closed"

_HEADER = struct.Struct("!I")
MAX_FRAME = 1 << 30  # a frame this large is a bug, not data


class LinkError(RuntimeError):
    """The other end sent something that is not a frame."""


def encode_frame(messages: list[Any]) -> bytes:
    body = pickle.dumps(messages, protocol=pickle.HIGHEST_PROTOCOL)
    return _HEADER.pack(len(body)) + body


class FrameReader:
    """Cuts a byte stream into frames and unpickles them."""

    def __init__(self) -> None:
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[Any]:
        """The messages of every frame completed by ``data``, in order."""
        buf = self._buffer
        buf += data
        messages: list[Any] = []
        start = 0
        while len(buf) - start >= 4:
            (size,) = _HEADER.unpack_from(buf, start)
            if size > MAX_FRAME:
                raise LinkError(f"audit link frame of {size} bytes")
            end = start + 4 + size
            if len(buf) < end:
                break
            try:
                frame = pickle.loads(memoryview(buf)[start + 4 : end])
            except Exception as exc:
                raise LinkError(f"unreadable audit link frame: {exc}") from exc
            if not isinstance(frame, list):
                raise LinkError("audit link frame is not a list")
            messages.extend(frame)
            start = end
        if start:
            del buf[:start]
        return messages

    @property
    def pending(self) -> int:
        """Bytes of an incomplete frame."""
        return len(self._buffer)


@dataclass(frozen=True, slots=True)
class WriterConfig:
    """What the writer process needs (sent over the pipe: the store URL may hold a password,
    which must never be on a command line)."""

    url: str | None
    jsonl: str | None
    mode: str
    instance_id: str
    queue_size: int = 10000
    param_cap: int = 1024
    redact_literals: bool = False
    redact_params: bool = False
    sync: str = "full"  # audit.sync
    log_level: str = "info"
    log_format: str = "text"
    worker: int | None = None
    resume: tuple[int, str] | None = None  # the chain head a previous writer reported


@dataclass(frozen=True, slots=True)
class WriterStatus:
    """The writer's counters, for /readyz and the metrics."""

    healthy: bool = True
    depth: int = 0  # records received and not yet written
    written: int = 0
    errors: int = 0  # failed write attempts
    dropped: int = 0
    abandoned: int = 0  # records left unwritten when it stopped
    last_error: str | None = None
    head: tuple[int, str] | None = None  # the chain's last sealed link (seq, hash)

    def to_wire(self) -> tuple[Any, ...]:
        return (
            self.healthy,
            self.depth,
            self.written,
            self.errors,
            self.dropped,
            self.abandoned,
            self.last_error,
            self.head,
        )

    @classmethod
    def from_wire(cls, wire: tuple[Any, ...]) -> WriterStatus:
        return cls(*wire)


# -- statements and sessions --------------------------------------------------------------


_PREVIEW = StatementRun._fields.index("preview")
_PREVIEW_FIELDS = tuple(f.name for f in fields(RecordedStatement))
_ERROR = _PREVIEW_FIELDS.index("error")
_preview_values = attrgetter(*_PREVIEW_FIELDS)


def run_to_wire(run: StatementRun) -> tuple[Any, ...]:
    """The run's fields in order; a decoded preview as a tuple too (``RecordedError`` as a
    pair), a raw one (the relay's) as it is: a NamedTuple of bytes, cheap to pickle."""
    p = run.preview
    if p is None or type(p) is RawPreview:
        return tuple(run)  # a plain tuple: pickled without a reference to StatementRun
    assert isinstance(p, RecordedStatement)
    wire = list(run)
    preview = list(_preview_values(p))
    if p.error is not None:
        preview[_ERROR] = (p.error.sqlstate, p.error.message)
    wire[_PREVIEW] = tuple(preview)
    return tuple(wire)


def run_from_wire(wire: tuple[Any, ...]) -> StatementRun:
    """The run (a raw preview stays raw: the record builder decodes it)."""
    values = list(wire)
    p = values[_PREVIEW]
    if p is not None and type(p) is not RawPreview:
        statement, columns, rows, truncated, row_count, tag, err, dropped = p
        error = None if err is None else RecordedError(*err)
        values[_PREVIEW] = RecordedStatement(
            statement, columns, rows, truncated, row_count, tag, error, dropped
        )
    return StatementRun(*values)


_CONTEXT_FIELDS = tuple(f.name for f in fields(SessionContext))
_IDENTITY = _CONTEXT_FIELDS.index("identity")


def context_to_wire(ctx: SessionContext) -> tuple[Any, ...]:
    """The session's fields in order; of its identity, only what records carry (no claims,
    so no token material crosses the pipe)."""
    wire = [getattr(ctx, name) for name in _CONTEXT_FIELDS]
    ident = ctx.identity
    if ident is not None:
        wire[_IDENTITY] = (ident.user, ident.email, ident.groups, ident.agent, ident.prompt_id)
    return tuple(wire)


def context_from_wire(wire: tuple[Any, ...]) -> SessionContext:
    values = list(wire)
    ident = values[_IDENTITY]
    if ident is not None:
        user, email, groups, agent, prompt_id = ident
        values[_IDENTITY] = Identity(user, email, groups, agent, prompt_id, None, 0.0, 0.0, {})
    return SessionContext(*values)


# -- the gateway's side: who waits for which ticket -----------------------------------------

DurableCallback = Callable[[BaseException | None], None]


class TicketBook:
    """Tickets for records whose statements wait until they are durable (strict mode)."""

    def __init__(self) -> None:
        self._next = 0
        self._waiting: dict[int, DurableCallback] = {}

    def issue(self, callback: DurableCallback) -> int:
        self._next += 1
        self._waiting[self._next] = callback
        return self._next

    def __len__(self) -> int:
        return len(self._waiting)

    def take(self, tickets: list[int]) -> list[DurableCallback]:
        """The callbacks of ``tickets`` (each answered once; unknown ones ignored)."""
        pop = self._waiting.pop
        found = [pop(t, None) for t in tickets]
        return [cb for cb in found if cb is not None]

    def take_all(self) -> list[DurableCallback]:
        callbacks = list(self._waiting.values())
        self._waiting.clear()
        return callbacks
