"""Unit tests for pgguard.masking: wire codecs, mask functions, DataRow and COPY rewriting.
Pure: no server. The golden wire values were taken from PostgreSQL 15."""

from __future__ import annotations

import json
import math
import struct
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Sequence
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any, Literal

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pgguard.masking import (
    CodecError,
    ColumnPlan,
    CopyFormat,
    Masker,
    MaskError,
    PgSpecial,
    RowFormatError,
    RowMasker,
    applicable,
    build_masker,
    codec_for,
    fallback_note,
)
from pgguard.masking.codecs import CODECS, format_float
from pgguard.masking.functions import parse_json_path
from pgguard.masking.rows import copy_text_escape, copy_text_unescape
from pgguard.policy.model import MaskFunction, parse_mask_function

SECRET = b"unit-test-masking-secret-0123456789"
OTHER_SECRET = b"another-secret-for-the-same-tests!!"

TEXT_OIDS = (25, 1043, 1042, 19)
INT_OIDS = (21, 23, 20)
NUMBER_OIDS = (*INT_OIDS, 1700, 700, 701)
DATE_OIDS = (1082, 1114, 1184)
ALL_OIDS = tuple(sorted(CODECS))

# One clear value per type, as PostgreSQL prints it (text format).
SAMPLES: dict[int, bytes] = {
    25: b"alice.smith42@example.com",
    1043: b"alice.smith42@example.com",
    1042: b"ab12-cd34-ef  ",  # char(14)
    19: b"alice.smith42@example.com",
    21: b"1234",
    23: b"123456",
    20: b"9876543210",
    1700: b"123456.78",
    700: b"3.14",
    701: b"2718.2818",
    16: b"t",
    1082: b"2024-05-17",
    1114: b"2024-05-17 13:04:05.123456",
    1184: b"2024-05-17 13:04:05.5+05:30",
    2950: b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    114: b'{"email": "a@b.c", "items": [{"email": "x@y.z", "n": 1}]}',
    3802: b'{"email": "a@b.c", "items": [{"email": "x@y.z", "n": 1}]}',
    17: b"\\x0102ff",
}

# A constant for each type, different from its sample.
CONSTANTS: dict[int, str] = {
    **dict.fromkeys(TEXT_OIDS, "'hidden'"),
    **dict.fromkeys(INT_OIDS, "7"),
    1700: "1.5",
    700: "1.5",
    701: "-2",
    16: "false",
    1082: "'2000-01-01'",
    1114: "'2000-01-01 00:00:00'",
    1184: "'2000-01-01 00:00:00+00'",
    2950: "'00000000-0000-0000-0000-000000000001'",
    114: "'{}'",
    3802: "'[1, 2]'",
    17: "'\\x00'",
}

# Which types each function applies to (the contract policy check reports).
APPLIES: dict[str, tuple[int, ...]] = {
    "nullify": ALL_OIDS,
    "redact": ALL_OIDS,
    "constant": ALL_OIDS,
    "partial(2, '*', 2)": TEXT_OIDS,
    "partial_email": TEXT_OIDS,
    "keep_last(4)": TEXT_OIDS,
    "hash(12)": (*TEXT_OIDS, *NUMBER_OIDS, *DATE_OIDS, 2950, 17),
    "pseudo(name)": TEXT_OIDS,
    "pseudo(email)": TEXT_OIDS,
    "pseudo(city)": TEXT_OIDS,
    "pseudo(phone)": TEXT_OIDS,
    "generalize(1000)": NUMBER_OIDS,
    "generalize(0.5)": (1700, 700, 701),
    "generalize(month)": DATE_OIDS,
    "generalize(week)": DATE_OIDS,
    "generalize(hour)": (1114, 1184),
    "noise(0.2)": (*NUMBER_OIDS, *DATE_OIDS),
    "json_mask(['$.email', '$.items[*].email'])": (114, 3802),
    "regex_redact('\\d', '#')": TEXT_OIDS,
}


def fn(spec: str) -> MaskFunction:
    return parse_mask_function(spec)


def spec_for(name: str, oid: int) -> str:
    return f"constant({CONSTANTS[oid]})" if name == "constant" else name


def masker(spec: str, oid: int, secret: bytes = SECRET, typmod: int = -1) -> Masker:
    return build_masker(fn(spec), oid, secret, typmod=typmod)


def value_of(oid: int, text: bytes) -> Any:
    codec = codec_for(oid)
    assert codec is not None
    return codec.decode(text, 0)


def wire(oid: int, value: Any, fmt: int) -> bytes:
    codec = codec_for(oid)
    assert codec is not None
    return codec.encode(value, fmt)


def same_value(a: Any, b: Any) -> bool:
    """Equality that also holds for NaN and keeps -0.0 apart from 0.0 and offsets apart."""
    if isinstance(a, float) and isinstance(b, float):
        return struct.pack("!d", a) == struct.pack("!d", b) or (math.isnan(a) and math.isnan(b))
    if isinstance(a, Decimal) and isinstance(b, Decimal):
        if a.is_nan() or b.is_nan():
            return a.is_nan() and b.is_nan()
        return a == b and a.as_tuple().exponent == b.as_tuple().exponent
    if isinstance(a, datetime) and isinstance(b, datetime):
        return a == b and a.utcoffset() == b.utcoffset()
    return type(a) is type(b) and a == b


# --------------------------------------------------------------------------------------------
# Codecs: golden wire values


