"""The mask functions of SPEC §4, on decoded values (see :mod:`pgguard.masking.codecs`). Pure.

:func:`build_masker` turns a parsed :class:`~pgguard.policy.model.MaskFunction` and a column
type into a :class:`Masker`: a callable from a value of the type to a value of the same type
(or ``None``, SQL NULL). :func:`applicable` says why a function cannot apply to a type, for
``pgguard policy check``. A type without a codec is always masked by ``nullify``.

Behaviour, by function (the result is always a valid value of the column's own type):

``nullify``
    NULL, for every type.
``redact``
    A fixed value: ``'****'`` for text types (``char(n)`` keeps its length: ``'****'`` cut or
    padded with spaces), 0 for numbers (numeric keeps its scale: ``0.00``), 1970-01-01 (00:00
    UTC) for dates and timestamps (timestamptz shown in the value's own UTC offset), false,
    the nil UUID, an empty bytea. json/jsonb keep the shape of the document's top level:
    ``{}``, ``[]``, ``"****"``, ``0``, ``false`` or ``null``.
``constant(v)``
    ``v`` read as a value of the column type, as PostgreSQL would read the literal (json:
    ``v`` must be a JSON text; bytea: ``'\\x…'`` hex or the string's UTF-8 bytes). A value that
    cannot be read is reported by :func:`applicable`.
``partial(prefix, pad, suffix)``
    Text: the first ``prefix`` characters, ``pad`` once, the last ``suffix`` characters, as in
    PostgreSQL Anonymizer (``partial(2, '*', 2)``: ``'john.doe'`` → ``'jo*oe'``); the length of
    the value is not kept. A value of ``prefix + suffix`` characters or fewer becomes ``pad``.
``partial_email``
    Text: the first character of the local part, ``****``, and the domain:
    ``alice@example.com`` → ``a****@example.com`` (no ``@``: ``a****``).
``keep_last(n)``
    Text: every letter and digit but the last ``n`` letters and digits becomes ``*``; other
    characters (separators) are kept, and so is the length: ``123-45-6789`` → ``***-**-6789``.
    A value with ``n`` letters and digits or fewer is masked entirely.
``hash(len)``
    HMAC-SHA256 of the value with the configured secret (deterministic: equal values give
    equal results in every session and replica, so joins still work). Text: the first
    ``len`` hex digits. Integers: a number of at most ``len`` digits within the type's range.
    numeric: ``len`` digits (at most the typmod's precision) at the typmod's scale (0 without
    a typmod). float: at most ``len`` digits (float8 15, float4 7). date/timestamp: a
    date/time in 1900-2099 (timestamptz in the value's offset). uuid: a version-4 UUID
    (``len`` ignored). bytea: ``len`` bytes. Values PostgreSQL calls equal hash alike:
    ``1.5`` and ``1.50``, ``'a '`` and ``'a'`` in ``char(n)``, one instant in two offsets.
``pseudo(kind)``
    Text: a fake ``name`` (``Maria Lopez``), ``email`` (``maria.lopez42@example.org``),
    ``city`` or ``phone`` (``+1-415-555-0142``, the fictional 555-01xx range) chosen by HMAC of
    the value from built-in lists: deterministic, like ``hash``.
``generalize(step)``
    Numbers: floored to a multiple of ``step`` (kept within the type's range; integers need a
    step > 1; numeric keeps its scale). ``generalize(unit)``, dates and timestamps: truncated
    to the ``minute``, ``hour``, ``day``, ``week`` (Monday), ``month``, ``quarter``, ``year``
    or ``decade``, as ``date_trunc`` does (timestamptz: in the value's own UTC offset, which
    is kept; date: ``minute``, ``hour`` and ``day`` are refused, they change nothing).
``noise(ratio)``
    Numbers: ``value * (1 + r)``, with ``r`` in ``[-ratio, ratio]`` derived from the HMAC of
    the value (deterministic); integers stay integers, numeric keeps its scale, results are
    clamped to the type's range. Dates and timestamps move by ``r * 365.25`` days. A result
    that would equal the clear value moves by one unit instead (1, the numeric's last digit,
    a float's last bit, a day, a microsecond), so only 0, NaN and infinities come out
    unchanged.
``json_mask(paths)``
    json/jsonb: the values at each path (``$.a.b``, ``$.items[*].email``, ``$[0]``,
    ``$.*``, ``$['key']``) become the string ``"****"``; the rest of the document is kept
    (numbers as written, key order and duplicate keys included). As in PostgreSQL's lax
    jsonpath mode, a key step applied to an array applies to each of its elements.
``regex_redact(pattern, repl)``
    Text: ``re.sub(pattern, repl, value)``.

Text results fit the column: ``char(n)`` values keep their length (cut, or padded with
spaces), ``varchar(n)`` results are cut to ``n`` characters when the typmod is known, ``name``
results to 63 bytes. Infinite dates and timestamps, NaN and infinite numbers pass through
``generalize`` and ``noise`` unchanged (they carry no information those functions hide).
"""

from __future__ import annotations

import json
import math
import re
import struct
import uuid
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta, tzinfo
from decimal import MAX_EMAX, MIN_EMIN, ROUND_FLOOR, ROUND_HALF_EVEN, Context, Decimal
from hashlib import sha256
from typing import Any, Final

from pgguard.masking.codecs import (
    BOOL_OID,
    BPCHAR_OID,
    BYTEA_OID,
    DATE_OID,
    FLOAT4_OID,
    FLOAT8_OID,
    INT2_OID,
    INT4_OID,
    INT8_OID,
    NAME_OID,
    NUMERIC_OID,
    TIMESTAMP_OID,
    TIMESTAMPTZ_OID,
    UUID_OID,
    VARCHAR_OID,
    Codec,
    CodecError,
    PgSpecial,
    codec_for,
    float4_round,
    format_float,
    int_range,
)
from pgguard.policy.model import JSON_PATH_RE, MaskFunction

