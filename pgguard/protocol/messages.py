"""PostgreSQL v3 protocol messages: one frozen dataclass per message, sans-IO.

Every message knows its type byte and how to encode and decode its body. Values stay raw
bytes where the protocol carries raw bytes (column values, parameters, COPY data); text
fields are decoded as UTF-8 with ``surrogateescape`` so that any byte string round-trips.

Direction matters: ``D``, ``E``, ``C``, ``S`` and others mean different things from the
client and from the server, so decoding goes through ``decode_frontend`` or ``decode_backend``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import ClassVar, Self

PROTOCOL_V3 = 196608  # 3.0
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102

_I16 = struct.Struct("!h")
_U16 = struct.Struct("!H")
_I32 = struct.Struct("!i")
_HDR = struct.Struct("!cI")


class ProtocolError(Exception):
    """Malformed or out-of-place protocol input. SQLSTATE 08P01 unless a more exact one fits."""

    def __init__(self, message: str, sqlstate: str = "08P01") -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _raw(text: str) -> bytes:
    return text.encode("utf-8", "surrogateescape")


def sql_bytes_text(raw: bytes) -> str:
    """SQL as the gateway records it when nothing better is known: UTF-8 where the bytes are
    valid UTF-8, else byte for byte as Latin-1, so that the text is readable and parses."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")


# PostgreSQL client encodings → Python codecs. SQL_ASCII: the server does not check bytes
# over 127, so neither can pgguard (Latin-1 reads each as one character).
_CODECS = {
    "utf8": "utf-8",
    "unicode": "utf-8",
    "sqlascii": "latin-1",
    "latin1": "latin-1",
    "latin2": "iso8859-2",
    "latin3": "iso8859-3",
    "latin4": "iso8859-4",
    "latin5": "iso8859-9",
    "latin6": "iso8859-10",
    "latin7": "iso8859-13",
    "latin8": "iso8859-14",
    "latin9": "iso8859-15",
    "latin10": "iso8859-16",
    "iso88595": "iso8859-5",
    "iso88596": "iso8859-6",
    "iso88597": "iso8859-7",
    "iso88598": "iso8859-8",
    "win866": "cp866",
    "win874": "cp874",
    "win1250": "cp1250",
    "win1251": "cp1251",
    "win1252": "cp1252",
    "win1253": "cp1253",
    "win1254": "cp1254",
    "win1255": "cp1255",
    "win1256": "cp1256",
    "win1257": "cp1257",
    "win1258": "cp1258",
    "koi8r": "koi8-r",
    "koi8u": "koi8-u",
    "eucjp": "euc_jp",
    "eucjis2004": "euc_jis_2004",
    "euckr": "euc_kr",
    "euccn": "gb2312",
}


def client_codec(encoding: str) -> str | None:
    """The Python codec that reads SQL in PostgreSQL client encoding ``encoding`` (as
    ParameterStatus names it); None for one pgguard cannot read (then only UTF-8 passes)."""
    return _CODECS.get(encoding.strip().lower().replace("_", "").replace("-", ""))


class BodyReader:
    """Bounds-checked reader over one message body. Every overrun is a ProtocolError."""

    __slots__ = ("_buf", "_pos", "_what")

    def __init__(self, buf: bytes, what: str) -> None:
        self._buf = buf
        self._pos = 0
        self._what = what

    def _need(self, n: int) -> None:
        if n < 0 or self._pos + n > len(self._buf):
            raise ProtocolError(f"{self._what}: message too short")

    def int16(self) -> int:
        self._need(2)
        (v,) = _I16.unpack_from(self._buf, self._pos)
        self._pos += 2
        return int(v)

    def uint16(self) -> int:
        self._need(2)
        (v,) = _U16.unpack_from(self._buf, self._pos)
        self._pos += 2
        return int(v)

    def int32(self) -> int:
        self._need(4)
        (v,) = _I32.unpack_from(self._buf, self._pos)
        self._pos += 4
        return int(v)

    def byte(self) -> bytes:
        self._need(1)
        v = self._buf[self._pos : self._pos + 1]
        self._pos += 1
        return v

    def raw(self, n: int) -> bytes:
        self._need(n)
        v = self._buf[self._pos : self._pos + n]
        self._pos += n
        return v

    def cstring(self) -> str:
        end = self._buf.find(b"\0", self._pos)
        if end < 0:
            raise ProtocolError(f"{self._what}: unterminated string")
        v = self._buf[self._pos : end]
        self._pos = end + 1
        return _text(v)

    def rest(self) -> bytes:
        v = self._buf[self._pos :]
        self._pos = len(self._buf)
        return v

    def remaining(self) -> int:
        return len(self._buf) - self._pos

    def nullable_bytes(self) -> bytes | None:
        n = self.int32()
        if n == -1:
            return None
        if n < -1:
            raise ProtocolError(f"{self._what}: negative length {n}")
        return self.raw(n)

    def count(self) -> int:
        """An element count: 16 bits, unsigned (PostgreSQL reads counts with
        ``pq_getmsgint(msg, 2)``, so 32768..65535 parameters are valid)."""
        return self.uint16()

    def end(self) -> None:
        if self._pos != len(self._buf):
            raise ProtocolError(f"{self._what}: {len(self._buf) - self._pos} trailing bytes")


