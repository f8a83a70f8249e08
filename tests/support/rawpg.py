"""A tiny PostgreSQL v3 wire-protocol client, for what drivers don't send (FunctionCall)
and for reading exact error fields (SQLSTATE of an authentication failure).

Authentication: trust, cleartext, md5 and SCRAM-SHA-256 (standard library only).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import os
import socket
import struct
from dataclasses import dataclass, field

PROTOCOL_3 = 196608  # 3.0
PROTOCOL_2 = 131072  # 2.0, refused by everyone nowadays
SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
CANCEL_REQUEST = 80877102


class PgError(Exception):
    """An ErrorResponse from the server (or the gateway)."""

    def __init__(self, fields: dict[str, str]) -> None:
        self.fields = fields
        self.auth_methods: list[int] = []  # authentication requests seen before it (startup)
        super().__init__(f"{fields.get('S', '?')} {fields.get('C', '?')}: {fields.get('M', '')}")

    @property
    def sqlstate(self) -> str | None:
        return self.fields.get("C")

    @property
    def severity(self) -> str | None:
        return self.fields.get("V") or self.fields.get("S")

    @property
    def message(self) -> str:
        return self.fields.get("M", "")


class ProtocolViolation(Exception):
    """The peer sent something this client did not expect (or closed the connection)."""


def parse_fields(body: bytes) -> dict[str, str]:
    """Fields of an ErrorResponse/NoticeResponse body."""
    out: dict[str, str] = {}
    pos = 0
    while pos < len(body) and body[pos] != 0:
        code = chr(body[pos])
        end = body.index(b"\x00", pos + 1)
        out[code] = body[pos + 1 : end].decode("utf-8", "replace")
        pos = end + 1
    return out


def _cstr(s: str) -> bytes:
    return s.encode() + b"\x00"


@dataclass
class QueryResult:
    """What a simple Query produced, one entry per statement."""

    rows: list[list[list[bytes | None]]] = field(default_factory=list)
    tags: list[str] = field(default_factory=list)
    notices: list[dict[str, str]] = field(default_factory=list)
    error: PgError | None = None
    status: bytes = b"I"


class RawConnection:
    """One v3 session over a plain TCP socket."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()
        self.parameters: dict[str, str] = {}
        self.backend_key: tuple[int, int] | None = None
        self.notices: list[dict[str, str]] = []
        self.auth_methods: list[int] = []
        self.status = b"?"

    # -- framing ------------------------------------------------------------------------

    def _recv_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            chunk = self.sock.recv(max(65536, n - len(self.buf)))
            if not chunk:
                raise ProtocolViolation("connection closed by peer")
            self.buf += chunk
        data = bytes(self.buf[:n])
        del self.buf[:n]
        return data

    def read_message(self) -> tuple[bytes, bytes]:
        header = self._recv_exact(5)
        kind = header[:1]
        (length,) = struct.unpack("!i", header[1:])
        if length < 4:
            raise ProtocolViolation(f"bad length {length} for message {kind!r}")
        return kind, self._recv_exact(length - 4)

    def send(self, kind: bytes, body: bytes = b"") -> None:
        self.sock.sendall(kind + struct.pack("!i", len(body) + 4) + body)

    def send_untyped(self, body: bytes) -> None:
        self.sock.sendall(struct.pack("!i", len(body) + 4) + body)

    # -- startup ------------------------------------------------------------------------

    def startup(self, user: str, database: str, password: str | None, **params: str) -> None:
        body = struct.pack("!i", PROTOCOL_3)
        for k, v in {"user": user, "database": database, **params}.items():
            body += _cstr(k) + _cstr(v)
        self.send_untyped(body + b"\x00")
        scram: _Scram | None = None
        while True:
            kind, msg = self.read_message()
            if kind == b"E":
                err = PgError(parse_fields(msg))
                err.auth_methods = list(self.auth_methods)
                raise err
            if kind == b"N":
                self.notices.append(parse_fields(msg))
            elif kind == b"R":
                (code,) = struct.unpack("!i", msg[:4])
                self.auth_methods.append(code)
                if code == 0:
                    continue
                if password is None:
                    raise ProtocolViolation(f"server asks for a password (auth code {code})")
                if code == 3:
                    self.send(b"p", _cstr(password))
                elif code == 5:
                    salt = msg[4:8]
                    inner = hashlib.md5((password + user).encode()).hexdigest().encode()
                    self.send(b"p", _cstr("md5" + hashlib.md5(inner + salt).hexdigest()))
                elif code == 10:
                    mechanisms = [m.decode() for m in msg[4:].split(b"\x00") if m]
                    if "SCRAM-SHA-256" not in mechanisms:
                        raise ProtocolViolation(f"no supported SASL mechanism in {mechanisms}")
                    scram = _Scram(password)
                    first = scram.client_first().encode()
                    self.send(b"p", _cstr("SCRAM-SHA-256") + struct.pack("!i", len(first)) + first)
                elif code == 11:
                    assert scram is not None
                    self.send(b"p", scram.client_final(msg[4:].decode()).encode())
                elif code == 12:
                    assert scram is not None
                    scram.verify_server_final(msg[4:].decode())
                else:
                    raise ProtocolViolation(f"unsupported authentication request {code}")
            elif kind == b"S":
                name, value, _ = msg.split(b"\x00", 2)
                self.parameters[name.decode()] = value.decode()
            elif kind == b"K":
                self.backend_key = struct.unpack("!ii", msg[:8])
            elif kind == b"Z":
                self.status = msg[:1]
                return
            else:
                raise ProtocolViolation(f"unexpected message {kind!r} during startup")

    # -- operations ---------------------------------------------------------------------

    def query(self, sql: str) -> QueryResult:
        """Simple Query; collect rows as raw text values, tags, notices, the first error."""
        self.send(b"Q", _cstr(sql))
        result = QueryResult()
        current: list[list[bytes | None]] | None = None
        while True:
            kind, msg = self.read_message()
            if kind == b"T":
                current = []
            elif kind == b"D":
                assert current is not None
                current.append(_data_row(msg))
            elif kind == b"C":
                result.tags.append(msg.rstrip(b"\x00").decode())
                result.rows.append(current or [])
                current = None
            elif kind == b"E":
                result.error = result.error or PgError(parse_fields(msg))
            elif kind == b"N":
                result.notices.append(parse_fields(msg))
            elif kind == b"Z":
                result.status = msg[:1]
                self.status = result.status
                return result
            elif kind in (b"I", b"S", b"A"):
                continue
            else:
                raise ProtocolViolation(f"unexpected message {kind!r} after Query")

    def function_call(
        self,
        oid: int,
        args: list[bytes | None],
        *,
        arg_formats: list[int] | None = None,
        result_format: int = 1,
    ) -> bytes | None:
        """FunctionCall ('F'); returns the result value (None for NULL) or raises PgError
        (after the ReadyForQuery that follows it)."""
        formats = arg_formats if arg_formats is not None else [1] * len(args)
        body = struct.pack("!i", oid)
        body += struct.pack("!h", len(formats)) + b"".join(struct.pack("!h", f) for f in formats)
        body += struct.pack("!h", len(args))
        for a in args:
            body += struct.pack("!i", -1) if a is None else struct.pack("!i", len(a)) + a
        body += struct.pack("!h", result_format)
        self.send(b"F", body)
        value: bytes | None = None
        error: PgError | None = None
        while True:
            kind, msg = self.read_message()
            if kind == b"V":
                (n,) = struct.unpack("!i", msg[:4])
                value = None if n < 0 else msg[4 : 4 + n]
            elif kind == b"E":
                error = PgError(parse_fields(msg))
            elif kind == b"N":
                self.notices.append(parse_fields(msg))
            elif kind == b"Z":
                self.status = msg[:1]
                if error is not None:
                    raise error
                return value
            elif kind in (b"S", b"A"):
                continue
            else:
                raise ProtocolViolation(f"unexpected message {kind!r} after FunctionCall")

    # -- extended protocol, message by message -----------------------------------------

    def parse(self, name: str, query: str, param_types: list[int] | None = None) -> None:
        types = param_types or []
        body = _cstr(name) + _cstr(query) + struct.pack("!h", len(types))
        body += b"".join(struct.pack("!I", t) for t in types)
        self.send(b"P", body)

    def bind(
        self,
        portal: str,
        statement: str,
        params: list[bytes | None],
        *,
        param_formats: list[int] | None = None,
        result_formats: list[int] | None = None,
    ) -> None:
        pf = param_formats or []
        rf = result_formats or []
        body = _cstr(portal) + _cstr(statement)
        body += struct.pack("!h", len(pf)) + b"".join(struct.pack("!h", f) for f in pf)
        body += struct.pack("!h", len(params))
        for p in params:
            body += struct.pack("!i", -1) if p is None else struct.pack("!i", len(p)) + p
        body += struct.pack("!h", len(rf)) + b"".join(struct.pack("!h", f) for f in rf)
        self.send(b"B", body)

    def describe(self, kind: str, name: str) -> None:
        self.send(b"D", kind.encode() + _cstr(name))

    def execute(self, portal: str, max_rows: int = 0) -> None:
        self.send(b"E", _cstr(portal) + struct.pack("!i", max_rows))

    def close(self, kind: str, name: str) -> None:
        self.send(b"C", kind.encode() + _cstr(name))

    def flush(self) -> None:
        self.send(b"H")

    def sync(self) -> None:
        self.send(b"S")

    def read_messages(self, count: int) -> list[tuple[bytes, bytes]]:
        return [self.read_message() for _ in range(count)]

    def read_until_ready(self) -> list[tuple[bytes, bytes]]:
        """Every message up to and including the next ReadyForQuery."""
        out: list[tuple[bytes, bytes]] = []
        while True:
            kind, body = self.read_message()
            out.append((kind, body))
            if kind == b"Z":
                self.status = body[:1]
                return out

    def terminate(self) -> None:
        with contextlib.suppress(OSError):
            self.send(b"X")
        self.sock.close()

    def __enter__(self) -> RawConnection:
        return self

    def __exit__(self, *exc: object) -> None:
        self.terminate()


