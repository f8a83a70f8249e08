"""Rewriting result rows: DataRow bodies and COPY TO STDOUT rows (text, csv, binary). Pure.

A :class:`RowMasker` is built once per result description from a plan: per result column,
``(type_oid, format, masker or None)`` (and an optional label for the metric, such as
``public.customers.email``). Only masked columns are decoded and re-encoded; every other byte
of a row is copied as it came. Rows of a result without masked columns should never reach it
(check :attr:`RowMasker.active`).

Fail closed: a masked value that cannot be decoded, masked or encoded becomes NULL (counted in
:attr:`RowMasker.failures`); the clear value is never passed on. A row whose structure does not
match the plan raises :class:`RowFormatError`: the caller must then drop the row (and end the
statement with an error), never forward the original.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, NamedTuple

from pgguard.masking.codecs import codec_for
from pgguard.masking.functions import Masker, RawTransform

__all__ = ["COPY_BINARY_SIGNATURE", "ColumnPlan", "CopyFormat", "RowFormatError", "RowMasker"]

_I16 = struct.Struct("!h")
_I32 = struct.Struct("!i")
_NULL_FIELD: Final = _I32.pack(-1)
COPY_BINARY_SIGNATURE: Final = b"PGCOPY\n\xff\r\n\x00"
_COPY_HEADER = struct.Struct("!11sii")


class RowFormatError(ValueError):
    """A row that does not have the shape the plan expects (column count, lengths)."""


class ColumnPlan(NamedTuple):
    """One result column: its type, its result format (0 text, 1 binary) and its mask."""

    type_oid: int
    format: int
    masker: Masker | Callable[[Any], Any] | None
    label: str = ""


_CopyKind = Literal["text", "csv"]


@dataclass(frozen=True, slots=True)
class CopyFormat:
    """The options of a ``COPY … TO STDOUT`` in text or csv format (PostgreSQL's defaults)."""

    format: _CopyKind = "text"
    delimiter: bytes | None = None  # text: tab; csv: comma
    null: bytes | None = None  # text: \N; csv: the empty string
    quote: bytes = b'"'  # csv only
    escape: bytes | None = None  # csv only; defaults to quote

    @property
    def delim(self) -> bytes:
        if self.delimiter is not None:
            return self.delimiter
        return b"\t" if self.format == "text" else b","

    @property
    def null_string(self) -> bytes:
        if self.null is not None:
            return self.null
        return b"\\N" if self.format == "text" else b""

    @property
    def escape_char(self) -> bytes:
        return self.quote if self.escape is None else self.escape


def _raw_transform(entry: ColumnPlan, fmt: int) -> RawTransform | None:
    masker = entry.masker
    if masker is None:
        return None
    if isinstance(masker, Masker):
        return masker.raw(fmt)
    codec = codec_for(entry.type_oid)
    if codec is None:
        return _to_null
    decode, encode, fn = codec.decoder(fmt), codec.encoder(fmt), masker

    def transform(raw: bytes) -> bytes | None:
        value = fn(decode(raw))
        return None if value is None else encode(value)

    return transform


def _to_null(raw: bytes) -> None:
    return None


class RowMasker:
    """Masks the rows of one result. ``counts[i]``: non-NULL values of column ``i`` masked;
    ``failures[i]``: of those, how many failed and were sent as NULL."""

    __slots__ = (
        "_copy_binary",
        "_copy_text",
        "_count",
        "_transforms",
        "_walk",
        "active",
        "counts",
        "failures",
        "labels",
        "plan",
        "width",
    )

    def __init__(self, plan: Sequence[ColumnPlan | tuple[Any, ...]]) -> None:
        self.plan: tuple[ColumnPlan, ...] = tuple(ColumnPlan(*entry) for entry in plan)
        self.width = len(self.plan)
        self.labels: tuple[str, ...] = tuple(
            e.label or f"column{i + 1}" for i, e in enumerate(self.plan)
        )
        self._transforms: list[RawTransform | None] = [
            _raw_transform(e, e.format) for e in self.plan
        ]
        masked = [i for i, t in enumerate(self._transforms) if t is not None]
        #: False when no column is masked: the rows need no rewriting at all.
        self.active = bool(masked)
        last = masked[-1] if masked else -1
        # The columns a DataRow is walked through: up to the last masked one.
        self._walk = tuple(enumerate(self._transforms[: last + 1]))
        self._count = _I16.pack(self.width)
        self._copy_text: list[RawTransform | None] | None = None
        self._copy_binary: list[RawTransform | None] | None = None
        self.counts = [0] * self.width
        self.failures = [0] * self.width

    # ---------------------------------------------------------------------------- metrics

    def take_counts(self) -> dict[str, int]:
        """Masked values per column label since the last call (for
        ``pgguard_masked_values_total{column}``), and reset the counters."""
        out: dict[str, int] = {}
        for i, n in enumerate(self.counts):
            if n:
                out[self.labels[i]] = out.get(self.labels[i], 0) + n
                self.counts[i] = 0
        return out

    # ---------------------------------------------------------------------------- DataRow

    def mask_datarow(self, body: bytes) -> bytes:
        """A DataRow message body (int16 count, then per column int32 length and bytes, -1
        for NULL) with the masked columns rewritten. Raises RowFormatError."""
        if body[:2] != self._count:
            raise RowFormatError(
                f"DataRow has {_I16.unpack_from(body)[0] if len(body) >= 2 else 0} columns, "
                f"the description {self.width}"
            )
        parts, copied = self._rewrite(body, 0, 2, self._walk)
        if not parts:
            return body
        parts.append(body[copied:])
        return b"".join(parts)

    def mask_message(self, buf: bytes, pos: int, end: int) -> bytes | None:
        """The DataRow message ``buf[pos:end]`` (type byte and length included) with the
        masked columns rewritten, or None when no value needed it (all NULL). Raises
        RowFormatError. Avoids copying the row before and after, as ``mask_datarow`` would."""
        if buf[pos + 5 : pos + 7] != self._count:
            raise RowFormatError("DataRow does not have the description's column count")
        parts, copied = self._rewrite(buf, pos + 5, pos + 7, self._walk, end)
        if not parts:
            return None
        parts.append(buf[copied:end])
        length = 4
        for part in parts:
            length += len(part)
        parts[0:0] = (b"D", _I32.pack(length))
        return b"".join(parts)

    def _rewrite(
        self,
        buf: bytes,
        base: int,
        pos: int,
        walk: tuple[tuple[int, RawTransform | None], ...],
        size: int = -1,
    ) -> tuple[list[bytes], int]:
        """Rewrite the fields of the row at ``base`` (its first field at ``pos``, the row
        ending at ``size``, default the end of ``buf``) for the columns in ``walk``. Returns
        the pieces from ``base`` to the end of the last rewritten field, and where that is
        (``base`` when nothing was rewritten)."""
        parts: list[bytes] = []
        copied = base  # buf[copied:pos] is not in parts yet
        if size < 0:
            size = len(buf)
        unpack = _I32.unpack_from
        pack = _I32.pack
        counts = self.counts
        try:
            for i, transform in walk:
                length = unpack(buf, pos)[0]
                if transform is None or length < 0:
                    pos += 4 + length if length > 0 else 4
                    continue
                end = pos + 4 + length
                if end > size:
                    raise RowFormatError("row: field runs past the end of the message")
                counts[i] += 1
                try:
                    new = transform(buf[pos + 4 : end])
                except Exception:
                    new = None
                    self.failures[i] += 1
                parts.append(buf[copied:pos])
                parts.append(_NULL_FIELD if new is None else pack(len(new)) + new)
                copied = pos = end
        except struct.error:
            raise RowFormatError("row: message too short") from None
        if pos > size:
            raise RowFormatError("row: field runs past the end of the message")
        return parts, copied

    # ---------------------------------------------------------------------------- COPY

    def _copy_transforms(self, fmt: int) -> list[RawTransform | None]:
        if fmt == 0:
            if self._copy_text is None:
                self._copy_text = [_raw_transform(e, 0) for e in self.plan]
            return self._copy_text
        if self._copy_binary is None:
            self._copy_binary = [_raw_transform(e, 1) for e in self.plan]
        return self._copy_binary

    def mask_copy_line(
        self,
        line: bytes,
        fmt: _CopyKind | CopyFormat = "text",
        *,
        delimiter: bytes | None = None,
        null: bytes | None = None,
        quote: bytes = b'"',
        escape: bytes | None = None,
    ) -> bytes:
        """One row of ``COPY … TO STDOUT`` in text or csv format (one CopyData message, with
        its line end) with the masked columns rewritten. Values are read and written in text
        format whatever the plan's formats say. A csv ``HEADER`` line must not be passed in.
        Assumes an ASCII-compatible client encoding (UTF-8, LATIN1…, not SJIS/BIG5).
        Raises RowFormatError."""
        options = (
            fmt if isinstance(fmt, CopyFormat) else CopyFormat(fmt, delimiter, null, quote, escape)
        )
        if not self.active:
            return line
        transforms = self._copy_transforms(0)
        if options.format == "csv":
            return _mask_csv_line(self, line, options, transforms)
        return _mask_text_line(self, line, options, transforms)

    def mask_copy_binary(self, data: bytes) -> bytes:
        """One CopyData message of a binary ``COPY … TO STDOUT`` (the header, whole tuples,
        the -1 trailer, as PostgreSQL sends them) with the masked columns rewritten in binary
        format. A tuple split across messages raises RowFormatError."""
        if not self.active:
            return data
        walk = tuple(enumerate(self._copy_transforms(1)))
        out: list[bytes] = []
        pos = 0
        if data.startswith(COPY_BINARY_SIGNATURE):
            if len(data) < _COPY_HEADER.size:
                raise RowFormatError("binary COPY header too short")
            _sig, _flags, ext = _COPY_HEADER.unpack_from(data)
            pos = _COPY_HEADER.size + ext
            if ext < 0 or pos > len(data):
                raise RowFormatError("binary COPY header extension too long")
            out.append(data[:pos])
        size = len(data)
        while pos < size:
            if pos + 2 > size:
                raise RowFormatError("binary COPY: tuple too short")
            (count,) = _I16.unpack_from(data, pos)
            if count == -1:
                out.append(data[pos : pos + 2])
                pos += 2
                continue
            if count != self.width:
                raise RowFormatError(
                    f"binary COPY tuple has {count} columns, the description {self.width}"
                )
            parts, copied = self._rewrite(data, pos, pos + 2, walk)
            end = _tuple_end(data, pos + 2, self.width)
            out.extend(parts)
            out.append(data[copied:end])
            pos = end
        return b"".join(out)


def _tuple_end(buf: bytes, pos: int, width: int) -> int:
    for _ in range(width):
        if pos + 4 > len(buf):
            raise RowFormatError("binary COPY: tuple too short")
        (length,) = _I32.unpack_from(buf, pos)
        pos += 4 + max(length, 0)
    if pos > len(buf):
        raise RowFormatError("binary COPY: field runs past the end of the message")
    return pos


# --------------------------------------------------------------------------------------------
# COPY text format

_TEXT_UNESCAPE: Final[dict[int, int]] = {
    ord("b"): 0x08,
    ord("f"): 0x0C,
    ord("n"): 0x0A,
    ord("r"): 0x0D,
    ord("t"): 0x09,
    ord("v"): 0x0B,
}
_TEXT_ESCAPE: Final[dict[int, bytes]] = {
    0x08: b"\\b",
    0x0C: b"\\f",
    0x0A: b"\\n",
    0x0D: b"\\r",
    0x09: b"\\t",
    0x0B: b"\\v",
    0x5C: b"\\\\",
}
_OCTAL_DIGITS = b"01234567"
_HEX_DIGITS = b"0123456789abcdefABCDEF"


def _line_end(line: bytes) -> int:
    """Where the row's line terminator starts (len(line) when there is none)."""
    if line.endswith(b"\r\n"):
        return len(line) - 2
    if line.endswith(b"\n") or line.endswith(b"\r"):
        return len(line) - 1
    return len(line)


def _split_text(body: bytes, delim: int) -> list[bytes]:
    if 0x5C not in body:
        return body.split(bytes((delim,)))
    fields: list[bytes] = []
    start = i = 0
    n = len(body)
    while i < n:
        c = body[i]
        if c == 0x5C:
            i += 2
            continue
        if c == delim:
            fields.append(body[start:i])
            start = i + 1
        i += 1
    fields.append(body[start:])
    return fields


def copy_text_unescape(field: bytes) -> bytes:
    """A COPY text field's value: backslash escapes undone (as COPY FROM reads them)."""
    if 0x5C not in field:
        return field
    out = bytearray()
    i, n = 0, len(field)
    while i < n:
        c = field[i]
        if c != 0x5C or i + 1 >= n:
            out.append(c)
            i += 1
            continue
        nxt = field[i + 1]
        i += 2
        if nxt in _OCTAL_DIGITS:
            j = i
            while j < n and j < i + 2 and field[j] in _OCTAL_DIGITS:
                j += 1
            out.append(int(field[i - 1 : j], 8) & 0xFF)
            i = j
        elif nxt == 0x78 and i < n and field[i] in _HEX_DIGITS:  # \xh or \xhh
            j = i + 1 if i + 1 < n and field[i + 1] in _HEX_DIGITS else i
            out.append(int(field[i : j + 1], 16))
            i = j + 1
        else:
            out.append(_TEXT_UNESCAPE.get(nxt, nxt))
    return bytes(out)


def copy_text_escape(value: bytes, delim: int) -> bytes:
    """A value as COPY TO writes it in text format."""
    out = bytearray()
    for c in value:
        escaped = _TEXT_ESCAPE.get(c)
        if escaped is not None:
            out += escaped
        elif c == delim:
            out.append(0x5C)
            out.append(c)
        else:
            out.append(c)
    return bytes(out)


def _check_width(masker: RowMasker, fields: list[Any]) -> None:
    if len(fields) != masker.width:
        raise RowFormatError(f"COPY row has {len(fields)} columns, the description {masker.width}")


def _apply(masker: RowMasker, i: int, transform: RawTransform, value: bytes) -> bytes | None:
    masker.counts[i] += 1
    try:
        return transform(value)
    except Exception:
        masker.failures[i] += 1
        return None


def _mask_text_line(
    masker: RowMasker, line: bytes, options: CopyFormat, transforms: list[RawTransform | None]
) -> bytes:
    delim = options.delim
    if len(delim) != 1:
        raise RowFormatError("COPY delimiter must be a single byte")
    null = options.null_string
    end = _line_end(line)
    fields = _split_text(line[:end], delim[0])
    _check_width(masker, fields)
    for i, transform in enumerate(transforms):
        if transform is None or fields[i] == null:
            continue
        new = _apply(masker, i, transform, copy_text_unescape(fields[i]))
        fields[i] = null if new is None else copy_text_escape(new, delim[0])
    return delim.join(fields) + line[end:]


# --------------------------------------------------------------------------------------------
# COPY csv format


def _split_csv(body: bytes, delim: int, quote: int, escape: int) -> list[tuple[bytes, bool]]:
    """The fields of a csv row: (value with quoting undone, whether any of it was quoted)."""
    if quote not in body:
        return [(f, False) for f in body.split(bytes((delim,)))]
    fields: list[tuple[bytes, bool]] = []
    value = bytearray()
    quoted = in_quotes = False
    i, n = 0, len(body)
    while i < n:
        c = body[i]
        if in_quotes:
            if c == escape and i + 1 < n and body[i + 1] in (escape, quote):
                value.append(body[i + 1])
                i += 2
                continue
            if c == quote:
                in_quotes = False
            else:
                value.append(c)
        elif c == quote:
            in_quotes = quoted = True
        elif c == delim:
            fields.append((bytes(value), quoted))
            value.clear()
            quoted = False
        else:
            value.append(c)
        i += 1
    if in_quotes:
        raise RowFormatError("COPY csv row ends inside a quoted field")
    fields.append((bytes(value), quoted))
    return fields


def _csv_field(value: bytes, options: CopyFormat, force: bool, single: bool) -> bytes:
    quote, escape, delim = options.quote, options.escape_char, options.delim
    if not force:
        force = (
            value == options.null_string
            or (single and value == b"\\.")
            or delim in value
            or quote in value
            or b"\n" in value
            or b"\r" in value
        )
    if not force:
        return value
    out = bytearray(quote)
    q, e = quote[0], escape[0]
    for c in value:
        if c in (q, e):
            out += escape
        out.append(c)
    out += quote
    return bytes(out)


def _mask_csv_line(
    masker: RowMasker, line: bytes, options: CopyFormat, transforms: list[RawTransform | None]
) -> bytes:
    delim, quote, escape = options.delim, options.quote, options.escape_char
    if len(delim) != 1 or len(quote) != 1 or len(escape) != 1:
        raise RowFormatError("COPY delimiter, quote and escape must be single bytes")
    null = options.null_string
    # The row's line end (a \r or \n inside a value is always quoted, so a row ending in
    # \r\n has a CRLF line end).
    end = _line_end(line)
    body = line[:end]
    fields = _split_csv(body, delim[0], quote[0], escape[0])
    _check_width(masker, fields)
    raw_fields = _raw_csv_fields(body, delim[0], quote[0], escape[0])
    single = masker.width == 1
    for i, transform in enumerate(transforms):
        if transform is None:
            continue
        value, quoted = fields[i]
        if not quoted and value == null:
            continue
        new = _apply(masker, i, transform, value)
        raw_fields[i] = null if new is None else _csv_field(new, options, quoted, single)
    return delim.join(raw_fields) + line[end:]


def _raw_csv_fields(body: bytes, delim: int, quote: int, escape: int) -> list[bytes]:
    """The fields of a csv row as written (quotes included), to copy unmasked ones as is."""
    if quote not in body:
        return body.split(bytes((delim,)))
    fields: list[bytes] = []
    start = i = 0
    n = len(body)
    in_quotes = False
    while i < n:
        c = body[i]
        if in_quotes:
            if c == escape and i + 1 < n and body[i + 1] in (escape, quote):
                i += 2
                continue
            if c == quote:
                in_quotes = False
        elif c == quote:
            in_quotes = True
        elif c == delim:
            fields.append(body[start:i])
            start = i + 1
        i += 1
    fields.append(body[start:])
    return fields
