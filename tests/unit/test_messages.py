"""Sans-IO tests for pgguard.protocol.messages: round trips, wire vectors, limits, fuzzing."""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterable
from typing import TypeVar

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from pgguard.protocol import messages as m
from pgguard.protocol.messages import (
    BACKEND,
    CANCEL_REQUEST_CODE,
    FRONTEND,
    GSSENC_REQUEST_CODE,
    PROTOCOL_V3,
    SSL_REQUEST_CODE,
    Authentication,
    BackendKeyData,
    Bind,
    BindComplete,
    BodyReader,
    CancelRequest,
    Close,
    CloseComplete,
    CommandComplete,
    CopyBothResponse,
    CopyData,
    CopyDone,
    CopyFail,
    CopyInResponse,
    CopyOutResponse,
    DataRow,
    Describe,
    EmptyQueryResponse,
    ErrorResponse,
    Execute,
    FieldDescription,
    Flush,
    FunctionCall,
    FunctionCallResponse,
    GSSENCRequest,
    GSSResponse,
    Message,
    NegotiateProtocolVersion,
    NoData,
    NoticeResponse,
    NotificationResponse,
    ParameterDescription,
    ParameterStatus,
    Parse,
    ParseComplete,
    PasswordMessage,
    PortalSuspended,
    ProtocolError,
    Query,
    ReadyForQuery,
    RowDescription,
    SASLInitialResponse,
    SASLResponse,
    SSLRequest,
    StartupMessage,
    StartupPacket,
    Sync,
    Terminate,
    decode_backend,
    decode_frontend,
    decode_startup,
    error_fields,
    frame,
)

ROUNDTRIP = settings(max_examples=40, deadline=None)
FUZZ = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------- strategies

T = TypeVar("T")


def _text(raw: bytes) -> str:
    """The canonical str for raw wire bytes (how the decoders produce text)."""
    return raw.decode("utf-8", "surrogateescape")


_unicode = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\0"), max_size=12)
_raw_bytes = st.binary(max_size=6).map(lambda b: b.replace(b"\0", b""))

# A C string: any text (non-ASCII included) followed by arbitrary non-UTF-8 bytes, never a NUL.
# Built as bytes and decoded once, so that it is the canonical form a decoder returns.
cstrings: SearchStrategy[str] = st.builds(
    lambda text, raw: _text(text.encode("utf-8") + raw), _unicode, _raw_bytes
)
names: SearchStrategy[str] = cstrings.filter(bool)
blobs: SearchStrategy[bytes] = st.binary(max_size=64)
nul_free_blobs: SearchStrategy[bytes] = blobs.map(lambda b: b.replace(b"\0", b""))
nullables: SearchStrategy[bytes | None] = st.none() | blobs
int16s = st.integers(-(2**15), 2**15 - 1)
int32s = st.integers(-(2**31), 2**31 - 1)
uint32s = st.integers(0, 2**32 - 1)


def tuples_of(elements: SearchStrategy[T], max_size: int = 4) -> SearchStrategy[tuple[T, ...]]:
    return st.lists(elements, max_size=max_size).map(tuple)


@st.composite
def binds(draw: st.DrawFn) -> Bind:
    params = draw(tuples_of(nullables))
    # Zero format codes, one for all parameters, or one per parameter.
    n_formats = draw(st.sampled_from(sorted({0, 1, len(params)})))
    return Bind(
        portal=draw(cstrings),
        statement=draw(cstrings),
        param_formats=tuple(draw(st.lists(int16s, min_size=n_formats, max_size=n_formats))),
        params=params,
        result_formats=draw(tuples_of(int16s)),
    )


field_descriptions = st.builds(
    FieldDescription, cstrings, uint32s, int16s, uint32s, int16s, int32s, int16s
)
notice_fields = tuples_of(st.tuples(st.integers(1, 255).map(lambda b: _text(bytes([b]))), cstrings))

authentications: SearchStrategy[Authentication] = st.one_of(
    st.sampled_from([0, 2, 3, 7, 9]).map(Authentication),
    st.builds(Authentication, st.just(Authentication.MD5), st.binary(min_size=4, max_size=4)),
    st.builds(Authentication, st.sampled_from([8, 11, 12]), blobs),
    tuples_of(names).map(Authentication.sasl),
)