def _cstring_at(body: bytes, pos: int, what: str) -> tuple[str, int]:
    """The NUL-terminated string at ``pos`` and the position after it."""
    end = body.find(b"\0", pos)
    if end < 0:
        raise ProtocolError(f"{what}: unterminated string")
    return body[pos:end].decode("utf-8", "surrogateescape"), end + 1


def _count_at(body: bytes, pos: int, what: str) -> tuple[int, int]:
    """The unsigned 16-bit count at ``pos`` and the position after it."""
    if pos + 2 > len(body):
        raise ProtocolError(f"{what}: message too short")
    return _U16.unpack_from(body, pos)[0], pos + 2


def _int16s_at(body: bytes, pos: int) -> tuple[tuple[int, ...], int]:
    """A Bind's format codes at ``pos``: a count, then that many int16."""
    count, pos = _count_at(body, pos, "Bind")
    end = pos + 2 * count
    if end > len(body):
        raise ProtocolError("Bind: message too short")
    return (struct.unpack_from(f"!{count}h", body, pos) if count else ()), end


def _only_cstring(body: bytes, what: str) -> str:
    """A body that is one NUL-terminated string (Query, CommandComplete: one per statement,
    so read without a BodyReader)."""
    text, end = _cstring_at(body, 0, what)
    if end != len(body):
        raise ProtocolError(f"{what}: {len(body) - end} trailing bytes")
    return text


def _cstr(text: str) -> bytes:
    raw = _raw(text)
    if b"\0" in raw:
        raise ProtocolError("string contains a NUL byte")
    return raw + b"\0"


def _nullable(value: bytes | None) -> bytes:
    if value is None:
        return _I32.pack(-1)
    return _I32.pack(len(value)) + value


def frame(type_code: bytes, body: bytes) -> bytes:
    """A typed message on the wire: type byte, int32 length (self-inclusive), body."""
    return _HDR.pack(type_code, len(body) + 4) + body


class Message:
    """Base for typed messages. ``TYPE`` is the message's type byte."""

    TYPE: ClassVar[bytes] = b""

    def encode_body(self) -> bytes:
        raise NotImplementedError

    @classmethod
    def decode_body(cls, body: bytes) -> Message:
        raise NotImplementedError

    def encode(self) -> bytes:
        return frame(self.TYPE, self.encode_body())


class _Empty(Message):
    """A message with an empty body."""

    def encode_body(self) -> bytes:
        return b""

    @classmethod
    def decode_body(cls, body: bytes) -> Message:
        if body:
            raise ProtocolError(f"{cls.__name__}: unexpected body")
        return cls()


# --------------------------------------------------------------------------- startup phase


@dataclass(frozen=True, slots=True)
class StartupMessage:
    """The first packet of a session: protocol version and name/value parameters."""

    params: tuple[tuple[str, str], ...]
    protocol: int = PROTOCOL_V3

    def param(self, name: str, default: str | None = None) -> str | None:
        for key, value in self.params:
            if key == name:
                return value
        return default

    def encode(self) -> bytes:
        body = _I32.pack(self.protocol)
        for key, value in self.params:
            if not key:
                raise ProtocolError("StartupMessage: empty parameter name")
            body += _cstr(key) + _cstr(value)
        body += b"\0"
        return _I32.pack(len(body) + 4) + body