@pytest.mark.parametrize(
    ("oid", "text", "binary"),
    [
        (1700, b"12345.6789", bytes.fromhex("0003000100000004000109291a85")),
        (1700, b"0.00", bytes.fromhex("0000000000000002")),
        (1700, b"0.0001", bytes.fromhex("0001ffff000000040001")),
        (1700, b"-0.5", bytes.fromhex("0001ffff400000011388")),
        (1700, b"10000", bytes.fromhex("00010001000000000001")),
        (1700, b"NaN", bytes.fromhex("00000000c0000000")),
        (1700, b"Infinity", bytes.fromhex("00000000d0000020")),
        (1700, b"-Infinity", bytes.fromhex("00000000f0000020")),
        (701, b"1e+15", struct.pack("!d", 1e15)),
        (701, b"123456789012345", struct.pack("!d", 123456789012345.0)),
        (701, b"0.0001", struct.pack("!d", 0.0001)),
        (701, b"1e-05", struct.pack("!d", 1e-05)),
        (701, b"-0", struct.pack("!d", -0.0)),
        (701, b"NaN", struct.pack("!d", math.nan)),
        (701, b"-Infinity", struct.pack("!d", -math.inf)),
        (700, b"100000", struct.pack("!f", 100000.0)),
        (700, b"1e+06", struct.pack("!f", 1e6)),
        (700, b"0.1", struct.pack("!f", 0.1)),
        (700, b"3.4028235e+38", struct.pack("!f", 3.4028234663852886e38)),
        (21, b"-32768", struct.pack("!h", -32768)),
        (20, b"9223372036854775807", struct.pack("!q", 2**63 - 1)),
        (16, b"t", b"\x01"),
        (1082, b"2000-01-02", struct.pack("!i", 1)),
        (1082, b"infinity", struct.pack("!i", 2**31 - 1)),
        (1082, b"-infinity", struct.pack("!i", -(2**31))),
        (1114, b"2000-01-01 00:00:00.000001", struct.pack("!q", 1)),
        (1114, b"infinity", struct.pack("!q", 2**63 - 1)),
        (1184, b"2000-01-01 05:30:00+05:30", struct.pack("!q", 0)),
        (1184, b"1900-01-01 00:00:00+05:53:28", struct.pack("!q", -3155694808000000)),
        (2950, b"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11", uuid.UUID(SAMPLES[2950].decode()).bytes),
        (3802, b'{"a": 1}', b'\x01{"a": 1}'),
        (114, b'{"a":1}', b'{"a":1}'),
        (17, b"\\x00ff5c", b"\x00\xff\\"),
        (1042, b"ab   ", b"ab   "),
    ],
)
def test_golden_wire_values(oid: int, text: bytes, binary: bytes) -> None:
    codec = codec_for(oid)
    assert codec is not None
    from_text, from_binary = codec.decode(text, 0), codec.decode(binary, 1)
    if not (isinstance(from_text, datetime) and oid == 1184):
        assert same_value(from_text, from_binary)
    else:
        assert from_text == from_binary  # the same instant; text keeps the session's offset
    assert codec.encode(from_text, 0) == text
    assert codec.encode(from_binary, 1) == binary


def test_numeric_binary_digits_past_dscale_are_dropped() -> None:
    # 1.2345 sent with dscale 2 (PostgreSQL's numeric_recv truncates): 1.23
    raw = struct.pack("!hhHH", 2, 0, 0, 2) + struct.pack("!hh", 1, 2345)
    assert str(codec_for(1700).decode(raw, 1)) == "1.23"  # type: ignore[union-attr]


def test_text_decoding_accepts_what_postgresql_accepts() -> None:
    assert value_of(16, b"true") is True
    assert value_of(1700, b"1.50e3") == Decimal("1500")
    assert str(value_of(1700, b"1.50e3")) == "1500"
    assert value_of(17, b"abc\\\\\\001") == b"abc\\\x01"  # escape format
    assert value_of(17, b"\\x") == b""
    assert value_of(1184, b"2024-01-01 00:00:00-03") == datetime(
        2024, 1, 1, tzinfo=timezone(timedelta(hours=-3))
    )
    assert value_of(1082, b"infinity") is PgSpecial.INFINITY


@pytest.mark.parametrize(
    ("oid", "raw", "fmt"),
    [
        (23, b"12x", 0),
        (23, b"123", 1),
        (21, b"40000", 0),
        (1700, b"1.2.3", 0),
        (1700, b"\x00\x01", 1),
        (1700, struct.pack("!hhHH", 1, 0, 0x1234, 0) + b"\x00\x01", 1),
        (16, b"maybe", 0),
        (1082, b"17/05/2024", 0),  # DateStyle is not ISO
        (1082, b"0044-03-15 BC", 0),
        (1114, b"2024-05-17 13:04:05+02", 0),
        (1184, b"Fri May 17 13:04:05 2024 CEST", 0),
        (2950, b"not-a-uuid", 0),
        (3802, b"\x02{}", 1),
        (17, b"\\xzz", 0),
        (17, b"a\\9", 0),
        (25, b"x", 2),
    ],
)
def test_invalid_values_raise_codec_error(oid: int, raw: bytes, fmt: int) -> None:
    with pytest.raises(CodecError):
        codec_for(oid).decode(raw, fmt)  # type: ignore[union-attr]


def test_unknown_types_have_no_codec() -> None:
    assert codec_for(1186) is None  # interval
    assert codec_for(1009) is None  # text[]


# --------------------------------------------------------------------------------------------
# Codecs: round trips (every type, both formats)

_TEXTS = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"), max_size=40)
_OFFSETS = st.integers(-(15 * 3600 + 59 * 60 + 59), 15 * 3600 + 59 * 60 + 59).map(
    lambda s: timezone(timedelta(seconds=s)) if s else UTC
)
_NUMERICS = st.builds(
    lambda coef, scale: Decimal(f"{coef}E{-scale}"),
    st.integers(-(10**40), 10**40),
    st.integers(0, 40),
) | st.sampled_from([Decimal("NaN"), Decimal("Infinity"), Decimal("-Infinity"), Decimal(0)])
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | _TEXTS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_TEXTS, inner, max_size=4),
    max_leaves=10,
).map(json.dumps)

ROUND_TRIP: dict[int, st.SearchStrategy[Any]] = {
    **dict.fromkeys(TEXT_OIDS, _TEXTS),
    21: st.integers(-(2**15), 2**15 - 1),
    23: st.integers(-(2**31), 2**31 - 1),
    20: st.integers(-(2**63), 2**63 - 1),
    1700: _NUMERICS,
    700: st.floats(width=32),
    701: st.floats(),
    16: st.booleans(),
    1082: st.dates() | st.sampled_from(list(PgSpecial)),
    1114: st.datetimes() | st.sampled_from(list(PgSpecial)),
    1184: st.datetimes(
        min_value=datetime(2, 1, 1), max_value=datetime(9998, 12, 31), timezones=_OFFSETS
    ),
    2950: st.uuids(),
    114: _JSON,
    3802: _JSON,
    17: st.binary(max_size=40),
}


def test_every_codec_has_a_round_trip_strategy() -> None:
    assert set(ROUND_TRIP) == set(CODECS)