__all__ = [
    "KEYED_FUNCTIONS",
    "MaskError",
    "MaskSecret",
    "Masker",
    "applicable",
    "build_masker",
    "fallback_note",
]

#: The configured HMAC secret for ``hash``, ``pseudo`` and ``noise``.
MaskSecret = bytes
MaskFn = Callable[[Any], Any]
RawTransform = Callable[[bytes], bytes | None]

#: Functions that need a non-empty secret.
KEYED_FUNCTIONS: Final = frozenset({"hash", "pseudo", "noise"})

_NAMEDATALEN: Final = 63
_EPOCH_UTC: Final = datetime(1970, 1, 1, tzinfo=UTC)
_HASH_DATE_START: Final = date(1900, 1, 1)
_HASH_DATE_DAYS: Final = (date(2100, 1, 1) - _HASH_DATE_START).days
_HASH_TS_START: Final = datetime(1900, 1, 1)
_HASH_TS_USECS: Final = _HASH_DATE_DAYS * 86_400_000_000
_YEAR_DAYS: Final = 365.25
_MASKED_JSON: Final = '"****"'
# Decimal arithmetic that never rounds a numeric's digits (numeric allows 131072 + 16383).
_BIG: Final = Context(prec=200_000, Emax=MAX_EMAX, Emin=MIN_EMIN, rounding=ROUND_HALF_EVEN)

_CATEGORY_NAMES: Final[dict[str, str]] = {
    "text": "text types (text, varchar, char, name)",
    "number": "numbers (int2, int4, int8, numeric, float4, float8)",
    "date": "dates and timestamps (date, timestamp, timestamptz)",
    "json": "json and jsonb",
}
# Which codec categories each function can produce valid values for.
_APPLIES: Final[dict[str, frozenset[str]]] = {
    "nullify": frozenset({"text", "number", "date", "bool", "uuid", "json", "bytea"}),
    "redact": frozenset({"text", "number", "date", "bool", "uuid", "json", "bytea"}),
    "constant": frozenset({"text", "number", "date", "bool", "uuid", "json", "bytea"}),
    "partial": frozenset({"text"}),
    "partial_email": frozenset({"text"}),
    "keep_last": frozenset({"text"}),
    "hash": frozenset({"text", "number", "date", "uuid", "bytea"}),
    "pseudo": frozenset({"text"}),
    "noise": frozenset({"number", "date"}),
    "json_mask": frozenset({"json"}),
    "regex_redact": frozenset({"text"}),
}


class MaskError(ValueError):
    """A mask function that cannot be built for a column (the reason is the message)."""


class Masker:
    """A mask for one column type: ``masker(value)`` → the masked value (None is NULL)."""

    __slots__ = ("_fn", "_raw", "codec", "constant", "function", "nullify", "type_oid")

    def __init__(
        self,
        function: MaskFunction,
        type_oid: int,
        codec: Codec | None,
        fn: MaskFn | None,
        constant: Any = None,
    ) -> None:
        self.function = function
        self.type_oid = type_oid
        self.codec = codec
        self._fn = fn
        #: True when every value becomes NULL (nullify, or a type without a codec).
        self.nullify = fn is None
        #: The result when it does not depend on the value (None: it does).
        self.constant = constant
        self._raw: dict[int, RawTransform] = {}

    def __call__(self, value: Any) -> Any:
        if value is None or self._fn is None:
            return None
        return self._fn(value)

    def raw(self, fmt: int) -> RawTransform:
        """Wire bytes in format ``fmt`` → masked wire bytes (None: NULL). Raises on values
        that fail to decode (the caller replaces them by NULL).

        Every mask is a function of the value alone, so results of short values are
        remembered (a bounded memo per masker and format): result sets repeat values, and
        decoding, masking and encoding cost far more than a dict lookup."""
        found = self._raw.get(fmt)
        if found is None:
            found = self._raw[fmt] = self._memoized(self._build_raw(fmt))
        return found

    def _memoized(self, transform: RawTransform) -> RawTransform:
        if transform is _to_null or self.constant is not None:
            return transform
        memo: dict[bytes, bytes | None] = {}

        get = memo.get

        def memoized(raw: bytes) -> bytes | None:
            out = get(raw, _MISS)
            if out is not _MISS:
                return out  # type: ignore[no-any-return]
            out = transform(raw)  # a failure raises and is not remembered
            if len(raw) <= _MEMO_VALUE_BYTES:
                if len(memo) >= _MEMO_ENTRIES:
                    memo.clear()
                memo[raw] = out
            return out

        return memoized

    def _build_raw(self, fmt: int) -> RawTransform:
        codec, fn = self.codec, self._fn
        if fn is None or codec is None:
            return _to_null
        encode = codec.encoder(fmt)
        if self.constant is not None:
            fixed = encode(self.constant)
            return lambda raw: fixed
        decode = codec.decoder(fmt)
        if codec.category == "text":
            # Inlined text decode/encode: the hot path of most masks. Text functions never
            # return None; a NUL in the result cannot be sent.

            def text_transform(raw: bytes) -> bytes | None:
                out: str = fn(raw.decode("utf-8", "surrogateescape"))
                if "\x00" in out:
                    raise CodecError("text cannot contain NUL characters")
                return out.encode("utf-8", "surrogateescape")

            return text_transform

        def transform(raw: bytes) -> bytes | None:
            value = fn(decode(raw))
            return None if value is None else encode(value)

        return transform

    def __repr__(self) -> str:
        kind = self.codec.name if self.codec is not None else f"oid {self.type_oid}"
        return f"Masker({self.function}, {kind})"