@dataclass(frozen=True, slots=True)
class SSLRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(SSL_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class GSSENCRequest:
    def encode(self) -> bytes:
        return _I32.pack(8) + _I32.pack(GSSENC_REQUEST_CODE)


@dataclass(frozen=True, slots=True)
class CancelRequest:
    process_id: int
    secret_key: int

    def encode(self) -> bytes:
        return struct.pack("!iiii", 16, CANCEL_REQUEST_CODE, self.process_id, self.secret_key)


StartupPacket = StartupMessage | SSLRequest | GSSENCRequest | CancelRequest


def decode_startup(body: bytes) -> StartupPacket:
    """Decode a startup-phase packet body (the bytes after the int32 length)."""
    r = BodyReader(body, "startup packet")
    code = r.int32()
    if code == SSL_REQUEST_CODE:
        r.end()
        return SSLRequest()
    if code == GSSENC_REQUEST_CODE:
        r.end()
        return GSSENCRequest()
    if code == CANCEL_REQUEST_CODE:
        pid = r.int32()
        secret = r.int32()
        r.end()
        return CancelRequest(pid, secret)
    major = (code & 0xFFFFFFFF) >> 16
    if major != 3:
        raise ProtocolError(
            f"unsupported frontend protocol {major}.{code & 0xFFFF}: server supports 3.0 to 3.0",
            sqlstate="0A000",
        )
    params: list[tuple[str, str]] = []
    while True:
        if r.remaining() == 0:
            raise ProtocolError("startup packet: missing terminator")
        key = r.cstring()
        if key == "":
            break
        params.append((key, r.cstring()))
    r.end()
    return StartupMessage(tuple(params), code)


# --------------------------------------------------------------------------- frontend


@dataclass(frozen=True, slots=True)
class Query(Message):
    TYPE: ClassVar[bytes] = b"Q"
    sql: str

    def encode_body(self) -> bytes:
        return _cstr(self.sql)

    @classmethod
    def decode_body(cls, body: bytes) -> Query:
        return cls(_only_cstring(body, "Query"))


@dataclass(frozen=True, slots=True)
class Parse(Message):
    TYPE: ClassVar[bytes] = b"P"
    name: str
    sql: str
    param_types: tuple[int, ...] = ()

    def encode_body(self) -> bytes:
        return (
            _cstr(self.name)
            + _cstr(self.sql)
            + _U16.pack(len(self.param_types))
            + b"".join(struct.pack("!I", t) for t in self.param_types)
        )

    @classmethod
    def decode_body(cls, body: bytes) -> Parse:
        # Inline rather than through a BodyReader: the audit follows every Parse.
        name, pos = _cstring_at(body, 0, "Parse")
        sql, pos = _cstring_at(body, pos, "Parse")
        count, pos = _count_at(body, pos, "Parse")
        end = pos + 4 * count
        if end > len(body):
            raise ProtocolError("Parse: message too short")
        if end != len(body):
            raise ProtocolError(f"Parse: {len(body) - end} trailing bytes")
        return cls(name, sql, struct.unpack_from(f"!{count}I", body, pos) if count else ())


@dataclass(frozen=True, slots=True)
class Bind(Message):
    TYPE: ClassVar[bytes] = b"B"
    portal: str
    statement: str
    param_formats: tuple[int, ...] = ()
    params: tuple[bytes | None, ...] = ()
    result_formats: tuple[int, ...] = ()

    def encode_body(self) -> bytes:
        out = [_cstr(self.portal), _cstr(self.statement), _U16.pack(len(self.param_formats))]
        out.extend(_I16.pack(f) for f in self.param_formats)
        out.append(_U16.pack(len(self.params)))
        out.extend(_nullable(p) for p in self.params)
        out.append(_U16.pack(len(self.result_formats)))
        out.extend(_I16.pack(f) for f in self.result_formats)
        return b"".join(out)

    @classmethod
    def decode_body(cls, body: bytes) -> Bind:
        # Inline rather than through a BodyReader: the audit follows every Bind.
        portal, pos = _cstring_at(body, 0, "Bind")
        stmt, pos = _cstring_at(body, pos, "Bind")
        pf, pos = _int16s_at(body, pos)
        params, pos = _values_at(body, pos, "Bind")
        if len(pf) > 1 and len(pf) != len(params):
            raise ProtocolError(f"Bind: {len(pf)} parameter formats but {len(params)} parameters")
        rf, pos = _int16s_at(body, pos)
        if pos != len(body):
            raise ProtocolError(f"Bind: {len(body) - pos} trailing bytes")
        return cls(portal, stmt, pf, params, rf)

    def param_format(self, index: int) -> int:
        """The format code of parameter ``index`` (one code applies to all; none means text)."""
        if not self.param_formats:
            return 0
        if len(self.param_formats) == 1:
            return self.param_formats[0]
        return self.param_formats[index]


@dataclass(frozen=True, slots=True)
class Describe(Message):
    TYPE: ClassVar[bytes] = b"D"
    kind: bytes  # b"S" statement or b"P" portal
    name: str

    def encode_body(self) -> bytes:
        return self.kind + _cstr(self.name)

    @classmethod
    def decode_body(cls, body: bytes) -> Describe:
        r = BodyReader(body, "Describe")
        kind = r.byte()
        if kind not in (b"S", b"P"):
            raise ProtocolError(f"Describe: invalid target type {kind!r}")
        name = r.cstring()
        r.end()
        return cls(kind, name)


@dataclass(frozen=True, slots=True)
class Close(Message):
    TYPE: ClassVar[bytes] = b"C"
    kind: bytes  # b"S" statement or b"P" portal
    name: str

    def encode_body(self) -> bytes:
        return self.kind + _cstr(self.name)

    @classmethod
    def decode_body(cls, body: bytes) -> Close:
        r = BodyReader(body, "Close")
        kind = r.byte()
        if kind not in (b"S", b"P"):
            raise ProtocolError(f"Close: invalid target type {kind!r}")
        name = r.cstring()
        r.end()
        return cls(kind, name)


@dataclass(frozen=True, slots=True)
class Execute(Message):
    TYPE: ClassVar[bytes] = b"E"
    portal: str
    max_rows: int = 0

    def encode_body(self) -> bytes:
        return _cstr(self.portal) + _I32.pack(self.max_rows)

    @classmethod
    def decode_body(cls, body: bytes) -> Execute:
        r = BodyReader(body, "Execute")
        portal = r.cstring()
        n = r.int32()
        r.end()
        return cls(portal, n)


@dataclass(frozen=True, slots=True)
class Sync(_Empty):
    TYPE: ClassVar[bytes] = b"S"


@dataclass(frozen=True, slots=True)
class Flush(_Empty):
    TYPE: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class Terminate(_Empty):
    TYPE: ClassVar[bytes] = b"X"


@dataclass(frozen=True, slots=True)
class CopyData(Message):
    """COPY data; the same in both directions."""

    TYPE: ClassVar[bytes] = b"d"
    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes) -> CopyData:
        return cls(bytes(body))


