"""The audit record: one per statement, session start/end, auth failure, policy reload, approval.

An :class:`AuditRecord` is a frozen value. The relay fills in what it knows; the
:class:`~pgguard.audit.writer.AuditWriter` stamps ``instance_id``, ``seq``, ``prev_hash`` and
``hash`` (see :mod:`pgguard.audit.chain`). Its JSON form (:meth:`AuditRecord.to_json`) is the
one ``pgguard audit search --json`` prints (SPEC §5), the one the JSON-lines sink writes, and
the one the hash chain is computed over — so a JSON-lines file can be verified on its own.

JSON form: every SPEC §5 key is always present (``null`` when unknown), plus ``seq`` and
``extra``; ``ts`` is ISO-8601 UTC with microseconds (``2024-05-01T12:00:00.123456Z``); the
Python attribute ``class_`` is the JSON key ``class``; tuples are JSON arrays.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from itertools import chain
from operator import attrgetter
from typing import Any, Literal, cast

EventKind = Literal[
    "statement",
    "session_start",
    "session_end",
    "auth_failure",
    "policy_reload",
    "approval_request",
    "approval_decision",
]
PromptSource = Literal["comment", "set", "startup", "jwt"]
ProtocolKind = Literal["simple", "extended"]
DecisionKind = Literal[
    "allow", "deny", "approved", "approval_denied", "approval_expired", "audit_only"
]

EVENTS: tuple[str, ...] = (
    "statement",
    "session_start",
    "session_end",
    "auth_failure",
    "policy_reload",
    "approval_request",
    "approval_decision",
)
PROMPT_SOURCES: tuple[str, ...] = ("comment", "set", "startup", "jwt")
PROTOCOLS: tuple[str, ...] = ("simple", "extended")
DECISIONS: tuple[str, ...] = (
    "allow",
    "deny",
    "approved",
    "approval_denied",
    "approval_expired",
    "audit_only",
)

# The keys of the JSON form, in display order: SPEC §5's keys plus ``seq`` and ``extra``.
JSON_KEYS: tuple[str, ...] = (
    "event",
    "ts",
    "instance_id",
    "seq",
    "session_id",
    "user",
    "email",
    "groups",
    "agent",
    "client_addr",
    "application_name",
    "database",
    "upstream_role",
    "prompt_id",
    "prompt_source",
    "protocol",
    "statement_name",
    "portal",
    "statement",
    "fingerprint",
    "params",
    "class",
    "command",
    "objects",
    "decision",
    "rule",
    "approval_id",
    "masked_columns",
    "rows",
    "sqlstate",
    "duration_ms",
    "prev_hash",
    "hash",
    "extra",
)

# Fields that are indexed in the SQL store (and short by nature): longer values are cut to
# this many characters before a record is sealed, so that a client-chosen prompt id or
# application_name can never make a record unstorable (PostgreSQL's btree row limit).
INDEXED_FIELD_MAX = 512
_INDEXED_FIELDS = ("session_id", "user", "prompt_id", "decision", "fingerprint", "instance_id")
_STR_FIELDS = (
    "instance_id",
    "session_id",
    "user",
    "email",
    "agent",
    "client_addr",
    "application_name",
    "database",
    "upstream_role",
    "prompt_id",
    "prompt_source",
    "protocol",
    "statement_name",
    "portal",
    "statement",
    "fingerprint",
    "class_",
    "command",
    "decision",
    "rule",
    "approval_id",
    "sqlstate",
)
_TUPLE_FIELDS = ("groups", "params", "objects", "masked_columns")


# Characters json.dumps leaves raw that a terminal may act on: escaped as \uXXXX in lines.
_JSON_ESCAPES = {
    c: f"\\u{c:04x}"
    for c in (*range(0x7F, 0xA0), 0x2028, 0x2029, *range(0x202A, 0x202F), *range(0x2066, 0x206A))
}


def format_ts(ts: float) -> str:
    """Epoch seconds → ISO-8601 UTC with microseconds, e.g. ``2024-05-01T12:00:00.123456Z``."""
    # The microseconds rounded as datetime.fromtimestamp rounds them (half to even), so that
    # the text is the one datetime would give; the seconds' text is cached (records of one
    # second share it, and building a datetime costs more than the rest).
    frac, whole = math.modf(ts)
    micros = round(frac * 1e6)
    if micros >= 1_000_000:
        whole += 1.0
        micros -= 1_000_000
    elif micros < 0:
        whole -= 1.0
        micros += 1_000_000
    global _ts_cached
    second, prefix = _ts_cached  # one tuple: a reader never pairs one second with another's
    if whole != second:
        # isoformat ends in "+00:00" for UTC; it is faster than strftime and pads the year
        prefix = datetime.fromtimestamp(whole, tz=UTC).isoformat(timespec="seconds")[:-6]
        _ts_cached = (whole, prefix)
    return f"{prefix}.{micros:06d}Z"


_ts_cached = (math.nan, "")


def parse_ts(value: str | float | int) -> float:
    """ISO-8601 (``Z`` or an offset; naive means UTC) or epoch seconds → epoch seconds."""
    if isinstance(value, bool):
        raise ValueError(f"not a timestamp: {value!r}")
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        dt = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"not an ISO-8601 timestamp: {value!r}") from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


@dataclass(frozen=True, slots=True)
class AuditRecord:
    """One audit event (SPEC §5). ``seq``, ``prev_hash`` and ``hash`` are set by the writer."""

    event: EventKind
    ts: float  # epoch seconds
    instance_id: str = ""
    seq: int | None = None
    session_id: str | None = None
    user: str | None = None
    email: str | None = None
    groups: tuple[str, ...] = ()
    agent: str | None = None
    client_addr: str | None = None
    application_name: str | None = None
    database: str | None = None
    upstream_role: str | None = None
    prompt_id: str | None = None
    prompt_source: PromptSource | None = None
    protocol: ProtocolKind | None = None
    statement_name: str | None = None
    portal: str | None = None
    statement: str | None = None
    fingerprint: str | None = None
    params: tuple[str | None, ...] = ()  # already capped / base64-encoded by the producer
    class_: str | None = None  # JSON key "class"
    command: str | None = None
    objects: tuple[str, ...] = ()  # schema.name
    decision: DecisionKind | None = None
    rule: str | None = None
    approval_id: str | None = None
    masked_columns: tuple[str, ...] = ()
    rows: int | None = None
    sqlstate: str | None = None
    duration_ms: float | None = None
    prev_hash: str | None = None
    hash: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict, hash=False)

    def __post_init__(self) -> None:
        # Cheap coercions so that a record survives a store round trip unchanged: lists become
        # tuples, numbers get the type the stores give back (a stored 2 comes back as 2.0).
        for name in _TUPLE_FIELDS:
            value = getattr(self, name)
            if not isinstance(value, tuple):
                object.__setattr__(self, name, tuple(value) if value is not None else ())
        if not isinstance(self.ts, float):
            object.__setattr__(self, "ts", float(self.ts))
        d = self.duration_ms
        if d is not None and (not isinstance(d, float) or not math.isfinite(d)):
            object.__setattr__(self, "duration_ms", float(d) if math.isfinite(d) else None)
        if self.rows is not None and type(self.rows) is not int:
            object.__setattr__(self, "rows", int(self.rows))
        if self.extra is None:
            object.__setattr__(self, "extra", {})

    # -- JSON ---------------------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The SPEC §5 ``--json`` object (plus ``seq`` and ``extra``): all keys, always."""
        return {
            "event": self.event,
            "ts": format_ts(self.ts),
            "instance_id": self.instance_id,
            "seq": self.seq,
            "session_id": self.session_id,
            "user": self.user,
            "email": self.email,
            "groups": list(self.groups),
            "agent": self.agent,
            "client_addr": self.client_addr,
            "application_name": self.application_name,
            "database": self.database,
            "upstream_role": self.upstream_role,
            "prompt_id": self.prompt_id,
            "prompt_source": self.prompt_source,
            "protocol": self.protocol,
            "statement_name": self.statement_name,
            "portal": self.portal,
            "statement": self.statement,
            "fingerprint": self.fingerprint,
            "params": list(self.params),
            "class": self.class_,
            "command": self.command,
            "objects": list(self.objects),
            "decision": self.decision,
            "rule": self.rule,
            "approval_id": self.approval_id,
            "masked_columns": list(self.masked_columns),
            "rows": self.rows,
            "sqlstate": self.sqlstate,
            "duration_ms": self.duration_ms,
            "prev_hash": self.prev_hash,
            "hash": self.hash,
            "extra": dict(self.extra),
        }

    def to_json_line(self) -> str:
        """One line of ``--json`` output / of the JSON-lines sink (no newline). C1 controls,
        line/paragraph separators and bidi overrides are escaped (the same JSON value), so
        the line is safe to print on a terminal."""
        return json.dumps(self.to_json(), ensure_ascii=False).translate(_JSON_ESCAPES)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AuditRecord:
        """The inverse of :meth:`to_json`. Unknown keys are ignored; missing ones are null."""
        if "event" not in data or "ts" not in data:
            raise ValueError("an audit record needs at least 'event' and 'ts'")
        kwargs: dict[str, Any] = {}
        for f in _FIELDS:
            key = "class" if f == "class_" else f
            if key in data:
                kwargs[f] = data[key]
        kwargs["ts"] = parse_ts(data["ts"])
        if kwargs.get("instance_id") is None:
            kwargs["instance_id"] = ""
        extra = kwargs.get("extra")
        kwargs["extra"] = dict(extra) if isinstance(extra, Mapping) else {}
        return cls(**kwargs)