def _data_row(msg: bytes) -> list[bytes | None]:
    (n,) = struct.unpack("!h", msg[:2])
    pos = 2
    out: list[bytes | None] = []
    for _ in range(n):
        (length,) = struct.unpack("!i", msg[pos : pos + 4])
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(msg[pos : pos + length])
            pos += length
    return out


class _Scram:
    """Client side of SCRAM-SHA-256 without channel binding (RFC 5802/7677)."""

    def __init__(self, password: str) -> None:
        self.password = password.encode()
        self.nonce = base64.b64encode(os.urandom(18)).decode()
        self.first_bare = f"n=,r={self.nonce}"
        self.auth_message = b""
        self.salted = b""

    def client_first(self) -> str:
        return "n,," + self.first_bare

    def client_final(self, server_first: str) -> str:
        attrs = dict(item.split("=", 1) for item in server_first.split(","))
        if not attrs["r"].startswith(self.nonce):
            raise ProtocolViolation("SCRAM server nonce does not extend the client nonce")
        salt = base64.b64decode(attrs["s"])
        self.salted = hashlib.pbkdf2_hmac("sha256", self.password, salt, int(attrs["i"]))
        client_key = hmac.digest(self.salted, b"Client Key", "sha256")
        stored_key = hashlib.sha256(client_key).digest()
        without_proof = f"c=biws,r={attrs['r']}"
        self.auth_message = f"{self.first_bare},{server_first},{without_proof}".encode()
        signature = hmac.digest(stored_key, self.auth_message, "sha256")
        proof = bytes(a ^ b for a, b in zip(client_key, signature, strict=True))
        return f"{without_proof},p={base64.b64encode(proof).decode()}"

    def verify_server_final(self, server_final: str) -> None:
        attrs = dict(item.split("=", 1) for item in server_final.split(","))
        if "e" in attrs:
            raise ProtocolViolation(f"SCRAM error from server: {attrs['e']}")
        server_key = hmac.digest(self.salted, b"Server Key", "sha256")
        expected = hmac.digest(server_key, self.auth_message, "sha256")
        if not hmac.compare_digest(base64.b64decode(attrs["v"]), expected):
            raise ProtocolViolation("SCRAM server signature mismatch")


def negotiate(sock: socket.socket, code: int) -> bytes:
    """Send an SSLRequest/GSSENCRequest-style 8-byte request; return the 1-byte answer."""
    sock.sendall(struct.pack("!ii", 8, code))
    answer = sock.recv(1)
    if not answer:
        raise ProtocolViolation("connection closed instead of answering the request")
    return answer


def send_cancel(host: str, port: int, pid: int, key: int) -> None:
    """A CancelRequest on a new connection (the server answers nothing and closes)."""
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(struct.pack("!iiii", 16, CANCEL_REQUEST, pid, key))
        with contextlib.suppress(OSError):
            sock.recv(1)


def connect(
    host: str,
    port: int,
    user: str,
    database: str,
    password: str | None,
    *,
    timeout: float = 10.0,
    **params: str,
) -> RawConnection:
    """Open a session (no TLS); raises PgError if the server refuses it."""
    sock = socket.create_connection((host, port), timeout=timeout)
    conn = RawConnection(sock)
    try:
        conn.startup(user, database, password, **params)
    except BaseException:
        sock.close()
        raise
    return conn