def _to_null(raw: bytes) -> None:
    return None


_MISS: Final[Any] = object()
_MEMO_ENTRIES: Final = 65536
_MEMO_VALUE_BYTES: Final = 256


# --------------------------------------------------------------------------------------------
# Applicability


def applicable(fn: MaskFunction, type_oid: int) -> str | None:
    """Why ``fn`` cannot mask a column of ``type_oid``, or None when it can.

    A type without a codec is masked by NULL whatever the function (see :func:`fallback_note`),
    which is not an error: this returns None for it."""
    codec = codec_for(type_oid)
    if codec is None or fn.name == "nullify":
        return None
    category = codec.category
    if fn.name == "generalize":
        step = fn.args[0] if fn.args else None
        if isinstance(step, str):
            if category != "date":
                return f"generalize({step}) applies to {_CATEGORY_NAMES['date']}, not {codec.name}"
            if codec.oid == DATE_OID and step in ("minute", "hour", "day"):
                return (
                    f"generalize({step}) does not change a date "
                    "(use week, month, quarter, year or decade)"
                )
            return None
        if category != "number":
            return f"generalize(step) applies to {_CATEGORY_NAMES['number']}, not {codec.name}"
        if (
            codec.oid in (INT2_OID, INT4_OID, INT8_OID)
            and isinstance(step, int | float)
            and step <= 1
        ):
            return f"generalize({step}) does not change an integer (use a step > 1)"
        return None
    allowed = _APPLIES.get(fn.name)
    if allowed is None:
        return f"unknown mask function {fn.name!r}"
    if category not in allowed:
        what = " or ".join(_CATEGORY_NAMES.get(c, c) for c in sorted(allowed))
        return f"{fn.name} applies to {what}, not {codec.name}"
    if fn.name == "constant":
        try:
            _parse_constant(fn.args[0], codec)
        except (CodecError, ValueError) as exc:
            return f"constant({fn.args[0]!r}) is not a valid {codec.name}: {exc}"
    return None


def fallback_note(fn: MaskFunction, type_oid: int) -> str | None:
    """A note for ``policy check`` when ``fn`` is replaced by NULL on this type, or None."""
    if fn.name == "nullify" or codec_for(type_oid) is not None:
        return None
    return f"type oid {type_oid} has no codec: {fn} masks its values as NULL"


# --------------------------------------------------------------------------------------------
# Building


def build_masker(fn: MaskFunction, type_oid: int, secret: bytes, *, typmod: int = -1) -> Masker:
    """The masker of ``fn`` for a column of ``type_oid`` (``typmod`` from the RowDescription,
    -1 when unknown). Raises :class:`MaskError` when :func:`applicable` has a reason, or when a
    keyed function (hash, pseudo, noise) has no secret."""
    codec = codec_for(type_oid)
    if codec is None or fn.name == "nullify":
        return Masker(fn, type_oid, codec, None)
    reason = applicable(fn, type_oid)
    if reason is not None:
        raise MaskError(reason)
    if fn.name in KEYED_FUNCTIONS and not secret:
        raise MaskError(f"{fn.name} needs a masking secret, and none is configured")
    builder = _BUILDERS[fn.name]
    return builder(fn, codec, typmod, bytes(secret))


_Builder = Callable[[MaskFunction, Codec, int, bytes], Masker]


def _fitter(codec: Codec, typmod: int) -> Callable[[str, str], str] | None:
    """(result, original) → the result made valid for the text column; None: any text is."""
    if codec.oid == BPCHAR_OID:
        return lambda result, original: result[: len(original)].ljust(len(original))
    if codec.oid == VARCHAR_OID and typmod >= 4:
        limit = typmod - 4
        return lambda result, original: result[:limit]
    if codec.oid == NAME_OID:
        return lambda result, original: _cut_bytes(result, _NAMEDATALEN)
    return None


def _fit_constant(codec: Codec, typmod: int, value: str) -> str:
    fit = _fitter(codec, typmod)
    return value if fit is None else fit(value, value)


def _cut_bytes(text: str, limit: int) -> str:
    while len(text.encode("utf-8", "surrogateescape")) > limit:
        text = text[:-1]
    return text


def _text_masker(fn: MaskFunction, codec: Codec, typmod: int, body: Callable[[str], str]) -> Masker:
    fit = _fitter(codec, typmod)
    if fit is None:
        return Masker(fn, codec.oid, codec, body)

    def fitted(value: str) -> str:
        return fit(body(value), value)

    return Masker(fn, codec.oid, codec, fitted)


# --------------------------------------------------------------------------------------------
# redact, constant


def _redact(fn: MaskFunction, codec: Codec, typmod: int, secret: bytes) -> Masker:
    category = codec.category
    if category == "text":
        if codec.oid == BPCHAR_OID:
            return _text_masker(fn, codec, typmod, lambda v: "****")
        fixed = _fit_constant(codec, typmod, "****")
        return Masker(fn, codec.oid, codec, lambda v: fixed, constant=fixed)
    if category == "json":
        return Masker(fn, codec.oid, codec, _redact_json)
    if codec.oid == NUMERIC_OID:
        return Masker(fn, codec.oid, codec, _zero_numeric)
    if codec.oid == TIMESTAMPTZ_OID:
        return Masker(fn, codec.oid, codec, lambda v: _in_offset_of(_EPOCH_UTC, v))
    constant = _REDACTED[codec.oid]
    return Masker(fn, codec.oid, codec, lambda v: constant, constant=constant)