FRONTEND_CASES: dict[type[Message], SearchStrategy[Message]] = {
    Query: st.builds(Query, cstrings),
    Parse: st.builds(Parse, cstrings, cstrings, tuples_of(uint32s)),
    Bind: binds(),
    Describe: st.builds(Describe, st.sampled_from([b"S", b"P"]), cstrings),
    Close: st.builds(Close, st.sampled_from([b"S", b"P"]), cstrings),
    Execute: st.builds(Execute, cstrings, int32s),
    Sync: st.just(Sync()),
    Flush: st.just(Flush()),
    Terminate: st.just(Terminate()),
    CopyData: st.builds(CopyData, blobs),
    CopyDone: st.just(CopyDone()),
    CopyFail: st.builds(CopyFail, cstrings),
    FunctionCall: st.builds(FunctionCall, uint32s, tuples_of(int16s), tuples_of(nullables), int16s),
    PasswordMessage: st.builds(PasswordMessage, nul_free_blobs),
}

# The other members of the 'p' family: only the authentication state tells them apart.
P_FAMILY_CASES: dict[type[Message], SearchStrategy[Message]] = {
    PasswordMessage: st.builds(PasswordMessage, nul_free_blobs),
    SASLInitialResponse: st.builds(SASLInitialResponse, cstrings, nullables),
    SASLResponse: st.builds(SASLResponse, blobs),
    GSSResponse: st.builds(GSSResponse, blobs),
}

BACKEND_CASES: dict[type[Message], SearchStrategy[Message]] = {
    Authentication: authentications,
    BackendKeyData: st.builds(BackendKeyData, int32s, int32s),
    ParseComplete: st.just(ParseComplete()),
    BindComplete: st.just(BindComplete()),
    CloseComplete: st.just(CloseComplete()),
    NoData: st.just(NoData()),
    EmptyQueryResponse: st.just(EmptyQueryResponse()),
    PortalSuspended: st.just(PortalSuspended()),
    CommandComplete: st.builds(CommandComplete, cstrings),
    ReadyForQuery: st.builds(ReadyForQuery, st.sampled_from([b"I", b"T", b"E"])),
    ParameterStatus: st.builds(ParameterStatus, cstrings, cstrings),
    ParameterDescription: st.builds(ParameterDescription, tuples_of(uint32s)),
    RowDescription: st.builds(RowDescription, tuples_of(field_descriptions)),
    DataRow: st.builds(DataRow, tuples_of(nullables)),
    CopyInResponse: st.builds(CopyInResponse, st.integers(0, 255), tuples_of(int16s)),
    CopyOutResponse: st.builds(CopyOutResponse, st.integers(0, 255), tuples_of(int16s)),
    CopyBothResponse: st.builds(CopyBothResponse, st.integers(0, 255), tuples_of(int16s)),
    CopyData: st.builds(CopyData, blobs),
    CopyDone: st.just(CopyDone()),
    ErrorResponse: st.builds(ErrorResponse, notice_fields),
    NoticeResponse: st.builds(NoticeResponse, notice_fields),
    NotificationResponse: st.builds(NotificationResponse, int32s, cstrings, cstrings),
    FunctionCallResponse: st.builds(FunctionCallResponse, nullables),
    NegotiateProtocolVersion: st.builds(NegotiateProtocolVersion, int32s, tuples_of(cstrings)),
}

STARTUP_CASES: dict[type[StartupPacket], SearchStrategy[StartupPacket]] = {
    StartupMessage: st.builds(
        StartupMessage,
        tuples_of(st.tuples(names, cstrings)),
        st.sampled_from([PROTOCOL_V3, (3 << 16) | 2, (3 << 16) | 0xFFFF]),
    ),
    SSLRequest: st.just(SSLRequest()),
    GSSENCRequest: st.just(GSSENCRequest()),
    CancelRequest: st.builds(CancelRequest, int32s, int32s),
}


def split_frame(raw: bytes) -> tuple[bytes, bytes]:
    """Type byte and body of one encoded message, checking its length word."""
    assert len(raw) >= 5
    (length,) = struct.unpack_from("!I", raw, 1)
    assert length == len(raw) - 1
    return raw[:1], raw[5:]