@dataclass(frozen=True, slots=True)
class CopyDone(_Empty):
    TYPE: ClassVar[bytes] = b"c"


@dataclass(frozen=True, slots=True)
class CopyFail(Message):
    TYPE: ClassVar[bytes] = b"f"
    message: str

    def encode_body(self) -> bytes:
        return _cstr(self.message)

    @classmethod
    def decode_body(cls, body: bytes) -> CopyFail:
        r = BodyReader(body, "CopyFail")
        msg = r.cstring()
        r.end()
        return cls(msg)


@dataclass(frozen=True, slots=True)
class FunctionCall(Message):
    TYPE: ClassVar[bytes] = b"F"
    function_oid: int
    arg_formats: tuple[int, ...] = ()
    args: tuple[bytes | None, ...] = ()
    result_format: int = 0

    def encode_body(self) -> bytes:
        out = [struct.pack("!I", self.function_oid), _U16.pack(len(self.arg_formats))]
        out.extend(_I16.pack(f) for f in self.arg_formats)
        out.append(_U16.pack(len(self.args)))
        out.extend(_nullable(a) for a in self.args)
        out.append(_I16.pack(self.result_format))
        return b"".join(out)

    @classmethod
    def decode_body(cls, body: bytes) -> FunctionCall:
        r = BodyReader(body, "FunctionCall")
        oid = r.int32() & 0xFFFFFFFF
        af = tuple(r.int16() for _ in range(r.count()))
        args = tuple(r.nullable_bytes() for _ in range(r.count()))
        rf = r.int16()
        r.end()
        return cls(oid, af, args, rf)


@dataclass(frozen=True, slots=True)
class PasswordMessage(Message):
    """'p' in password authentication: a NUL-terminated password (cleartext or md5)."""

    TYPE: ClassVar[bytes] = b"p"
    password: bytes

    def encode_body(self) -> bytes:
        return self.password + b"\0"

    @classmethod
    def decode_body(cls, body: bytes) -> PasswordMessage:
        if not body or body[-1:] != b"\0" or b"\0" in body[:-1]:
            raise ProtocolError("PasswordMessage: malformed password")
        return cls(bytes(body[:-1]))