def _zero_numeric(value: Decimal) -> Decimal:
    exponent = value.as_tuple().exponent
    return Decimal(f"0E{exponent}") if isinstance(exponent, int) and exponent < 0 else Decimal(0)


def _redact_json(value: str) -> str:
    head = value.lstrip()[:1]
    if head == "{":
        return "{}"
    if head == "[":
        return "[]"
    if head == '"':
        return _MASKED_JSON
    if head in ("t", "f"):
        return "false"
    if head == "n":
        return "null"
    return "0"


_REDACTED: Final[dict[int, Any]] = {
    INT2_OID: 0,
    INT4_OID: 0,
    INT8_OID: 0,
    FLOAT4_OID: 0.0,
    FLOAT8_OID: 0.0,
    BOOL_OID: False,
    DATE_OID: date(1970, 1, 1),
    TIMESTAMP_OID: datetime(1970, 1, 1),
    UUID_OID: uuid.UUID(int=0),
    BYTEA_OID: b"",
}


def _in_offset_of(instant: datetime, value: Any) -> datetime:
    """``instant`` shown in the UTC offset of ``value`` (a timestamptz), if it has one."""
    tz: tzinfo | None = value.tzinfo if isinstance(value, datetime) else None
    return instant.astimezone(tz) if tz is not None else instant


def _parse_constant(arg: Any, codec: Codec) -> Any:
    """A policy constant as a value of the codec's type; raises ValueError."""
    if isinstance(arg, tuple):
        raise ValueError("a list is not a single value")
    category = codec.category
    if category == "text":
        text = arg if isinstance(arg, str) else str(arg)
        if "\x00" in text:
            raise ValueError("text cannot contain NUL")
        return text
    if category == "json":
        if isinstance(arg, str):
            try:
                json.loads(arg)
            except ValueError:
                raise ValueError(
                    f"not a JSON text (a JSON string is written with its quotes: "
                    f"constant('{json.dumps(arg)}'))"
                ) from None
            return arg
        return json.dumps(arg)
    if codec.oid in (INT2_OID, INT4_OID, INT8_OID):
        if isinstance(arg, float):
            if not arg.is_integer():
                raise ValueError("not an integer")
            arg = int(arg)
        number: int = int(arg) if isinstance(arg, int) else codec.decode(str(arg).encode(), 0)
        lo, hi = int_range(codec.oid)
        if not lo <= number <= hi:
            raise ValueError("out of range")
        return number
    if codec.oid in (FLOAT4_OID, FLOAT8_OID) and isinstance(arg, int | float):
        real = float(arg)
        return float4_round(real) if codec.oid == FLOAT4_OID else real
    if category == "date" and isinstance(arg, str):
        try:
            return codec.decode(arg.strip().encode(), 0)
        except CodecError:
            parsed = datetime.fromisoformat(arg.strip())
            if codec.oid == DATE_OID:
                return parsed.date()
            if codec.oid == TIMESTAMPTZ_OID:
                return parsed if parsed.tzinfo is not None else parsed.replace(tzinfo=UTC)
            if parsed.tzinfo is not None:
                raise ValueError("timestamp without time zone cannot carry a UTC offset") from None
            return parsed
    return codec.decode(str(arg).encode("utf-8"), 0)


def _constant(fn: MaskFunction, codec: Codec, typmod: int, secret: bytes) -> Masker:
    value = _parse_constant(fn.args[0], codec)
    if codec.category == "text":
        if codec.oid == BPCHAR_OID:
            return _text_masker(fn, codec, typmod, lambda v: value)
        value = _fit_constant(codec, typmod, value)
    if codec.oid == NUMERIC_OID:
        _check_numeric_typmod(value, typmod)
    if codec.oid == TIMESTAMPTZ_OID and isinstance(value, datetime):
        return Masker(fn, codec.oid, codec, lambda v: _in_offset_of(value, v))
    codec.encode(value, 0)  # raises if it cannot be sent
    return Masker(fn, codec.oid, codec, lambda v: value, constant=value)


# --------------------------------------------------------------------------------------------
# Text functions


def _partial(fn: MaskFunction, codec: Codec, typmod: int, secret: bytes) -> Masker:
    prefix, pad, suffix = fn.args
    assert isinstance(prefix, int) and isinstance(pad, str) and isinstance(suffix, int)

    def body(value: str) -> str:
        if codec.oid == BPCHAR_OID:
            value = value.rstrip(" ")
        if len(value) <= prefix + suffix:
            return pad
        return value[:prefix] + pad + (value[-suffix:] if suffix else "")

    return _text_masker(fn, codec, typmod, body)


def _partial_email(fn: MaskFunction, codec: Codec, typmod: int, secret: bytes) -> Masker:
    def body(value: str) -> str:
        if codec.oid == BPCHAR_OID:
            value = value.rstrip(" ")
        local, at, domain = value.rpartition("@")
        if not at:
            local, domain = value, ""
        return local[:1] + "****" + at + domain

    return _text_masker(fn, codec, typmod, body)


def _keep_last(fn: MaskFunction, codec: Codec, typmod: int, secret: bytes) -> Masker:
    (n,) = fn.args
    assert isinstance(n, int)

    def body(value: str) -> str:
        # value[cut:] holds the last n letters and digits.
        cut, kept = len(value), 0
        while cut and kept < n:
            cut -= 1
            if value[cut].isalnum():
                kept += 1
        head = _star_alnum(value[:cut])
        if kept < n or head == value[:cut]:  # n letters and digits or fewer: hide them all
            return _star_alnum(value)
        return head + value[cut:]

    return _text_masker(fn, codec, typmod, body)


_ASCII_ALNUM_STAR: Final = str.maketrans(
    dict.fromkeys("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", "*")
)