@pytest.mark.parametrize("oid", ALL_OIDS, ids=lambda o: CODECS[o].name)
@pytest.mark.parametrize("fmt", [0, 1], ids=["text", "binary"])
@settings(max_examples=150)
@given(data=st.data())
def test_round_trip(oid: int, fmt: int, data: st.DataObject) -> None:
    codec = CODECS[oid]
    value = data.draw(ROUND_TRIP[oid])
    raw = codec.encode(value, fmt)
    back = codec.decode(raw, fmt)
    if oid == 1184 and fmt == 1 and isinstance(value, datetime):
        assert back == value and back.utcoffset() == timedelta(0)  # binary is UTC
    else:
        assert same_value(back, value), (value, raw, back)
    assert codec.encode(back, fmt) == raw


@settings(max_examples=300)
@given(st.binary(max_size=60))
def test_bytea_escape_format_decodes(value: bytes) -> None:
    escaped = b"".join(
        b"\\\\" if c == 0x5C else bytes((c,)) if 0x20 <= c < 0x7F else b"\\%03o" % c for c in value
    )
    assert value_of(17, escaped) == value


@settings(max_examples=300)
@given(st.binary(max_size=60).filter(lambda b: b"\x00" not in b))
def test_text_bytes_round_trip_whatever_the_encoding(raw: bytes) -> None:
    codec = CODECS[25]
    assert codec.encode(codec.decode(raw, 0), 0) == raw


@settings(max_examples=300)
@given(st.floats(width=32, allow_nan=False))
def test_float4_text_is_shortest_that_reads_back(value: float) -> None:
    text = format_float(value, float4=True)
    assert struct.pack("!f", float(text)) == struct.pack("!f", value)
    digits = text.lstrip("-").split("e")[0].replace(".", "").strip("0")
    if value != 0 and not math.isinf(value):
        shorter = f"{value:.{max(len(digits) - 2, 0)}e}"
        assert struct.pack("!f", float(shorter)) != struct.pack("!f", value) or len(digits) == 1


# --------------------------------------------------------------------------------------------
# Applicability (what `pgguard policy check` reports)


@pytest.mark.parametrize("spec", sorted(APPLIES))
def test_applicable_matrix(spec: str) -> None:
    for oid in ALL_OIDS:
        f = fn(spec_for(spec, oid))
        reason = applicable(f, oid)
        if oid in APPLIES[spec]:
            assert reason is None, (spec, oid, reason)
            build_masker(f, oid, SECRET)
        else:
            assert reason is not None, (spec, oid)
            with pytest.raises(MaskError, match=r"applies to|does not change"):
                build_masker(f, oid, SECRET)


def test_applicable_reasons_are_readable() -> None:
    assert applicable(fn("keep_last(4)"), 1184) == (
        "keep_last applies to text types (text, varchar, char, name), not timestamptz"
    )
    assert "generalize(day) does not change a date" in str(applicable(fn("generalize(day)"), 1082))
    assert applicable(fn("generalize(year)"), 23) == (
        "generalize(year) applies to dates and timestamps (date, timestamp, timestamptz), not int4"
    )
    assert "not a valid int4" in str(applicable(fn("constant('abc')"), 23))
    assert "not a valid int2" in str(applicable(fn("constant(70000)"), 21))
    assert "not a valid uuid" in str(applicable(fn("constant('x')"), 2950))
    assert "constant('\"abc\"')" in str(applicable(fn("constant('abc')"), 114))
    assert "does not change an integer" in str(applicable(fn("generalize(1)"), 20))
    assert "not a valid timestamp" in str(applicable(fn("constant('2020-01-01 00:00+02')"), 1114))


def test_types_without_codec_fall_back_to_null() -> None:
    f = fn("keep_last(4)")
    assert applicable(f, 1186) is None
    note = "type oid 1186 has no codec: keep_last(4) masks its values as NULL"
    assert fallback_note(f, 1186) == note
    assert fallback_note(f, 25) is None
    m = build_masker(f, 1186, SECRET)
    assert m.nullify and m("1 day") is None
    assert m.raw(0)(b"1 day") is None


def test_keyed_functions_need_a_secret() -> None:
    for spec in ("hash(8)", "pseudo(name)", "noise(0.1)"):
        with pytest.raises(MaskError, match="secret"):
            masker(spec, 25 if spec != "noise(0.1)" else 23, secret=b"")
    masker("redact", 25, secret=b"")  # unkeyed functions do not


# --------------------------------------------------------------------------------------------
# Every function, on every type it applies to, in both formats


def _cases() -> list[tuple[str, int]]:
    return [(spec, oid) for spec, oids in sorted(APPLIES.items()) for oid in oids]


@pytest.mark.parametrize(("spec", "oid"), _cases(), ids=lambda x: str(x))
@pytest.mark.parametrize("fmt", [0, 1], ids=["text", "binary"])
def test_masked_value_is_a_valid_value_of_the_type(spec: str, oid: int, fmt: int) -> None:
    codec = CODECS[oid]
    m = masker(spec_for(spec, oid), oid)
    clear = codec.encode(codec.decode(SAMPLES[oid], 0), fmt)
    out = m.raw(fmt)(clear)
    if spec == "nullify":
        assert out is None
        return
    assert out is not None
    decoded = codec.decode(out, fmt)  # a valid value of the same type, in the same format
    assert codec.encode(decoded, fmt) == out  # as PostgreSQL itself would send it
    assert out != clear, (spec, oid, out)
    # The callable API agrees with the wire API.
    assert same_value(m(codec.decode(clear, fmt)), decoded) or oid == 1184


@pytest.mark.parametrize(("spec", "oid"), _cases(), ids=lambda x: str(x))
def test_null_stays_null(spec: str, oid: int) -> None:
    assert masker(spec_for(spec, oid), oid)(None) is None


# --------------------------------------------------------------------------------------------
# Function behaviour


def m_text(spec: str, value: str, oid: int = 25, typmod: int = -1) -> Any:
    return masker(spec, oid, typmod=typmod)(value)


