"""Masking on one relayed session: which result each server message belongs to. Sans-IO.

The relay hands :class:`SessionMasking` the client messages that start or describe work
(Query, Parse, Bind, Describe, Execute, Close, Sync, FunctionCall) and the server messages
that answer them. From those it keeps a queue of expected replies, in the server's order, so
that it knows at every RowDescription, DataRow and CopyData which statement (and so which
:class:`~pgguard.masking.plan.ResultPlan`) the rows belong to.

* Simple query: the RowDescription gives types and formats; rows are masked per statement.
* Extended query: a statement's plan is kept per Parse, a portal's result formats per Bind.
  Types come from the client's own Describe (statement or portal); when a client executes a
  masked portal without any Describe, a Describe of the portal is slipped in before the
  Execute and its reply is kept from the client.
* SQL-level cursors and prepared statements (DECLARE/FETCH, PREPARE/EXECUTE) carry their
  result plan to the FETCH/EXECUTE; an unknown one (e.g. a refcursor a function opened) is
  fully masked.
* COPY … TO STDOUT rows (text, csv, binary) are masked line by line.
* RowDescription origins (table OID and attribute number) are checked too: a column the
  server says comes straight from a masked column is masked even if the plan missed it.
* Errors of a statement that reads masked columns lose quoted values and details.

Rows without a masked column are never decoded (a DataRow outside a masked result costs
one attribute check).
"""

from __future__ import annotations

import re
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from pgguard.masking.plan import (
    NO_MASKS,
    OPAQUE_RESULT,
    ColumnMask,
    MaskerCache,
    ResultPlan,
    StatementPlan,
    copy_format,
)
from pgguard.masking.rows import CopyFormat, RowFormatError, RowMasker
from pgguard.protocol.messages import (
    ErrorResponse,
    ProtocolError,
    RowDescription,
    error_fields,
)

__all__ = ["Planner", "SessionMasking"]

Planner = Callable[[str], tuple[StatementPlan, ...]]
# (table oid, attribute number) → the mask of that column, or None.
OriginMask = Callable[[int, int], ColumnMask | None]

_LEN = struct.Struct("!I")
_IDLE = 73  # ReadyForQuery status "I"
_Description = tuple[tuple[tuple[int, int], ...], tuple[int, ...], tuple[tuple[int, int, int], ...]]
_U16 = struct.Struct("!H")
_I32S = struct.Struct("!i")
_I16 = struct.Struct("!h")
_T, _N, _D, _C, _I, _S, _E, _Z, _H, _CD = 84, 110, 68, 67, 73, 115, 69, 90, 72, 100
_Q, _P, _B, _SYNC, _F, _CLOSE, _EXEC, _DESC = 81, 80, 66, 83, 70, 67, 69, 68
_QUOTED = re.compile(r'"[^"]*"|\'[^\']*\'')


@dataclass(slots=True)
class _Statement:
    sql: str
    types: tuple[tuple[int, int], ...] | None = None  # from a Describe; None: unknown
    described: bool = False  # a Describe answered (types None then means NoData)
    origins: tuple[tuple[int, int, int], ...] = ()  # fields' (index, table oid, attnum)
    # The server may hold another text under this name (a re-Parse that fails because the
    # name is taken, a statement pgguard did not see prepared): its results are masked whole.
    uncertain: bool = False


@dataclass(slots=True)
class _Portal:
    statement: _Statement
    bind: bytes  # the Bind message: its result formats are read only when rows are masked
    types: tuple[tuple[int, int], ...] | None = None
    described: bool = False
    origins: tuple[tuple[int, int, int], ...] = ()

    @property
    def formats(self) -> tuple[int, ...]:
        return _bind_result_formats(self.bind)


def _bind_result_formats(msg: bytes) -> tuple[int, ...]:
    """The result format codes at the end of a Bind message."""
    i = msg.index(0, msg.index(0, 5) + 1) + 1
    count = _U16.unpack_from(msg, i)[0]
    i += 2 + 2 * count
    count = _U16.unpack_from(msg, i)[0]
    i += 2
    for _ in range(count):
        length = _I32S.unpack_from(msg, i)[0]
        i += 4 + (length if length > 0 else 0)
    count = _U16.unpack_from(msg, i)[0]
    return struct.unpack_from(f"!{count}h", msg, i + 2) if count else ()


@dataclass(slots=True)
class _Slot:
    kind: str  # query | describe_s | describe_p | execute | sync | function
    sql: str = ""  # query: its text, planned when the first reply comes
    plans: tuple[StatementPlan, ...] | None = None
    index: int = 0
    statement: _Statement | None = None
    portal: _Portal | None = None
    hidden: bool = False
    ready: bool = False  # execute: its rows' masking was set up


