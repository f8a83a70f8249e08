"""Sans-IO tests for pgguard.protocol.framing: MessageReader, StartupReader and Scanner."""

from __future__ import annotations

import contextlib
import itertools
import struct
from collections.abc import Iterable, Sequence

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.strategies import SearchStrategy

from pgguard.protocol.framing import HEADER_SIZE, Frame, MessageReader, Scanner, StartupReader
from pgguard.protocol.messages import (
    BindComplete,
    CancelRequest,
    CommandComplete,
    DataRow,
    FieldDescription,
    ParseComplete,
    ProtocolError,
    Query,
    ReadyForQuery,
    RowDescription,
    SSLRequest,
    StartupMessage,
    Sync,
    decode_backend,
    decode_startup,
    frame,
)

LIMIT = 4096
ALL_TYPES = bytes(range(256))

STREAMS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FUZZ = settings(max_examples=700, deadline=None, suppress_health_check=[HealthCheck.too_slow])

Msg = tuple[bytes, bytes]  # (type code, body)
Item = bytes | Frame

# --------------------------------------------------------------------------- helpers


def encode(messages: Iterable[Msg]) -> bytes:
    return b"".join(frame(t, body) for t, body in messages)


def chunk(data: bytes, size: int) -> list[bytes]:
    return [data[i : i + size] for i in range(0, len(data), size)]


def read_all(reader: MessageReader, chunks: Iterable[bytes]) -> list[Msg]:
    """Feed every chunk, draining whole messages after each one."""
    out: list[Msg] = []
    for piece in chunks:
        reader.feed(piece)
        while (msg := reader.next_message()) is not None:
            out.append(msg)
    return out


def scan_all(scanner: Scanner, chunks: Iterable[bytes]) -> list[Item]:
    out: list[Item] = []
    for piece in chunks:
        out.extend(scanner.feed(piece))
    return out


def reassemble(items: Iterable[Item]) -> bytes:
    return b"".join(item.raw if isinstance(item, Frame) else item for item in items)


def normalize(items: Iterable[Item]) -> list[Item]:
    """Merge adjacent pass-through pieces and drop empty ones, keeping frames in place."""
    out: list[Item] = []
    for item in items:
        if isinstance(item, Frame):
            out.append(item)
        elif item:
            if out and not isinstance(out[-1], Frame):
                out[-1] = out[-1] + item
            else:
                out.append(item)
    return out


def expected_scan(messages: Sequence[Msg], intercept: bytes) -> list[Item]:
    """What a Scanner must produce, normalized: frames for intercepted types, runs otherwise."""
    items: list[Item] = []
    for t, body in messages:
        raw = frame(t, body)
        items.append(Frame(t[0], raw) if t[0] in intercept else raw)
    return normalize(items)


# --------------------------------------------------------------------------- strategies

# Types are drawn mostly from a few common codes so that intercept sets actually match.
type_codes: SearchStrategy[bytes] = st.one_of(
    st.sampled_from([b"Q", b"P", b"B", b"D", b"T", b"Z", b"d", b"C"]),
    st.integers(0, 255).map(lambda b: bytes([b])),
)
messages: SearchStrategy[list[Msg]] = st.lists(
    st.tuples(type_codes, st.binary(max_size=200)), max_size=25
)
intercepts: SearchStrategy[bytes] = st.one_of(
    st.sampled_from([b"", b"Q", b"QPBDE", b"Zd", ALL_TYPES]),
    st.sets(type_codes.map(lambda t: t[0])).map(lambda s: bytes(sorted(s))),
)