def test_redact() -> None:
    assert m_text("redact", "secret") == "****"
    assert m_text("redact", "ab   ", 1042) == "**** "  # char(5) keeps its length
    assert m_text("redact", "ab", 1042) == "**"
    assert m_text("redact", "secret", 1043, typmod=4 + 2) == "**"  # varchar(2)
    assert masker("redact", 1700)(Decimal("12.345")) == Decimal("0.000")
    assert str(masker("redact", 1700)(Decimal("12.345"))) == "0.000"
    assert masker("redact", 23)(42) == 0
    assert masker("redact", 701)(2.5) == 0.0
    assert masker("redact", 16)(True) is False
    assert masker("redact", 1082)(date(2024, 1, 2)) == date(1970, 1, 1)
    assert masker("redact", 1114)(datetime(2024, 1, 2)) == datetime(1970, 1, 1)
    tz = timezone(timedelta(hours=2))
    redacted = masker("redact", 1184)(datetime(2024, 1, 2, tzinfo=tz))
    assert redacted == datetime(1970, 1, 1, tzinfo=UTC)
    assert redacted.utcoffset() == timedelta(hours=2)
    assert masker("redact", 2950)(uuid.uuid4()) == uuid.UUID(int=0)
    assert masker("redact", 17)(b"abc") == b""
    js = masker("redact", 3802)
    assert [js(v) for v in ('{"a": 1}', " [1]", '"x"', "12", "true", "null")] == [
        "{}",
        "[]",
        '"****"',
        "0",
        "false",
        "null",
    ]


def test_redact_of_fixed_results_skips_decoding() -> None:
    m = masker("redact", 25)
    assert m.constant == "****"
    assert m.raw(1)(b"\xff\xfe not even utf-8") == b"****"


def test_constant() -> None:
    assert m_text("constant('n/a')", "secret") == "n/a"
    assert m_text("constant(0)", "secret") == "0"
    assert m_text("constant('n/a')", "abcdef", 1042) == "n/a   "
    assert masker("constant(5.0)", 23)(42) == 5
    assert masker("constant('2.50')", 1700)(Decimal(1)) == Decimal("2.50")
    assert masker("constant(true)", 16)(False) is True
    assert masker("constant('2020-02-03')", 1082)(date(2024, 1, 1)) == date(2020, 2, 3)
    assert masker("constant('2020-02-03T04:05:06')", 1114)(datetime(2024, 1, 1)) == datetime(
        2020, 2, 3, 4, 5, 6
    )
    tz = timezone(timedelta(hours=-5))
    out = masker("constant('2020-01-01 00:00:00+00')", 1184)(datetime(2024, 1, 1, tzinfo=tz))
    assert out == datetime(2020, 1, 1, tzinfo=UTC) and out.utcoffset() == timedelta(hours=-5)
    assert masker("constant('{\"a\": null}')", 3802)("[1]") == '{"a": null}'
    assert masker("constant(3)", 114)("[1]") == "3"
    assert masker("constant('\\x6869')", 17)(b"x") == b"hi"
    assert masker("constant('hi')", 17)(b"x") == b"hi"
    with pytest.raises(MaskError, match="numeric"):
        masker("constant(12345.5)", 1700, typmod=((5 << 16) | 2) + 4)  # numeric(5, 2)


def test_partial() -> None:
    assert m_text("partial(2, '*', 2)", "john.doe") == "jo*oe"
    assert m_text("partial(1, 'xxxx', 0)", "secret") == "sxxxx"
    assert m_text("partial(0, '***', 3)", "4111111111111111") == "***111"
    assert m_text("partial(2, '*', 2)", "abcd") == "*"  # too short to hide anything: pad only
    assert m_text("partial(2, '*', 2)", "abc") == "*"
    assert m_text("partial(2, '*', 2)", "john.doe  ", 1042) == "jo*oe     "


def test_partial_email() -> None:
    assert m_text("partial_email", "alice@example.com") == "a****@example.com"
    assert m_text("partial_email", "a@x.org") == "a****@x.org"
    assert m_text("partial_email", "@x.org") == "****@x.org"
    assert m_text("partial_email", "we@ird@x.org") == "w****@x.org"
    assert m_text("partial_email", "no-at-sign") == "n****"
    assert m_text("partial_email", "") == "****"


def test_keep_last() -> None:
    assert m_text("keep_last(4)", "123-45-6789") == "***-**-6789"
    assert m_text("keep_last(4)", "4111 1111 1111 1234") == "**** **** **** 1234"
    assert m_text("keep_last(4)", "AB-12-cd-") == "**-12-cd-"
    assert m_text("keep_last(4)", "+1 (555) 123-4567") == "+* (***) ***-4567"
    assert m_text("keep_last(4)", "1234") == "****"  # nothing to keep without showing it all
    assert m_text("keep_last(4)", "12-3") == "**-*"
    assert m_text("keep_last(0)", "ab-c") == "**-*"
    assert m_text("keep_last(2)", "élan-ça") == "****-ça"
    assert m_text("keep_last(4)", "123-45-6789   ", 1042) == "***-**-6789   "


def test_regex_redact() -> None:
    assert m_text("regex_redact('\\d', '#')", "call 555-1234") == "call ###-####"
    assert m_text("regex_redact('(\\w)\\w*@', '\\1***@')", "alice@x.org") == "a***@x.org"
    assert m_text("regex_redact('x', '')", "abc") == "abc"  # nothing matched: as is


def test_hash_text() -> None:
    out = m_text("hash(12)", "alice")
    assert len(out) == 12 and int(out, 16) >= 0
    assert m_text("hash(12)", "alice") == out
    assert m_text("hash(64)", "alice").startswith(out)
    assert len(m_text("hash(12)", "alice     ", 1042)) == 10  # char(10): cut to its length
    # char(n) ignores trailing spaces: the same value hashes alike whatever the padding.
    assert m_text("hash(4)", "ab  ", 1042)[:4] == m_text("hash(4)", "ab      ", 1042)[:4]
    assert len(m_text("hash(64)", "x", 19).encode()) <= 63