def _formats(codes: tuple[int, ...], width: int) -> tuple[int, ...]:
    if not codes:
        return (0,) * width
    if len(codes) == 1:
        return codes * width
    return codes[:width] + (0,) * (width - len(codes))


def _fail_row_error() -> bytes:
    return ErrorResponse(
        error_fields("ERROR", "XX000", "pgguard: masking: a result row could not be masked")
    ).encode()


class SessionMasking:
    """The masking state of one session whose identity has masks."""

    def __init__(self, planner: Planner, cache: MaskerCache, origin: OriginMask) -> None:
        self.planner = planner
        self.cache = cache
        self.origin = origin
        self._slots: deque[_Slot] = deque()
        self._statements: dict[bytes, _Statement] = {}  # by name
        self._portals: dict[bytes, _Portal] = {}
        self._named: dict[tuple[str, str], ResultPlan | None] = {}
        self._rows: RowMasker | None = None  # masks the DataRows of the current result
        self._copy: tuple[RowMasker, CopyFormat | None, bool] | None = None
        self._copy_header = False
        self._row_failed = False
        self._blind = False  # mask every column of the current rows (types unknown)
        # RowDescription body → (types, formats, origins), decoded once
        self._described: dict[bytes, _Description] = {}
        self.counts: dict[str, int] = {}
        self.statement_masked: tuple[str, ...] = ()  # masked sources of the current result
        self.last_masked: tuple[str, ...] = ()  # those of the result that just ended

    # ------------------------------------------------------------------ client side
    def client(self, t: int, msg: bytes) -> bytes | None:
        """A client message (whole, type byte first). Returns bytes to send instead, or None.
        Names stay bytes and Bind is not decoded: this runs for every extended message."""
        if t == _Q:
            self._slots.append(_Slot("query", sql=msg[5:-1].decode("utf-8", "surrogateescape")))
        elif t == _P:
            i = msg.index(0, 5)
            sql = msg[i + 1 : msg.index(0, i + 1)].decode("utf-8", "surrogateescape")
            name = msg[5:i]
            known = self._statements.get(name) if name else None
            uncertain = known is not None and (known.uncertain or known.sql != sql)
            self._statements[name] = _Statement(sql, uncertain=uncertain)
        elif t == _B:
            i = msg.index(0, 5)
            statement = self._statements.get(msg[i + 1 : msg.index(0, i + 1)])
            if statement is None:  # e.g. a SQL-level PREPARE bound by name: unknown text
                statement = _Statement("", uncertain=True)
            self._portals[msg[5:i]] = _Portal(statement, msg)
        elif t == _DESC:
            name = msg[6:-1]
            if msg[5] == 83:  # "S"
                self._slots.append(_Slot("describe_s", statement=self._statements.get(name)))
            else:
                self._slots.append(_Slot("describe_p", portal=self._portals.get(name)))
        elif t == _EXEC:
            name = msg[5 : msg.index(0, 5)]
            portal = self._portals.get(name)
            injected = b""
            if portal is not None and self._needs_description(portal):
                injected = b"D" + _LEN.pack(len(name) + 6) + b"P" + name + b"\x00"
                self._slots.append(_Slot("describe_p", portal=portal, hidden=True))
            self._slots.append(_Slot("execute", portal=portal))
            return injected + msg if injected else None
        elif t == _CLOSE:
            (self._statements if msg[5] == 83 else self._portals).pop(msg[6:-1], None)
        elif t == _SYNC:
            self._slots.append(_Slot("sync"))
        elif t == _F:
            self._slots.append(_Slot("function"))
        return None

    def seed(self, statements: dict[bytes, tuple[bytes, ...]]) -> None:
        """Statements the session prepared before masking started (a policy reload)."""
        for name, texts in statements.items():
            sql = texts[0].decode("utf-8", "surrogateescape")
            self._statements[name] = _Statement(sql, uncertain=len(texts) > 1)

    def _plan_of(self, statement: _Statement) -> StatementPlan:
        if statement.uncertain:
            return _UNCERTAIN_PLAN
        # Planned when needed, so that a search_path change confirmed in between (pgguard
        # asks the server after a SET) is taken into account.
        plans = self.planner(statement.sql)
        return plans[0] if len(plans) == 1 else NO_MASKS

    def _needs_description(self, portal: _Portal) -> bool:
        if self._result(self._plan_of(portal.statement)) is None:
            return False
        if portal.described or portal.statement.described:
            return False
        for slot in self._slots:  # a Describe already on its way
            if slot.portal is portal or (
                slot.kind == "describe_s" and slot.statement is portal.statement
            ):
                return False
        return True

    def _result(self, plan: StatementPlan) -> ResultPlan | None:
        if plan.reference is not None:
            # FETCH / EXECUTE: the named object's plan (an unknown one is fully masked), with
            # the masks of what the statement adds (EXECUTE parameters).
            named = self._named.get(plan.reference, OPAQUE_RESULT)
            if named is None:
                return plan.result
            return named.merged(plan.result)
        return plan.result

    # ------------------------------------------------------------------ server side
    def server(self, t: int, buf: bytes, pos: int, end: int) -> bytes | None:
        """The server message ``buf[pos:end]``. Returns its replacement (b"" drops it), or
        None to keep it."""
        if t == _D:
            rows = self._rows
            if rows is None:
                slot = self._slots[0] if self._slots else None
                if slot is None or slot.kind != "execute" or slot.ready:
                    return None
                slot.ready = True  # the first row of an Execute: set up its masking
                self._execute_rows(slot)
                rows = self._rows
                if rows is None:
                    if not self._blind:
                        return None
                    rows = self._rows = self.cache.blind(_I16.unpack_from(buf, pos + 5)[0])
            try:
                return rows.mask_message(buf, pos, end)
            except RowFormatError:
                self._row_failed = True  # never forward a row that could not be masked
                return b""
        if t == _CD:
            return self._mask_copy(buf[pos:end]) if self._copy is not None else None
        slot = self._slots[0] if self._slots else None
        if t == _T:
            return self._row_description(slot, buf[pos + 5 : end])
        if t == _N:
            if slot is not None and slot.kind in ("describe_s", "describe_p"):
                self._slots.popleft()
                self._describe_answer(slot, None)
                return b"" if slot.hidden else None
            return None
        if t in (_C, _I, _S):
            return self._end_result(slot, t)
        if t == _E:
            return self._error(slot, buf[pos:end])
        if t == _Z:
            self._end_rows()
            while self._slots:
                done = self._slots.popleft()
                if done.kind in ("query", "sync", "function"):
                    break
            if buf[pos + 5] == _IDLE:
                for key in [k for k in self._named if k[0] == "cursor"]:
                    del self._named[key]  # cursors end with their transaction
            return None
        if t == _H:
            return self._copy_out(slot, buf[pos + 5 : end])
        return None  # t, c, G: nothing to do

    def _current_plan(self, slot: _Slot | None) -> StatementPlan:
        if slot is None:
            return NO_MASKS
        if slot.kind == "query":
            if slot.plans is None:
                slot.plans = self.planner(slot.sql)
            return slot.plans[slot.index] if slot.index < len(slot.plans) else NO_MASKS
        if slot.kind == "execute" and slot.portal is not None:
            return self._plan_of(slot.portal.statement)
        return NO_MASKS

    def _row_description(self, slot: _Slot | None, body: bytes) -> bytes | None:
        known = self._described.get(body)
        if known is None:
            fields = RowDescription.decode_body(body).fields
            known = (
                tuple((f.type_oid, f.type_modifier) for f in fields),
                tuple(f.format for f in fields),
                tuple((i, f.table_oid, f.column_attr) for i, f in enumerate(fields) if f.table_oid),
            )
            if len(self._described) > 512:
                self._described.clear()
            self._described[body] = known
        types, formats, origins = known
        if slot is not None and slot.kind in ("describe_s", "describe_p"):
            self._slots.popleft()
            self._describe_answer(slot, types, origins)
            return b"" if slot.hidden else None
        if slot is not None and slot.kind == "query":
            self._start_rows(self._current_plan(slot), origins, types, formats)
        return None

    def _describe_answer(
        self,
        slot: _Slot,
        types: tuple[tuple[int, int], ...] | None,
        origins: tuple[tuple[int, int, int], ...] = (),
    ) -> None:
        described: _Statement | _Portal | None = (
            slot.statement if slot.kind == "describe_s" else slot.portal
        )
        if described is not None:
            described.types = types
            described.origins = origins
            described.described = True

    def _with_origins(
        self, plan: ResultPlan | None, origins: tuple[tuple[int, int, int], ...], width: int
    ) -> ResultPlan | None:
        """``plan`` with the masks of columns the RowDescription says come straight from a
        masked column (``origins``: index, table oid, attribute number): a safety net under
        the lineage analysis. The planner answers from a cache it renews with the policy."""
        found: list[ColumnMask | None] | None = None
        for i, table_oid, attnum in origins:
            mask = self.origin(table_oid, attnum)
            if mask is not None:
                if found is None:
                    found = [None] * width
                found[i] = mask
        if found is None:
            return plan
        if plan is not None:
            found = [plan.mask_at(i) or found[i] for i in range(width)]
        return ResultPlan(tuple(found), None if plan is None else plan.rest)

    def _start_rows(
        self,
        plan: StatementPlan,
        origins: tuple[tuple[int, int, int], ...],
        types: tuple[tuple[int, int], ...],
        formats: tuple[int, ...],
    ) -> None:
        result = self._result(plan)
        if plan.width is not None and plan.width != len(types):
            result = OPAQUE_RESULT  # not the shape the analysis expected: a stale catalog
        if origins:
            result = self._with_origins(result, origins, len(types))
        if result is None:
            self._end_rows()
            return
        rows = self.cache.rows(result, types, formats)
        self.statement_masked = result.masked
        if rows.active:
            self._rows = rows
        else:
            self._end_rows()

    def _end_rows(self) -> None:
        rows = self._rows
        if rows is not None:
            for label, n in rows.take_counts().items():
                self.counts[label] = self.counts.get(label, 0) + n
        if self._copy is not None:
            for label, n in self._copy[0].take_counts().items():
                self.counts[label] = self.counts.get(label, 0) + n
        self._rows = None
        self._copy = None
        self._blind = False

    def _execute_rows(self, slot: _Slot) -> None:
        """Set up masking for the rows of an Execute (they come without a RowDescription)."""
        portal = slot.portal
        if portal is None:
            # A portal bound before masking started, or unknown: every column as NULL.
            self._blind = True
            return
        plan = self._plan_of(portal.statement)
        described = portal if portal.described else portal.statement
        types = described.types
        if types is None:
            if self._result(plan) is not None:
                # Never described (should not happen: a Describe was slipped in): every
                # column is sent as NULL.
                self._blind = True
            return
        self._start_rows(plan, described.origins, types, _formats(portal.formats, len(types)))

    def _end_result(self, slot: _Slot | None, t: int) -> bytes | None:
        failed = self._row_failed
        self._row_failed = False
        self.last_masked = self.statement_masked
        self.statement_masked = ()
        self._end_rows()
        if slot is not None and slot.kind in ("query", "execute"):
            if t == _C:
                plan = self._current_plan(slot)
                if plan.declares is not None:  # DECLARE / PREPARE ran: FETCH / EXECUTE use it
                    self._named[plan.declares] = plan.result
            if slot.kind == "query":
                if t == _C:
                    slot.index += 1
            else:
                self._slots.popleft()
        if failed and t == _C:
            return _fail_row_error()
        return None

    def _error(self, slot: _Slot | None, msg: bytes) -> bytes | None:
        plan = self._current_plan(slot)
        self._end_rows()
        self._row_failed = False
        if slot is not None and slot.kind in ("describe_s", "describe_p", "execute"):
            # The server skips the rest of the batch until Sync.
            while self._slots and self._slots[0].kind not in ("sync", "query", "function"):
                self._slots.popleft()
        elif slot is not None and slot.kind == "query":
            slot.index = 1 << 30  # the rest of the query string is skipped
        if not plan.scrub_errors:
            return None
        return _scrub(msg)

    def _copy_out(self, slot: _Slot | None, body: bytes) -> bytes | None:
        plan = self._current_plan(slot)
        result = self._result(plan)
        if result is None:
            return None
        overall = body[0]
        width = _I16.unpack_from(body, 1)[0]
        rows = self.cache.copy_rows(result, width, overall)
        if not rows.active:
            return None
        options = copy_format(plan.copy)
        self._copy = (rows, options, overall == 1)
        self._copy_header = bool(plan.copy is not None and plan.copy.header and overall == 0)
        return None

    def _mask_copy(self, msg: bytes) -> bytes:
        assert self._copy is not None
        rows, options, binary = self._copy
        data = msg[5:]
        try:
            if binary:
                out = rows.mask_copy_binary(data)
            elif self._copy_header:
                self._copy_header = False
                return msg
            else:
                assert options is not None
                out = rows.mask_copy_line(data, options)
        except RowFormatError:
            self._row_failed = True
            return b""
        if out is data:
            return msg
        return b"d" + _LEN.pack(len(out) + 4) + out

    def take_counts(self) -> dict[str, int]:
        counts, self.counts = self.counts, {}
        return counts


_UNCERTAIN_PLAN = StatementPlan(result=OPAQUE_RESULT, returns_rows=True, scrub_errors=True)


def _scrub(msg: bytes) -> bytes | None:
    """An ErrorResponse without the values it may quote: quoted parts of the message become
    ``"…"``; detail, hint, where and internal query are dropped."""
    try:
        err = ErrorResponse.decode_body(msg[5:])
    except ProtocolError:
        return None
    if err.message.startswith("pgguard:"):
        return None
    fields: list[tuple[str, str]] = []
    changed = False
    for code, value in err.fields:
        if code in ("D", "W", "q", "H", "p", "P"):
            changed = True
            continue
        if code == "M":
            scrubbed = _QUOTED.sub('"…"', value)
            if scrubbed != value:
                changed = True
                value = scrubbed + " (value hidden: the statement reads masked columns)"
        fields.append((code, value))
    if not changed:
        return None
    return ErrorResponse(tuple(fields)).encode()