_FIELDS: tuple[str, ...] = tuple(f.name for f in fields(AuditRecord))


def with_link(
    record: AuditRecord, instance_id: str, seq: int, prev_hash: str, hash_: str
) -> AuditRecord:
    """A copy of ``record`` with its chain fields set (faster than ``dataclasses.replace``,
    which the writer thread would pay for on every record)."""
    new = object.__new__(AuditRecord)
    for name in _FIELDS:
        object.__setattr__(new, name, getattr(record, name))
    object.__setattr__(new, "instance_id", instance_id)
    object.__setattr__(new, "seq", seq)
    object.__setattr__(new, "prev_hash", prev_hash)
    object.__setattr__(new, "hash", hash_)
    return new


def set_link(record: AuditRecord, instance_id: str, seq: int, prev_hash: str, hash_: str) -> None:
    """Set ``record``'s chain fields in place: only for a record nothing else holds (the
    writer process's own), where a copy of 34 fields would cost more than sealing it."""
    object.__setattr__(record, "instance_id", instance_id)
    object.__setattr__(record, "seq", seq)
    object.__setattr__(record, "prev_hash", prev_hash)
    object.__setattr__(record, "hash", hash_)


def clean_str(value: str) -> str:
    """A string any store accepts: no NUL (PostgreSQL text), no lone surrogates (UTF-8)."""
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            value = value.encode("utf-8", "backslashreplace").decode("utf-8")
    return value