def test_hash_other_types() -> None:
    assert 0 <= masker("hash(3)", 23)(123456) < 1000
    assert 0 <= masker("hash(12)", 21)(5) <= 32767
    big = masker("hash(12)", 1700)(Decimal("1.50"))
    assert big.as_tuple().exponent == 0 and len(big.as_tuple().digits) <= 12
    assert str(masker("hash(12)", 1700)(Decimal("1.5"))) == str(big)  # 1.5 = 1.50: same hash
    in_typmod = masker("hash(12)", 1700, typmod=((6 << 16) | 2) + 4)(Decimal("12.50"))
    assert in_typmod.adjusted() < 4 and in_typmod.as_tuple().exponent == -2  # numeric(6, 2)
    assert masker("hash(30)", 700)(1.5) < 10**7
    d = masker("hash(8)", 1082)(date(2024, 1, 1))
    assert date(1900, 1, 1) <= d < date(2100, 1, 1)
    tz = timezone(timedelta(hours=9))
    t1 = masker("hash(8)", 1184)(datetime(2024, 1, 1, 9, tzinfo=tz))
    t2 = masker("hash(8)", 1184)(datetime(2024, 1, 1, tzinfo=UTC))
    assert t1 == t2 and t1.utcoffset() == timedelta(hours=9)  # same instant, original offset
    u = masker("hash(8)", 2950)(uuid.UUID(int=1))
    assert u.version == 4 and u != uuid.UUID(int=1)
    assert len(masker("hash(40)", 17)(b"abc")) == 40


def test_pseudo() -> None:
    name = m_text("pseudo(name)", "Alice Smith")
    assert len(name.split(" ")) == 2
    email = m_text("pseudo(email)", "alice@corp.com")
    assert email.split("@")[1] in ("example.com", "example.org", "example.net")
    assert m_text("pseudo(city)", "Paris")[0].isupper()
    phone = m_text("pseudo(phone)", "+33 1 23 45 67 89")
    assert phone.startswith("+1-") and "-555-01" in phone
    assert m_text("pseudo(email)", "alice@corp.com", 1043, typmod=4 + 5) == email[:5]
    # Varied output: the lists are not degenerate.
    names = {m_text("pseudo(name)", f"user{i}") for i in range(200)}
    assert len(names) > 150


def test_generalize_numbers() -> None:
    assert masker("generalize(1000)", 23)(123456) == 123000
    assert masker("generalize(1000)", 23)(-5) == -1000
    assert masker("generalize(1000)", 21)(-32768) == -32000  # stays in int2
    assert masker("generalize(2.5)", 23)(7) == 5
    out = masker("generalize(1000)", 1700)(Decimal("123456.78"))
    assert str(out) == "123000.00"
    assert str(masker("generalize(0.25)", 1700)(Decimal("1.234"))) == "1.000"
    assert str(masker("generalize(0.25)", 1700)(Decimal("3"))) == "3"
    assert str(masker("generalize(1000)", 1700, typmod=((4 << 16) | 2) + 4)(Decimal("-99.99"))) == (
        "0.00"
    )
    assert masker("generalize(0.5)", 701)(3.7) == 3.5
    assert masker("generalize(10)", 701)(-math.inf) == -math.inf
    assert masker("generalize(10)", 1700)(Decimal("NaN")).is_nan()


def test_generalize_dates() -> None:
    tz = timezone(timedelta(hours=5, minutes=30))
    ts = datetime(2024, 5, 17, 13, 4, 5, 123, tzinfo=tz)
    cases = {
        "minute": datetime(2024, 5, 17, 13, 4, tzinfo=tz),
        "hour": datetime(2024, 5, 17, 13, tzinfo=tz),
        "day": datetime(2024, 5, 17, tzinfo=tz),
        "week": datetime(2024, 5, 13, tzinfo=tz),
        "month": datetime(2024, 5, 1, tzinfo=tz),
        "quarter": datetime(2024, 4, 1, tzinfo=tz),
        "year": datetime(2024, 1, 1, tzinfo=tz),
        "decade": datetime(2020, 1, 1, tzinfo=tz),
    }
    for unit, expected in cases.items():
        out = masker(f"generalize({unit})", 1184)(ts)
        assert out == expected and out.utcoffset() == tz.utcoffset(None), unit
        assert masker(f"generalize({unit})", 1114)(ts.replace(tzinfo=None)) == expected.replace(
            tzinfo=None
        )
    assert masker("generalize(month)", 1082)(date(2024, 5, 17)) == date(2024, 5, 1)
    assert masker("generalize(month)", 1082)(PgSpecial.INFINITY) is PgSpecial.INFINITY
    # The text form keeps the session's offset.
    raw = masker("generalize(month)", 1184).raw(0)(b"2024-05-17 13:04:05+05:30")
    assert raw == b"2024-05-01 00:00:00+05:30"


def test_noise() -> None:
    m = masker("noise(0.1)", 23)
    for v in (1000, -1000, 123456, 5, -1, 2**31 - 1):
        out = m(v)
        assert isinstance(out, int) and out != v
        assert abs(out - v) <= max(abs(v) * 0.1 + 1, 1)
    assert m(0) == 0
    assert masker("noise(1)", 21)(32767) <= 32767
    n = masker("noise(0.1)", 1700)(Decimal("1234.56"))
    assert n.as_tuple().exponent == -2 and n != Decimal("1234.56")
    assert abs(n - Decimal("1234.56")) <= Decimal("123.46")
    clamped = masker("noise(1)", 1700, typmod=((6 << 16) | 2) + 4)
    for i in range(50):
        assert abs(clamped(Decimal(f"9999.{i:02d}"))) < 10000
    f = masker("noise(0.1)", 701)(3.14)
    assert f != 3.14 and abs(f - 3.14) <= 0.315
    f4 = masker("noise(0.1)", 700)(3.14)
    assert struct.unpack("!f", struct.pack("!f", f4))[0] == f4
    d = masker("noise(0.1)", 1082)(date(2024, 1, 1))
    assert d != date(2024, 1, 1) and abs((d - date(2024, 1, 1)).days) <= 37
    tz = timezone(timedelta(hours=-3))
    t = masker("noise(0.1)", 1184)(datetime(2024, 1, 1, tzinfo=tz))
    assert t.utcoffset() == timedelta(hours=-3)
    assert masker("noise(0.1)", 1082)(PgSpecial.NEG_INFINITY) is PgSpecial.NEG_INFINITY
    assert math.isnan(masker("noise(0.1)", 701)(math.nan))


