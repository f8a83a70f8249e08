"""PostgreSQL column values on the wire, text (format 0) and binary (format 1). Pure.

One :class:`Codec` per supported type; :func:`codec_for` finds it by type OID (``None`` for a
type pgguard cannot decode, which masking then replaces by NULL). ``decode`` raises
:class:`CodecError` for anything it cannot read exactly; ``encode`` writes what PostgreSQL
itself would send (same text spelling as the server with ``DateStyle=ISO``,
``IntervalStyle`` irrelevant, ``extra_float_digits >= 1``; same binary layout as the type's
``send`` function), so that ``decode(encode(v, f), f) == v`` for every value ``v`` of the type.

Python values by type:

=================================  ==========================================================
text, varchar, bpchar, name        ``str`` (UTF-8, undecodable bytes kept as surrogates)
int2, int4, int8                   ``int``
numeric                            ``decimal.Decimal`` (exponent = -dscale; NaN, ±Infinity)
float4, float8                     ``float`` (nan and ±inf included)
bool                               ``bool``
date                               ``datetime.date`` or :class:`PgSpecial`
timestamp                          naive ``datetime.datetime`` or :class:`PgSpecial`
timestamptz                        aware ``datetime.datetime`` or :class:`PgSpecial`. Text keeps
                                   the session's UTC offset (``tzinfo`` is a fixed
                                   ``timezone``); binary decodes in UTC
uuid                               ``uuid.UUID``
json, jsonb                        ``str``: the JSON text (jsonb binary: version byte 1 + text)
bytea                              ``bytes`` (text: hex ``\\x…``; escape format also decoded)
=================================  ==========================================================

Limits (a masked value beyond them fails to decode and is replaced by NULL, never passed
through): text assumes a UTF-8 (or ASCII-compatible) ``client_encoding``; dates and
timestamps must be within years 1-9999 (no BC) and in ``DateStyle`` ISO in text format.
"""

from __future__ import annotations

import enum
import math
import re
import struct
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, timezone, tzinfo
from decimal import Decimal, InvalidOperation
from typing import Any, Final, Literal

__all__ = [
    "BINARY",
    "CODECS",
    "TEXT",
    "Codec",
    "CodecError",
    "PgSpecial",
    "TypeCategory",
    "codec_for",
    "float4_round",
    "format_float",
]

TEXT: Final = 0
BINARY: Final = 1

# Type OIDs (pg_type.dat).
BOOL_OID: Final = 16
BYTEA_OID: Final = 17
NAME_OID: Final = 19
INT8_OID: Final = 20
INT2_OID: Final = 21
INT4_OID: Final = 23
TEXT_OID: Final = 25
JSON_OID: Final = 114
FLOAT4_OID: Final = 700
FLOAT8_OID: Final = 701
BPCHAR_OID: Final = 1042
VARCHAR_OID: Final = 1043
DATE_OID: Final = 1082
TIMESTAMP_OID: Final = 1114
TIMESTAMPTZ_OID: Final = 1184
NUMERIC_OID: Final = 1700
UUID_OID: Final = 2950
JSONB_OID: Final = 3802

TypeCategory = Literal["text", "number", "date", "bool", "uuid", "json", "bytea"]


class CodecError(ValueError):
    """A column value that is not a valid value of its type in the given format."""


class PgSpecial(enum.Enum):
    """``infinity`` / ``-infinity`` of date, timestamp and timestamptz."""

    INFINITY = "infinity"
    NEG_INFINITY = "-infinity"

    def __repr__(self) -> str:
        return f"PgSpecial.{self.name}"


Decoder = Callable[[bytes], Any]
Encoder = Callable[[Any], bytes]