def _star_alnum(text: str) -> str:
    """Every letter and digit of ``text`` replaced by ``*``."""
    if text.isascii():
        return text.translate(_ASCII_ALNUM_STAR)
    return "".join("*" if c.isalnum() else c for c in text)


def _regex_redact(fn: MaskFunction, codec: Codec, typmod: int, secret: bytes) -> Masker:
    pattern, repl = fn.args
    assert isinstance(pattern, str) and isinstance(repl, str)
    compiled = re.compile(pattern)
    sub = compiled.sub
    return _text_masker(fn, codec, typmod, lambda value: sub(repl, value))


# --------------------------------------------------------------------------------------------
# Keyed functions: hash, pseudo, noise


class _Keyed:
    """HMAC-SHA256 (RFC 2104) of ``domain NUL canonical-bytes``: the function's name as the
    domain, so ``hash`` and ``pseudo`` of one value are unrelated. The padded key states are
    computed once; each value then costs two hash-object copies."""

    __slots__ = ("_bpchar", "_inner", "_outer")

    def __init__(self, secret: bytes, domain: str, codec: Codec) -> None:
        key = sha256(secret).digest() if len(secret) > _SHA256_BLOCK else secret
        key = key.ljust(_SHA256_BLOCK, b"\x00")
        self._inner = sha256(key.translate(_IPAD))
        self._inner.update(domain.encode() + b"\x00")
        self._outer = sha256(key.translate(_OPAD))
        self._bpchar = codec.oid == BPCHAR_OID

    def digest(self, value: Any, counter: int = 0) -> bytes:
        inner = self._inner.copy()
        inner.update(_canonical(value, self._bpchar))
        if counter:
            inner.update(b"\x00%d" % counter)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def number(self, value: Any) -> int:
        return int.from_bytes(self.digest(value), "big")

    def stream(self, value: Any, length: int) -> bytes:
        out = b""
        counter = 0
        while len(out) < length:
            out += self.digest(value, counter)
            counter += 1
        return out[:length]


_F4: Final = struct.Struct("!f")
_F4_BITS: Final = struct.Struct("!I")
_SHA256_BLOCK: Final = 64
_IPAD: Final = bytes(x ^ 0x36 for x in range(256))
_OPAD: Final = bytes(x ^ 0x5C for x in range(256))


def _canonical(value: object, bpchar: bool = False) -> bytes:
    """The bytes a value is keyed by: equal values of different types give equal bytes
    where PostgreSQL would call them equal (5 = 5.00 = 5.0; 'a ' = 'a' for char(n); the
    same instant in two UTC offsets)."""
    if isinstance(value, str):
        if bpchar:
            value = value.rstrip(" ")
        return value.encode("utf-8", "surrogateescape")
    if isinstance(value, bool):
        return b"t" if value else b"f"
    if isinstance(value, int):
        return b"%d" % value
    if isinstance(value, float):
        if math.isnan(value) or math.isinf(value):
            return format_float(value).encode()
        return _canonical(Decimal(repr(value)))
    if isinstance(value, Decimal):
        if not value.is_finite():
            return str(value).encode()
        if not value:
            return b"0"
        return format(value.normalize(_BIG), "f").encode()
    if isinstance(value, datetime):
        if value.tzinfo is not None:
            value = value.astimezone(UTC)
        return value.isoformat().encode()
    if isinstance(value, date):
        return value.isoformat().encode()
    if isinstance(value, PgSpecial):
        return value.value.encode()
    if isinstance(value, uuid.UUID):
        return value.bytes
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    raise CodecError(f"cannot key a {type(value).__name__}")


def _hash(fn: MaskFunction, codec: Codec, typmod: int, secret: bytes) -> Masker:
    (length,) = fn.args
    assert isinstance(length, int)
    keyed = _Keyed(secret, "hash", codec)
    oid = codec.oid
    mask: MaskFn
    if codec.category == "text":
        return _text_masker(fn, codec, typmod, lambda v: keyed.digest(v).hex()[:length])
    if oid in (INT2_OID, INT4_OID, INT8_OID):
        modulus = min(10**length, int_range(oid)[1] + 1)
        mask = lambda v: keyed.number(v) % modulus  # noqa: E731
    elif oid == NUMERIC_OID:
        digits = length
        precision, scale = _numeric_typmod(typmod)
        if precision is not None:
            digits = min(digits, precision)

        # The typmod's scale (0 without one), not the value's: equal values (1.5 = 1.50)
        # must give equal results.
        exp = min(-scale, 0) if scale is not None else 0

        def mask(v: Decimal) -> Decimal:
            return Decimal(f"{keyed.number(v) % 10**digits}E{exp}")

    elif oid in (FLOAT4_OID, FLOAT8_OID):
        modulus = 10 ** min(length, 7 if oid == FLOAT4_OID else 15)
        mask = lambda v: float(keyed.number(v) % modulus)  # noqa: E731
    elif oid == DATE_OID:

        def mask(v: Any) -> date:
            return _HASH_DATE_START + timedelta(days=keyed.number(v) % _HASH_DATE_DAYS)

    elif codec.category == "date":
        aware = oid == TIMESTAMPTZ_OID

        def mask(v: Any) -> datetime:
            moment = _HASH_TS_START + timedelta(microseconds=keyed.number(v) % _HASH_TS_USECS)
            return _in_offset_of(moment.replace(tzinfo=UTC), v) if aware else moment

    elif codec.category == "uuid":
        mask = lambda v: uuid.UUID(bytes=keyed.digest(v)[:16], version=4)  # noqa: E731
    elif codec.category == "bytea":
        mask = lambda v: keyed.stream(v, length)  # noqa: E731
    else:  # pragma: no cover - applicable() refused it
        raise MaskError(f"hash does not apply to {codec.name}")
    return Masker(fn, oid, codec, mask)


