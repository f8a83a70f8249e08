"""Session recording (SPEC §5): each statement with a preview of the rows the client saw.

The relay feeds a :class:`PreviewCapture` as a result goes back to the client (after
masking, so the preview shows what the client saw); it keeps at most ``max_rows`` rows and
``max_bytes`` bytes of values, as wire bodies, and counts the rest. The audit writer process
decodes the :class:`RawPreview` into a :class:`RecordedStatement`. Its entries
serialise to JSON for a store (:func:`to_json` / :func:`from_json`), and
:func:`render_transcript` replays them as a psql-like transcript for ``pgguard sessions
show``. Pure: no I/O.

Byte caps count the values' sizes on the wire (NULL counts 0). The preview is always a
prefix of the result: once a row does not fit, it and every later row are dropped and
counted (``truncated``, ``row_count - len(rows)``, ``dropped_bytes``).
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, NamedTuple

from pgguard.protocol.messages import ProtocolError, RowDescription, data_row_values

__all__ = [
    "BINARY_HEX_MAX",
    "PreviewCapture",
    "RawPreview",
    "RecordedError",
    "RecordedStatement",
    "from_json",
    "render_transcript",
    "to_json",
]

JSON_VERSION = 1
# Binary-format values up to this many bytes are shown as ``\x`` + hex, longer ones as
# ``(binary N bytes)``.
BINARY_HEX_MAX = 32

Row = tuple[str | None, ...]


@dataclass(frozen=True, slots=True)
class RecordedError:
    sqlstate: str
    message: str


@dataclass(frozen=True, slots=True)
class RecordedStatement:
    """One statement of a session and the preview of what came back."""

    statement: str
    columns: tuple[str, ...] = ()
    rows: tuple[Row, ...] = ()
    truncated: bool = False
    row_count: int = 0  # rows the client received, recorded or not
    command_tag: str | None = None
    error: RecordedError | None = None
    dropped_bytes: int = 0  # wire bytes of the rows not recorded

    @property
    def dropped_rows(self) -> int:
        return self.row_count - len(self.rows)

    def to_dict(self) -> dict[str, Any]:
        return {
            "statement": self.statement,
            "columns": list(self.columns),
            "rows": [list(row) for row in self.rows],
            "truncated": self.truncated,
            "row_count": self.row_count,
            "command_tag": self.command_tag,
            "error": (
                None
                if self.error is None
                else {"sqlstate": self.error.sqlstate, "message": self.error.message}
            ),
            "dropped_bytes": self.dropped_bytes,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RecordedStatement:
        try:
            error = data.get("error")
            return cls(
                statement=str(data["statement"]),
                columns=tuple(str(name) for name in data.get("columns", ())),
                rows=tuple(
                    tuple(None if value is None else str(value) for value in row)
                    for row in data.get("rows", ())
                ),
                truncated=bool(data.get("truncated", False)),
                row_count=int(data.get("row_count", 0)),
                command_tag=(None if data.get("command_tag") is None else str(data["command_tag"])),
                error=(
                    None
                    if error is None
                    else RecordedError(str(error["sqlstate"]), str(error["message"]))
                ),
                dropped_bytes=int(data.get("dropped_bytes", 0)),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise ValueError(f"not a recorded statement: {exc}") from exc


class RawPreview(NamedTuple):
    """A statement's preview as the relay keeps it: the RowDescription and DataRow bodies the
    client got, undecoded. The audit writer process decodes it (:meth:`decoded`): the
    gateway's event loop only slices bytes."""

    description: bytes  # the RowDescription body
    rows: tuple[bytes, ...]  # the recorded DataRow bodies
    truncated: bool
    row_count: int  # rows the client received, recorded or not
    command_tag: str | None
    dropped_bytes: int

    def decoded(self) -> RecordedStatement:
        """The preview with its columns named and its values rendered as text. A body that
        does not decode (the server's, so not expected) leaves the rows out, truncated."""
        try:
            columns, formats = _description(self.description)
            rows = tuple(
                tuple(_render_value(v, _format_of(formats, i)) for i, v in enumerate(values))
                for values in map(data_row_values, self.rows)
            )
            truncated = self.truncated
        except ProtocolError:
            columns, rows, truncated = (), (), True
        return RecordedStatement(
            "", columns, rows, truncated, self.row_count, self.command_tag, None, self.dropped_bytes
        )