def test_json_mask() -> None:
    m = masker("json_mask(['$.email', '$.items[*].email', '$.tags[1]', \"$['odd key']\"])", 3802)
    doc = (
        '{"email": "a@b.c", "n": 1.000000000000000000001, "items": [{"email": "x", "k": [1]},'
        ' {"email": null}], "tags": ["a", "b"], "odd key": {"x": 1}, "email": "dup"}'
    )
    assert json.loads(m(doc)) == {
        "email": "****",
        "n": 1.0,
        "items": [{"email": "****", "k": [1]}, {"email": "****"}],
        "tags": ["a", "****"],
        "odd key": "****",
    }
    out = m(doc)
    assert "1.000000000000000000001" in out  # numbers as written
    assert out.count('"email": "****"') == 4  # duplicate keys kept and masked
    lax = masker("json_mask(['$.items.email', '$.*.x'])", 114)
    assert json.loads(lax('{"items": [{"email": 1}, {"email": 2}], "o": {"x": 1, "y": 2}}')) == {
        "items": [{"email": "****"}, {"email": "****"}],
        "o": {"x": "****", "y": 2},
    }
    assert masker("json_mask(['$.a'])", 3802)("[1, 2]") == "[1, 2]"  # no such path: kept
    assert masker("json_mask(['$[0]'])", 3802)('"scalar"') == '"****"'
    assert masker("json_mask(['$.a'])", 3802)('{"a": "\\ud800"}') == '{"a": "****"}'
    assert masker("json_mask(['$.b'])", 3802)('{"a": "\\ud800"}') == '{"a": "\\ud800"}'
    with pytest.raises(CodecError):
        masker("json_mask(['$.a'])", 114)("{not json")


def test_parse_json_path() -> None:
    assert parse_json_path("$.items[*].email") == (
        ("key", "items"),
        ("anyindex", None),
        ("key", "email"),
    )
    assert parse_json_path("$[3]['a b'].*") == (("index", 3), ("key", "a b"), ("anykey", None))
    with pytest.raises(ValueError):
        parse_json_path("items.email")


def test_text_results_fit_the_column() -> None:
    assert m_text("pseudo(city)", "Paris", 1042) == m_text("pseudo(city)", "Paris", 1042)[:5]
    assert len(m_text("pseudo(city)", "Paris", 1042)) == 5
    long = "x" * 40
    assert len(m_text("regex_redact('x', 'éé')", long, 19).encode()) <= 63


# --------------------------------------------------------------------------------------------
# Determinism (hash, pseudo, noise) and secrecy

KEYED = [
    ("hash(16)", 25, "alice@example.com"),
    ("hash(16)", 20, 9876543210),
    ("hash(16)", 1700, Decimal("12.34")),
    ("hash(16)", 1082, date(2024, 1, 1)),
    ("hash(16)", 2950, uuid.UUID(int=42)),
    ("hash(16)", 17, b"blob"),
    ("pseudo(name)", 25, "Alice Smith"),
    ("pseudo(email)", 25, "alice@example.com"),
    ("pseudo(phone)", 25, "+33 1 23 45 67 89"),
    ("noise(0.3)", 23, 123456),
    ("noise(0.3)", 1700, Decimal("123.456")),
    ("noise(0.3)", 701, 123.456),
    ("noise(0.3)", 1114, datetime(2024, 1, 1, 12)),
]


@pytest.mark.parametrize(("spec", "oid", "value"), KEYED, ids=lambda x: str(x))
def test_keyed_functions_are_deterministic_per_secret(spec: str, oid: int, value: Any) -> None:
    a = masker(spec, oid)(value)
    assert masker(spec, oid)(value) == a  # a new masker (another session) agrees
    assert a != value
    others = [masker(spec, oid, secret=OTHER_SECRET + bytes([i]))(value) for i in range(4)]
    if spec.startswith("hash"):
        assert all(o != a for o in others)
    else:  # pseudonyms and noise come from small ranges: some secrets may collide
        assert any(o != a for o in others)


def test_keyed_functions_agree_across_processes() -> None:
    code = (
        "from pgguard.masking import build_masker\n"
        "from pgguard.policy.model import parse_mask_function as p\n"
        f"s = {SECRET!r}\n"
        "print(build_masker(p('pseudo(email)'), 25, s)('alice@example.com'))\n"
        "print(build_masker(p('hash(20)'), 25, s)('alice@example.com'))\n"
        "print(build_masker(p('noise(0.5)'), 23, s)(1000000))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "12345", "PATH": ""},
    ).stdout.split("\n")
    assert out[0] == masker("pseudo(email)", 25)("alice@example.com")
    assert out[1] == masker("hash(20)", 25)("alice@example.com")
    assert out[2] == str(masker("noise(0.5)", 23)(1000000))


def test_functions_are_keyed_apart() -> None:
    # Each function keys its HMAC with its own name: hash(64) of a value is not the HMAC that
    # chose its pseudonym or its noise.
    from pgguard.masking.functions import _Keyed

    text = CODECS[25]
    digests = {_Keyed(SECRET, d, text).digest("alice") for d in ("hash", "pseudo:name", "noise")}
    assert len(digests) == 3
    assert masker("hash(64)", 25)("alice") == _Keyed(SECRET, "hash", text).digest("alice").hex()


_WORDS = st.text(
    st.characters(categories=["Lu", "Ll", "Nd"], max_codepoint=0x2FF) | st.sampled_from("-. @_+"),
    min_size=1,
    max_size=30,
)


@settings(max_examples=200)
@given(_WORDS.filter(lambda s: sum(c.isalnum() for c in s) > 4))
def test_text_masks_never_return_the_clear_value(value: str) -> None:
    for spec in ("keep_last(4)", "partial(2, '*', 2)", "hash(16)", "redact"):
        assert m_text(spec, value) != value, spec
    assert m_text("pseudo(name)", value) != value or " " in value
    if "@" in value:
        local = value.rpartition("@")[0]
        if len(local) > 1:
            assert m_text("partial_email", value) != value


@settings(max_examples=200)
@given(st.integers(-(2**31), 2**31 - 1).filter(bool))
def test_number_masks_never_return_the_clear_value(value: int) -> None:
    assert masker("noise(0.05)", 23)(value) != value
    assert masker("hash(9)", 23)(value) != value or value < 10**9
    if value % 1000:
        assert masker("generalize(1000)", 23)(value) != value