def _words(text: str, sep: str | None = None) -> tuple[str, ...]:
    return tuple(text.split(sep))


_FIRST_NAMES: Final = _words(
    "Maria James Aiko Omar Lena Carlos Priya Noah Fatima Liam Sofia Kenji Amara Lucas Elena "
    "Mateo Chloe Arjun Zara Felix Ingrid Tomas Nadia Hugo Leila Oscar Mei Rafael Anya Diego "
    "Clara Ivan Yara Samuel Hana Marco Freya Idris Julia Emil Rosa Kofi Alma Viktor Nora "
    "Pablo Lucia Dmitri Ines Theo Maya Jonas Selin Bruno Ada Rohan Greta Malik Eva Tariq"
)
_LAST_NAMES: Final = _words(
    "Lopez Smith Tanaka Haddad Novak Silva Patel Johnson Rahman Murphy Rossi Sato Okafor "
    "Martin Petrov Garcia Dubois Sharma Khan Weber Larsen Costa Ivanova Moreau Nasser Berg "
    "Chen Almeida Kowalski Ortega Fischer Jensen Morales Cohen Kim Romano Nilsson Hussain "
    "Schmidt Horvat Alvarez Mensah Lindqvist Popescu Ferreira Yilmaz Andersen Mendes Park "
    "Bianchi Sokolov Vargas Nakamura Brennan Ahmed Keller Soto Lund Varga Reyes Ito Baker"
)
_CITIES: Final = _words(
    "Springfield|Riverton|Lakeside|Fairview|Brookhaven|Millbrook|Oakridge|Cedar Falls|"
    "Maplewood|Ashford|Greenville|Kingsport|Westbury|Eastwood|Northfield|Southport|"
    "Clearwater|Stonebridge|Pinecrest|Hillsdale|Rosedale|Silverton|Bayview|Elmhurst|"
    "Redwood City|Granite Bay|Highland Park|Willowdale|Harborview|Foxborough|Glenwood|"
    "Briarcliff|Sunnyvale|Meadowbrook|Ironwood|Lakewood|Fairhaven|Brightwater|Oakdale|"
    "Summerville|Winterport|Crestview|Ravensworth|Thornbury|Amberley|Kingsbridge|Marlow|"
    "Newhaven|Pembroke|Shelbourne|Wexford|Yarmouth|Dunmore|Ellington|Hartwell|Lockwood",
    "|",
)
_EMAIL_DOMAINS: Final = ("example.com", "example.org", "example.net")


def _pseudo_value(kind: str, n: int) -> str:
    if kind == "city":
        return _CITIES[n % len(_CITIES)]
    if kind == "phone":
        area = 200 + n % 800
        return f"+1-{area}-555-01{(n // 800) % 100:02d}"
    first = _FIRST_NAMES[n % len(_FIRST_NAMES)]
    n //= len(_FIRST_NAMES)
    last = _LAST_NAMES[n % len(_LAST_NAMES)]
    n //= len(_LAST_NAMES)
    if kind == "name":
        return f"{first} {last}"
    domain = _EMAIL_DOMAINS[n % len(_EMAIL_DOMAINS)]
    n //= len(_EMAIL_DOMAINS)
    return f"{first.lower()}.{last.lower()}{n % 100}@{domain}"


def _pseudo(fn: MaskFunction, codec: Codec, typmod: int, secret: bytes) -> Masker:
    (kind,) = fn.args
    assert isinstance(kind, str)
    keyed = _Keyed(secret, f"pseudo:{kind}", codec)
    return _text_masker(fn, codec, typmod, lambda v: _pseudo_value(kind, keyed.number(v)))


def _unit_interval(keyed: _Keyed, value: Any) -> float:
    """A deterministic number in [-1, 1) from the value's HMAC."""
    bits = int.from_bytes(keyed.digest(value)[:7], "big") >> 3  # 53 bits
    return bits / 2.0**52 - 1.0


def _noise(fn: MaskFunction, codec: Codec, typmod: int, secret: bytes) -> Masker:
    (ratio,) = fn.args
    assert isinstance(ratio, int | float)
    ratio = float(ratio)
    keyed = _Keyed(secret, "noise", codec)
    oid = codec.oid
    mask: MaskFn
    if oid in (INT2_OID, INT4_OID, INT8_OID):
        lo, hi = int_range(oid)

        def mask(v: int) -> int:
            r = ratio * _unit_interval(keyed, v)
            result = v + round(v * r)
            if result == v and v:
                result = v + (1 if r >= 0 else -1)
            return int(_clamp_away(result, v, lo, hi, 1))

    elif oid == NUMERIC_OID:
        precision, scale = _numeric_typmod(typmod)

        def mask(v: Decimal) -> Decimal:
            if not v.is_finite() or not v:
                return v
            exponent = v.as_tuple().exponent
            assert isinstance(exponent, int)
            exp = min(exponent, 0)
            r = Decimal(repr(ratio * _unit_interval(keyed, v)))
            quantum = Decimal(f"1E{exp}")
            result = _BIG.multiply(v, _BIG.add(Decimal(1), r)).quantize(
                quantum, rounding=ROUND_HALF_EVEN, context=_BIG
            )
            if result == v:
                result = _BIG.add(v, quantum if r >= 0 else -quantum)
            if precision is not None:
                limit = _BIG.subtract(Decimal(f"1E{precision - (scale or 0)}"), quantum)
                result = _clamp_away(result, v, -limit, limit, quantum)
            return result

    elif oid in (FLOAT4_OID, FLOAT8_OID):
        is4 = oid == FLOAT4_OID

        def mask(v: float) -> float:
            if not math.isfinite(v) or v == 0:
                return v
            r = ratio * _unit_interval(keyed, v)
            result = v * (1 + r)
            if is4:
                result = _float4_or_max(result)
            if result == v or math.isinf(result):  # too small a change, or out of range
                result = v * (1 - math.copysign(ratio, r))
                if is4:
                    result = _float4_or_max(result)
            if result == v:  # subnormal: one unit in the last place, towards zero
                result = _float4_toward_zero(v) if is4 else math.nextafter(v, 0.0)
            return result

    else:
        is_date = oid == DATE_OID

        def mask(v: Any) -> Any:
            if isinstance(v, PgSpecial):
                return v
            r = ratio * _unit_interval(keyed, v)
            if is_date:
                days = round(r * _YEAR_DAYS) or (1 if r >= 0 else -1)
                shift = timedelta(days=days)
            else:
                usecs = round(r * _YEAR_DAYS * 86_400_000_000) or (1 if r >= 0 else -1)
                shift = timedelta(microseconds=usecs)
            try:
                return v + shift  # timestamptz: the same offset, another instant
            except OverflowError:
                return v - shift

    return Masker(fn, oid, codec, mask)