def _ids(classes: Iterable[type]) -> list[str]:
    return [cls.__name__ for cls in classes]


# --------------------------------------------------------------------------- round trips


def test_cases_cover_every_message_class() -> None:
    assert set(FRONTEND_CASES) == set(FRONTEND.values())
    assert set(BACKEND_CASES) == set(BACKEND.values())
    assert {cls.TYPE for cls in P_FAMILY_CASES} == {b"p"}


@pytest.mark.parametrize("strategy", list(FRONTEND_CASES.values()), ids=_ids(FRONTEND_CASES))
@ROUNDTRIP
@given(data=st.data())
def test_frontend_round_trip(strategy: SearchStrategy[Message], data: st.DataObject) -> None:
    msg = data.draw(strategy)
    type_code, body = split_frame(msg.encode())
    assert type_code == msg.TYPE
    assert body == msg.encode_body()
    assert decode_frontend(type_code, body) == msg


@pytest.mark.parametrize("strategy", list(BACKEND_CASES.values()), ids=_ids(BACKEND_CASES))
@ROUNDTRIP
@given(data=st.data())
def test_backend_round_trip(strategy: SearchStrategy[Message], data: st.DataObject) -> None:
    msg = data.draw(strategy)
    type_code, body = split_frame(msg.encode())
    assert type_code == msg.TYPE
    assert decode_backend(type_code, body) == msg


@pytest.mark.parametrize(
    ("cls", "strategy"), list(P_FAMILY_CASES.items()), ids=_ids(P_FAMILY_CASES)
)
@ROUNDTRIP
@given(data=st.data())
def test_password_family_round_trip(
    cls: type[Message], strategy: SearchStrategy[Message], data: st.DataObject
) -> None:
    msg = data.draw(strategy)
    type_code, body = split_frame(msg.encode())
    assert type_code == b"p"
    assert cls.decode_body(body) == msg


@pytest.mark.parametrize("strategy", list(STARTUP_CASES.values()), ids=_ids(STARTUP_CASES))
@ROUNDTRIP
@given(data=st.data())
def test_startup_round_trip(strategy: SearchStrategy[StartupPacket], data: st.DataObject) -> None:
    packet = data.draw(strategy)
    raw = packet.encode()
    (length,) = struct.unpack_from("!I", raw)
    assert length == len(raw)
    assert decode_startup(raw[4:]) == packet