@settings(max_examples=200)
@given(
    st.builds(
        lambda c, s: Decimal(f"{c}E{-s}"),
        st.integers(-(10**20), 10**20).filter(bool),
        st.integers(0, 6),
    )
)
def test_numeric_noise_keeps_scale_and_changes_value(value: Decimal) -> None:
    out = masker("noise(0.01)", 1700)(value)
    assert out != value and out.as_tuple().exponent == value.as_tuple().exponent


@settings(max_examples=200)
@given(st.floats(allow_nan=False, allow_infinity=False, width=32).filter(bool))
def test_float4_noise_changes_value(value: float) -> None:
    out = masker("noise(0.1)", 700)(value)
    assert out != value and math.isfinite(out)
    CODECS[700].encode(out, 1)


@settings(max_examples=200)
@given(st.dates(min_value=date(2, 1, 1), max_value=date(9998, 1, 1)))
def test_date_noise_changes_value(value: date) -> None:
    assert masker("noise(0.01)", 1082)(value) != value


# --------------------------------------------------------------------------------------------
# DataRow rewriting


def datarow(values: Sequence[bytes | None]) -> bytes:
    out = struct.pack("!h", len(values))
    for v in values:
        out += struct.pack("!i", -1) if v is None else struct.pack("!i", len(v)) + v
    return out


def parse_datarow(body: bytes) -> list[bytes | None]:
    (n,) = struct.unpack_from("!h", body)
    pos, out = 2, list[bytes | None]()
    for _ in range(n):
        (length,) = struct.unpack_from("!i", body, pos)
        pos += 4
        if length < 0:
            out.append(None)
        else:
            out.append(body[pos : pos + length])
            pos += length
    assert pos == len(body)
    return out


def test_datarow_masks_only_masked_columns() -> None:
    plan = [
        ColumnPlan(23, 1, None),
        ColumnPlan(25, 0, masker("partial_email", 25), "public.customers.email"),
        ColumnPlan(1082, 0, None),
        ColumnPlan(1700, 1, masker("generalize(1000)", 1700), "public.customers.salary"),
        ColumnPlan(25, 0, None),
    ]
    rm = RowMasker(plan)
    salary = wire(1700, Decimal("123456.78"), 1)
    row = [struct.pack("!i", 7), b"alice@example.com", b"2024-01-01", salary, b"tail"]
    out = parse_datarow(rm.mask_datarow(datarow(row)))
    assert out[0] == row[0] and out[2] == row[2] and out[4] == row[4]
    assert out[1] == b"a****@example.com"
    assert out[3] is not None and CODECS[1700].decode(out[3], 1) == Decimal("123000.00")
    # NULLs stay NULL and are not counted.
    out = parse_datarow(rm.mask_datarow(datarow([None, None, None, None, None])))
    assert out == [None] * 5
    assert rm.counts == [0, 1, 0, 1, 0]
    assert rm.take_counts() == {"public.customers.email": 1, "public.customers.salary": 1}
    assert rm.take_counts() == {}


def test_datarow_accepts_plain_tuples_and_callables() -> None:
    rm = RowMasker([(25, 0, str.upper), (23, 0, None)])
    assert parse_datarow(rm.mask_datarow(datarow([b"abc", b"1"]))) == [b"ABC", b"1"]
    assert rm.labels == ("column1", "column2")


def test_datarow_without_masked_columns_is_inactive() -> None:
    rm = RowMasker([(25, 0, None), (23, 1, None)])
    assert not rm.active
    body = datarow([b"x", b"\x00\x00\x00\x01"])
    assert rm.mask_datarow(body) is body
    assert rm.mask_copy_line(b"x\t1\n") == b"x\t1\n"


def test_datarow_fails_closed() -> None:
    rm = RowMasker([(23, 0, masker("noise(0.1)", 23)), (25, 0, None)])
    out = parse_datarow(rm.mask_datarow(datarow([b"not a number", b"x"])))
    assert out == [None, b"x"]
    assert rm.failures == [1, 0] and rm.counts == [1, 0]

    def boom(value: Any) -> Any:
        raise RuntimeError("bug in a mask")

    rm = RowMasker([(25, 0, boom)])
    assert parse_datarow(rm.mask_datarow(datarow([b"secret"]))) == [None]
    rm = RowMasker([(1186, 0, masker("redact", 1186))])  # interval: no codec
    assert parse_datarow(rm.mask_datarow(datarow([b"1 day"]))) == [None]


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"\x00",
        datarow([b"a"]),  # one column, the plan has two
        datarow([b"a", b"b"])[:-1],  # truncated
        struct.pack("!h", 2) + struct.pack("!i", 100) + b"a",
        struct.pack("!h", 2) + struct.pack("!i", 1) + b"a" + struct.pack("!i", 5) + b"ab",
    ],
)
def test_malformed_datarows_raise(body: bytes) -> None:
    rm = RowMasker([(25, 0, None), (25, 0, masker("redact", 25))])
    with pytest.raises(RowFormatError):
        rm.mask_datarow(body)


_FIELDS = st.lists(st.none() | st.binary(max_size=20), min_size=1, max_size=8)


@settings(max_examples=300)
@given(_FIELDS, st.data())
def test_datarow_unmasked_columns_are_byte_identical(
    fields: list[bytes | None], data: st.DataObject
) -> None:
    masked = data.draw(st.lists(st.booleans(), min_size=len(fields), max_size=len(fields)))
    plan = [(17, 1, masker("hash(8)", 17) if m else None) for m in masked]
    rm = RowMasker(plan)
    out = parse_datarow(rm.mask_datarow(datarow(fields)))
    for clear, new, is_masked in zip(fields, out, masked, strict=True):
        if not is_masked or clear is None:
            assert new == clear
        else:
            assert new is not None and len(new) == 8


def test_datarow_performance() -> None:
    plan = [
        (23, 0, None),
        (25, 0, masker("partial_email", 25)),
        (25, 0, masker("keep_last(4)", 25)),
        (25, 0, masker("redact", 25)),
        (1082, 0, None),
        (25, 0, None),
    ]
    rm = RowMasker(plan)
    body = datarow([b"12345", b"alice@example.com", b"123-45-6789", b"x", b"2024-01-01", b"t"])
    rounds = 5000
    start = time.perf_counter()
    for _ in range(rounds):
        rm.mask_datarow(body)
    per_row = (time.perf_counter() - start) / rounds
    assert per_row < 100e-6, f"{per_row * 1e6:.1f} µs per row"


# --------------------------------------------------------------------------------------------
# COPY TO STDOUT rows


