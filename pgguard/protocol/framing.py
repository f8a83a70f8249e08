"""Framing: cut a byte stream into messages, with size limits. Sans-IO.

Two readers:

* ``MessageReader`` buffers and returns whole ``(type, body)`` messages; used where every
  message is read (authentication, tests).
* ``Scanner`` is the relay's hot path. It walks message headers and returns pass-through runs
  of the input as they are (the original ``bytes`` object when nothing in it is intercepted),
  and whole ``Frame`` objects only for the message types it was asked to intercept. A
  pass-through message larger than the chunk is forwarded piece by piece, so memory stays
  constant however large a row or COPY chunk is.
"""

from __future__ import annotations

import struct
from typing import NamedTuple

from pgguard.protocol.messages import ProtocolError

_LEN = struct.Struct("!I")
_HEADER = struct.Struct("!BI")  # type byte (as an int) and length, in one call
HEADER_SIZE = 5


class Frame(NamedTuple):
    """One whole message: its type byte as an int and its raw bytes, header included."""

    type: int
    raw: bytes

    @property
    def body(self) -> bytes:
        return self.raw[HEADER_SIZE:]

    @property
    def type_code(self) -> bytes:
        return bytes((self.type,))


def _check_length(type_code: int, length: int, limit: int) -> None:
    if length < 4:
        raise ProtocolError(f"invalid message length {length} for type {chr(type_code)!r}")
    if length - 4 > limit:
        raise ProtocolError(
            f"message of type {chr(type_code)!r} is {length - 4} bytes, over the "
            f"{limit}-byte limit",
            sqlstate="54000",
        )


class MessageReader:
    """Buffers bytes and yields whole typed messages as ``(type_code, body)``."""

    __slots__ = ("_buf", "_limit")

    def __init__(self, max_message_bytes: int) -> None:
        self._buf = bytearray()
        self._limit = max_message_bytes

    def feed(self, data: bytes) -> None:
        self._buf += data

    def buffered(self) -> int:
        return len(self._buf)

    def take_buffer(self) -> bytes:
        """Remove and return whatever is buffered (for handing over to another reader)."""
        data = bytes(self._buf)
        self._buf.clear()
        return data

    def next_message(self) -> tuple[bytes, bytes] | None:
        buf = self._buf
        if len(buf) < HEADER_SIZE:
            return None
        t = buf[0]
        (length,) = _LEN.unpack_from(buf, 1)
        _check_length(t, length, self._limit)
        end = 1 + length
        if len(buf) < end:
            return None
        body = bytes(buf[HEADER_SIZE:end])
        del buf[:end]
        return bytes((t,)), body


class StartupReader:
    """Reads the first, untyped packet: int32 length then body, bounded by ``limit``."""

    __slots__ = ("_buf", "_limit")

    def __init__(self, limit: int = 10000) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> None:
        self._buf += data

    def next_packet(self) -> bytes | None:
        """The packet body (after the length word), or None until it is complete."""
        buf = self._buf
        if len(buf) < 4:
            return None
        (length,) = _LEN.unpack_from(buf, 0)
        if length < 8:
            raise ProtocolError(f"invalid startup packet length {length}")
        if length > self._limit:
            raise ProtocolError(
                f"startup packet of {length} bytes is over the {self._limit}-byte limit"
            )
        if len(buf) < length:
            return None
        body = bytes(buf[4:length])
        del buf[:length]
        return body

    def take_buffer(self) -> bytes:
        data = bytes(self._buf)
        self._buf.clear()
        return data


_NO_HITS: list[int] = []


class Scanner:
    """Streaming splitter for one direction of the relay.

    ``scan(data)`` is the hot path: it walks message headers and returns ``(buf, hits, cut)``.
    The caller forwards ``buf[:cut]``; ``hits`` are the offsets in ``buf`` of whole intercepted
    messages (the caller may look at or replace them). Nothing is copied when ``data`` holds
    whole messages. A pass-through message cut off at the end of ``data`` is forwarded as far
    as it goes and the rest is passed through on the next call, so memory stays constant;
    an intercepted message, or a header, cut off at the end is kept back until complete.

    ``feed(data)`` returns the same as a list of ``bytes`` runs and ``Frame`` objects.
    """

    __slots__ = ("_intercept", "_intercepting", "_limit", "_need", "_pending", "_skip")

    def __init__(self, intercept: bytes, max_message_bytes: int) -> None:
        self._intercepting = intercept
        self._intercept = self._table(intercept)
        self._limit = max_message_bytes
        # A partial header, or a partial intercepted message (a bytearray, so that a large
        # message arriving in many chunks is appended in place, not copied each time).
        self._pending: bytearray | None = None
        self._need = 0  # total size of the intercepted message being collected (0: a header)
        self._skip = 0  # bytes of a pass-through message still to forward

    @staticmethod
    def _table(intercept: bytes) -> list[bool]:
        table = [False] * 256
        for code in intercept:
            table[code] = True
        return table

    def set_intercept(self, intercept: bytes) -> None:
        if intercept != self._intercepting:  # the audit's preview sets it per statement
            self._intercepting = intercept
            self._intercept = self._table(intercept)

    def idle(self) -> bool:
        """True when no message is partially received."""
        return self._pending is None and not self._skip

    def reset(self) -> None:
        """Forget a partial message: the caller keeps the bytes and scans them again."""
        self._pending = None
        self._need = 0
        self._skip = 0

    def buffered(self) -> int:
        """Bytes held back: a partial header or a partial intercepted message."""
        return 0 if self._pending is None else len(self._pending)

    def scan(self, data: bytes) -> tuple[bytes, list[int], int]:
        pos = 0
        buf = data
        if self._skip:
            n = len(data)
            if self._skip >= n:
                self._skip -= n
                return data, _NO_HITS, n
            pos = self._skip
            self._skip = 0
        elif self._pending is not None:
            pending = self._pending
            if self._need and len(pending) + len(data) < self._need:
                pending += data
                return b"", _NO_HITS, 0
            buf = bytes(pending) + data
            self._pending = None
            self._need = 0
        n = len(buf)
        hits: list[int] = []
        intercept = self._intercept
        limit4 = self._limit + 4
        header = _HEADER.unpack_from
        last = n - HEADER_SIZE
        while pos <= last:
            t, length = header(buf, pos)
            if not 4 <= length <= limit4:
                _check_length(t, length, self._limit)
            end = pos + 1 + length
            if end > n:
                if intercept[t]:
                    self._pending = bytearray(buf[pos:])
                    self._need = end - pos
                    return buf, hits, pos
                self._skip = end - n
                return buf, hits, n
            if intercept[t]:
                hits.append(pos)
            pos = end
        if pos < n:
            self._pending = bytearray(buf[pos:])  # a partial header
            return buf, hits, pos
        return buf, hits, n

    def feed(self, data: bytes) -> list[bytes | Frame]:
        buf, hits, cut = self.scan(data)
        out: list[bytes | Frame] = []
        prev = 0
        for pos in hits:
            if prev < pos:
                out.append(buf[prev:pos])
            end = pos + 1 + _LEN.unpack_from(buf, pos + 1)[0]
            out.append(Frame(buf[pos], buf[pos:end]))
            prev = end
        if prev < cut:
            out.append(buf if prev == 0 and cut == len(buf) else buf[prev:cut])
        return out