@pytest.mark.parametrize(
    "msg",
    [
        Authentication(Authentication.OK),
        Authentication(Authentication.KERBEROS_V5),
        Authentication(Authentication.CLEARTEXT),
        Authentication(Authentication.MD5, b"\x01\x02\x03\x04"),
        Authentication(Authentication.GSS),
        Authentication(Authentication.GSS_CONTINUE, b"token"),
        Authentication(Authentication.SSPI),
        Authentication.sasl(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")),
        Authentication.sasl(()),
        Authentication(Authentication.SASL_CONTINUE, b"r=abc,s=c2FsdA==,i=4096"),
        Authentication(Authentication.SASL_FINAL, b"v=c2lnbmF0dXJl"),
    ],
    ids=lambda m: f"code{m.code}",
)
def test_every_authentication_code_round_trips(msg: Authentication) -> None:
    assert decode_backend(*split_frame(msg.encode())) == msg


def test_large_counts_round_trip() -> None:
    """Counts are unsigned 16-bit on the wire: up to 65535 parameters, columns or types."""
    many = 40_000
    bind = Bind("", "s", (1,), tuple(b"%d" % i for i in range(many)), (1,))
    assert decode_frontend(*split_frame(bind.encode())) == bind
    parse = Parse("s", "insert ...", tuple(range(65_535)))
    assert decode_frontend(*split_frame(parse.encode())) == parse
    call = FunctionCall(1, (), (None,) * many)
    assert decode_frontend(*split_frame(call.encode())) == call
    for msg in (
        DataRow((b"x",) * many),
        ParameterDescription((23,) * 65_535),
        RowDescription((FieldDescription("c"),) * many),
        CopyOutResponse(0, (0,) * many),
    ):
        assert decode_backend(*split_frame(msg.encode())) == msg


# --------------------------------------------------------------------------- wire vectors

# Byte strings as PostgreSQL and libpq put them on the wire.
FRONTEND_VECTORS: list[tuple[Message, bytes]] = [
    (Query("select 1"), b"Q\x00\x00\x00\x0dselect 1\x00"),
    (Sync(), b"S\x00\x00\x00\x04"),
    (Flush(), b"H\x00\x00\x00\x04"),
    (Terminate(), b"X\x00\x00\x00\x04"),
    (Parse("", "select $1", (23,)), b"P\x00\x00\x00\x15\x00select $1\x00\x00\x01\x00\x00\x00\x17"),
    (
        Bind("", "", (), (b"1", None), ()),
        b"B\x00\x00\x00\x15\x00\x00\x00\x00\x00\x02\x00\x00\x00\x011\xff\xff\xff\xff\x00\x00",
    ),
    (Describe(b"P", ""), b"D\x00\x00\x00\x06P\x00"),
    (Execute("", 0), b"E\x00\x00\x00\x09\x00\x00\x00\x00\x00"),
    (Close(b"S", "s1"), b"C\x00\x00\x00\x08Ss1\x00"),
    (CopyData(b"1\tone\n"), b"d\x00\x00\x00\x0a1\tone\n"),
    (CopyDone(), b"c\x00\x00\x00\x04"),
    (PasswordMessage(b"secret"), b"p\x00\x00\x00\x0bsecret\x00"),
]

BACKEND_VECTORS: list[tuple[Message, bytes]] = [
    (ReadyForQuery(b"I"), b"Z\x00\x00\x00\x05I"),
    (ReadyForQuery(b"T"), b"Z\x00\x00\x00\x05T"),
    (Authentication(Authentication.OK), b"R\x00\x00\x00\x08\x00\x00\x00\x00"),
    (
        Authentication(Authentication.MD5, b"\xde\xad\xbe\xef"),
        b"R\x00\x00\x00\x0c\x00\x00\x00\x05\xde\xad\xbe\xef",
    ),
    (
        Authentication.sasl(("SCRAM-SHA-256",)),
        b"R\x00\x00\x00\x17\x00\x00\x00\x0aSCRAM-SHA-256\x00\x00",
    ),
    (
        BackendKeyData(4242, -1),
        b"K\x00\x00\x00\x0c\x00\x00\x10\x92\xff\xff\xff\xff",
    ),
    (
        ParameterStatus("client_encoding", "UTF8"),
        b"S\x00\x00\x00\x19client_encoding\x00UTF8\x00",
    ),
    # select 1: one int4 column named ?column?, then its row.
    (
        RowDescription((FieldDescription("?column?", 0, 0, 23, 4, -1, 0),)),
        b"T\x00\x00\x00\x21\x00\x01?column?\x00"
        b"\x00\x00\x00\x00\x00\x00\x00\x00\x00\x17\x00\x04\xff\xff\xff\xff\x00\x00",
    ),
    (DataRow((b"1",)), b"D\x00\x00\x00\x0b\x00\x01\x00\x00\x00\x011"),
    (DataRow((None, b"")), b"D\x00\x00\x00\x0e\x00\x02\xff\xff\xff\xff\x00\x00\x00\x00"),
    (CommandComplete("SELECT 1"), b"C\x00\x00\x00\x0dSELECT 1\x00"),
    (ParseComplete(), b"1\x00\x00\x00\x04"),
    (BindComplete(), b"2\x00\x00\x00\x04"),
    (NoData(), b"n\x00\x00\x00\x04"),
    (EmptyQueryResponse(), b"I\x00\x00\x00\x04"),
    (
        ErrorResponse((("S", "ERROR"), ("C", "42P01"), ("M", "no t"))),
        b"E\x00\x00\x00\x19SERROR\x00C42P01\x00Mno t\x00\x00",
    ),
    (CopyOutResponse(0, (0, 0)), b"H\x00\x00\x00\x0b\x00\x00\x02\x00\x00\x00\x00"),
    (NotificationResponse(7, "ch", "hi"), b"A\x00\x00\x00\x0e\x00\x00\x00\x07ch\x00hi\x00"),
]


@pytest.mark.parametrize(("msg", "wire"), FRONTEND_VECTORS, ids=lambda v: type(v).__name__)
def test_frontend_wire_vectors(msg: Message, wire: bytes) -> None:
    assert msg.encode() == wire
    assert decode_frontend(wire[:1], wire[5:]) == msg


@pytest.mark.parametrize(("msg", "wire"), BACKEND_VECTORS, ids=lambda v: type(v).__name__)
def test_backend_wire_vectors(msg: Message, wire: bytes) -> None:
    assert msg.encode() == wire
    assert decode_backend(wire[:1], wire[5:]) == msg


STARTUP_VECTORS: list[tuple[StartupPacket, bytes]] = [
    (SSLRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x2f"),
    (GSSENCRequest(), b"\x00\x00\x00\x08\x04\xd2\x16\x30"),
    (
        CancelRequest(1234, -2),
        b"\x00\x00\x00\x10\x04\xd2\x16\x2e\x00\x00\x04\xd2\xff\xff\xff\xfe",
    ),
    (
        StartupMessage((("user", "postgres"), ("database", "postgres"))),
        b"\x00\x00\x00\x29\x00\x03\x00\x00user\x00postgres\x00database\x00postgres\x00\x00",
    ),
    (StartupMessage(()), b"\x00\x00\x00\x09\x00\x03\x00\x00\x00"),
]


@pytest.mark.parametrize(("packet", "wire"), STARTUP_VECTORS, ids=lambda v: type(v).__name__)
def test_startup_wire_vectors(packet: StartupPacket, wire: bytes) -> None:
    assert packet.encode() == wire
    assert decode_startup(wire[4:]) == packet


def test_request_codes() -> None:
    assert (SSL_REQUEST_CODE >> 16, SSL_REQUEST_CODE & 0xFFFF) == (1234, 5679)
    assert (GSSENC_REQUEST_CODE >> 16, GSSENC_REQUEST_CODE & 0xFFFF) == (1234, 5680)
    assert (CANCEL_REQUEST_CODE >> 16, CANCEL_REQUEST_CODE & 0xFFFF) == (1234, 5678)
    assert PROTOCOL_V3 == 3 << 16


def test_text_fields_keep_non_utf8_bytes() -> None:
    wire = b"Q\x00\x00\x00\x0cs\xc3\xa9l \xff\xfe\x00"
    msg = decode_frontend(wire[:1], wire[5:])
    assert isinstance(msg, Query)
    assert msg.sql == "sél \udcff\udcfe"
    assert msg.encode() == wire


def test_frame_helper() -> None:
    assert frame(b"Z", b"I") == b"Z\x00\x00\x00\x05I"


# --------------------------------------------------------------------------- helpers


def test_startup_param_lookup() -> None:
    msg = StartupMessage((("user", "alice"), ("database", "db")))
    assert msg.param("user") == "alice"
    assert msg.param("options") is None
    assert msg.param("options", "-c x=1") == "-c x=1"


def test_bind_param_format() -> None:
    assert Bind("", "", (), (b"1", b"2")).param_format(1) == 0
    assert Bind("", "", (1,), (b"1", b"2")).param_format(1) == 1
    assert Bind("", "", (0, 1), (b"1", b"2")).param_format(1) == 1


def test_sasl_mechanisms() -> None:
    auth = Authentication.sasl(("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"))
    assert auth.data == b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0"
    assert auth.mechanisms() == ("SCRAM-SHA-256-PLUS", "SCRAM-SHA-256")
    assert Authentication.sasl(()).mechanisms() == ()


def test_notice_accessors() -> None:
    err = ErrorResponse(error_fields("FATAL", "28P01", "bad password", "detail", "hint"))
    assert err.fields == (
        ("S", "FATAL"),
        ("V", "FATAL"),
        ("C", "28P01"),
        ("M", "bad password"),
        ("D", "detail"),
        ("H", "hint"),
    )
    assert (err.severity, err.sqlstate, err.message) == ("FATAL", "28P01", "bad password")
    assert err.get("X", "none") == "none"
    assert NoticeResponse((("S", "WARNING"),)).severity == "WARNING"
    assert error_fields("ERROR", "XX000", "m") == (
        ("S", "ERROR"),
        ("V", "ERROR"),
        ("C", "XX000"),
        ("M", "m"),
    )


def test_body_reader_counts_are_unsigned() -> None:
    assert BodyReader(b"\xff\xff", "t").count() == 65_535
    assert BodyReader(b"\x80\x00", "t").count() == 32_768


# --------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    "encode",
    [
        lambda: Query("a\0b").encode(),
        lambda: Parse("s\0", "q").encode(),
        lambda: ParameterStatus("a", "b\0").encode(),
        lambda: StartupMessage((("user", "a\0b"),)).encode(),
        lambda: StartupMessage((("", "x"),)).encode(),
        lambda: ErrorResponse((("", "x"),)).encode(),
        lambda: ErrorResponse((("MD", "x"),)).encode(),
        lambda: ErrorResponse((("é", "x"),)).encode(),
        lambda: ErrorResponse((("\0", "x"),)).encode(),
        lambda: Authentication.sasl(("a\0",)),
    ],
)
def test_encode_rejects_unrepresentable_values(encode: Callable[[], object]) -> None:
    with pytest.raises(ProtocolError):
        encode()


@pytest.mark.parametrize(
    ("type_code", "body"),
    [
        (b"Q", b"select 1"),  # unterminated
        (b"Q", b"select 1\0x"),  # trailing bytes
        (b"P", b"\0q\0\x00\x02\x00\x00\x00\x17"),  # one of two type OIDs
        (b"B", b"\0\0\x00\x02\x00\x00\x00\x01\x00\x03" + b"\xff\xff\xff\xff" * 3 + b"\x00\x00"),
        (b"B", b"\0\0\x00\x00\x00\x01\xff\xff\xff\xfe\x00\x00"),  # length -2
        (b"B", b"\0\0\x00\x00\x00\x01\x00\x00\x00\x05ab\x00\x00"),  # value overruns
        (b"D", b"X\0"),  # bad Describe target
        (b"C", b""),
        (b"E", b"\0\x00\x00"),
        (b"S", b"x"),  # Sync with a body
        (b"F", b"\x00\x00\x00\x01\x00\x00\x00\x00"),  # no result format
        (b"p", b""),
        (b"p", b"pass"),  # unterminated
        (b"p", b"pa\0ss\0"),  # embedded NUL
        (b"Z", b"I"),  # backend-only type
        (b"\0", b""),
    ],
)
def test_decode_frontend_rejects(type_code: bytes, body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_frontend(type_code, body)


@pytest.mark.parametrize(
    ("type_code", "body"),
    [
        (b"Z", b""),
        (b"Z", b"X"),
        (b"Z", b"II"),
        (b"R", b"\x00\x00\x00"),
        (b"R", b"\x00\x00\x00\x00x"),  # AuthenticationOk with payload
        (b"R", b"\x00\x00\x00\x05abc"),  # 3-byte MD5 salt
        (b"R", b"\x00\x00\x00\x0aSCRAM-SHA-256\x00"),  # unterminated mechanism list
        (b"R", b"\x00\x00\x00\x0a"),
        (b"R", b"\x00\x00\x00\x06"),  # SCM credentials: long gone
        (b"R", b"\xff\xff\xff\xff"),
        (b"K", b"\x00\x00\x00\x01\x00\x00"),
        (b"T", b"\x00\x01c\0" + b"\x00" * 17),  # field description one byte short
        (b"D", b"\x00\x01\x00\x00\x00\x05abc"),
        (b"D", b"\x00\x01\x80\x00\x00\x00"),  # huge negative length
        (b"E", b"Mmessage"),  # unterminated field
        (b"E", b"Mm\0"),  # no terminator
        (b"N", b""),
        (b"G", b""),
        (b"H", b"\x00\xff\xff"),  # 65535 column formats, none present
        (b"v", b"\x00\x00\x00\x00\xff\xff\xff\xff"),  # negative option count
        (b"v", b"\x00\x00\x00\x00\x7f\xff\xff\xff"),  # more options than bytes
        (b"V", b"\x00\x00\x00\x02a"),
        (b"Q", b"select 1\0"),  # frontend-only type
    ],
)
def test_decode_backend_rejects(type_code: bytes, body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_backend(type_code, body)


def test_bind_format_count_must_match_parameters() -> None:
    body = Bind("", "", (0, 1), (b"1", b"2", b"3")).encode_body()
    with pytest.raises(ProtocolError, match="2 parameter formats but 3 parameters"):
        decode_frontend(b"B", body)


@pytest.mark.parametrize(
    ("code", "version"),
    [(0x00020000, "2.0"), (0x00010000, "1.0"), (0x00040000, "4.0"), (0, "0.0")],
)
def test_startup_rejects_other_protocol_versions(code: int, version: str) -> None:
    with pytest.raises(ProtocolError, match=rf"unsupported frontend protocol {version}\b") as e:
        decode_startup(struct.pack("!i", code) + b"user\0u\0\0")
    assert e.value.sqlstate == "0A000"


@pytest.mark.parametrize(
    ("code", "version"),
    [(0xFFFFFFFF, "65535.65535"), (0x80000000, "32768.0"), ((1234 << 16) | 5681, "1234.5681")],
)
def test_startup_rejects_unknown_codes(code: int, version: str) -> None:
    with pytest.raises(ProtocolError, match=rf"unsupported frontend protocol {version}:"):
        decode_startup(struct.pack("!I", code))


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00\x03",
        b"\x00\x03\x00\x00",  # no terminator
        b"\x00\x03\x00\x00user\0",  # name without value
        b"\x00\x03\x00\x00user\0alice",  # unterminated value
        b"\x00\x03\x00\x00user\0alice\0",  # no final terminator
        b"\x00\x03\x00\x00user\0alice\0\0x",  # trailing bytes
        b"\x04\xd2\x16\x2f\x00",  # SSLRequest with a body
        b"\x04\xd2\x16\x30\x00",  # GSSENCRequest with a body
        b"\x04\xd2\x16\x2e\x00\x00\x00\x01",  # CancelRequest without a key
        b"\x04\xd2\x16\x2e" + b"\x00" * 9,  # CancelRequest, one byte too long
    ],
)
def test_decode_startup_rejects_malformed(body: bytes) -> None:
    with pytest.raises(ProtocolError):
        decode_startup(body)


# --------------------------------------------------------------------------- fuzzing


@st.composite
def mutated(draw: st.DrawFn, valid: SearchStrategy[bytes]) -> bytes:
    """A valid encoding damaged a few times: truncated, bytes overwritten, inserted, removed."""
    buf = bytearray(draw(valid))
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "overwrite", "insert", "delete"]))
        at = draw(st.integers(0, len(buf)))
        if op == "truncate":
            del buf[at:]
        elif op == "overwrite":
            junk = draw(st.binary(min_size=1, max_size=4))
            buf[at : at + len(junk)] = junk
        elif op == "insert":
            buf[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            del buf[at : at + draw(st.integers(1, 4))]
    return bytes(buf)


def fuzz_bodies(valid: SearchStrategy[Message] | None) -> SearchStrategy[bytes]:
    noise = st.binary(max_size=48)
    if valid is None:
        return noise
    bodies = valid.map(lambda m: m.encode_body())
    return st.one_of(noise, mutated(bodies))


def check_decode(decode: Callable[[bytes, bytes], Message], type_code: bytes, body: bytes) -> None:
    """Decoding either fails with ProtocolError or gives a message that re-encodes exactly."""
    try:
        msg = decode(type_code, body)
    except ProtocolError:
        return
    assert type_code == msg.TYPE
    assert msg.encode_body() == body


def typed_fuzz(
    table: dict[bytes, type[Message]], cases: dict[type[Message], SearchStrategy[Message]]
) -> SearchStrategy[tuple[bytes, bytes]]:
    """A (type code, body) pair for every type of one direction, the body near a valid one."""
    return st.sampled_from(sorted(table)).flatmap(
        lambda code: st.tuples(st.just(code), fuzz_bodies(cases[table[code]]))
    )


@settings(FUZZ, max_examples=500)
@given(type_code=st.integers(0, 255).map(lambda b: bytes([b])), body=st.binary(max_size=32))
def test_fuzz_any_type_code(type_code: bytes, body: bytes) -> None:
    check_decode(decode_frontend, type_code, body)
    check_decode(decode_backend, type_code, body)


@settings(FUZZ, max_examples=800)
@given(case=typed_fuzz(FRONTEND, FRONTEND_CASES))
def test_fuzz_decode_frontend(case: tuple[bytes, bytes]) -> None:
    check_decode(decode_frontend, *case)


@settings(FUZZ, max_examples=800)
@given(case=typed_fuzz(BACKEND, BACKEND_CASES))
def test_fuzz_decode_backend(case: tuple[bytes, bytes]) -> None:
    check_decode(decode_backend, *case)


def _p_decoder(cls: type[Message]) -> Callable[[bytes, bytes], Message]:
    def decode(_type_code: bytes, body: bytes) -> Message:
        return cls.decode_body(body)

    return decode


@settings(FUZZ, max_examples=500)
@given(body=fuzz_bodies(st.one_of(*P_FAMILY_CASES.values())))
def test_fuzz_password_family(body: bytes) -> None:
    for cls in P_FAMILY_CASES:
        check_decode(_p_decoder(cls), b"p", body)


_startup_codes = st.sampled_from(
    [PROTOCOL_V3, 0x00020000, SSL_REQUEST_CODE, GSSENC_REQUEST_CODE, CANCEL_REQUEST_CODE]
).map(lambda c: struct.pack("!I", c))
startup_bodies: SearchStrategy[bytes] = st.one_of(
    st.binary(max_size=40),
    st.tuples(_startup_codes, st.binary(max_size=24)).map(b"".join),
    mutated(st.one_of(*STARTUP_CASES.values()).map(lambda p: p.encode()[4:])),
)


@settings(FUZZ, max_examples=800)
@given(body=startup_bodies)
def test_fuzz_decode_startup(body: bytes) -> None:
    try:
        packet = decode_startup(body)
    except ProtocolError:
        return
    assert packet.encode()[4:] == body


@pytest.mark.parametrize(
    "message",
    [
        m.Parse("s1", "select $1, $2", (23, 4294967295)),
        m.Bind("p", "s1", (0, 1), (b"12", None), (1,)),
        m.Bind("", "", (), (), ()),
        m.DataRow((b"abc", None, b"")),
        m.RowDescription(
            (
                m.FieldDescription("a", 1, 2, 23, 4, -1, 0),
                m.FieldDescription("é", 0, 0, 25, -1, -1, 1),
            )
        ),
        m.Query("select 1"),
        m.CommandComplete("SELECT 1"),
    ],
    ids=lambda msg: type(msg).__name__,
)
def test_the_inline_decoders_take_whole_bodies_only(message: m.Message) -> None:
    # The hot messages are decoded without a BodyReader: they must refuse exactly what it
    # refuses (a cut body, trailing bytes) and give back what was encoded.
    body = message.encode()[5:]
    assert type(message).decode_body(body) == message
    for cut in range(len(body)):
        with pytest.raises(m.ProtocolError):
            type(message).decode_body(body[:cut])
    with pytest.raises(m.ProtocolError):
        type(message).decode_body(body + b"\x00")


def test_sql_is_read_as_utf8_or_else_byte_for_byte() -> None:
    from pgguard.protocol.messages import sql_bytes_text
    from pgguard.protocol.relay import RelayCore

    assert sql_bytes_text("select 'café'".encode()) == "select 'café'"
    assert sql_bytes_text(b"select 'caf\xe9'") == "select 'café'"  # a LATIN1 client's
    assert sql_bytes_text(b"select '\xff'") == "select 'ÿ'"  # parseable; the server refuses it
    # A UTF8 session records what messages decoded (surrogateescape) as the same text.
    utf8 = RelayCore(1 << 20)
    for raw in ("select 'café'".encode(), b"select 'caf\xe9'", b"plain"):
        assert utf8._recorded_sql(raw.decode("utf-8", "surrogateescape")) == sql_bytes_text(raw)