@dataclass(frozen=True, slots=True)
class SASLInitialResponse(Message):
    """'p' after AuthenticationSASL: mechanism name and initial client data."""

    TYPE: ClassVar[bytes] = b"p"
    mechanism: str
    data: bytes | None

    def encode_body(self) -> bytes:
        return _cstr(self.mechanism) + _nullable(self.data)

    @classmethod
    def decode_body(cls, body: bytes) -> SASLInitialResponse:
        r = BodyReader(body, "SASLInitialResponse")
        mech = r.cstring()
        data = r.nullable_bytes()
        r.end()
        return cls(mech, data)


@dataclass(frozen=True, slots=True)
class SASLResponse(Message):
    """'p' after AuthenticationSASLContinue: raw SASL data."""

    TYPE: ClassVar[bytes] = b"p"
    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes) -> SASLResponse:
        return cls(bytes(body))


@dataclass(frozen=True, slots=True)
class GSSResponse(Message):
    """'p' during GSSAPI/SSPI authentication: raw token bytes."""

    TYPE: ClassVar[bytes] = b"p"
    data: bytes

    def encode_body(self) -> bytes:
        return self.data

    @classmethod
    def decode_body(cls, body: bytes) -> GSSResponse:
        return cls(bytes(body))


# --------------------------------------------------------------------------- backend


@dataclass(frozen=True, slots=True)
class Authentication(Message):
    """'R': every authentication request. ``code`` says which; ``data`` is its payload.

    Codes: 0 ok, 2 KerberosV5, 3 cleartext, 5 MD5 (data = 4-byte salt), 7 GSS,
    8 GSS continue, 9 SSPI, 10 SASL (data = mechanism list), 11 SASL continue, 12 SASL final.
    """

    TYPE: ClassVar[bytes] = b"R"
    code: int
    data: bytes = b""

    OK: ClassVar[int] = 0
    KERBEROS_V5: ClassVar[int] = 2
    CLEARTEXT: ClassVar[int] = 3
    MD5: ClassVar[int] = 5
    GSS: ClassVar[int] = 7
    GSS_CONTINUE: ClassVar[int] = 8
    SSPI: ClassVar[int] = 9
    SASL: ClassVar[int] = 10
    SASL_CONTINUE: ClassVar[int] = 11
    SASL_FINAL: ClassVar[int] = 12

    _NO_DATA: ClassVar[frozenset[int]] = frozenset({0, 2, 3, 7, 9})

    def encode_body(self) -> bytes:
        return _I32.pack(self.code) + self.data

    @classmethod
    def decode_body(cls, body: bytes) -> Authentication:
        r = BodyReader(body, "Authentication")
        code = r.int32()
        data = r.rest()
        if code in cls._NO_DATA:
            if data:
                raise ProtocolError(f"Authentication {code}: unexpected payload")
        elif code == cls.MD5:
            if len(data) != 4:
                raise ProtocolError("AuthenticationMD5Password: salt must be 4 bytes")
        elif code == cls.SASL:
            if not data.endswith(b"\0\0") and data != b"\0":
                raise ProtocolError("AuthenticationSASL: malformed mechanism list")
        elif code not in (cls.GSS_CONTINUE, cls.SASL_CONTINUE, cls.SASL_FINAL):
            raise ProtocolError(f"unknown authentication request {code}")
        return cls(code, bytes(data))

    @classmethod
    def sasl(cls, mechanisms: tuple[str, ...]) -> Authentication:
        return cls(cls.SASL, b"".join(_cstr(m) for m in mechanisms) + b"\0")

    def mechanisms(self) -> tuple[str, ...]:
        """The SASL mechanism names of an AuthenticationSASL request."""
        names = self.data.split(b"\0")
        return tuple(_text(n) for n in names if n)


@dataclass(frozen=True, slots=True)
class BackendKeyData(Message):
    TYPE: ClassVar[bytes] = b"K"
    process_id: int
    secret_key: int

    def encode_body(self) -> bytes:
        return _I32.pack(self.process_id) + _I32.pack(self.secret_key)

    @classmethod
    def decode_body(cls, body: bytes) -> BackendKeyData:
        r = BodyReader(body, "BackendKeyData")
        pid = r.int32()
        key = r.int32()
        r.end()
        return cls(pid, key)


