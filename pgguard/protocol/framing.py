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


class Scanner:
    """Streaming splitter for one direction of the relay.

    ``feed(data)`` returns a list whose items are either ``bytes`` (forward as they are) or
    ``Frame`` (an intercepted message, for the caller to handle). Order is preserved.
    """

    __slots__ = ("_intercept", "_limit", "_pending", "_need", "_skip")

    def __init__(self, intercept: bytes, max_message_bytes: int) -> None:
        table = [False] * 256
        for code in intercept:
            table[code] = True
        self._intercept = table
        self._limit = max_message_bytes
        # A partial header (bytes), or a partial intercepted message (a bytearray, so that a
        # large message arriving in many chunks is appended in place, not copied each time).
        self._pending: bytes | bytearray = b""
        self._need = 0  # total size of the intercepted message being collected (0: none)
        self._skip = 0  # bytes of a pass-through message still to forward

    def set_intercept(self, intercept: bytes) -> None:
        table = [False] * 256
        for code in intercept:
            table[code] = True
        self._intercept = table

    def idle(self) -> bool:
        """True when no message is partially received."""
        return not self._pending and not self._skip

    def feed(self, data: bytes) -> list[bytes | Frame]:
        out: list[bytes | Frame] = []
        n = len(data)
        pos = 0
        if self._skip:
            if self._skip >= n:
                self._skip -= n
                return [data]
            out.append(data[: self._skip])
            pos = self._skip
            self._skip = 0
        if self._pending:
            if self._need:
                # Collecting an intercepted message.
                want = self._need - len(self._pending)
                pending = self._pending
                if n - pos < want:
                    pending += data[pos:]
                    return out
                pending += data[pos : pos + want]
                raw = bytes(pending)
                self._pending = b""
                self._need = 0
                out.append(Frame(raw[0], raw))
                pos += want
            else:
                # A header split across chunks: prepend it and start over.
                data = self._pending + data[pos:]
                self._pending = b""
                n = len(data)
                pos = 0
        intercept = self._intercept
        limit = self._limit
        unpack = _LEN.unpack_from
        run = pos
        while pos < n:
            if n - pos < HEADER_SIZE:
                if run < pos:
                    out.append(data[run:pos])
                self._pending = data[pos:]
                return out
            t = data[pos]
            (length,) = unpack(data, pos + 1)
            if length < 4 or length - 4 > limit:
                _check_length(t, length, limit)
            end = pos + 1 + length
            if intercept[t]:
                if run < pos:
                    out.append(data[run:pos])
                if end <= n:
                    out.append(Frame(t, data[pos:end]))
                    pos = run = end
                    continue
                self._pending = bytearray(data[pos:])
                self._need = end - pos
                return out
            if end > n:
                self._skip = end - n
                pos = n
                break
            pos = end
        if run < pos:
            out.append(data if run == 0 and pos == n else data[run:pos])
        return out