@st.composite
def chunkings(draw: st.DrawFn, data: bytes) -> list[bytes]:
    """``data`` cut at arbitrary points (empty chunks included)."""
    cuts = draw(st.lists(st.integers(0, len(data)), max_size=30))
    bounds = [0, *sorted(cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(bounds)]


def feedings(data: bytes) -> list[list[bytes]]:
    """The deterministic ways to feed ``data``: whole, then one byte at a time."""
    return [[data], chunk(data, 1)]


SAMPLE: list[Msg] = [
    (b"Q", b"select 1\0"),
    (b"T", RowDescription((FieldDescription("?column?", 0, 0, 23, 4, -1, 0),)).encode_body()),
    (b"D", DataRow((b"1",)).encode_body()),
    (b"D", DataRow((None, b"x" * 300)).encode_body()),
    (b"C", b"SELECT 1\0"),
    (b"S", b""),
    (b"Z", b"I"),
    (b"d", b"\0" * 1000),
    (b"X", b""),
]

# --------------------------------------------------------------------------- MessageReader


@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_reader_sample_stream(how: str) -> None:
    data = encode(SAMPLE)
    chunks = [data] if how == "whole" else chunk(data, 1)
    reader = MessageReader(LIMIT)
    assert read_all(reader, chunks) == SAMPLE
    assert reader.buffered() == 0


def test_reader_returns_none_until_complete() -> None:
    raw = ReadyForQuery(b"I").encode()
    reader = MessageReader(LIMIT)
    for i in range(len(raw) - 1):
        reader.feed(raw[i : i + 1])
        assert reader.next_message() is None
        assert reader.buffered() == i + 1
    reader.feed(raw[-1:])
    assert reader.next_message() == (b"Z", b"I")
    assert reader.next_message() is None


def test_reader_decodes_real_messages() -> None:
    stream = [ParseComplete(), BindComplete(), CommandComplete("SELECT 1"), ReadyForQuery(b"T")]
    data = b"".join(m.encode() for m in stream)
    decoded = [decode_backend(*m) for m in read_all(MessageReader(LIMIT), chunk(data, 3))]
    assert decoded == stream


def test_reader_take_buffer_hands_over_the_rest() -> None:
    reader = MessageReader(LIMIT)
    reader.feed(Sync().encode() + b"\x16\x03\x01 partial")
    assert reader.next_message() == (b"S", b"")
    assert reader.take_buffer() == b"\x16\x03\x01 partial"
    assert reader.buffered() == 0
    assert reader.next_message() is None


@STREAMS
@given(msgs=messages, data=st.data())
def test_reader_any_chunking(msgs: list[Msg], data: st.DataObject) -> None:
    stream = encode(msgs)
    for chunks in [*feedings(stream), data.draw(chunkings(stream))]:
        reader = MessageReader(LIMIT)
        assert read_all(reader, chunks) == msgs
        assert reader.buffered() == 0


# --------------------------------------------------------------------------- Scanner


@pytest.mark.parametrize("intercept", [b"", b"Q", b"QZ", b"D", b"d", ALL_TYPES])
@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_scanner_sample_stream(intercept: bytes, how: str) -> None:
    data = encode(SAMPLE)
    chunks = [data] if how == "whole" else chunk(data, 1)
    scanner = Scanner(intercept, LIMIT)
    out = scan_all(scanner, chunks)
    assert reassemble(out) == data
    assert normalize(out) == expected_scan(SAMPLE, intercept)
    assert scanner.idle()


@STREAMS
@given(msgs=messages, intercept=intercepts, data=st.data())
def test_scanner_any_chunking(msgs: list[Msg], intercept: bytes, data: st.DataObject) -> None:
    stream = encode(msgs)
    expected = expected_scan(msgs, intercept)
    for chunks in [*feedings(stream), data.draw(chunkings(stream))]:
        scanner = Scanner(intercept, LIMIT)
        out: list[Item] = []
        fed = 0
        for piece in chunks:
            got = scanner.feed(piece)
            fed += len(piece)
            out.extend(got)
            if not intercept:
                # Nothing intercepted: at most a partial header is ever held back.
                assert fed - len(reassemble(out)) < HEADER_SIZE
        assert reassemble(out) == stream
        assert normalize(out) == expected
        assert scanner.idle()
        for item in out:
            if isinstance(item, Frame):
                assert item.type in intercept
                assert item.type_code == item.raw[:1]
                assert len(item.raw) == 1 + struct.unpack_from("!I", item.raw, 1)[0]
                assert item.body == item.raw[HEADER_SIZE:]


@STREAMS
@given(msgs=messages, data=st.data())
def test_scanner_matches_message_reader(msgs: list[Msg], data: st.DataObject) -> None:
    """Intercepting every type, the Scanner yields exactly what the MessageReader reads."""
    stream = encode(msgs)
    chunks = data.draw(chunkings(stream))
    frames = [item for item in scan_all(Scanner(ALL_TYPES, LIMIT), chunks) if item]
    assert all(isinstance(f, Frame) for f in frames)
    assert [(f.type_code, f.body) for f in frames if isinstance(f, Frame)] == msgs


@STREAMS
@given(msgs=messages, intercept=intercepts, data=st.data())
def test_scanner_scan_reports_hits_and_cut(
    msgs: list[Msg], intercept: bytes, data: st.DataObject
) -> None:
    """scan(): forwarding ``buf[:cut]`` of every call reproduces the stream, and ``hits`` are
    the offsets of exactly the intercepted messages, each whole inside ``buf[:cut]``."""
    stream = encode(msgs)
    scanner = Scanner(intercept, LIMIT)
    forwarded = bytearray()
    found: list[Msg] = []
    for piece in data.draw(chunkings(stream)):
        buf, hits, cut = scanner.scan(piece)
        for pos in hits:
            (length,) = struct.unpack_from("!I", buf, pos + 1)
            assert pos + 1 + length <= cut
            found.append((buf[pos : pos + 1], buf[pos + HEADER_SIZE : pos + 1 + length]))
        forwarded += buf[:cut]
    assert forwarded == stream
    assert found == [m for m in msgs if m[0][0] in intercept]
    assert scanner.idle()


def test_scanner_forwards_original_object_when_nothing_is_intercepted() -> None:
    data = encode(SAMPLE)
    out = Scanner(b"", LIMIT).feed(data)
    assert len(out) == 1
    assert out[0] is data
    # Also when the only intercepted types are absent from the chunk.
    out = Scanner(b"Q", LIMIT).feed(data[len(frame(b"Q", b"select 1\0")) :])
    assert len(out) == 1
    assert isinstance(out[0], bytes)


def test_scanner_big_pass_through_is_forwarded_piecewise() -> None:
    """A 1 MiB DataRow fed in 4 KiB chunks: every chunk is forwarded as it arrives."""
    big = DataRow((b"x" * (1 << 20),)).encode()
    after = ReadyForQuery(b"I").encode()
    data = big + after
    scanner = Scanner(b"Z", 2 << 20)
    fed = forwarded = 0
    frames: list[Frame] = []
    for piece in chunk(data, 4096):
        fed += len(piece)
        for item in scanner.feed(piece):
            if isinstance(item, Frame):
                frames.append(item)
            else:
                forwarded += len(item)
        if fed < len(big):
            # Mid-message: everything fed so far has gone out; nothing is held in memory.
            assert forwarded == fed
            assert not scanner.idle()
            assert scanner.buffered() == 0
    assert forwarded == len(big)
    assert frames == [Frame(ord("Z"), after)]
    assert scanner.idle()


@given(size=st.integers(0, 50_000), step=st.integers(1, 3000))
@settings(max_examples=40, deadline=None)
def test_scanner_pass_through_arrives_before_message_completes(size: int, step: int) -> None:
    data = frame(b"d", b"\xab" * size)
    scanner = Scanner(b"Q", 1 << 20)
    fed = forwarded = 0
    for piece in chunk(data, step):
        fed += len(piece)
        out = scanner.feed(piece)
        assert all(isinstance(item, bytes) for item in out)
        forwarded += sum(len(item) for item in out if isinstance(item, bytes))
        # Only a header cut short may be held back; the message body never is.
        assert forwarded == (0 if fed < HEADER_SIZE else fed)
        assert scanner.buffered() < HEADER_SIZE
    assert forwarded == len(data)
    assert scanner.idle()


def test_scanner_collects_intercepted_message_across_chunks() -> None:
    query = Query("select " + "x" * 20_000).encode()
    data = frame(b"D", b"row") + query + frame(b"Z", b"I")
    scanner = Scanner(b"Q", LIMIT * 10)
    out: list[Item] = []
    for piece in chunk(data, 1000):
        out.extend(scanner.feed(piece))
    assert normalize(out) == [frame(b"D", b"row"), Frame(ord("Q"), query), frame(b"Z", b"I")]
    frames = [item for item in out if isinstance(item, Frame)]
    assert len(frames) == 1
    assert type(frames[0].raw) is bytes


def test_scanner_collects_a_big_message_in_place() -> None:
    """Each chunk of an intercepted message is appended to one buffer, not re-copied with all
    that came before (that was quadratic: a 32 MiB query in 64 KiB chunks took seconds)."""
    query = Query("x" * 100_000).encode()
    pieces = chunk(query, 1000)
    scanner = Scanner(b"Q", 1 << 20)
    assert scanner.feed(pieces[0]) == []
    buffer = scanner._pending
    for piece in pieces[1:-1]:
        assert scanner.feed(piece) == []
        assert scanner._pending is buffer
    assert scanner.feed(pieces[-1]) == [Frame(ord("Q"), query)]
    assert scanner.idle()


def test_scanner_is_not_idle_mid_message() -> None:
    scanner = Scanner(b"Q", LIMIT)
    assert scanner.idle()
    assert scanner.feed(b"Q\x00\x00") == []  # partial header
    assert not scanner.idle()
    assert scanner.feed(b"\x00\x0asel") == []  # partial intercepted message
    assert not scanner.idle()
    assert scanner.feed(b"ect") == [Frame(ord("Q"), b"Q\x00\x00\x00\x0aselect")]
    assert scanner.idle()
    assert scanner.feed(b"D\x00\x00\x00\x08ab") == [b"D\x00\x00\x00\x08ab"]  # pass-through
    assert not scanner.idle()
    assert scanner.feed(b"cd") == [b"cd"]
    assert scanner.idle()


@pytest.mark.parametrize("cut", range(1, HEADER_SIZE + 3))
def test_scanner_header_split_at_every_offset(cut: int) -> None:
    data = frame(b"D", b"row") + frame(b"Q", b"q\0") + frame(b"D", b"r2")
    first = len(frame(b"D", b"row"))
    scanner = Scanner(b"Q", LIMIT)
    out = scanner.feed(data[: first + cut]) + scanner.feed(data[first + cut :])
    assert reassemble(out) == data
    assert normalize(out) == [
        frame(b"D", b"row"),
        Frame(ord("Q"), frame(b"Q", b"q\0")),
        frame(b"D", b"r2"),
    ]


def test_scanner_set_intercept_applies_to_the_next_message() -> None:
    scanner = Scanner(b"", LIMIT)
    assert scanner.feed(frame(b"Q", b"a\0")) == [frame(b"Q", b"a\0")]
    scanner.set_intercept(b"Q")
    assert scanner.feed(frame(b"Q", b"b\0")) == [Frame(ord("Q"), frame(b"Q", b"b\0"))]
    scanner.set_intercept(b"")
    assert scanner.feed(frame(b"Q", b"c\0")) == [frame(b"Q", b"c\0")]


def test_scanner_empty_feed_forwards_nothing() -> None:
    scanner = Scanner(b"Q", LIMIT)
    assert reassemble(scanner.feed(b"")) == b""
    scanner.feed(b"D\x00\x00\x00\x08ab")
    assert reassemble(scanner.feed(b"")) == b""
    assert reassemble(scanner.feed(b"cd")) == b"cd"


# --------------------------------------------------------------------------- limits


@pytest.mark.parametrize("intercept", [b"", b"D", ALL_TYPES])
def test_limit_is_inclusive(intercept: bytes) -> None:
    data = frame(b"D", b"x" * LIMIT)
    assert read_all(MessageReader(LIMIT), [data]) == [(b"D", b"x" * LIMIT)]
    assert reassemble(Scanner(intercept, LIMIT).feed(data)) == data


def test_reader_rejects_oversize_as_soon_as_the_header_arrives() -> None:
    reader = MessageReader(LIMIT)
    reader.feed(b"D" + struct.pack("!I", LIMIT + 5))
    with pytest.raises(ProtocolError, match="over the 4096-byte limit") as e:
        reader.next_message()
    assert e.value.sqlstate == "54000"


@pytest.mark.parametrize("intercept", [b"", b"D", ALL_TYPES])
@pytest.mark.parametrize("prefix", [b"", frame(b"Z", b"I"), b"Z\x00"])
def test_scanner_rejects_oversize_as_soon_as_the_header_arrives(
    intercept: bytes, prefix: bytes
) -> None:
    scanner = Scanner(intercept, LIMIT)
    scanner.feed(prefix)
    header = b"D" + struct.pack("!I", LIMIT + 5)
    data = header if prefix != b"Z\x00" else b"\x00\x00\x05I" + header
    with pytest.raises(ProtocolError) as e:
        scanner.feed(data)
    assert e.value.sqlstate == "54000"


@pytest.mark.parametrize("length", [0, 1, 2, 3])
def test_reader_rejects_length_below_four(length: int) -> None:
    reader = MessageReader(LIMIT)
    reader.feed(b"D" + struct.pack("!I", length))
    with pytest.raises(ProtocolError, match="invalid message length") as e:
        reader.next_message()
    assert e.value.sqlstate == "08P01"


@pytest.mark.parametrize("length", [0, 1, 2, 3])
@pytest.mark.parametrize("intercept", [b"", b"D"])
def test_scanner_rejects_length_below_four(length: int, intercept: bytes) -> None:
    with pytest.raises(ProtocolError, match="invalid message length") as e:
        Scanner(intercept, LIMIT).feed(b"D" + struct.pack("!I", length))
    assert e.value.sqlstate == "08P01"


def test_huge_length_word_is_oversize_not_negative() -> None:
    reader = MessageReader(LIMIT)
    reader.feed(b"D\xff\xff\xff\xff")
    with pytest.raises(ProtocolError) as e:
        reader.next_message()
    assert e.value.sqlstate == "54000"
    with pytest.raises(ProtocolError) as e:
        Scanner(b"", LIMIT).feed(b"D\xff\xff\xff\xff")
    assert e.value.sqlstate == "54000"


# --------------------------------------------------------------------------- StartupReader


STARTUP_PACKETS = [
    StartupMessage((("user", "alice"), ("database", "db"), ("application_name", "psql"))),
    SSLRequest(),
    CancelRequest(42, -7),
]


@pytest.mark.parametrize("packet", STARTUP_PACKETS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("how", ["whole", "bytewise"])
def test_startup_reader(packet: StartupMessage | SSLRequest | CancelRequest, how: str) -> None:
    raw = packet.encode()
    reader = StartupReader()
    body = None
    for piece in [raw] if how == "whole" else chunk(raw, 1):
        assert body is None
        reader.feed(piece)
        body = reader.next_packet()
    assert body is not None
    assert decode_startup(body) == packet
    assert reader.next_packet() is None


def test_startup_reader_hands_over_tls_bytes() -> None:
    reader = StartupReader()
    reader.feed(SSLRequest().encode() + b"\x16\x03\x01\x02\x00")
    body = reader.next_packet()
    assert body is not None
    assert decode_startup(body) == SSLRequest()
    assert reader.take_buffer() == b"\x16\x03\x01\x02\x00"
    assert reader.next_packet() is None


@pytest.mark.parametrize("length", [0, 4, 7])
def test_startup_reader_rejects_short_packets(length: int) -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!I", length) + b"\x00" * 8)
    with pytest.raises(ProtocolError, match="invalid startup packet length"):
        reader.next_packet()


def test_startup_reader_limit() -> None:
    params = (("options", "x" * 100),)
    raw = StartupMessage(params).encode()
    exact = StartupReader(limit=len(raw))
    exact.feed(raw)
    assert exact.next_packet() == raw[4:]
    over = StartupReader(limit=len(raw) - 1)
    over.feed(raw[:4])  # the length word alone is enough to refuse
    with pytest.raises(ProtocolError, match="over the"):
        over.next_packet()
    huge = StartupReader()
    huge.feed(b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolError):
        huge.next_packet()


@pytest.mark.parametrize(("code", "version"), [(0x00020000, "2.0"), (0x04D2162F + 10, "1234.5689")])
def test_startup_reader_then_decode_rejects_other_protocols(code: int, version: str) -> None:
    reader = StartupReader()
    reader.feed(struct.pack("!II", 8, code))
    body = reader.next_packet()
    assert body is not None
    with pytest.raises(ProtocolError, match=f"unsupported frontend protocol {version}"):
        decode_startup(body)


# --------------------------------------------------------------------------- fuzzing


@st.composite
def hostile_streams(draw: st.DrawFn) -> bytes:
    """Valid frames, headers with arbitrary lengths and raw junk, concatenated."""
    parts = draw(
        st.lists(
            st.one_of(
                st.tuples(type_codes, st.binary(max_size=40)).map(lambda m: frame(*m)),
                st.tuples(type_codes, st.integers(0, LIMIT + 8)).map(
                    lambda h: h[0] + struct.pack("!I", h[1])
                ),
                st.binary(max_size=12),
            ),
            max_size=12,
        )
    )
    return b"".join(parts)


fuzz_streams: SearchStrategy[bytes] = st.one_of(st.binary(max_size=200), hostile_streams())


@FUZZ
@given(stream=fuzz_streams, intercept=intercepts, data=st.data())
def test_fuzz_reader_and_scanner(stream: bytes, intercept: bytes, data: st.DataObject) -> None:
    """Only ProtocolError ever escapes, and both readers agree on whether the stream is bad."""
    chunks = data.draw(chunkings(stream))
    reader_error = scanner_error = None
    read: list[Msg] = []
    try:
        read = read_all(MessageReader(LIMIT), chunks)
    except ProtocolError as e:
        reader_error = e
    scanner = Scanner(intercept, LIMIT)
    out: list[Item] = []
    try:
        for piece in chunks:
            out.extend(scanner.feed(piece))
    except ProtocolError as e:
        scanner_error = e
    assert (reader_error is None) == (scanner_error is None)
    if reader_error is not None and scanner_error is not None:
        assert reader_error.sqlstate == scanner_error.sqlstate
        return
    forwarded = reassemble(out)
    assert stream.startswith(forwarded)
    complete = encode(read)
    assert stream.startswith(complete)
    if scanner.idle():
        assert forwarded == stream == complete


@settings(FUZZ, max_examples=500)
@given(stream=st.one_of(st.binary(max_size=64), hostile_streams()), data=st.data())
def test_fuzz_startup_reader(stream: bytes, data: st.DataObject) -> None:
    reader = StartupReader(limit=256)
    try:
        for piece in data.draw(chunkings(stream)):
            reader.feed(piece)
            if (body := reader.next_packet()) is not None:
                assert 4 <= len(body) <= 252
                with contextlib.suppress(ProtocolError):
                    decode_startup(body)
    except ProtocolError:
        pass