@dataclass(frozen=True, slots=True)
class ParseComplete(_Empty):
    TYPE: ClassVar[bytes] = b"1"


@dataclass(frozen=True, slots=True)
class BindComplete(_Empty):
    TYPE: ClassVar[bytes] = b"2"


@dataclass(frozen=True, slots=True)
class CloseComplete(_Empty):
    TYPE: ClassVar[bytes] = b"3"


@dataclass(frozen=True, slots=True)
class NoData(_Empty):
    TYPE: ClassVar[bytes] = b"n"


@dataclass(frozen=True, slots=True)
class EmptyQueryResponse(_Empty):
    TYPE: ClassVar[bytes] = b"I"


@dataclass(frozen=True, slots=True)
class PortalSuspended(_Empty):
    TYPE: ClassVar[bytes] = b"s"


@dataclass(frozen=True, slots=True)
class CommandComplete(Message):
    TYPE: ClassVar[bytes] = b"C"
    tag: str

    def encode_body(self) -> bytes:
        return _cstr(self.tag)

    @classmethod
    def decode_body(cls, body: bytes) -> CommandComplete:
        return cls(_only_cstring(body, "CommandComplete"))


@dataclass(frozen=True, slots=True)
class ReadyForQuery(Message):
    TYPE: ClassVar[bytes] = b"Z"
    status: bytes  # b"I" idle, b"T" in transaction, b"E" failed transaction

    def encode_body(self) -> bytes:
        return self.status

    @classmethod
    def decode_body(cls, body: bytes) -> ReadyForQuery:
        if body not in (b"I", b"T", b"E"):
            raise ProtocolError(f"ReadyForQuery: invalid status {bytes(body)!r}")
        return cls(bytes(body))


@dataclass(frozen=True, slots=True)
class ParameterStatus(Message):
    TYPE: ClassVar[bytes] = b"S"
    name: str
    value: str

    def encode_body(self) -> bytes:
        return _cstr(self.name) + _cstr(self.value)

    @classmethod
    def decode_body(cls, body: bytes) -> ParameterStatus:
        r = BodyReader(body, "ParameterStatus")
        name = r.cstring()
        value = r.cstring()
        r.end()
        return cls(name, value)


@dataclass(frozen=True, slots=True)
class ParameterDescription(Message):
    TYPE: ClassVar[bytes] = b"t"
    type_oids: tuple[int, ...]

    def encode_body(self) -> bytes:
        return _U16.pack(len(self.type_oids)) + b"".join(
            struct.pack("!I", t) for t in self.type_oids
        )

    @classmethod
    def decode_body(cls, body: bytes) -> ParameterDescription:
        r = BodyReader(body, "ParameterDescription")
        oids = tuple(r.int32() & 0xFFFFFFFF for _ in range(r.uint16()))
        r.end()
        return cls(oids)


@dataclass(frozen=True, slots=True)
class FieldDescription:
    name: str
    table_oid: int = 0
    column_attr: int = 0
    type_oid: int = 25
    type_size: int = -1
    type_modifier: int = -1
    format: int = 0


_FIELD = struct.Struct("!IhIhih")


@dataclass(frozen=True, slots=True)
class RowDescription(Message):
    TYPE: ClassVar[bytes] = b"T"
    fields: tuple[FieldDescription, ...]

    def encode_body(self) -> bytes:
        out = [_U16.pack(len(self.fields))]
        for f in self.fields:
            out.append(_cstr(f.name))
            out.append(
                _FIELD.pack(
                    f.table_oid,
                    f.column_attr,
                    f.type_oid,
                    f.type_size,
                    f.type_modifier,
                    f.format,
                )
            )
        return b"".join(out)

    @classmethod
    def decode_body(cls, body: bytes) -> RowDescription:
        return cls(tuple(FieldDescription(name, *rest) for name, rest in _row_description(body)))

    @staticmethod
    def columns_of(body: bytes) -> tuple[list[str], list[int]]:
        """The column names and format codes of a RowDescription body (as strictly checked
        as :meth:`decode_body`, without building its field objects: the audit's preview
        needs only these, once per statement)."""
        names: list[str] = []
        formats: list[int] = []
        for name, rest in _row_description(body):
            names.append(name)
            formats.append(rest[5])
        return names, formats