def test_copy_text_escaping() -> None:
    assert copy_text_escape(b"a\tb\nc\\d|e", ord("|")) == b"a\\tb\\nc\\\\d\\|e"
    assert copy_text_unescape(b"a\\tb\\nc\\\\d\\|e\\101\\x41\\q") == b"a\tb\nc\\d|eAAq"


@settings(max_examples=300)
@given(st.binary(max_size=30))
def test_copy_text_escape_round_trip(value: bytes) -> None:
    assert copy_text_unescape(copy_text_escape(value, 9)) == value


def test_copy_text_rows() -> None:
    rm = RowMasker(
        [(25, 0, None), (25, 0, masker("partial_email", 25)), (23, 0, masker("redact", 23))]
    )
    line = b"keep\\tme\talice@example.com\t42\n"
    assert rm.mask_copy_line(line) == b"keep\\tme\ta****@example.com\t0\n"
    assert rm.mask_copy_line(b"x\t\\N\t\\N\n") == b"x\t\\N\t\\N\n"  # NULLs stay NULL
    # A masked value with characters to escape, and a custom delimiter and NULL.
    rm = RowMasker([(25, 0, None), (25, 0, masker("constant('a|b\tc\\\\d')", 25))])
    out = rm.mask_copy_line(b"un\\|touched|x\n", "text", delimiter=b"|", null=b"NULL")
    assert out == b"un\\|touched|a\\|b\\tc\\\\\\\\d\n"
    assert rm.mask_copy_line(b"a|NULL\n", "text", delimiter=b"|", null=b"NULL") == b"a|NULL\n"
    with pytest.raises(RowFormatError):
        rm.mask_copy_line(b"only-one-field\n", "text", delimiter=b"|")


def test_copy_csv_rows() -> None:
    rm = RowMasker([(25, 0, None), (25, 0, masker("partial_email", 25)), (23, 0, None)])
    assert rm.mask_copy_line(b'"a,b",bob@x.org,1\n', "csv") == b'"a,b",b****@x.org,1\n'
    # Quoted and multi-line values; a quoted empty string is not NULL, an empty field is.
    assert rm.mask_copy_line(b'x,"al""ice\n@x.org",2\n', "csv") == b'x,"a****@x.org",2\n'
    assert rm.mask_copy_line(b'x,"",3\n', "csv") == b'x,"****",3\n'
    assert rm.mask_copy_line(b"x,,3\n", "csv") == b"x,,3\n"
    assert rm.mask_copy_line(b'x,"bob@x.org",3\r\n', "csv") == b'x,"b****@x.org",3\r\n'
    # Values that need quoting are quoted; FORCE_QUOTE'd fields stay quoted.
    rm = RowMasker([(25, 0, masker("constant('say \"hi\", bye')", 25))])
    assert rm.mask_copy_line(b"plain\n", "csv") == b'"say ""hi"", bye"\n'
    opts = CopyFormat("csv", delimiter=b";", null=b"\\N", quote=b"'", escape=b"\\")
    rm = RowMasker([(25, 0, masker("constant('it''s; \\ ok')", 25)), (25, 0, None)])
    assert rm.mask_copy_line(b"x;\\N\n", opts) == b"'it\\'s; \\\\ ok';\\N\n"
    # A value equal to the NULL string is quoted, so it does not read back as NULL.
    rm = RowMasker([(25, 0, masker("constant('\\N')", 25))])
    assert rm.mask_copy_line(b"x\n", opts) == b"'\\\\N'\n"
    rm = RowMasker([(25, 0, masker("redact", 25))])
    with pytest.raises(RowFormatError):
        rm.mask_copy_line(b'"unterminated\n', "csv")


_COPY_TEXT = st.text(st.characters(exclude_categories=["Cs"], exclude_characters="\x00"))


@settings(max_examples=300)
@given(st.lists(st.none() | _COPY_TEXT, min_size=1, max_size=5), st.data())
def test_copy_identity_masks_are_byte_identical(
    values: list[str | None], data: st.DataObject
) -> None:
    """With an identity mask, a row written as PostgreSQL writes it comes back unchanged."""
    fmt: Literal["text", "csv"] = data.draw(st.sampled_from(["text", "csv"]))
    rm = RowMasker([(25, 0, lambda v: v) for _ in values])
    if fmt == "text":
        fields = [b"\\N" if v is None else copy_text_escape(v.encode(), 9) for v in values]
        line = b"\t".join(fields) + b"\n"
    else:
        fields = [
            b"" if v is None else _csv_quote(v.encode(), single=len(values) == 1) for v in values
        ]
        line = b",".join(fields) + b"\n"
    assert rm.mask_copy_line(line, fmt) == line


def _csv_quote(value: bytes, single: bool) -> bytes:
    if value == b"" or (single and value == b"\\.") or any(c in value for c in b',"\n\r'):
        return b'"' + value.replace(b'"', b'""') + b'"'
    return value


def test_copy_binary_rows() -> None:
    header = b"PGCOPY\n\xff\r\n\x00" + struct.pack("!ii", 0, 0)
    rm = RowMasker([(23, 1, None), (25, 1, masker("redact", 25))])
    tuple1 = datarow([struct.pack("!i", 1), b"secret"])
    tuple2 = datarow([struct.pack("!i", 2), None])
    out = rm.mask_copy_binary(header + tuple1)
    assert out == header + datarow([struct.pack("!i", 1), b"****"])
    assert rm.mask_copy_binary(tuple2) == tuple2
    assert rm.mask_copy_binary(struct.pack("!h", -1)) == struct.pack("!h", -1)
    both = rm.mask_copy_binary(tuple1 + tuple1 + struct.pack("!h", -1))
    masked = datarow([struct.pack("!i", 1), b"****"])
    assert both == masked + masked + struct.pack("!h", -1)
    with pytest.raises(RowFormatError):
        rm.mask_copy_binary(datarow([b"x"]))


def test_masker_repr_and_constant_flags() -> None:
    m = masker("partial_email", 25)
    assert repr(m) == "Masker(partial_email, text)"
    assert not m.nullify and m.constant is None
    assert masker("nullify", 25).nullify


def test_callable_type() -> None:
    f: Callable[[Any], Any] = masker("keep_last(2)", 25)
    assert f("abcd") == "**cd"