class Codec:
    """Decode and encode one type's values in text (0) and binary (1) format."""

    __slots__ = ("_decoders", "_encoders", "category", "name", "oid")

    def __init__(
        self,
        oid: int,
        name: str,
        category: TypeCategory,
        text: tuple[Decoder, Encoder],
        binary: tuple[Decoder, Encoder],
    ) -> None:
        self.oid = oid
        self.name = name
        self.category: TypeCategory = category
        self._decoders: tuple[Decoder, Decoder] = (text[0], binary[0])
        self._encoders: tuple[Encoder, Encoder] = (text[1], binary[1])

    def decoder(self, fmt: int) -> Decoder:
        """The decoding function for one format (for hot loops)."""
        return self._decoders[_fmt_index(fmt)]

    def encoder(self, fmt: int) -> Encoder:
        """The encoding function for one format (for hot loops)."""
        return self._encoders[_fmt_index(fmt)]

    def decode(self, raw: bytes, fmt: int) -> Any:
        """The value of ``raw``; raises :class:`CodecError` if it is not a valid value."""
        try:
            return self._decoders[_fmt_index(fmt)](raw)
        except CodecError:
            raise
        except (ValueError, ArithmeticError, struct.error, IndexError) as exc:
            raise CodecError(f"invalid {self.name} value: {exc}") from None

    def encode(self, value: Any, fmt: int) -> bytes:
        """The wire bytes of ``value``; raises :class:`CodecError` if it cannot be encoded."""
        try:
            return self._encoders[_fmt_index(fmt)](value)
        except CodecError:
            raise
        except (ValueError, ArithmeticError, struct.error, TypeError, AttributeError) as exc:
            raise CodecError(f"cannot encode {value!r} as {self.name}: {exc}") from None

    def __repr__(self) -> str:
        return f"Codec({self.name}, oid={self.oid})"


def _fmt_index(fmt: int) -> int:
    if fmt == 0 or fmt == 1:
        return fmt
    raise CodecError(f"unknown format code {fmt}")


# --------------------------------------------------------------------------------------------
# text, varchar, bpchar, name: identical in both formats (the text in the client encoding)