def _float4_toward_zero(value: float) -> float:
    """The float4 next to ``value`` (not 0) on the side of zero."""
    (bits,) = _F4_BITS.unpack(_F4.pack(value))
    result: float = _F4.unpack(_F4_BITS.pack(bits - 1))[0]
    return result


def _float4_or_max(value: float) -> float:
    try:
        return float4_round(value)
    except OverflowError:
        return math.copysign(3.4028234663852886e38, value)


def _clamp_away(result: Any, original: Any, lo: Any, hi: Any, unit: Any) -> Any:
    """``result`` clamped to [lo, hi]; if that makes it the original, one unit the other way."""
    if lo <= result <= hi:
        return result
    result = lo if result < lo else hi
    if result == original:
        result = original - unit if original == hi else original + unit
    return result


# --------------------------------------------------------------------------------------------
# generalize


def _numeric_typmod(typmod: int) -> tuple[int | None, int | None]:
    """numeric(p, s) from a typmod: (p, s), or (None, None)."""
    if typmod < 4:
        return None, None
    value = typmod - 4
    precision = (value >> 16) & 0xFFFF
    scale = value & 0x7FF
    if scale & 0x400:  # negative scales (PostgreSQL 15+)
        scale -= 0x800
    return precision, scale


def _check_numeric_typmod(value: Decimal, typmod: int) -> None:
    precision, scale = _numeric_typmod(typmod)
    if precision is None or not value.is_finite():
        return
    if value.adjusted() >= precision - (scale or 0):
        raise MaskError(f"{value} does not fit numeric({precision}, {scale})")


