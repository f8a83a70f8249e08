"""The relay's per-session protocol state, once both sides are authenticated. Sans-IO.

``from_client`` and ``from_server`` take raw bytes and return what to send each way. Messages
nobody needs to read are forwarded as the original bytes; only the few types that carry state
(statement boundaries, ReadyForQuery, Terminate) are cut out and looked at.

The statement seam for guard rules, audit and masking is ``StatementHook``: it sees every
Query and Parse before the server does. The default hook allows everything.

pgguard runs statements of its own on the session in two ways: a simple Query at an idle point
(``internal_query``), or, inside a client's extended-protocol batch, as Parse/Bind/Execute/Close
messages slipped in just before a held message (``inject``), whose replies are dropped.
"""

from __future__ import annotations

import secrets
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from pgguard.audit.recording import PreviewCapture
from pgguard.policy.identity_guard import Hold, PromptSync, Refusal, unsafe_setting
from pgguard.protocol.framing import Scanner
from pgguard.protocol.messages import (
    Bind,
    Close,
    CommandComplete,
    ErrorResponse,
    Execute,
    FunctionCall,
    NoticeResponse,
    ParameterStatus,
    Parse,
    ProtocolError,
    Query,
    client_codec,
    data_row_values,
    error_fields,
    sql_bytes_text,
)
from pgguard.protocol.statements import StatementRun, StatementTracker

if TYPE_CHECKING:
    from pgguard.masking.session import SessionMasking

# Type bytes as ints, for the hot path.
_Q, _P, _S, _F, _X, _H, _B = 81, 80, 83, 70, 88, 72, 66
_Z = 90

# Intercepted types. Client: Query, Parse, Sync, FunctionCall, Terminate, Bind (a prepared
# statement is judged again at each Bind: the policy or search_path may have changed).
CLIENT_INTERCEPT = b"QPSFXBCEcf"  # and Close, which frees a prepared statement's name
# (Execute, CopyDone and CopyFail: for the Syncs a COPY FROM STDIN's server ignores)
# Server: ReadyForQuery, ErrorResponse (to put refusals in their place), ParameterStatus
# (a setting that changes how the server reads SQL ends the session).
SERVER_INTERCEPT = b"ZESG"  # and CopyInResponse
_E = 69

# A statement hook sees the SQL of every Query and Parse and may refuse it.
StatementHook = Callable[[str], Refusal | None]

_T, _D, _C, _I, _SUSPENDED, _N = 84, 68, 67, 73, 115, 78
_EXECUTE, _CLOSE = 69, 67  # client-side type bytes that share letters with server ones
# Extra types the statement tracker needs: client Execute and Close; server replies.
_TRACK_CLIENT = b"EC"
_TRACK_SERVER = b"CIsEZ"
_TRACKED_REPLIES = frozenset(_TRACK_SERVER)

# Called with the statements whose outcome just became known.
RunsCallback = Callable[[list[StatementRun]], None]
# The statement metrics without the tracker: at the ReadyForQuery that ends a request, called
# with the SQL of each Query and executing Bind in it and the final verdict on it, and the
# request's duration in seconds (see ``RelayCore.count_statements``).
Counted = tuple[bytes, Refusal | None]
CountedCallback = Callable[[list[Counted], float], None]
_ROW_LIMIT_TYPES = frozenset((_D, _C, _E, _Z))
_JUDGED = frozenset((_Q, _P, _B))  # client messages whose SQL the hook judges
_COUNTED = frozenset((_S, _F))  # client messages answered by a ReadyForQuery
_COPY_END = frozenset(b"cf")  # CopyDone, CopyFail
_COPY_IN = 71  # G: CopyInResponse
# Masking follows every request and reply that starts, describes or ends a result.
MASKING_CLIENT_TYPES = b"QPBDECSF"
MASKING_SERVER_TYPES = b"TntCIsEZHdcG"
_DESCRIPTIONS = frozenset(b"Tn")
# ReadyForQuery status byte → the bytes object, without slicing a new one per message.
_STATUS = [bytes((i,)) for i in range(256)]
_ASYNC = frozenset(b"ANS")  # NotificationResponse, NoticeResponse, ParameterStatus
_ALL_TYPES = bytes(range(256))

# Called with the text rows of pgguard's own query, or its error message.
InternalCallback = Callable[[list[tuple[str | None, ...]], str | None], None]
# Called at the ReadyForQuery of the batch a statement of pgguard's own was injected into:
# True if it ran and nothing after it in the batch failed or rolled back (``RelayCore.inject``).
SettledCallback = Callable[[bool], None]

# Replies to an injected statement: ParseComplete, BindComplete, DataRow, CommandComplete,
# CloseComplete; counted or dropped while one is expected (ZES are always intercepted).
_ONE, _TWO, _THREE = 49, 50, 51
_OWN_REPLIES = b"123DC"
# Command tags after which what ran earlier in the transaction may be undone.
_UNDOING = (b"ROLLBACK", b"PREPARE TRANSACTION")
# The reply the first injected statement still waiting for its replies expects next.
_OWN_PARSE, _OWN_BIND, _OWN_RESULT, _OWN_CLOSE_PORTAL, _OWN_CLOSE = 0, 1, 2, 3, 4

_LEN = struct.Struct("!I")
_UNSEEN = object()
_VERDICT_CACHE = 4096


def _no_clock() -> float:
    return 0.0


def _ignored(_rows: list[tuple[str | None, ...]], _error: str | None) -> None:
    pass


@dataclass(frozen=True, slots=True)
class Fatal:
    """A FATAL error pgguard sends to the client before closing the session."""

    sqlstate: str
    message: str

    def encode(self) -> bytes:
        return ErrorResponse(error_fields("FATAL", self.sqlstate, self.message)).encode()


TOKEN_EXPIRED = Fatal("28000", "pgguard: token expired")
SHUTTING_DOWN = Fatal("57P01", "terminating connection due to administrator command")
IDLE_TIMEOUT = Fatal("57P05", "terminating connection due to idle-session timeout")