def _text_decode(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogateescape")


def _text_encode(value: str) -> bytes:
    if not isinstance(value, str):
        raise CodecError(f"expected a str, got {type(value).__name__}")
    if "\x00" in value:
        raise CodecError("text cannot contain NUL characters")
    return value.encode("utf-8", "surrogateescape")


# --------------------------------------------------------------------------------------------
# integers

_INT_RANGES: Final[dict[int, tuple[int, int]]] = {
    INT2_OID: (-(2**15), 2**15 - 1),
    INT4_OID: (-(2**31), 2**31 - 1),
    INT8_OID: (-(2**63), 2**63 - 1),
}
_INT_TEXT_RE = re.compile(rb"\s*[-+]?[0-9]+\s*\Z")


def _int_codecs(oid: int, fmt: str) -> tuple[tuple[Decoder, Encoder], tuple[Decoder, Encoder]]:
    lo, hi = _INT_RANGES[oid]
    st = struct.Struct(fmt)
    size = st.size

    def check(value: int) -> int:
        if type(value) is not int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise CodecError(f"expected an int, got {type(value).__name__}")
            value = int(value)
        if not lo <= value <= hi:
            raise CodecError(f"{value} is out of range")
        return value

    def text_decode(raw: bytes) -> int:
        if _INT_TEXT_RE.match(raw) is None:
            raise CodecError(f"invalid integer {raw[:40]!r}")
        return check(int(raw))

    def text_encode(value: int) -> bytes:
        return b"%d" % check(value)

    def bin_decode(raw: bytes) -> int:
        if len(raw) != size:
            raise CodecError(f"expected {size} bytes, got {len(raw)}")
        value: int = st.unpack(raw)[0]
        return value

    def bin_encode(value: int) -> bytes:
        return st.pack(check(value))

    return (text_decode, text_encode), (bin_decode, bin_encode)


def int_range(oid: int) -> tuple[int, int]:
    """The smallest and largest value of an integer type."""
    return _INT_RANGES[oid]


# --------------------------------------------------------------------------------------------
# numeric

_NUMERIC_POS = 0x0000
_NUMERIC_NEG = 0x4000
_NUMERIC_NAN = 0xC000
_NUMERIC_PINF = 0xD000
_NUMERIC_NINF = 0xF000
_NUMERIC_HDR = struct.Struct("!hhHH")
_NBASE = 10000
_NUMERIC_MAX_DSCALE = 0x3FFF
_NUMERIC_TEXT_RE = re.compile(r"\s*[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\s*\Z")
_NUMERIC_SPECIAL: Final[dict[str, Decimal]] = {
    "nan": Decimal("NaN"),
    "infinity": Decimal("Infinity"),
    "+infinity": Decimal("Infinity"),
    "inf": Decimal("Infinity"),
    "+inf": Decimal("Infinity"),
    "-infinity": Decimal("-Infinity"),
    "-inf": Decimal("-Infinity"),
}


def _numeric_text_decode(raw: bytes) -> Decimal:
    text = raw.decode("ascii")
    special = _NUMERIC_SPECIAL.get(text.strip().lower())
    if special is not None:
        return special
    if _NUMERIC_TEXT_RE.match(text) is None:
        raise CodecError(f"invalid numeric {text[:40]!r}")
    value = Decimal(text.strip())
    # numeric never has a positive exponent: 1e3 is 1000 (dscale 0).
    if value.as_tuple().exponent > 0:  # type: ignore[operator]
        value = _decimal_with_exponent(value, 0)
    return value


def _numeric_check(value: Decimal) -> Decimal:
    if not isinstance(value, Decimal):
        if isinstance(value, int) and not isinstance(value, bool):
            return Decimal(value)
        raise CodecError(f"expected a Decimal, got {type(value).__name__}")
    if value.is_snan():
        raise CodecError("signalling NaN is not a numeric value")
    return value


def format_numeric(value: Decimal) -> str:
    """A numeric's text form as PostgreSQL prints it (no exponent, dscale digits)."""
    if value.is_nan():
        return "NaN"
    if value.is_infinite():
        return "-Infinity" if value.is_signed() else "Infinity"
    exponent = value.as_tuple().exponent
    assert isinstance(exponent, int)
    if exponent > 0:
        value = _decimal_with_exponent(value, 0)
    text = format(value, "f")
    if text.startswith("-") and not value:  # numeric has no negative zero
        text = text[1:]
    return text


def _numeric_text_encode(value: Decimal) -> bytes:
    return format_numeric(_numeric_check(value)).encode("ascii")


def _decimal_with_exponent(value: Decimal, exponent: int) -> Decimal:
    """``value`` with exactly ``exponent`` (truncating digits past it), without a context."""
    sign, digits, exp = value.as_tuple()
    assert isinstance(exp, int)
    coefficient = int("".join(map(str, digits))) if digits else 0
    if exp > exponent:
        coefficient *= 10 ** (exp - exponent)
    elif exp < exponent:
        coefficient //= 10 ** (exponent - exp)
    return Decimal(f"{'-' if sign else ''}{coefficient}E{exponent}")


def _numeric_bin_decode(raw: bytes) -> Decimal:
    if len(raw) < 8:
        raise CodecError("numeric: message too short")
    ndigits, weight, sign, dscale = _NUMERIC_HDR.unpack_from(raw)
    if sign == _NUMERIC_NAN:
        return Decimal("NaN")
    if sign == _NUMERIC_PINF:
        return Decimal("Infinity")
    if sign == _NUMERIC_NINF:
        return Decimal("-Infinity")
    if sign not in (_NUMERIC_POS, _NUMERIC_NEG):
        raise CodecError(f"numeric: invalid sign 0x{sign:04x}")
    if ndigits < 0 or len(raw) != 8 + 2 * ndigits:
        raise CodecError("numeric: length does not match the digit count")
    if dscale > _NUMERIC_MAX_DSCALE:
        raise CodecError("numeric: invalid dscale")
    digits = struct.unpack_from(f"!{ndigits}h", raw, 8)
    coefficient = 0
    for d in digits:
        if not 0 <= d < _NBASE:
            raise CodecError("numeric: invalid digit")
        coefficient = coefficient * _NBASE + d
    # The last digit is the group of weight (weight - ndigits + 1): decimal exponent 4 * that.
    exponent = 4 * (weight - ndigits + 1)
    if exponent > -dscale:
        coefficient *= 10 ** (exponent + dscale)
    elif exponent < -dscale:
        coefficient //= 10 ** (-dscale - exponent)  # digits hidden by dscale are dropped
    return Decimal(f"{'-' if sign == _NUMERIC_NEG else ''}{coefficient}E{-dscale}")


def _numeric_bin_encode(value: Decimal) -> bytes:
    value = _numeric_check(value)
    if value.is_nan():
        return _NUMERIC_HDR.pack(0, 0, _NUMERIC_NAN, 0)
    if value.is_infinite():
        # PostgreSQL sends dscale 32 for ±Infinity (bits of its short header), 0 for NaN.
        sign_code = _NUMERIC_NINF if value.is_signed() else _NUMERIC_PINF
        return _NUMERIC_HDR.pack(0, 0, sign_code, 32)
    sign, digit_tuple, exponent = value.as_tuple()
    assert isinstance(exponent, int)
    dscale = max(0, -exponent)
    if dscale > _NUMERIC_MAX_DSCALE:
        raise CodecError("numeric: too many digits after the decimal point")
    coefficient = int("".join(map(str, digit_tuple))) if digit_tuple else 0
    # Align the exponent on a base-10000 digit boundary.
    low = exponent // 4  # weight of the last base-10000 digit (floor division)
    coefficient *= 10 ** (exponent - 4 * low)
    groups: list[int] = []
    while coefficient:
        coefficient, d = divmod(coefficient, _NBASE)
        groups.append(d)
    # Trailing zero digits (the low end) are not sent.
    strip = 0
    while strip < len(groups) and groups[strip] == 0:
        strip += 1
    groups = groups[strip:]
    low += strip
    if not groups:
        return _NUMERIC_HDR.pack(0, 0, _NUMERIC_POS, dscale)
    groups.reverse()
    weight = low + len(groups) - 1
    if not -32768 <= weight <= 32767 or len(groups) > 32767:
        raise CodecError("numeric: value out of range")
    return _NUMERIC_HDR.pack(
        len(groups), weight, _NUMERIC_NEG if sign else _NUMERIC_POS, dscale
    ) + struct.pack(f"!{len(groups)}h", *groups)


# --------------------------------------------------------------------------------------------
# float4, float8

_F4 = struct.Struct("!f")
_F8 = struct.Struct("!d")
_FLOAT_SPECIAL: Final[dict[str, float]] = {
    "nan": math.nan,
    "infinity": math.inf,
    "+infinity": math.inf,
    "inf": math.inf,
    "+inf": math.inf,
    "-infinity": -math.inf,
    "-inf": -math.inf,
}
_FLOAT_TEXT_RE = re.compile(r"\s*[-+]?(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][-+]?[0-9]+)?\s*\Z")


def float4_round(value: float) -> float:
    """``value`` rounded to the nearest float4 (raises OverflowError if out of range)."""
    result: float = _F4.unpack(_F4.pack(value))[0]
    return result


def _shortest_digits(value: float, float4: bool) -> tuple[str, int]:
    """The shortest decimal digits that read back as ``value`` (> 0), and the scientific
    exponent of the first one: 1234.5 → ("12345", 3)."""
    text = repr(value)
    if float4:
        for precision in range(1, 10):
            text = f"{value:.{precision - 1}e}"
            try:
                if float4_round(float(text)) == value:
                    break
            except OverflowError:  # rounded up past the largest float4
                continue
    exact = Decimal(text)
    digits = "".join(map(str, exact.as_tuple().digits)).strip("0") or "0"
    return digits, exact.adjusted()


def format_float(value: float, float4: bool = False) -> str:
    """A float's text form as PostgreSQL 12+ prints it (shortest exact, ``extra_float_digits``
    ≥ 1): fixed notation for exponents -4 to 14 (float4: -4 to 5), else ``1.5e+20``."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "-Infinity" if value < 0 else "Infinity"
    sign = "-" if math.copysign(1.0, value) < 0 else ""
    if value == 0:
        return sign + "0"
    digits, exp = _shortest_digits(abs(value), float4)
    if -4 <= exp < (6 if float4 else 15):
        if exp < 0:
            return f"{sign}0.{'0' * (-exp - 1)}{digits}"
        if len(digits) <= exp + 1:
            return sign + digits + "0" * (exp + 1 - len(digits))
        return f"{sign}{digits[: exp + 1]}.{digits[exp + 1 :]}"
    mantissa = digits[0] + ("." + digits[1:] if len(digits) > 1 else "")
    return f"{sign}{mantissa}e{'-' if exp < 0 else '+'}{abs(exp):02d}"


def _float_codecs(float4: bool) -> tuple[tuple[Decoder, Encoder], tuple[Decoder, Encoder]]:
    st = _F4 if float4 else _F8

    def check(value: float) -> float:
        if type(value) is not float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise CodecError(f"expected a float, got {type(value).__name__}")
            value = float(value)
        if float4 and not math.isnan(value) and float4_round(value) != value:
            raise CodecError(f"{value!r} is not a float4 value")
        return value

    def text_decode(raw: bytes) -> float:
        text = raw.decode("ascii")
        special = _FLOAT_SPECIAL.get(text.strip().lower())
        if special is not None:
            return special
        if _FLOAT_TEXT_RE.match(text) is None:
            raise CodecError(f"invalid float {text[:40]!r}")
        value = float(text)
        if float4:
            value = float4_round(value)
        return value

    def text_encode(value: float) -> bytes:
        return format_float(check(value), float4).encode("ascii")

    def bin_decode(raw: bytes) -> float:
        if len(raw) != st.size:
            raise CodecError(f"expected {st.size} bytes, got {len(raw)}")
        value: float = st.unpack(raw)[0]
        return value

    def bin_encode(value: float) -> bytes:
        return st.pack(check(value))

    return (text_decode, text_encode), (bin_decode, bin_encode)


# --------------------------------------------------------------------------------------------
# bool

_BOOL_TEXT: Final[dict[bytes, bool]] = {
    b"t": True,
    b"f": False,
    b"true": True,
    b"false": False,
    b"y": True,
    b"n": False,
    b"yes": True,
    b"no": False,
    b"on": True,
    b"off": False,
    b"1": True,
    b"0": False,
}


def _bool_text_decode(raw: bytes) -> bool:
    value = _BOOL_TEXT.get(raw.strip().lower())
    if value is None:
        raise CodecError(f"invalid bool {raw[:20]!r}")
    return value


def _check_bool(value: bool) -> bool:
    if not isinstance(value, bool):
        raise CodecError(f"expected a bool, got {type(value).__name__}")
    return value


def _bool_text_encode(value: bool) -> bytes:
    return b"t" if _check_bool(value) else b"f"


def _bool_bin_decode(raw: bytes) -> bool:
    if len(raw) != 1:
        raise CodecError(f"expected 1 byte, got {len(raw)}")
    return raw != b"\x00"


def _bool_bin_encode(value: bool) -> bytes:
    return b"\x01" if _check_bool(value) else b"\x00"


# --------------------------------------------------------------------------------------------
# date, timestamp, timestamptz

PG_EPOCH_DATE: Final = date(2000, 1, 1)
PG_EPOCH: Final = datetime(2000, 1, 1)
PG_EPOCH_UTC: Final = datetime(2000, 1, 1, tzinfo=UTC)
_PG_EPOCH_ORDINAL: Final = PG_EPOCH_DATE.toordinal()
_I32 = struct.Struct("!i")
_I64 = struct.Struct("!q")
_DATE_NOBEGIN, _DATE_NOEND = -(2**31), 2**31 - 1
_TS_NOBEGIN, _TS_NOEND = -(2**63), 2**63 - 1
_SPECIAL_TEXT: Final[dict[bytes, PgSpecial]] = {
    b"infinity": PgSpecial.INFINITY,
    b"+infinity": PgSpecial.INFINITY,
    b"-infinity": PgSpecial.NEG_INFINITY,
}
_DATE_RE = re.compile(rb"([0-9]{4,})-([0-9]{2})-([0-9]{2})( BC)?\Z")
_TS_RE = re.compile(
    rb"([0-9]{4,})-([0-9]{2})-([0-9]{2})[ T]([0-9]{2}):([0-9]{2}):([0-9]{2})(?:\.([0-9]{1,6}))?"
    rb"(?:([-+])([0-9]{2})(?::?([0-9]{2})(?::?([0-9]{2}))?)?)?( BC)?\Z"
)
_USEC = timedelta(microseconds=1)
_TZ_CACHE: dict[int, timezone] = {}


def _special(raw: bytes) -> PgSpecial | None:
    return _SPECIAL_TEXT.get(raw.lower()) if raw[:1] in (b"i", b"I", b"-", b"+") else None


def _ymd(year: bytes, month: bytes, day: bytes, bc: bytes | None) -> tuple[int, int, int]:
    if bc:
        raise CodecError("dates before the common era are not supported")
    y = int(year)
    if not 1 <= y <= 9999:
        raise CodecError(f"year {y} is out of the supported range 1-9999")
    return y, int(month), int(day)


def _date_text_decode(raw: bytes) -> date | PgSpecial:
    special = _special(raw)
    if special is not None:
        return special
    m = _DATE_RE.match(raw)
    if m is None:
        raise CodecError(f"invalid date {raw[:40]!r} (DateStyle must be ISO)")
    return date(*_ymd(m[1], m[2], m[3], m[4]))


def _check_date(value: date | PgSpecial) -> date | PgSpecial:
    if isinstance(value, datetime):
        return value.date()
    if not isinstance(value, date | PgSpecial):
        raise CodecError(f"expected a date, got {type(value).__name__}")
    return value


def _date_text_encode(value: date | PgSpecial) -> bytes:
    value = _check_date(value)
    if isinstance(value, PgSpecial):
        return value.value.encode()
    return b"%04d-%02d-%02d" % (value.year, value.month, value.day)


def _date_bin_decode(raw: bytes) -> date | PgSpecial:
    if len(raw) != 4:
        raise CodecError(f"expected 4 bytes, got {len(raw)}")
    days: int = _I32.unpack(raw)[0]
    if days == _DATE_NOEND:
        return PgSpecial.INFINITY
    if days == _DATE_NOBEGIN:
        return PgSpecial.NEG_INFINITY
    ordinal = _PG_EPOCH_ORDINAL + days
    if not 1 <= ordinal <= date.max.toordinal():
        raise CodecError("date is out of the supported range 0001-9999")
    return date.fromordinal(ordinal)


def _date_bin_encode(value: date | PgSpecial) -> bytes:
    value = _check_date(value)
    if value is PgSpecial.INFINITY:
        return _I32.pack(_DATE_NOEND)
    if value is PgSpecial.NEG_INFINITY:
        return _I32.pack(_DATE_NOBEGIN)
    assert isinstance(value, date)
    return _I32.pack(value.toordinal() - _PG_EPOCH_ORDINAL)


def _fixed_tz(seconds: int) -> timezone:
    tz = _TZ_CACHE.get(seconds)
    if tz is None:
        tz = UTC if seconds == 0 else timezone(timedelta(seconds=seconds))
        if len(_TZ_CACHE) < 1024:
            _TZ_CACHE[seconds] = tz
    return tz


def _ts_text_decode(raw: bytes, aware: bool) -> datetime | PgSpecial:
    special = _special(raw)
    if special is not None:
        return special
    m = _TS_RE.match(raw)
    if m is None:
        raise CodecError(f"invalid timestamp {raw[:40]!r} (DateStyle must be ISO)")
    y, mo, d = _ymd(m[1], m[2], m[3], m[12])
    frac = m[7]
    usec = int(frac.ljust(6, b"0")) if frac else 0
    tz: tzinfo | None = None
    if m[8] is not None:
        if not aware:
            raise CodecError("timestamp without time zone has no UTC offset")
        offset = int(m[9]) * 3600 + int(m[10] or 0) * 60 + int(m[11] or 0)
        tz = _fixed_tz(-offset if m[8] == b"-" else offset)
    elif aware:
        tz = UTC
    return datetime(y, mo, d, int(m[4]), int(m[5]), int(m[6]), usec, tz)


def _format_offset(offset: timedelta | None) -> bytes:
    seconds = int(offset.total_seconds()) if offset is not None else 0
    sign = b"-" if seconds < 0 else b"+"
    hours, rest = divmod(abs(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    if secs:
        return b"%s%02d:%02d:%02d" % (sign, hours, minutes, secs)
    if minutes:
        return b"%s%02d:%02d" % (sign, hours, minutes)
    return b"%s%02d" % (sign, hours)


def _format_ts(value: datetime) -> bytes:
    text = b"%04d-%02d-%02d %02d:%02d:%02d" % (
        value.year,
        value.month,
        value.day,
        value.hour,
        value.minute,
        value.second,
    )
    if value.microsecond:
        text += (b".%06d" % value.microsecond).rstrip(b"0")
    return text


def _check_ts(value: datetime | PgSpecial) -> datetime | PgSpecial:
    if not isinstance(value, datetime | PgSpecial):
        raise CodecError(f"expected a datetime, got {type(value).__name__}")
    return value


def _timestamp_text_encode(value: datetime | PgSpecial) -> bytes:
    value = _check_ts(value)
    if isinstance(value, PgSpecial):
        return value.value.encode()
    if value.tzinfo is not None:
        raise CodecError("timestamp without time zone cannot carry a UTC offset")
    return _format_ts(value)


def _timestamptz_text_encode(value: datetime | PgSpecial) -> bytes:
    value = _check_ts(value)
    if isinstance(value, PgSpecial):
        return value.value.encode()
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return _format_ts(value) + _format_offset(value.utcoffset())


def _ts_bin_decode(raw: bytes, aware: bool) -> datetime | PgSpecial:
    if len(raw) != 8:
        raise CodecError(f"expected 8 bytes, got {len(raw)}")
    usec: int = _I64.unpack(raw)[0]
    if usec == _TS_NOEND:
        return PgSpecial.INFINITY
    if usec == _TS_NOBEGIN:
        return PgSpecial.NEG_INFINITY
    try:
        return (PG_EPOCH_UTC if aware else PG_EPOCH) + timedelta(microseconds=usec)
    except OverflowError:
        raise CodecError("timestamp is out of the supported range 0001-9999") from None


def _ts_bin_encode(value: datetime | PgSpecial, aware: bool) -> bytes:
    value = _check_ts(value)
    if value is PgSpecial.INFINITY:
        return _I64.pack(_TS_NOEND)
    if value is PgSpecial.NEG_INFINITY:
        return _I64.pack(_TS_NOBEGIN)
    assert isinstance(value, datetime)
    if aware:
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        delta = value - PG_EPOCH_UTC
    else:
        if value.tzinfo is not None:
            raise CodecError("timestamp without time zone cannot carry a UTC offset")
        delta = value - PG_EPOCH
    return _I64.pack(delta // _USEC)


# --------------------------------------------------------------------------------------------
# uuid


def _uuid_text_decode(raw: bytes) -> uuid.UUID:
    return uuid.UUID(raw.decode("ascii"))


def _check_uuid(value: uuid.UUID) -> uuid.UUID:
    if not isinstance(value, uuid.UUID):
        raise CodecError(f"expected a UUID, got {type(value).__name__}")
    return value


def _uuid_text_encode(value: uuid.UUID) -> bytes:
    return str(_check_uuid(value)).encode("ascii")


def _uuid_bin_decode(raw: bytes) -> uuid.UUID:
    if len(raw) != 16:
        raise CodecError(f"expected 16 bytes, got {len(raw)}")
    return uuid.UUID(bytes=raw)


def _uuid_bin_encode(value: uuid.UUID) -> bytes:
    return _check_uuid(value).bytes


# --------------------------------------------------------------------------------------------
# json, jsonb: the JSON text (not parsed here: only json_mask needs the structure)


def _jsonb_bin_decode(raw: bytes) -> str:
    if raw[:1] != b"\x01":
        raise CodecError(f"unsupported jsonb binary version {raw[:1]!r}")
    return _text_decode(raw[1:])


def _jsonb_bin_encode(value: str) -> bytes:
    return b"\x01" + _text_encode(value)


# --------------------------------------------------------------------------------------------
# bytea

_HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")
_OCTAL = frozenset(b"01234567")


def _bytea_text_decode(raw: bytes) -> bytes:
    if raw[:2] == b"\\x":
        body = raw[2:]
        if not body.strip():
            return b""
        return bytes.fromhex(body.decode("ascii"))
    if b"\\" not in raw:
        return raw
    # Escape format: \\ is a backslash, \ooo an octal byte, anything else is itself.
    out = bytearray()
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if c != 0x5C:
            out.append(c)
            i += 1
        elif raw[i + 1 : i + 2] == b"\\":
            out.append(0x5C)
            i += 2
        elif i + 3 < n and raw[i + 1] in b"0123" and raw[i + 2] in _OCTAL and raw[i + 3] in _OCTAL:
            out.append(int(raw[i + 1 : i + 4], 8))
            i += 4
        else:
            raise CodecError("invalid escape sequence in bytea")
    return bytes(out)


def _check_bytes(value: bytes) -> bytes:
    if not isinstance(value, bytes | bytearray | memoryview):
        raise CodecError(f"expected bytes, got {type(value).__name__}")
    return bytes(value)


def _bytea_text_encode(value: bytes) -> bytes:
    return b"\\x" + _check_bytes(value).hex().encode("ascii")


def _bytea_bin_decode(raw: bytes) -> bytes:
    return bytes(raw)


def _bytea_bin_encode(value: bytes) -> bytes:
    return _check_bytes(value)


# --------------------------------------------------------------------------------------------
# Registry


def _build() -> dict[int, Codec]:
    text = (_text_decode, _text_encode)
    codecs = [
        Codec(TEXT_OID, "text", "text", text, text),
        Codec(VARCHAR_OID, "varchar", "text", text, text),
        Codec(BPCHAR_OID, "bpchar", "text", text, text),
        Codec(NAME_OID, "name", "text", text, text),
        Codec(INT2_OID, "int2", "number", *_int_codecs(INT2_OID, "!h")),
        Codec(INT4_OID, "int4", "number", *_int_codecs(INT4_OID, "!i")),
        Codec(INT8_OID, "int8", "number", *_int_codecs(INT8_OID, "!q")),
        Codec(
            NUMERIC_OID,
            "numeric",
            "number",
            (_numeric_text_decode, _numeric_text_encode),
            (_numeric_bin_decode, _numeric_bin_encode),
        ),
        Codec(FLOAT4_OID, "float4", "number", *_float_codecs(True)),
        Codec(FLOAT8_OID, "float8", "number", *_float_codecs(False)),
        Codec(
            BOOL_OID,
            "bool",
            "bool",
            (_bool_text_decode, _bool_text_encode),
            (_bool_bin_decode, _bool_bin_encode),
        ),
        Codec(
            DATE_OID,
            "date",
            "date",
            (_date_text_decode, _date_text_encode),
            (_date_bin_decode, _date_bin_encode),
        ),
        Codec(
            TIMESTAMP_OID,
            "timestamp",
            "date",
            (lambda raw: _ts_text_decode(raw, False), _timestamp_text_encode),
            (lambda raw: _ts_bin_decode(raw, False), lambda v: _ts_bin_encode(v, False)),
        ),
        Codec(
            TIMESTAMPTZ_OID,
            "timestamptz",
            "date",
            (lambda raw: _ts_text_decode(raw, True), _timestamptz_text_encode),
            (lambda raw: _ts_bin_decode(raw, True), lambda v: _ts_bin_encode(v, True)),
        ),
        Codec(
            UUID_OID,
            "uuid",
            "uuid",
            (_uuid_text_decode, _uuid_text_encode),
            (_uuid_bin_decode, _uuid_bin_encode),
        ),
        Codec(JSON_OID, "json", "json", text, text),
        Codec(JSONB_OID, "jsonb", "json", text, (_jsonb_bin_decode, _jsonb_bin_encode)),
        Codec(
            BYTEA_OID,
            "bytea",
            "bytea",
            (_bytea_text_decode, _bytea_text_encode),
            (_bytea_bin_decode, _bytea_bin_encode),
        ),
    ]
    return {c.oid: c for c in codecs}


#: Every supported type, by OID.
CODECS: Final[dict[int, Codec]] = _build()


def codec_for(type_oid: int) -> Codec | None:
    """The codec of a type OID, or None when pgguard cannot decode that type."""
    return CODECS.get(type_oid)


def parse_decimal(text: str) -> Decimal:
    """A Decimal from text, raising CodecError rather than InvalidOperation."""
    try:
        return Decimal(text)
    except InvalidOperation:
        raise CodecError(f"invalid number {text!r}") from None