class PreviewCapture:
    """The relay's preview of one result: up to ``max_rows`` rows and ``max_bytes`` bytes of
    values (their wire sizes; NULL counts 0), kept as wire bodies. The preview is a prefix:
    once a row does not fit, it and every later row are only counted."""

    __slots__ = (
        "bytes",
        "description",
        "dropped_bytes",
        "max_bytes",
        "max_rows",
        "row_count",
        "rows",
        "truncated",
    )

    def __init__(self, description: bytes, max_rows: int, max_bytes: int) -> None:
        self.description = description
        self.max_rows = max(max_rows, 0)
        self.max_bytes = max(max_bytes, 0)
        self.rows: list[bytes] = []
        self.bytes = 0
        self.truncated = False
        self.row_count = 0
        self.dropped_bytes = 0

    def row(self, body: bytes) -> None:
        """One DataRow body as the client received it."""
        self.row_count += 1
        # The values' sizes: the body less its 2-byte count and each value's 4-byte length.
        size = max(len(body) - 2 - 4 * int.from_bytes(body[:2], "big"), 0)
        if self.truncated or len(self.rows) >= self.max_rows or self.bytes + size > self.max_bytes:
            self.truncated = True
            self.dropped_bytes += size
            return
        self.bytes += size
        self.rows.append(body)

    def result(self, command_tag: str | None, sent: int | None = None) -> RawPreview:
        """The preview once the statement completed; ``sent``: the rows its tag says were
        sent (rows past the preview are not seen one by one)."""
        truncated, row_count = self.truncated, self.row_count
        if sent is not None and sent > row_count:
            truncated, row_count = True, sent
        return RawPreview(
            self.description,
            tuple(self.rows),
            truncated,
            row_count,
            command_tag,
            self.dropped_bytes,
        )


_DESCRIPTIONS: dict[bytes, tuple[tuple[str, ...], tuple[int, ...]]] = {}


def _description(body: bytes) -> tuple[tuple[str, ...], tuple[int, ...]]:
    """Column names and formats of a RowDescription body, cached (a statement's shape comes
    back with every execution)."""
    known = _DESCRIPTIONS.get(body)
    if known is None:
        names, formats = RowDescription.columns_of(body)
        known = (tuple(names), tuple(formats))
        if len(_DESCRIPTIONS) >= 1024:
            _DESCRIPTIONS.clear()
        _DESCRIPTIONS[body] = known
    return known


def _format_of(formats: tuple[int, ...], index: int) -> int:
    if not formats:
        return 0
    if len(formats) == 1:
        return formats[0]
    return formats[index] if index < len(formats) else 0


def _render_value(value: bytes | None, format_code: int) -> str | None:
    if value is None:
        return None
    if format_code == 0:
        return bytes(value).decode("utf-8", "replace")
    if len(value) <= BINARY_HEX_MAX:
        return "\\x" + bytes(value).hex()
    return f"(binary {len(value)} bytes)"


# ---------------------------------------------------------------------------------------
# JSON


def to_json(entries: Sequence[RecordedStatement]) -> str:
    """Entries as a compact JSON document (``{"version": 1, "statements": [...]}``)."""
    return json.dumps(
        {"version": JSON_VERSION, "statements": [entry.to_dict() for entry in entries]},
        ensure_ascii=False,
        separators=(",", ":"),
    )


def from_json(text: str | bytes) -> list[RecordedStatement]:
    """Entries from :func:`to_json`'s output; ``ValueError`` if it is not one."""
    data = json.loads(text)
    if not isinstance(data, dict) or data.get("version") != JSON_VERSION:
        raise ValueError("not a pgguard session recording (version 1)")
    statements = data.get("statements")
    if not isinstance(statements, list):
        raise ValueError("not a pgguard session recording: no statements")
    return [RecordedStatement.from_dict(item) for item in statements]


# ---------------------------------------------------------------------------------------
# Transcript

_NUMERIC = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?|-?Infinity|NaN")
_CELL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_HEADER_FIELDS = (
    ("user", "user"),
    ("email", "email"),
    ("agent", "agent"),
    ("client_addr", "client"),
    ("application_name", "application"),
    ("database", "database"),
    ("upstream_role", "upstream role"),
)