def _generalize(fn: MaskFunction, codec: Codec, typmod: int, secret: bytes) -> Masker:
    (step,) = fn.args
    oid = codec.oid
    mask: MaskFn
    if isinstance(step, str):
        return Masker(fn, oid, codec, _truncator(step))
    assert isinstance(step, int | float)
    if oid in (INT2_OID, INT4_OID, INT8_OID):
        lo, hi = int_range(oid)
        dstep = _decimal_arg(step)
        int_step = int(step) if float(step).is_integer() else None

        def mask(v: int) -> int:
            if int_step is not None:
                result = (v // int_step) * int_step
                if result < lo:
                    result += int_step
            else:
                q = _floor_div(Decimal(v), dstep)
                result = int(_BIG.multiply(q, dstep).to_integral_value(rounding=ROUND_FLOOR))
                if result < lo:
                    q = _BIG.add(q, Decimal(1))
                    result = int(_BIG.multiply(q, dstep).to_integral_value(rounding=ROUND_FLOOR))
            return max(lo, min(hi, result))

    elif oid == NUMERIC_OID:
        dstep = _decimal_arg(step)
        precision, scale = _numeric_typmod(typmod)

        def mask(v: Decimal) -> Decimal:
            if not v.is_finite():
                return v
            exponent = v.as_tuple().exponent
            assert isinstance(exponent, int)
            quantum = Decimal(f"1E{min(exponent, 0)}")
            quotient = _floor_div(v, dstep)
            result = _BIG.multiply(quotient, dstep)
            if precision is not None and result and result.adjusted() >= precision - (scale or 0):
                result = _BIG.add(result, dstep)  # floored past numeric(p, s): one step back
            return result.quantize(quantum, rounding=ROUND_FLOOR, context=_BIG)

    else:
        fstep = float(step)
        is4 = oid == FLOAT4_OID

        def mask(v: float) -> float:
            if not math.isfinite(v):
                return v
            result = math.floor(v / fstep) * fstep
            return _float4_or_max(result) if is4 else result

    return Masker(fn, oid, codec, mask)


def _floor_div(value: Decimal, step: Decimal) -> Decimal:
    """floor(value / step) for step > 0, exactly. (An inexact ``divide`` at the huge
    precision of ``_BIG`` costs ~150 µs; integer division is exact and fast.)"""
    quotient = _BIG.divide_int(value, step)
    if _BIG.multiply(quotient, step) > value:
        quotient = _BIG.subtract(quotient, Decimal(1))
    return quotient


def _decimal_arg(step: float) -> Decimal:
    return Decimal(repr(step)) if isinstance(step, float) else Decimal(step)


def _truncator(unit: str) -> MaskFn:
    def trunc(v: Any) -> Any:
        if isinstance(v, PgSpecial):
            return v
        if isinstance(v, datetime):
            if unit == "minute":
                return v.replace(second=0, microsecond=0)
            if unit == "hour":
                return v.replace(minute=0, second=0, microsecond=0)
            day = v.replace(hour=0, minute=0, second=0, microsecond=0)
            if unit == "day":
                return day
            return datetime.combine(_trunc_date(day.date(), unit), day.timetz())
        return _trunc_date(v, unit)

    return trunc


def _trunc_date(d: date, unit: str) -> date:
    if unit == "week":
        return d - timedelta(days=d.weekday())
    if unit == "month":
        return d.replace(day=1)
    if unit == "quarter":
        return d.replace(month=3 * ((d.month - 1) // 3) + 1, day=1)
    if unit == "year":
        return d.replace(month=1, day=1)
    if unit == "decade":
        return date(max(1, d.year - d.year % 10), 1, 1)
    return d  # minute, hour, day: a date has nothing finer


# --------------------------------------------------------------------------------------------
# json_mask

_PATH_STEP = re.compile(
    r"""\.(?P<key>[A-Za-z_][A-Za-z0-9_-]*)|\.(?P<anykey>\*)|\[(?P<index>\d+)\]"""
    r"""|\[(?P<anyindex>\*)\]|\['(?P<sq>[^']*)'\]|\["(?P<dq>[^"]*)"\]"""
)

_Step = tuple[str, Any]  # ("key", name) | ("anykey", None) | ("index", n) | ("anyindex", None)


def parse_json_path(path: str) -> tuple[_Step, ...]:
    """``$.items[*].email`` → (("key", "items"), ("anyindex", None), ("key", "email"))."""
    if JSON_PATH_RE.match(path) is None:
        raise ValueError(f"{path!r} is not a JSON path like '$.a', '$.a.b', '$.items[*].id'")
    steps: list[_Step] = []
    pos = 1
    while pos < len(path):
        m = _PATH_STEP.match(path, pos)
        if m is None:  # pragma: no cover - JSON_PATH_RE accepted it
            raise ValueError(f"cannot read {path!r} at {pos}")
        kind = m.lastgroup or ""
        if kind in ("key", "sq", "dq"):
            steps.append(("key", m.group(kind)))
        elif kind == "index":
            steps.append(("index", int(m.group(kind))))
        else:
            steps.append((kind, None))
        pos = m.end()
    return tuple(steps)


class _Number(str):
    """A JSON number kept as written."""

    __slots__ = ()


class _Object(list[tuple[str, Any]]):
    """A JSON object as its (key, value) pairs: order and duplicate keys are kept."""

    __slots__ = ()


_MASKED = object()


def _loads(text: str) -> Any:
    return json.loads(
        text,
        object_pairs_hook=_Object,
        parse_float=_Number,
        parse_int=_Number,
        parse_constant=_Number,
    )


def _dumps(node: Any, out: list[str]) -> None:
    if node is _MASKED:
        out.append(_MASKED_JSON)
    elif type(node) is _Number:
        out.append(node)
    elif isinstance(node, str):
        try:
            out.append(json.dumps(node, ensure_ascii=False))
            out[-1].encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes
            out[-1] = json.dumps(node)
    elif node is True:
        out.append("true")
    elif node is False:
        out.append("false")
    elif node is None:
        out.append("null")
    elif isinstance(node, _Object):
        out.append("{")
        for i, (key, value) in enumerate(node):
            if i:
                out.append(", ")
            _dumps(key, out)
            out.append(": ")
            _dumps(value, out)
        out.append("}")
    else:
        out.append("[")
        for i, value in enumerate(node):
            if i:
                out.append(", ")
            _dumps(value, out)
        out.append("]")


def _mask_path(node: Any, steps: tuple[_Step, ...], i: int) -> Any:
    if i == len(steps):
        return _MASKED
    if node is _MASKED:
        return node
    kind, arg = steps[i]
    if isinstance(node, _Object):
        if kind == "key" or kind == "anykey":
            for j, (key, value) in enumerate(node):
                if kind == "anykey" or key == arg:
                    node[j] = (key, _mask_path(value, steps, i + 1))
        return node
    if isinstance(node, list):
        if kind == "index":
            if arg < len(node):
                node[arg] = _mask_path(node[arg], steps, i + 1)
        elif kind == "anyindex":
            for j, value in enumerate(node):
                node[j] = _mask_path(value, steps, i + 1)
        else:  # lax mode: a key step on an array applies to each element
            for j, value in enumerate(node):
                node[j] = _mask_path(value, steps, i)
        return node
    if kind == "anyindex" or (kind == "index" and arg == 0):
        return _mask_path(node, steps, i + 1)  # lax mode: a scalar is a one-element array
    return node


def _json_mask(fn: MaskFunction, codec: Codec, typmod: int, secret: bytes) -> Masker:
    (paths,) = fn.args
    assert isinstance(paths, tuple)
    parsed = tuple(parse_json_path(p) for p in paths)

    def mask(value: str) -> str:
        try:
            node = _loads(value)
        except ValueError:
            raise CodecError("not a JSON text") from None
        for steps in parsed:
            node = _mask_path(node, steps, 0)
        out: list[str] = []
        _dumps(node, out)
        return "".join(out)

    return Masker(fn, codec.oid, codec, mask)


_BUILDERS: Final[dict[str, _Builder]] = {
    "redact": _redact,
    "constant": _constant,
    "partial": _partial,
    "partial_email": _partial_email,
    "keep_last": _keep_last,
    "hash": _hash,
    "pseudo": _pseudo,
    "generalize": _generalize,
    "noise": _noise,
    "json_mask": _json_mask,
    "regex_redact": _regex_redact,
}