def _row_description(body: bytes) -> list[tuple[str, tuple[int, int, int, int, int, int]]]:
    """Each field of a RowDescription body: its name and the six numbers after it."""
    n = len(body)
    if n < 2:
        raise ProtocolError("RowDescription: message too short")
    (count,) = _U16.unpack_from(body, 0)
    pos = 2
    unpack = _FIELD.unpack_from
    out = []
    for _ in range(count):
        end = body.find(b"\0", pos)
        if end < 0:
            raise ProtocolError("RowDescription: unterminated string")
        name = body[pos:end].decode("utf-8", "surrogateescape")
        pos = end + 1 + 18
        if pos > n:
            raise ProtocolError("RowDescription: message too short")
        out.append((name, unpack(body, pos - 18)))
    if pos != n:
        raise ProtocolError(f"RowDescription: {n - pos} trailing bytes")
    return out


@dataclass(frozen=True, slots=True)
class DataRow(Message):
    TYPE: ClassVar[bytes] = b"D"
    values: tuple[bytes | None, ...]

    def encode_body(self) -> bytes:
        return _U16.pack(len(self.values)) + b"".join(_nullable(v) for v in self.values)

    @classmethod
    def decode_body(cls, body: bytes) -> DataRow:
        return cls(data_row_values(body))


def data_row_values(body: bytes) -> tuple[bytes | None, ...]:
    """The values of a DataRow body (inline rather than through a BodyReader: rows are the
    most frequent message a mask decodes)."""
    values, pos = _values_at(body, 0, "DataRow")
    if pos != len(body):
        raise ProtocolError(f"DataRow: {len(body) - pos} trailing bytes")
    return values


def _values_at(body: bytes, pos: int, what: str) -> tuple[tuple[bytes | None, ...], int]:
    """A count, then that many length-prefixed values (-1: NULL), at ``pos``: a DataRow's
    values, a Bind's parameters; and the position after them."""
    count, pos = _count_at(body, pos, what)
    n = len(body)
    unpack = _I32.unpack_from
    values: list[bytes | None] = []
    for _ in range(count):
        if pos + 4 > n:
            raise ProtocolError(f"{what}: message too short")
        (size,) = unpack(body, pos)
        pos += 4
        if size < 0:
            if size != -1:
                raise ProtocolError(f"{what}: negative length {size}")
            values.append(None)
            continue
        end = pos + size
        if end > n:
            raise ProtocolError(f"{what}: message too short")
        values.append(body[pos:end])
        pos = end
    return tuple(values), pos


@dataclass(frozen=True, slots=True)
class _CopyResponse(Message):
    """CopyInResponse / CopyOutResponse / CopyBothResponse: overall and per-column formats."""

    format: int
    column_formats: tuple[int, ...] = ()

    def encode_body(self) -> bytes:
        return (
            bytes([self.format])
            + _U16.pack(len(self.column_formats))
            + b"".join(_I16.pack(f) for f in self.column_formats)
        )

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        fmt = r.byte()[0]
        cols = tuple(r.int16() for _ in range(r.count()))
        r.end()
        return cls(fmt, cols)


@dataclass(frozen=True, slots=True)
class CopyInResponse(_CopyResponse):
    TYPE: ClassVar[bytes] = b"G"


@dataclass(frozen=True, slots=True)
class CopyOutResponse(_CopyResponse):
    TYPE: ClassVar[bytes] = b"H"


@dataclass(frozen=True, slots=True)
class CopyBothResponse(_CopyResponse):
    TYPE: ClassVar[bytes] = b"W"


@dataclass(frozen=True, slots=True)
class _Notice(Message):
    """ErrorResponse and NoticeResponse: (field code, value) pairs."""

    fields: tuple[tuple[str, str], ...] = field(default=())

    def encode_body(self) -> bytes:
        out = []
        for code, value in self.fields:
            raw_code = _raw(code)
            if len(raw_code) != 1 or raw_code == b"\0":
                raise ProtocolError(f"{type(self).__name__}: invalid field code {code!r}")
            out.append(raw_code + _cstr(value))
        out.append(b"\0")
        return b"".join(out)

    @classmethod
    def decode_body(cls, body: bytes) -> Self:
        r = BodyReader(body, cls.__name__)
        fields = []
        while True:
            code = r.byte()
            if code == b"\0":
                break
            fields.append((_text(code), r.cstring()))
        r.end()
        return cls(tuple(fields))

    def get(self, code: str, default: str = "") -> str:
        for key, value in self.fields:
            if key == code:
                return value
        return default

    @property
    def severity(self) -> str:
        return self.get("V") or self.get("S")

    @property
    def sqlstate(self) -> str:
        return self.get("C")

    @property
    def message(self) -> str:
        return self.get("M")