def _cap(value: str, limit: int = INDEXED_FIELD_MAX) -> str:
    return value if len(value) <= limit else value[: limit - 1] + "\u2026"


def storable(record: AuditRecord) -> AuditRecord:
    """``record`` made safe to store, before it is sealed (the hash covers the result).

    Strings lose NUL characters and lone surrogates; indexed fields are capped at
    :data:`INDEXED_FIELD_MAX` characters; ``extra`` becomes plain JSON (values JSON cannot
    hold become strings, keys become strings). Returns ``record`` itself when nothing changes.
    """
    extra = record.extra
    plain_extra = not extra or type(extra) is PlainExtra
    if plain_extra and _plain_strings(record):
        return record  # the common case, decided without a copy
    changes: dict[str, Any] = {}
    for name in _STR_FIELDS:
        value = getattr(record, name)
        if value is None:
            continue
        if type(value) is not str:
            value = str(value)
            changes[name] = value
        elif (
            value.isascii()
            and "\x00" not in value
            and (len(value) <= INDEXED_FIELD_MAX or name not in _INDEXED_FIELDS)
        ):
            continue  # the common case, decided without a copy
        cleaned = clean_str(value)
        if name in _INDEXED_FIELDS:
            cleaned = _cap(cleaned)
        if cleaned is not value:
            changes[name] = cleaned
    for name in _TUPLE_FIELDS:
        items = getattr(record, name)
        if any(v is not None and type(v) is not str for v in items):
            changes[name] = tuple(v if v is None else str(v) for v in items)
    if not plain_extra and not (type(extra) is dict and _plain_json(extra)):
        plain = json.loads(json.dumps(extra, default=str, ensure_ascii=True))
        if not isinstance(plain, dict):
            plain = {"value": plain}
        changes["extra"] = plain
    return replace(record, **changes) if changes else record


_str_values = attrgetter(*_STR_FIELDS)
_indexed_values = attrgetter(*_INDEXED_FIELDS)
_tuple_values = attrgetter(*_TUPLE_FIELDS)


_STR_OR_NONE = frozenset({str, type(None)})


def _plain_strings(record: AuditRecord) -> bool:
    """Whether every string field is already storable (str or None; ASCII, no NUL, indexed
    ones short) and every tuple holds only str or None: a few C-level passes instead of a
    Python loop over the fields."""
    values = _str_values(record)
    if not set(map(type, values)) <= _STR_OR_NONE:
        return False
    text = "".join(filter(None, values))
    if not text.isascii() or "\x00" in text:
        return False
    if max(map(len, filter(None, _indexed_values(record))), default=0) > INDEXED_FIELD_MAX:
        return False
    return set(map(type, chain.from_iterable(_tuple_values(record)))) <= _STR_OR_NONE


class PlainExtra(dict[str, Any]):
    """An ``extra`` built by pgguard's own record builder out of str keys and JSON values
    only (no NaN or infinite float), so :func:`storable` need not check it (a recursive walk
    over, e.g., every cell of a session-recording preview, on the writer's hot path) and the
    fast JSON encoder may write it (:mod:`pgguard.audit.jsoncodec`)."""

    __slots__ = ()


def _plain_json(value: object, depth: int = 0) -> bool:
    """Whether ``value`` comes back from a JSON round trip unchanged (and is not too deep)."""
    kind = type(value)
    if kind is str or kind is int or kind is bool or value is None:
        return True
    if kind is float:
        return math.isfinite(value)  # type: ignore[arg-type]
    if depth > 8:
        return False
    if kind is list:
        return all(_plain_json(v, depth + 1) for v in value)  # type: ignore[attr-defined]
    if kind is dict:
        return all(
            type(k) is str and _plain_json(v, depth + 1)
            for k, v in value.items()  # type: ignore[attr-defined]
        )
    return False


def decode_extra(text: str | None) -> dict[str, Any]:
    """The ``extra`` column of a stored record back to a dict."""
    if not text:
        return {}
    value = json.loads(text)
    return cast(dict[str, Any], value) if isinstance(value, dict) else {"value": value}
