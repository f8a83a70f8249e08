"""The relay's per-session protocol state, once both sides are authenticated. Sans-IO.

``from_client`` and ``from_server`` take raw bytes and return what to send each way. Messages
nobody needs to read are forwarded as the original bytes; only the few types that carry state
(statement boundaries, ReadyForQuery, Terminate) are cut out and looked at.

The statement seam for guard rules, audit and masking is ``StatementHook``: it sees every
Query and Parse before the server does. The default hook allows everything.
"""

from __future__ import annotations

from dataclasses import dataclass

from pgguard.protocol.framing import Frame, Scanner
from pgguard.protocol.messages import ErrorResponse, error_fields

# Type bytes as ints, for the hot path.
_Q, _P, _S, _F, _X, _H = 81, 80, 83, 70, 88, 72
_Z = 90

# Intercepted types. Client: Query, Parse, Sync, FunctionCall, Terminate.
CLIENT_INTERCEPT = b"QPSFX"
# Server: ReadyForQuery.
SERVER_INTERCEPT = b"Z"

_NOTHING: tuple[()] = ()


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


class RelayCore:
    """State of one relayed session: pending replies, transaction status, ending conditions."""

    __slots__ = (
        "_client",
        "_server",
        "closing",
        "ending",
        "pending",
        "status",
        "terminated",
    )

    def __init__(self, max_message_bytes: int) -> None:
        self._client = Scanner(CLIENT_INTERCEPT, max_message_bytes)
        self._server = Scanner(SERVER_INTERCEPT, max_message_bytes)
        self.status = b"I"  # transaction status from the last ReadyForQuery
        self.pending = 0  # ReadyForQuery messages the client still expects
        self.terminated = False  # client sent Terminate
        self.ending: Fatal | None = None  # end the session at the next idle point
        self.closing = False  # close both sides once the output is written

    def idle(self) -> bool:
        """No request outstanding and nothing half-received in either direction."""
        return self.pending == 0 and self._client.idle() and self._server.idle()

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

    def from_client(self, data: bytes) -> tuple[list[bytes | Frame] | list[bytes], tuple[()]]:
        """Client bytes → (to_server, to_client)."""
        pieces = self._client.feed(data)
        if len(pieces) == 1 and type(pieces[0]) is bytes:
            return pieces, _NOTHING
        out: list[bytes] = []
        for piece in pieces:
            if type(piece) is bytes:
                out.append(piece)
                continue
            assert isinstance(piece, Frame)
            t = piece.type
            if t == _S or t == _Q or t == _F:
                self.pending += 1
            elif t == _X:
                self.terminated = True
                self.closing = True
            out.append(piece.raw)
        return out, _NOTHING

    def from_server(self, data: bytes) -> list[bytes | Frame] | list[bytes]:
        """Server bytes → bytes for the client."""
        pieces = self._server.feed(data)
        if len(pieces) == 1 and type(pieces[0]) is bytes:
            return pieces
        out: list[bytes] = []
        for piece in pieces:
            if type(piece) is bytes:
                out.append(piece)
                continue
            assert isinstance(piece, Frame)
            if piece.type == _Z:
                self.status = piece.raw[5:6]
                if self.pending:
                    self.pending -= 1
                out.append(piece.raw)
                if self.ending is not None and self._can_end():
                    out.append(self.ending.encode())
                    self.closing = True
                    break
            else:
                out.append(piece.raw)
        return out