@dataclass(slots=True)
class _Injected:
    """A statement of pgguard's own in a client's batch."""

    parses: int  # the client's Parses before it in the batch: their ParseCompletes come first
    on_settled: SettledCallback
    name: str  # of its prepared statement (and portal)
    ran: bool = False  # its CommandComplete arrived
    prepared: bool = False  # its Parse went through and its Close(statement) has not yet


@dataclass(slots=True)
class _Injections:
    """pgguard's own statements in the client's batch being answered, and where their replies
    are among the server's: a statement's replies start at the ParseComplete that follows
    those of the client's Parses before it (only a Parse answers with one, and an error ends
    every reply up to the ReadyForQuery)."""

    items: list[_Injected] = field(default_factory=list)
    head: int = 0  # the first of ``items`` whose replies are not all in
    stage: int = _OWN_PARSE  # the reply it expects next
    ones: int = 0  # the client's ParseCompletes seen in the batch
    failed: bool = False  # an ErrorResponse came: the server skips the rest of the batch
    undone: int = 0  # ``items`` before this one ran before a ROLLBACK (that may undo them)
    synced: bool = False  # the client ended the batch (Sync, Query or FunctionCall)


class RelayCore:
    """State of one relayed session: pending replies, transaction status, ending conditions."""

    __slots__ = (
        "_client",
        "_clock",
        "_codec",
        "_copy_in",
        "_epoch_seen",
        "_extra_server",
        "_heard",
        "_held_bytes",
        "_held_in",
        "_held_limit",
        "_held_sql",
        "_in_on_hold",
        "_inject_next",
        "_injections",
        "_internal_active",
        "_internal_error",
        "_internal_queue",
        "_internal_rows",
        "_marker",
        "_noted",
        "_noted_at",
        "_over",
        "_overrides",
        "_own",
        "_parses",
        "_preview",
        "_preview_count",
        "_preview_limits",
        "_refusals",
        "_refused_now",
        "_released_early",
        "_requests",
        "_rows",
        "_seq",
        "_server",
        "_server_table",
        "_statements",
        "_syncs_since_execute",
        "_verdicts",
        "cancel_requested",
        "client_encoding",
        "closing",
        "ending",
        "epoch",
        "forget_at_idle",
        "gate",
        "holding",
        "hook",
        "masking",
        "masking_wanted",
        "max_rows",
        "on_counted",
        "on_hold",
        "on_runs",
        "pending",
        "row_limit_mode",
        "server_out",
        "status",
        "terminated",
        "tracker",
        "unsynced",
    )

    def __init__(self, max_message_bytes: int, hook: StatementHook | None = None) -> None:
        self.hook = hook
        # Refused statements are replaced by a unique syntax error, so the server itself fails
        # the request in order (discarding to Sync, failing a transaction block); its error is
        # then rewritten into the refusal. The marker is random so clients cannot forge it.
        self._marker = "pgguard_refused_" + secrets.token_hex(6) + "_"
        # Names of pgguard's own prepared statements and portals (see ``inject``): random too,
        # so that they cannot collide with a client's (and apart from the marker, which a
        # statement name left behind must not give away).
        self._own = "pgguard_" + secrets.token_hex(6) + "_"
        self._refusals: dict[str, Refusal] = {}
        self._refused_now: Refusal | None = None  # the refusal the last error was rewritten to
        self.client_encoding = "UTF8"
        self._codec = "utf-8"  # reads the client's SQL for the guard (set_client_encoding)
        self._seq = 0
        self._verdicts: dict[bytes, Refusal | object | None] = {}
        # Prepared statement name → the SQL it may hold: re-Parsing a name fails on the server
        # unless it was closed or DEALLOCATEd, which pgguard may not see, so a Bind is judged
        # for every text the name may stand for (fail closed).
        self._statements: dict[bytes, tuple[bytes, ...]] = {}
        self.epoch: list[int] | None = None  # shared cell: verdicts are stale when it moves
        self._epoch_seen = 0
        self._client = Scanner(CLIENT_INTERCEPT, max_message_bytes)
        self._server = Scanner(SERVER_INTERCEPT, max_message_bytes)
        self.status = b"I"  # transaction status from the last ReadyForQuery
        self.pending = 0  # ReadyForQuery messages the client still expects
        # A COPY FROM STDIN's server ignores the Syncs it gets in copy-in mode (libpq sends
        # one with the COPY's Execute): those since the last Execute are not counted once
        # the copy ends (CopyDone or CopyFail after a CopyInResponse).
        self._syncs_since_execute = 0
        self._copy_in = False
        self.terminated = False  # client sent Terminate
        self.ending: Fatal | None = None  # end the session at the next idle point
        self.closing = False  # close both sides once the output is written
        # pgguard's own queries on the session (e.g. to learn the search_path after a SET).
        self._internal_queue: list[tuple[str, InternalCallback, bool]] = []
        self._internal_active: InternalCallback | None = None
        self._internal_rows: list[tuple[str | None, ...]] = []
        self._internal_error: str | None = None
        self.server_out: list[bytes] = []  # bytes for the server produced by server input
        # Row limit (identity ceiling): rows counted per result, the rest dropped.
        self.max_rows: int | None = None
        self.row_limit_mode = "error"
        self._rows = 0
        self._over = False
        self.cancel_requested = False  # the I/O layer sends a CancelRequest and clears it
        self._server_table = SERVER_INTERCEPT
        self.tracker: StatementTracker | None = None
        self._preview: PreviewCapture | None = None  # rows of the current result
        self._preview_count = 0
        self._preview_limits = (0, 0)
        self.gate: Callable[[], Refusal | None] | None = None  # refuses everything when set
        self.on_runs: RunsCallback | None = None
        # Extended-protocol messages sent since the last Sync: their replies may come (after
        # a Flush) without a ReadyForQuery, so pgguard's own queries must wait for the Sync.
        self.unsynced = False
        # Approval holds: the statement waiting for a decision and the client bytes from it.
        # (hold, SQL, the held Query or Bind message); set when holds are supported
        self.on_hold: Callable[[Hold, str, bytes], None] | None = None
        self.holding: Hold | None = None
        self._in_on_hold = False
        self._released_early = b""
        self._held_sql = b""
        self._held_in: list[bytes] = []
        self._held_bytes = 0
        self._held_limit = 4 * max_message_bytes
        self._overrides: dict[bytes, Refusal | None] = {}
        self.masking: SessionMasking | None = None
        self.masking_wanted: SessionMasking | None = None  # enabled at the next idle point
        self._extra_server = b""  # server types intercepted for masking
        # Statement counting (metrics without the tracker): the statements of the request
        # being sent and when it started, then one entry per request awaiting its
        # ReadyForQuery (None: it ran no statement), in step with ``pending``.
        self.on_counted: CountedCallback | None = None
        self._clock: Callable[[], float] = _no_clock
        self._noted: list[Counted] = []
        self._noted_at = 0.0
        self._requests: deque[tuple[float, list[Counted]] | None] = deque()
        # Statements of pgguard's own in the client's batch (see ``inject``): the client's
        # Parses since its last Sync, Query or FunctionCall; whether the server sent anything
        # since its last ReadyForQuery; the statement to send before the held message.
        self._parses = 0
        self._heard = False
        self._injections: _Injections | None = None
        self._inject_next: tuple[bytes, _Injected] | None = None
        # Set by the session: verdicts given inside the current transaction block are
        # forgotten when it ends (e.g. they relied on a setting a ROLLBACK undoes).
        self.forget_at_idle = False

    def enable_masking(self, masking: SessionMasking) -> None:
        """Mask result rows from now on (the identity has masks). Every DataRow and CopyData
        is then cut out: whether a result needs masking is only known at its
        RowDescription, too late for messages already scanned past."""
        self.masking = masking
        masking.seed(self._statements)
        self.masking_wanted = None
        self._verdicts.clear()  # refusals pending masking are stale now
        self._client.set_intercept(
            CLIENT_INTERCEPT
            + (_TRACK_CLIENT if self.tracker is not None else b"")
            + MASKING_CLIENT_TYPES
        )
        self._extra_server = MASKING_SERVER_TYPES + b"D"
        self._server_table += self._extra_server
        self._apply_server_table()

    def idle(self) -> bool:
        """No request outstanding and nothing half-received in either direction."""
        return (
            self.pending == 0
            and self.holding is None
            and self._internal_active is None
            and self._client.idle()
            and self._server.idle()
        )

    def _can_end(self) -> bool:
        # A shutdown lets an open transaction block finish; other endings only wait for idle.
        if not self.idle():
            return False
        return self.ending is not SHUTTING_DOWN or self.status == b"I"

    def end(self, reason: Fatal) -> bytes:
        """Ask the session to end with ``reason``. Returns bytes for the client now if idle."""
        if self.closing:
            return b""
        if self.ending is None or reason is not SHUTTING_DOWN:
            self.ending = reason
        if self._can_end():
            self.closing = True
            return reason.encode()
        return b""

    def from_client(self, data: bytes) -> bytes:
        """Client bytes → bytes for the server."""
        if self.holding is not None:
            # A statement awaits approval: nothing after it reaches the server yet.
            self._held_bytes += len(data)
            if self._held_bytes > self._held_limit:
                raise ProtocolError("too much data sent while a statement awaits approval")
            self._held_in.append(data)
            return b""
        buf, hits, cut = self._client.scan(data)
        if hits:
            return self._client_messages(buf, hits, cut)
        return buf if cut == len(buf) else buf[:cut]

    def _client_messages(self, buf: bytes, hits: list[int], cut: int) -> bytes:
        out: list[bytes] | None = None  # built only when a message is replaced
        prev = 0
        masking = self.masking
        for k, pos in enumerate(hits):
            t = buf[pos]
            end = pos + 1 + _LEN.unpack_from(buf, pos + 1)[0]
            refusal: Refusal | None = None
            if t in _JUDGED and (self.hook is not None or self.on_counted is not None):
                sql = self._sql_of(t, buf, pos, end)
                if sql is not None:
                    refusal = self._verdict(sql)
                    if t == _B:
                        sql, refusal = self._bind_verdict(buf, pos, end, sql, refusal)
                    if isinstance(refusal, Hold) and self.on_hold is not None:
                        if t == _P and not (
                            isinstance(refusal, PromptSync)
                            and (not self.unsynced or self.can_inject())
                        ):
                            # Parsing runs nothing: the hold comes at the Bind that would
                            # execute it, so that one approval covers one execution. A
                            # prompt id is set at the Parse, though: before a batch, by a
                            # query of pgguard's own; within one, by a statement injected
                            # before it (where pgguard can tell its replies apart).
                            refusal = None
                        else:
                            if self.tracker is not None:
                                self._track_client(buf, hits[:k])
                            return self._hold(buf, pos, end, out, prev, refusal, sql)
                    if t == _P:
                        self._parses += 1
                        name = buf[pos + 5 : buf.index(0, pos + 5)]
                        known = self._statements.get(name) if name else None
                        if known is None:
                            self._statements[name] = (sql,)
                        elif sql not in known:
                            self._statements[name] = (sql, *known)
                    elif self.on_counted is not None:
                        # Counted with its final verdict: a held statement only once released.
                        if not self._noted:
                            self._noted_at = self._clock()
                        self._noted.append((sql, refusal))
            if t == _CLOSE and buf[pos + 5] == _S:
                self._statements.pop(buf[pos + 6 : end - 1], None)
            if masking is not None:
                replacement = masking.client(t, buf[pos:end])
                if replacement is not None:  # an Execute with a Describe slipped in
                    if out is None:
                        out = []
                    out.append(buf[prev:pos])
                    out.append(replacement)
                    prev = end
            if t in _COUNTED:
                self.pending += 1
                self._parses = 0
                if self._injections is not None:
                    self._batch_sent()
                if self.on_counted is not None:
                    self._end_request()
                if t == _S:
                    self.unsynced = False
                    self._syncs_since_execute += 1
                continue
            if t == _X:
                self.terminated = True
                self.closing = True
                continue
            if t == _Q:
                self.pending += 1
                self._parses = 0
                self._syncs_since_execute = 0
                if self._injections is not None:
                    self._batch_sent()
                if self.on_counted is not None:
                    self._end_request()
            elif t in _COPY_END:
                if self._copy_in:
                    self._copy_ended()
            else:
                self.unsynced = True  # Parse, Bind, Describe, Execute, Close
                if t == _EXECUTE:
                    self._syncs_since_execute = 0
            if refusal is not None:
                if out is None:
                    out = []
                out.append(buf[prev:pos])
                out.append(self._substitute_message(buf[pos:end], refusal, t))
                prev = end
        if self.tracker is not None:
            self._track_client(buf, hits)
        if out is None:
            return buf if cut == len(buf) else buf[:cut]
        out.append(buf[prev:cut])
        return b"".join(out)

    def _bind_verdict(
        self, buf: bytes, pos: int, end: int, sql: bytes, refusal: Refusal | None
    ) -> tuple[bytes, Refusal | None]:
        """The most severe verdict over every text a Bind's statement name may stand for."""
        i = buf.find(0, pos + 5, end)
        candidates = self._statements.get(buf[i + 1 : buf.find(0, i + 1, end)], ())
        for other in candidates[1:]:
            verdict = self._verdict(other)
            if verdict is None:
                continue
            if refusal is None or (isinstance(refusal, Hold) and not isinstance(verdict, Hold)):
                sql, refusal = other, verdict
        return sql, refusal

    def _sql_of(self, t: int, buf: bytes, pos: int, end: int) -> bytes | None:
        """The SQL a Query, Parse or Bind (its prepared statement's) will run; None for a
        Bind of a statement pgguard did not see (the server reports it)."""
        if t == _Q:
            return buf[pos + 5 : end - 1]
        # Parse or Bind: a name (portal for Bind), then the statement's name or SQL
        i = buf.find(0, pos + 5, end)
        j = buf.find(0, i + 1, end) if i >= 0 else -1
        if j < 0:
            raise ProtocolError("Parse/Bind: unterminated string")
        if t == _P:
            return buf[i + 1 : j]
        known = self._statements.get(buf[i + 1 : j])
        return known[0] if known else None

    # ------------------------------------------------------------------ approval holds
    def _hold(
        self,
        buf: bytes,
        pos: int,
        end: int,
        out: list[bytes] | None,
        prev: int,
        hold: Hold,
        sql: bytes,
    ) -> bytes:
        """Stop relaying the client at the message at ``pos``: it and everything after it
        wait (unread by the server) until :meth:`release`."""
        self.holding = hold
        self._held_sql = sql
        self._held_in = [buf[pos:]]
        self._held_bytes = len(buf) - pos
        self._client.reset()  # the held bytes are scanned again from their start
        assert self.on_hold is not None
        # A hold the callback ends at once (a prompt id already set, no approvals store)
        # must not send the held bytes ahead of those before them: release() keeps them
        # for this return instead of handing them to the caller.
        # (Holds nest: releasing one may hold, and at once release, a later statement.)
        outer = (self._in_on_hold, self._released_early)
        self._in_on_hold, self._released_early = True, b""
        try:
            self.on_hold(hold, self.sql_text(sql), buf[pos:end])
            released = self._released_early
        finally:
            self._in_on_hold, self._released_early = outer
        return b"".join((*(out or ()), buf[prev:pos], released))

    def release(self, verdict: Refusal | None) -> bytes:
        """End a hold: the held statement runs (``verdict`` None) or is refused with
        ``verdict``; returns the client bytes to send to the server now."""
        if self.holding is None:
            return b""
        data = b"".join(self._held_in)
        sql = self._held_sql
        self.holding = None
        self._held_in = []
        self._held_bytes = 0
        injected = self._inject_next
        if injected is not None:
            # Registered before the held bytes are read again: they may end the batch.
            self._inject_next = None
            if self._injections is None:
                self._injections = _Injections()
                self._apply_server_table()
            self._injections.items.append(injected[1])
        # The decision covers the held statement's Parse and Binds in what was held; a
        # later execution asks again.
        self._overrides[sql] = verdict
        try:
            released = self.from_client(data)
        finally:
            self._overrides.pop(sql, None)
        if injected is not None:
            released = injected[0] + released
        if self._in_on_hold:
            self._released_early += released  # sent after the bytes before the hold
            return b""
        return released

    def _verdict(self, sql: bytes) -> Refusal | None:
        """The hook's verdict on ``sql``, remembered per text until the epoch moves."""
        if self.hook is None:
            return None  # only counting statements
        if self.gate is not None:
            closed = self.gate()
            if closed is not None:
                return closed
        if self._overrides:
            decided = self._overrides.pop(sql, _UNSEEN)
            if decided is not _UNSEEN:  # the decision on a held statement: one execution
                return cast(Refusal | None, decided)
        cache = self._verdicts
        if self.epoch is not None and self.epoch[0] != self._epoch_seen:
            cache.clear()  # the policy or a catalog changed since these verdicts
            self._epoch_seen = self.epoch[0]
        refusal = cache.get(sql, _UNSEEN)
        if refusal is _UNSEEN:
            text = self._sql_text(sql)
            refusal = self.hook(text) if text is not None else self._undecodable()
            if len(cache) >= _VERDICT_CACHE:
                cache.clear()
            cache[sql] = refusal
        return cast(Refusal | None, refusal)

    def set_client_encoding(self, encoding: str) -> None:
        """The session's client_encoding (from the server's ParameterStatus): how its SQL's
        bytes are read for the guard."""
        codec = client_codec(encoding) or "utf-8"
        if codec != self._codec:
            self._verdicts.clear()  # verdicts are kept by bytes: the same bytes, other text
        self.client_encoding = encoding
        self._codec = codec

    def _sql_text(self, raw: bytes) -> str | None:
        """SQL bytes as text in the session's client encoding; None if they are not valid in
        it (the server would refuse them too)."""
        try:
            return raw.decode(self._codec)
        except UnicodeDecodeError:
            return None

    def sql_text(self, raw: bytes) -> str:
        """SQL bytes as the session's statements are held, counted and recorded: in its
        client encoding, or (not valid in it) readable all the same (see sql_bytes_text)."""
        text = self._sql_text(raw)
        return text if text is not None else sql_bytes_text(raw)

    def _recorded_sql(self, text: str) -> str:
        """A Query's or Parse's SQL, decoded with ``surrogateescape`` as messages are, as the
        audit records it (:meth:`sql_text`)."""
        return text if text.isascii() else self.sql_text(text.encode("utf-8", "surrogateescape"))

    def _undecodable(self) -> Refusal:
        return Refusal(
            "encoding",
            f'invalid byte sequence for encoding "{self.client_encoding}"',
            "22021",
        )

    def _substitute_message(self, raw: bytes, refusal: Refusal, t: int) -> bytes:
        """A message the server will fail with an error naming a unique marker (see
        ``__init__``): a syntax error for Query/Parse, an unknown statement for Bind."""
        token = self._substitute(refusal)
        if t == _Q:
            return Query(token).encode()
        name = raw[5 : raw.find(0, 5)].decode("utf-8", "surrogateescape")
        if t == _P:
            return Parse(name, token, ()).encode()
        return Bind(name, token).encode()

    def _substitute(self, refusal: Refusal) -> str:
        self._seq += 1
        token = f"{self._marker}{self._seq}"
        self._refusals[token] = refusal
        return token

    def _marker_in(self, message: str) -> str | None:
        """The refusal token in a server error message, if the error is one of ours."""
        start = message.find(self._marker)
        if start < 0:
            return None
        end = start + len(self._marker)
        while end < len(message) and message[end].isdigit():
            end += 1
        return message[start:end]

    def _rewrite_error(self, raw: bytes) -> bytes:
        if not self._refusals or self._marker.encode() not in raw:
            return raw
        try:
            err = ErrorResponse.decode_body(raw[5:])
        except ProtocolError:
            return raw
        token = self._marker_in(err.message)
        if token is None:
            return raw
        refusal = self._refusals.pop(token, None)
        if refusal is None:
            return raw
        self._refused_now = refusal  # for the statement tracker, which sees the rewrite
        return ErrorResponse(error_fields("ERROR", refusal.sqlstate, refusal.text())).encode()

    def from_server(self, data: bytes) -> bytes:
        """Server bytes → bytes for the client."""
        self._heard = True  # until a ReadyForQuery ends the data (see can_inject)
        buf, hits, cut = self._server.scan(data)
        if hits:
            return self._server_messages(buf, hits, cut)
        return buf if cut == len(buf) else buf[:cut]

    def _server_messages(self, buf: bytes, hits: list[int], cut: int) -> bytes:
        out: list[bytes] | None = None
        prev = 0
        masking = self.masking
        for pos in hits:
            t = buf[pos]
            if self._internal_active:
                # A reply to pgguard's own query: read it, keep it from the client, except
                # the asynchronous messages (notifications, notices, parameter changes).
                if t in _ASYNC:
                    continue
                end = pos + 1 + _LEN.unpack_from(buf, pos + 1)[0]
                if t == _Z:
                    self._heard = end < len(buf)
                self._internal_message(t, buf[pos + 5 : end])
                if out is None:
                    out = []
                out.append(buf[prev:pos])
                prev = end
                continue
            end = pos + 1 + _LEN.unpack_from(buf, pos + 1)[0]
            if self._injections is not None and self._own_reply(t, buf, pos):
                if out is None:
                    out = []
                out.append(buf[prev:pos])
                prev = end
                continue
            msg: bytes | None = None  # what replaces buf[pos:end]; None: unchanged
            if t == _E and self._refusals:
                self._refused_now = None
                raw = buf[pos:end]
                rewritten = self._rewrite_error(raw)
                if rewritten is not raw:
                    msg = rewritten
            if masking is not None:
                replacement = (
                    masking.server(t, buf, pos, end)
                    if msg is None
                    else masking.server(t, msg, 0, len(msg))
                )
                if replacement is not None:
                    msg = replacement
            if self.max_rows is not None and t in _ROW_LIMIT_TYPES and msg != b"":
                limited = self._limit_rows(t, buf[pos:end] if msg is None else msg)
                if limited is not None:
                    msg = limited
            if self.tracker is not None:
                # The audit sees what the client gets: masked rows, a row-limit error.
                if msg is None:
                    self._track_server(t, buf, pos)
                elif msg:
                    self._track_replacement(t, msg)
                elif t in _DESCRIPTIONS:
                    self._track_server(t, buf, pos)  # a RowDescription kept from the client
            if msg is not None and not msg:  # dropped
                if out is None:
                    out = []
                out.append(buf[prev:pos])
                prev = end
                continue
            if t == _Z:
                self.status = _STATUS[buf[pos + 5]]
                self._heard = end < len(buf)
                if self.forget_at_idle and self.status == b"I":
                    self.forget_at_idle = False
                    self._verdicts.clear()
                if self.pending:
                    self.pending -= 1
                    if self._requests:
                        request = self._requests.popleft()
                        if request is not None:
                            assert self.on_counted is not None
                            self.on_counted(request[1], self._clock() - request[0])
                if self.pending == 0:
                    if self.holding is not None and self.status == b"E":
                        self._fail_internal("the transaction has failed")
                    if self.masking_wanted is not None:
                        self.enable_masking(self.masking_wanted)
                    if self._refusals:
                        self._refusals.clear()  # refused requests skipped after an error
                    if self._internal_queue and self._internal_ready():
                        self._start_internal()
                if self.ending is not None and self._can_end():
                    self.closing = True
                    head = buf[prev : pos + 6]
                    return b"".join((*(out or ()), head, self.ending.encode()))
            elif t == _COPY_IN:
                self._copy_in = True
            elif t == _S:
                status = ParameterStatus.decode_body(buf[pos + 5 : end])
                if status.name == "client_encoding":
                    self.set_client_encoding(status.value)
                reason = unsafe_setting(status.name, status.value)
                if reason is not None:
                    # Something changed it behind the guard's back: pgguard can no longer
                    # parse this session's SQL as the server does. Fail closed.
                    self.closing = True
                    fatal = Fatal("0A000", f"pgguard: sql-safety: {reason}; session ended")
                    return b"".join((*(out or ()), buf[prev:pos], fatal.encode()))
            if msg is not None:
                if out is None:
                    out = []
                out.append(buf[prev:pos])
                out.append(msg)
                prev = end
        if out is None:
            return buf if cut == len(buf) else buf[:cut]
        out.append(buf[prev:cut])
        return b"".join(out)

    # ------------------------------------------------------------------ statement counting
    def count_statements(self, on_counted: CountedCallback, clock: Callable[[], float]) -> None:
        """Report the statements of each request to ``on_counted`` at the ReadyForQuery that
        ends it: for metrics without the statement tracker, at the cost of a list append per
        statement. Only when the tracker is not installed (it would count them twice)."""
        assert self.tracker is None
        self.on_counted = on_counted
        self._clock = clock
        self._requests.extend([None] * self.pending)  # replies already due ran nothing seen

    def _copy_ended(self) -> None:
        """CopyDone or CopyFail of a COPY FROM STDIN: the Syncs sent since its Execute reached
        the server in copy-in mode, which ignored them; the Sync after this one gets the
        ReadyForQuery. Their statements belong to that Sync's request."""
        self._copy_in = False
        ignored, self._syncs_since_execute = self._syncs_since_execute, 0
        if not ignored:
            return
        self.pending -= ignored
        if self.on_counted is not None:
            for _ in range(ignored):
                entry = self._requests.pop() if self._requests else None
                if entry is not None:
                    self._noted_at, noted = entry
                    self._noted = noted + self._noted
        if self.tracker is not None:
            self.tracker.ignored_syncs(ignored)

    def _end_request(self) -> None:
        """A Query, Sync or FunctionCall was sent: the statements noted since the last one
        are answered by its ReadyForQuery."""
        if self._noted:
            self._requests.append((self._noted_at, self._noted))
            self._noted = []
        else:
            self._requests.append(None)

    # ------------------------------------------------------------------ statement tracking
    def track_statements(
        self,
        tracker: StatementTracker,
        on_runs: RunsCallback,
        preview_rows: int = 0,
        preview_bytes: int = 0,
    ) -> None:
        """Report every statement's outcome (for the audit trail) to ``on_runs``, with a
        preview of up to ``preview_rows`` rows as the client received them."""
        assert self.on_counted is None  # the runs are counted instead
        self.tracker = tracker
        self.on_runs = on_runs
        self._preview_limits = (preview_rows, preview_bytes)
        self._client.set_intercept(
            CLIENT_INTERCEPT
            + _TRACK_CLIENT
            + (MASKING_CLIENT_TYPES if self.masking is not None else b"")
        )
        self._server_table = self._server_table + _TRACK_SERVER
        if preview_rows > 0:
            self._server_table += b"TD"
        self._apply_server_table()

    def _previewing(self, on: bool) -> None:
        """Stop (or start again) cutting out DataRows once a preview is full."""
        if self.max_rows is not None or self._internal_active is not None or self.masking:
            return  # row limits and masking see every row anyway
        self._apply_server_table(
            self._server_table if on else self._server_table.replace(b"D", b"")
        )

    def _track_client(self, buf: bytes, hits: list[int]) -> None:
        tracker = self.tracker
        assert tracker is not None
        for pos in hits:
            t = buf[pos]
            end = pos + 1 + _LEN.unpack_from(buf, pos + 1)[0]
            body = buf[pos + 5 : end]
            if t == _Q:
                tracker.query(self._recorded_sql(Query.decode_body(body).sql))
            elif t == _P:
                parse = Parse.decode_body(body)
                tracker.parse(parse.name, self._recorded_sql(parse.sql))
            elif t == _B:
                bind = Bind.decode_body(body)
                # Each parameter's format: one code for all, none for text (param_format).
                pf, count = bind.param_formats, len(bind.params)
                formats = pf if len(pf) > 1 else (pf or (0,)) * count
                tracker.bind(bind.portal, bind.statement, bind.params, formats)
            elif t == _EXECUTE:
                execute = Execute.decode_body(body)
                tracker.execute(execute.portal, execute.max_rows)
            elif t == _S:
                tracker.sync()
            elif t == _F:
                tracker.function_call(FunctionCall.decode_body(body).function_oid)
            elif t == _CLOSE:
                close = Close.decode_body(body)
                tracker.close(close.kind, close.name)

    def _track_replacement(self, t: int, msg: bytes) -> None:
        """Track what replaced a server message: itself, a row-limit error instead of its
        CommandComplete, or a NOTICE followed by the CommandComplete."""
        first = msg[0]
        if first in (t, _E):
            self._track_server(first, msg, 0)
        elif first == _N and t == _C:
            self._track_server(_C, msg, 1 + _LEN.unpack_from(msg, 1)[0])

    def _track_server(self, t: int, buf: bytes, pos: int) -> None:
        tracker = self.tracker
        assert tracker is not None and self.on_runs is not None
        if t == _D:
            preview = self._preview
            if preview is not None and self._preview_count < self._preview_limits[0]:
                end = pos + 1 + _LEN.unpack_from(buf, pos + 1)[0]
                preview.row(buf[pos + 5 : end])  # decoded by the audit writer process
                self._preview_count += 1
                if self._preview_count >= self._preview_limits[0]:
                    self._previewing(False)
            return
        if t == _T:
            end = pos + 1 + _LEN.unpack_from(buf, pos + 1)[0]
            self._preview = PreviewCapture(buf[pos + 5 : end], *self._preview_limits)
            self._preview_count = 0
            self._previewing(True)
            return
        if t not in _TRACKED_REPLIES:
            return
        end = pos + 1 + _LEN.unpack_from(buf, pos + 1)[0]
        body = buf[pos + 5 : end]
        if t in (_C, _SUSPENDED):
            if t == _C:
                tag = CommandComplete.decode_body(body).tag
                runs = tracker.complete(tag)
            else:  # the rows so far are what the client got: previewed the same way
                tag = "SUSPENDED"
                runs = tracker.suspended()
            masked = self.masking.last_masked if self.masking is not None else ()
            entry = None
            if self._preview is not None and runs:
                # Rows past the preview were not seen one by one: the tag says how many.
                entry = self._preview.result(tag, runs[-1].rows)
                self._preview = None
            if runs and (entry is not None or masked):
                runs[-1] = runs[-1].with_result(entry, masked or runs[-1].masked_columns)
        elif t == _I:
            runs = tracker.empty()
        elif t == _E:
            err = ErrorResponse.decode_body(body)
            sqlstate, message = err.sqlstate, err.message
            refusal, self._refused_now = self._refused_now, None
            if refusal is not None:
                runs = tracker.refused(
                    refusal.sqlstate,
                    refusal.text(),
                    (refusal.rule, refusal.decision, refusal.approval_id),
                )
            else:
                runs = tracker.error(sqlstate, message)
        else:  # ReadyForQuery
            runs = tracker.ready()
        if t != _C and t != _SUSPENDED and self._preview is not None:
            self._preview = None  # an error or the end of the request: no rows to keep
            self._previewing(True)
        if runs:
            self.on_runs(runs)

    # ------------------------------------------------------------------ row limits
    def set_row_limit(self, max_rows: int | None, mode: str = "error") -> None:
        """Cap the rows each statement returns (``mode`` "truncate": the first ``max_rows``
        rows and a NOTICE; "error": an error once the cap is passed, the query cancelled)."""
        self.max_rows = max_rows
        self.row_limit_mode = mode
        self._server_table = (
            SERVER_INTERCEPT
            + (b"DC" if max_rows is not None else b"")
            + (_TRACK_SERVER if self.tracker is not None else b"")
            + (b"TD" if self.tracker is not None and self._preview_limits[0] > 0 else b"")
            + self._extra_server
        )
        self._apply_server_table()

    def _limit_rows(self, t: int, raw: bytes) -> bytes | None:
        """Count a result's rows; the replacement for ``raw`` (b"" drops it), or None."""
        assert self.max_rows is not None
        if t == _D:
            self._rows += 1
            if self._rows <= self.max_rows:
                return None
            if not self._over:
                self._over = True
                if self.row_limit_mode == "error":
                    self.cancel_requested = True  # stop the server producing rows we drop
            return b""
        over, self._over, self._rows = self._over, False, 0
        if not over or (t == _Z):
            return None
        text = f"pgguard: limits: the result has more than {self.max_rows} rows"
        if self.row_limit_mode == "error":
            if t in (_C, _E):
                return ErrorResponse(error_fields("ERROR", "54000", text)).encode()
            return None
        if t == _C:
            tag = CommandComplete.decode_body(raw[5:]).tag
            verb = tag.split(" ", 1)[0]
            if verb in ("SELECT", "FETCH", "MOVE"):
                tag = f"{verb} {self.max_rows}"
            notice = NoticeResponse(
                error_fields("NOTICE", "01000", f"{text}; only the first {self.max_rows} sent")
            ).encode()
            return notice + CommandComplete(tag).encode()
        return None

    # ------------------------------------------------------------------ pgguard's own queries
    def forget_verdicts(self) -> None:
        """Judge every statement afresh (e.g. after the search_path changed)."""
        self._verdicts.clear()

    def internal_query(
        self, sql: str, on_result: InternalCallback, outside_transaction: bool = False
    ) -> None:
        """Run ``sql`` on the upstream session at its next idle point, unseen by the client.

        ``on_result(rows, error)`` gets the text rows of the last result, or the error message.
        It is sent when no client request is outstanding (and not in a failed transaction, or
        with ``outside_transaction`` only once no transaction block is open), so its reply
        comes back whole before any later client request's reply.
        """
        self._internal_queue.append((sql, on_result, outside_transaction))

    def internal_now(self) -> bool:
        """Start a queued query of pgguard's own at once if the session is idle; the caller
        then writes :attr:`server_out` to the server. False when it has to wait."""
        if self._internal_active is None and self._internal_ready():
            self._start_internal()
            return True
        return False

    def internal_clear(self) -> bool:
        """Nothing of pgguard's own is queued or running, and no transaction has failed:
        a query queued now runs as soon as the client's outstanding replies are in."""
        return (
            not self._internal_queue
            and self._internal_active is None
            and self.status != b"E"
            and not self.unsynced
        )

    def _fail_internal(self, why: str) -> None:
        """Queued queries of pgguard's own that cannot run (a failed transaction, whose
        ROLLBACK waits behind a held statement) end with an error instead of never."""
        queued, self._internal_queue = self._internal_queue, []
        for _sql, callback, _outside in queued:
            callback([], why)

    def _internal_ready(self) -> bool:
        if not self._internal_queue or self.pending or self.unsynced:
            return False
        if self._internal_queue[0][2]:
            return self.status == b"I"
        return self.status != b"E"

    def _start_internal(self) -> None:
        sql, callback, _ = self._internal_queue.pop(0)
        self._internal_active = callback
        self._internal_rows = []
        self._internal_error = None
        self.server_out.append(Query(sql).encode())
        self._server.set_intercept(_ALL_TYPES)

    def _internal_message(self, t: int, body: bytes) -> None:
        if t == _T:
            self._internal_rows = []
        elif t == _D:
            values = data_row_values(body)
            self._internal_rows.append(
                tuple(None if v is None else v.decode("utf-8", "replace") for v in values)
            )
        elif t == _E:
            self._internal_error = ErrorResponse.decode_body(body).message
        elif t == _Z:
            callback = self._internal_active
            self._internal_active = None
            self._apply_server_table()
            assert callback is not None
            callback(self._internal_rows, self._internal_error)
            if self._internal_ready():
                self._start_internal()

    # ------------------------------------------------------------------ statements in the batch
    def _apply_server_table(self, table: bytes | None = None) -> None:
        """Intercept ``table`` (the session's server types by default), and the replies to
        pgguard's statements in the client's batch while it has some; not while a query of
        pgguard's own runs (everything is intercepted then)."""
        if self._internal_active is not None:
            return
        if table is None:
            table = self._server_table
        if self._injections is not None:
            table += _OWN_REPLIES
        self._server.set_intercept(table)

    def can_inject(self) -> bool:
        """Whether a statement of pgguard's own can go into the client's batch now (see
        :meth:`inject`). pgguard must know where its replies will come among the server's:
        it does while no earlier request is still being answered and nothing of the batch
        came back yet (nor anything else since the last ReadyForQuery), or while it follows
        the batch's replies already; not once the batch failed."""
        if self.pending or self.status == b"E":
            # In a failed transaction the server refuses the injected Parse and skips all up
            # to the Sync: a ROLLBACK or COMMIT after it would fail too.
            return False
        if self.holding is not None and self._held_in and self._held_in[0][0] == _Q:
            # Never before a simple Query: after an error of the injected statement the
            # server would skip the Query too, waiting for a Sync that never comes.
            return False
        own = self._injections
        if own is not None:
            return not own.failed
        return self._internal_active is not None or not self._heard

    def inject(self, sql: str, params: tuple[str, ...], on_settled: SettledCallback) -> None:
        """Run ``sql`` (one statement, text parameters ``params``) inside the client's batch,
        just before the held message, when it is released; only if :meth:`can_inject`.

        It goes as Parse, Bind, Execute and Close under a name of pgguard's own (the client's
        unnamed statement and portal stay untouched) and its replies are dropped, so neither
        the client nor the statement tracker sees them. If the server skips it (an earlier
        message of the batch failed) nothing of it comes back; if it fails, its error reaches
        the client as that of the client's next statement, which would have failed alike.
        ``on_settled(landed)`` is called at the batch's ReadyForQuery: ``landed`` only if it
        ran and nothing after it in the batch failed or rolled back (either may undo it)."""
        assert self.holding is not None and self._inject_next is None
        self._seq += 1
        name = f"{self._own}{self._seq}"  # statement and portal
        values = tuple(p.encode("utf-8", "surrogateescape") for p in params)
        data = b"".join(
            (
                Parse(name, sql).encode(),
                Bind(name, name, (), values).encode(),
                Execute(name).encode(),
                # Both closed: a portal left open in a transaction block would show in
                # pg_cursors (and give the names away) until the block ends.
                Close(b"P", name).encode(),
                Close(b"S", name).encode(),
            )
        )
        self._inject_next = (data, _Injected(self._parses, on_settled, name))

    @property
    def injected_in_flight(self) -> bool:
        """The client ended a batch holding statements of pgguard's own, and whether they ran
        is not known yet (until its ReadyForQuery)."""
        own = self._injections
        return own is not None and own.synced

    def _batch_sent(self) -> None:
        """The client ended the batch pgguard's statements are in."""
        own = self._injections
        assert own is not None
        if not own.synced:
            own.synced = True
            self._verdicts.clear()  # verdicts may depend on whether those statements ran

    def _own_reply(self, t: int, buf: bytes, pos: int) -> bool:
        """Whether the server message at ``pos`` (of type ``t``) answers a statement of
        pgguard's own in the client's batch (it is then dropped), and the bookkeeping of where
        those replies are."""
        own = self._injections
        assert own is not None
        if t == _Z:
            self._settle_injections(own)
            return False
        if t == _E:
            # The server skips the rest of the batch up to the Sync, pgguard's statements
            # included; an error of theirs goes to the client in its next statement's place.
            own.failed = True
            own.head = len(own.items)
            own.stage = _OWN_PARSE
            return False
        stage = own.stage
        if stage == _OWN_PARSE:
            if t == _ONE:
                if own.head < len(own.items) and own.ones == own.items[own.head].parses:
                    own.items[own.head].prepared = True
                    own.stage = _OWN_BIND
                    return True
                own.ones += 1  # the client's
            elif t == _C and own.head and buf.startswith(_UNDOING, pos + 5):
                own.undone = own.head  # the client's ROLLBACK may undo what ran before it
            return False
        if t in _ASYNC:
            return False  # a notice or notification between replies: not one
        if stage == _OWN_BIND and t == _TWO:
            own.stage = _OWN_RESULT
            return True
        if stage == _OWN_RESULT and t in (_D, _C):
            if t == _C:
                own.items[own.head].ran = True
                own.stage = _OWN_CLOSE_PORTAL
            return True
        if stage == _OWN_CLOSE_PORTAL and t == _THREE:
            own.stage = _OWN_CLOSE
            return True
        if stage == _OWN_CLOSE and t == _THREE:
            own.items[own.head].prepared = False
            own.head += 1
            own.stage = _OWN_PARSE
            return True
        raise ProtocolError(f"unexpected message {chr(t)!r} in a reply to pgguard's statement")

    def _settle_injections(self, own: _Injections) -> None:
        """The ReadyForQuery of the batch holding pgguard's statements: report how they went."""
        self._injections = None
        self._apply_server_table()
        self._verdicts.clear()  # given while the outcome was not known
        for i, item in enumerate(own.items):
            if item.prepared:
                # It failed after its Parse, so the server skipped its Closes: its statement
                # would stay prepared on the session; gone once the session is idle again.
                self.internal_query(f"DEALLOCATE {item.name}", _ignored, outside_transaction=True)
            item.on_settled(item.ran and not own.failed and i >= own.undone)