def render_transcript(entries: Sequence[RecordedStatement], session_meta: Mapping[str, Any]) -> str:
    """A psql-like transcript of a recorded session.

    ``session_meta`` keys: ``session_id``, ``user``, ``database``, ``started_at``,
    ``ended_at`` (``datetime``, epoch seconds or text), and optionally ``email``, ``agent``,
    ``client_addr``, ``application_name``, ``upstream_role``. Each statement is echoed after
    a ``=>`` prompt (continuation lines ``->``), followed by its result table (psql's aligned
    format: centred headers, numeric-looking columns right-aligned, NULL shown empty,
    ``(N rows)``), a note for rows that were not recorded, its ``ERROR:`` or its command tag.
    Control and format characters from the recording are escaped, so a transcript printed on
    a terminal cannot drive it.
    """
    lines = [f"-- pgguard session {_clean(_meta_text(session_meta.get('session_id')))}"]
    for key, label in _HEADER_FIELDS:
        if session_meta.get(key) not in (None, ""):
            lines.append(f"-- {label}: {_clean(_meta_text(session_meta.get(key)))}")
    lines.append(f"-- started: {_meta_text(session_meta.get('started_at'))}")
    ended = session_meta.get("ended_at")
    lines.append(f"-- ended: {_meta_text(ended) if ended is not None else '(still open)'}")
    lines.append("")
    for entry in entries:
        lines.extend(_render_statement(entry))
        lines.append("")
    return "\n".join(lines)


def _render_statement(entry: RecordedStatement) -> list[str]:
    statement_lines = _clean(entry.statement, keep_newlines=True).split("\n")
    lines = ["=> " + statement_lines[0]]
    lines.extend("-> " + line for line in statement_lines[1:])
    if entry.rows or (entry.columns and entry.error is None):
        lines.extend(_render_table(entry.columns, entry.rows))
        if entry.dropped_rows > 0:
            noun = "row" if entry.dropped_rows == 1 else "rows"
            lines.append(f"… {entry.dropped_rows} more {noun} not recorded")
        if entry.error is None:
            noun = "row" if entry.row_count == 1 else "rows"
            lines.append(f"({entry.row_count} {noun})")
    elif entry.dropped_rows > 0:
        noun = "row" if entry.dropped_rows == 1 else "rows"
        lines.append(f"… {entry.dropped_rows} {noun} not recorded")
    if entry.error is not None:
        message_lines = _clean(entry.error.message, keep_newlines=True).split("\n")
        lines.append("ERROR:  " + message_lines[0])
        lines.extend("        " + line for line in message_lines[1:])
        if entry.error.sqlstate:
            lines.append(f"(SQLSTATE {_clean(entry.error.sqlstate)})")
    elif not entry.columns and not entry.rows:
        if entry.command_tag is not None:
            lines.append(_clean(entry.command_tag) or "(empty query)")
        else:
            lines.append("(no result recorded)")
    return lines


def _render_table(columns: Sequence[str], rows: Sequence[Row]) -> list[str]:
    ncols = max([len(columns), *(len(row) for row in rows)])
    names = [_clean(columns[i]) if i < len(columns) else "" for i in range(ncols)]
    cells = [
        [_clean(row[i]) if i < len(row) and row[i] is not None else "" for i in range(ncols)]
        for row in rows
    ]
    widths = [
        max([_width(names[i]), *(_width(cells_row[i]) for cells_row in cells)])
        for i in range(ncols)
    ]
    right = [
        any(i < len(row) and row[i] is not None for row in rows)
        and all(
            _NUMERIC.fullmatch(value) is not None
            for row in rows
            if i < len(row) and (value := row[i]) is not None
        )
        for i in range(ncols)
    ]
    out = [
        "|".join(" " + _center(names[i], widths[i]) + " " for i in range(ncols)).rstrip(),
        "+".join("-" * (widths[i] + 2) for i in range(ncols)),
    ]
    for cells_row in cells:
        out.append(
            "|".join(
                " " + _pad(cells_row[i], widths[i], right=right[i]) + " " for i in range(ncols)
            ).rstrip()
        )
    return out


def _width(text: str) -> int:
    width = 0
    for ch in text:
        if unicodedata.combining(ch):
            continue
        width += 2 if unicodedata.east_asian_width(ch) in ("W", "F") else 1
    return width


def _pad(text: str, width: int, *, right: bool) -> str:
    fill = " " * (width - _width(text))
    return fill + text if right else text + fill


def _center(text: str, width: int) -> str:
    extra = width - _width(text)
    left = extra // 2
    return " " * left + text + " " * (extra - left)


def _clean(text: str | None, *, keep_newlines: bool = False) -> str:
    """Escape control/format characters (``\\n``, ``\\x1b``, ``\\u202e``...)."""
    if text is None:
        return ""
    if keep_newlines:
        text = text.replace("\r\n", "\n")
    out: list[str] = []
    for ch in text:
        if keep_newlines and ch == "\n":
            out.append(ch)
        elif ch in _CELL_ESCAPES:
            out.append(_CELL_ESCAPES[ch])
        elif unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _meta_text(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        moment = value
    elif isinstance(value, int | float) and not isinstance(value, bool):
        moment = datetime.fromtimestamp(value, UTC)
    else:
        return _clean(str(value))
    return moment.isoformat(sep=" ", timespec="seconds")