@dataclass(frozen=True, slots=True)
class ErrorResponse(_Notice):
    TYPE: ClassVar[bytes] = b"E"


@dataclass(frozen=True, slots=True)
class NoticeResponse(_Notice):
    TYPE: ClassVar[bytes] = b"N"


def error_fields(
    severity: str, sqlstate: str, message: str, detail: str | None = None, hint: str | None = None
) -> tuple[tuple[str, str], ...]:
    """Fields of an ErrorResponse/NoticeResponse the way the server orders them."""
    fields = [("S", severity), ("V", severity), ("C", sqlstate), ("M", message)]
    if detail:
        fields.append(("D", detail))
    if hint:
        fields.append(("H", hint))
    return tuple(fields)


@dataclass(frozen=True, slots=True)
class NotificationResponse(Message):
    TYPE: ClassVar[bytes] = b"A"
    process_id: int
    channel: str
    payload: str

    def encode_body(self) -> bytes:
        return _I32.pack(self.process_id) + _cstr(self.channel) + _cstr(self.payload)

    @classmethod
    def decode_body(cls, body: bytes) -> NotificationResponse:
        r = BodyReader(body, "NotificationResponse")
        pid = r.int32()
        channel = r.cstring()
        payload = r.cstring()
        r.end()
        return cls(pid, channel, payload)


@dataclass(frozen=True, slots=True)
class FunctionCallResponse(Message):
    TYPE: ClassVar[bytes] = b"V"
    result: bytes | None

    def encode_body(self) -> bytes:
        return _nullable(self.result)

    @classmethod
    def decode_body(cls, body: bytes) -> FunctionCallResponse:
        r = BodyReader(body, "FunctionCallResponse")
        v = r.nullable_bytes()
        r.end()
        return cls(v)


@dataclass(frozen=True, slots=True)
class NegotiateProtocolVersion(Message):
    TYPE: ClassVar[bytes] = b"v"
    newest_minor: int
    unrecognized: tuple[str, ...] = ()

    def encode_body(self) -> bytes:
        return (
            _I32.pack(self.newest_minor)
            + _I32.pack(len(self.unrecognized))
            + b"".join(_cstr(o) for o in self.unrecognized)
        )

    @classmethod
    def decode_body(cls, body: bytes) -> NegotiateProtocolVersion:
        r = BodyReader(body, "NegotiateProtocolVersion")
        minor = r.int32()
        n = r.int32()
        if n < 0:
            raise ProtocolError("NegotiateProtocolVersion: negative count")
        opts = tuple(r.cstring() for _ in range(n))
        r.end()
        return cls(minor, opts)


FRONTEND: dict[bytes, type[Message]] = {
    m.TYPE: m
    for m in (
        Query,
        Parse,
        Bind,
        Describe,
        Close,
        Execute,
        Sync,
        Flush,
        Terminate,
        CopyData,
        CopyDone,
        CopyFail,
        FunctionCall,
        PasswordMessage,
    )
}

BACKEND: dict[bytes, type[Message]] = {
    m.TYPE: m
    for m in (
        Authentication,
        BackendKeyData,
        ParseComplete,
        BindComplete,
        CloseComplete,
        NoData,
        EmptyQueryResponse,
        PortalSuspended,
        CommandComplete,
        ReadyForQuery,
        ParameterStatus,
        ParameterDescription,
        RowDescription,
        DataRow,
        CopyInResponse,
        CopyOutResponse,
        CopyBothResponse,
        CopyData,
        CopyDone,
        ErrorResponse,
        NoticeResponse,
        NotificationResponse,
        FunctionCallResponse,
        NegotiateProtocolVersion,
    )
}


def decode_frontend(type_code: bytes, body: bytes) -> Message:
    """Decode a client→server message. ``'p'`` decodes as PasswordMessage; use the SASL/GSS
    classes' ``decode_body`` directly when the authentication exchange calls for them."""
    cls = FRONTEND.get(type_code)
    if cls is None:
        raise ProtocolError(f"invalid frontend message type {type_code!r}")
    return cls.decode_body(body)


def decode_backend(type_code: bytes, body: bytes) -> Message:
    """Decode a server→client message."""
    cls = BACKEND.get(type_code)
    if cls is None:
        raise ProtocolError(f"invalid backend message type {type_code!r}")
    return cls.decode_body(body)
