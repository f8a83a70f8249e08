"""Reading the trail, for the CLI: ``audit search``, ``audit tail``, ``audit verify``.

Everything here returns text (or yields records); the CLI prints it and picks the exit status.
Text that came from clients (statements, names, prompt ids) is escaped before it reaches a
terminal: control and format characters are shown as ``\\xNN`` / ``\\uNNNN``, so a statement
cannot drive the reviewer's terminal. ``--json`` lines are real JSON, with C1 controls and
bidirectional overrides escaped as well.
"""

from __future__ import annotations

import itertools
import re
import shutil
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from pgguard.audit.chain import ChainVerifier, Link, VerifyResult
from pgguard.audit.records import AuditRecord, format_ts, parse_ts
from pgguard.audit.store import SqlStore, read_jsonl
from pgguard.config import parse_duration

# -- times ---------------------------------------------------------------------------------


def parse_time(value: str | float | datetime | None, *, now: float | None = None) -> float | None:
    """A ``--since`` / ``--until`` value → epoch seconds.

    ``1h``, ``30m``, ``2d``, ``90s``, ``250ms`` or a bare number of seconds mean that long
    before ``now``; ``now`` means now; otherwise an ISO-8601 date or timestamp
    (``2024-05-01``, ``2024-05-01T12:00:00Z``, ``2024-05-01 12:00+02:00``; no offset = UTC).
    """
    if value is None:
        return None
    if isinstance(value, datetime):
        return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()
    if isinstance(value, int | float) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, str):
        raise ValueError(f"not a time: {value!r}")
    current = time.time() if now is None else now
    text = value.strip()
    if text.lower() == "now":
        return current
    try:
        seconds = parse_duration(text)
    except ValueError:
        pass
    else:
        return current - float(seconds)
    try:
        return parse_ts(text)
    except ValueError:
        raise ValueError(
            f"not a time: {value!r} (use a duration such as 1h or 30m, or an ISO-8601 "
            f"timestamp such as 2024-05-01T12:00:00Z)"
        ) from None


def search_store(
    store: SqlStore,
    *,
    since: str | float | datetime | None = None,
    until: str | float | datetime | None = None,
    now: float | None = None,
    **filters: object,
) -> list[AuditRecord]:
    """:meth:`SqlStore.search` with ``since`` / ``until`` as the CLI takes them.

    Without an explicit ``order``, a ``limit`` keeps the *newest* matching records (what a
    reviewer looking at ``--limit 50`` wants), still returned oldest first.
    """
    lo, hi = parse_time(since, now=now), parse_time(until, now=now)
    table = filters.get("table")
    if isinstance(table, str):
        filters["table"] = table_name(table)
    if "order" not in filters and filters.get("limit") is not None:
        newest = store.search(since=lo, until=hi, order="desc", **filters)  # type: ignore[arg-type]
        newest.reverse()
        return newest
    return store.search(since=lo, until=hi, **filters)  # type: ignore[arg-type]


def table_name(text: str) -> str:
    """A ``--table`` value as records name tables: each dot-separated part folded to lower
    case as SQL folds an unquoted name, or kept as written inside double quotes
    (``public.Orders`` → ``public.orders``; ``"Sales"."Q1"`` → ``Sales.Q1``)."""
    parts: list[str] = []
    for part in re.findall(r'"(?:[^"]|"")*"|[^.]+', text.strip()):
        if part.startswith('"') and part.endswith('"') and len(part) >= 2:
            parts.append(part[1:-1].replace('""', '"'))
        else:
            parts.append(part.strip().lower())
    return ".".join(parts)


def search_page(
    store: SqlStore, *, limit: int, **filters: object
) -> tuple[list[AuditRecord], bool]:
    """:func:`search_store` with a ``limit`` (at least 1), and whether more records match:
    one record more than ``limit`` is read to know it."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    records = search_store(store, limit=limit + 1, **filters)  # type: ignore[arg-type]
    if len(records) <= limit:
        return records, False
    if "order" in filters:
        return records[:limit], True  # the extra one is the last of that order
    return records[1:], True  # the newest kept, oldest first: the extra one is the oldest


def more_note(shown: int, noun: str = "record") -> str:
    """The footer of a listing cut by its limit."""
    return f"({shown} {noun}{'s' if shown != 1 else ''}; more match: use --limit)"


# -- output --------------------------------------------------------------------------------


def json_line(record: AuditRecord) -> str:
    """One ``--json`` line: the record's JSON form, safe to print on a terminal."""
    return record.to_json_line()


def search_text(
    records: Iterable[AuditRecord],
    as_json: bool = False,
    *,
    width: int | None = None,
    more: bool = False,
) -> str:
    """The output of ``audit search``: a table, or one JSON object per line. ``more``: the
    limit cut the list (the table's footer says so; JSON lines stay records only)."""
    if as_json:
        return "".join(json_line(r) + "\n" for r in records)
    return render_table(list(records), width=width, more=more)


def terminal_text(value: object, *, limit: int | None = None) -> str:
    """``value`` on one line with control/format characters escaped, cut to ``limit``."""
    if value is None:
        return ""
    text = str(value)
    out: list[str] = []
    space = False
    for ch in text:
        if ch in " \t\r\n\f\v":
            if not space:
                out.append(" ")
            space = True
            continue
        space = False
        if ch.isprintable():
            out.append(ch)
        elif unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp", "Co", "Cn"):
            code = ord(ch)
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    result = "".join(out).strip()
    if limit is not None and len(result) > limit:
        result = result[: max(limit - 1, 0)] + "\u2026"
    return result


_COLUMNS: tuple[tuple[str, Callable[[AuditRecord], object], int], ...] = (
    # header, value, cap on width
    ("time (UTC)", lambda r: format_ts(r.ts)[:19].replace("T", " "), 19),
    ("user", lambda r: r.user, 24),
    ("prompt", lambda r: r.prompt_id, 20),
    ("decision", lambda r: r.decision if r.event == "statement" else f"({r.event})", 19),
    ("rule", lambda r: r.rule, 20),
    ("class", lambda r: r.class_, 8),
    ("rows", lambda r: r.rows, 9),
    ("ms", lambda r: None if r.duration_ms is None else f"{r.duration_ms:.1f}", 9),
)
_RIGHT = frozenset(("rows", "ms"))


def _statement_cell(r: AuditRecord) -> object:
    if r.statement is not None:
        return r.statement
    if r.event != "statement":
        details = ", ".join(f"{k}={v}" for k, v in sorted(r.extra.items()))
        return details or r.sqlstate
    return None


def render_table(
    records: Sequence[AuditRecord], *, width: int | None = None, more: bool = False
) -> str:
    """A psql-like table of records; the statement column takes the rest of the width."""
    if width is None:
        width = shutil.get_terminal_size((140, 24)).columns
    headers = [h for h, _, _ in _COLUMNS] + ["statement"]
    rows = [
        [terminal_text(get(r), limit=cap) for _, get, cap in _COLUMNS]
        + [terminal_text(_statement_cell(r))]
        for r in records
    ]
    widths = [max([len(headers[i]), *(len(row[i]) for row in rows)]) for i in range(len(headers))]
    fixed = sum(widths[:-1]) + 3 * (len(widths) - 1) + 1
    widths[-1] = max(min(widths[-1], width - fixed), 20)
    for row in rows:
        if len(row[-1]) > widths[-1]:
            row[-1] = row[-1][: widths[-1] - 1] + "\u2026"

    def line(cells: Sequence[str]) -> str:
        parts = []
        for i, cell in enumerate(cells):
            right = headers[i] in _RIGHT
            parts.append(cell.rjust(widths[i]) if right else cell.ljust(widths[i]))
        return (" " + " | ".join(parts)).rstrip()

    out = [line([h.center(w) for h, w in zip(headers, widths, strict=True)])]
    out.append("-" + "-+-".join("-" * w for w in widths) + "-")
    out.extend(line(row) for row in rows)
    n = len(records)
    out.append(more_note(n) if more else f"({n} record{'s' if n != 1 else ''})")
    return "\n".join(out) + "\n"


# -- tail ----------------------------------------------------------------------------------


def tail(
    store: SqlStore,
    *,
    follow: bool = True,
    last: int = 10,
    poll_interval: float = 0.5,
    idle_timeout: float | None = None,
    hole_timeout: float = 10.0,
    sleep: Callable[[float], None] = time.sleep,
) -> Iterator[AuditRecord]:
    """The last ``last`` records, then (``follow``) every new one as it is stored.

    The starting point is taken when ``tail`` is called (not at the first ``next``). New
    records are found by row id. With several pgguard replicas writing to one PostgreSQL
    store, a row id can become visible after a higher one (transactions commit in any
    order), so ids skipped over are looked for again for ``hole_timeout`` seconds.
    ``idle_timeout`` stops following after that long without a new record (None: never).
    """
    initial = store.last(last) if last > 0 else []
    position = initial[-1][0] if initial else store.max_position()
    holes: dict[int, float] = {}  # skipped row id -> give up at (monotonic)
    _note_holes(holes, [pos for pos, _ in initial], hole_timeout)
    return _follow(
        store,
        [r for _, r in initial],
        position,
        holes,
        follow=follow,
        poll_interval=poll_interval,
        idle_timeout=idle_timeout,
        hole_timeout=hole_timeout,
        sleep=sleep,
    )


def _note_holes(holes: dict[int, float], positions: Sequence[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    for before, after in itertools.pairwise(positions):
        if 1 < after - before <= 1000:
            for missing in range(before + 1, after):
                holes[missing] = deadline


def _follow(
    store: SqlStore,
    initial: list[AuditRecord],
    position: int,
    holes: dict[int, float],
    *,
    follow: bool,
    poll_interval: float,
    idle_timeout: float | None,
    hole_timeout: float,
    sleep: Callable[[float], None],
) -> Iterator[AuditRecord]:
    yield from initial
    if not follow:
        return
    quiet_since = time.monotonic()
    while True:
        got = False
        page = store.after(position, limit=1000)
        if page:
            _note_holes(holes, [position] + [pos for pos, _ in page], hole_timeout)
            for pos, record in page:
                holes.pop(pos, None)
                position = max(position, pos)
                got = True
                yield record
        if holes:
            for pos, record in store.at(holes):
                holes.pop(pos, None)
                got = True
                yield record
            now = time.monotonic()
            for pos in [p for p, deadline in holes.items() if deadline < now]:
                del holes[pos]
        if got:
            quiet_since = time.monotonic()
            continue
        if idle_timeout is not None and time.monotonic() - quiet_since >= idle_timeout:
            return
        sleep(poll_interval)


# -- verify --------------------------------------------------------------------------------


def verify_report(result: VerifyResult, source: str) -> str:
    """A human report of a verification (the first break of each broken chain)."""
    lines: list[str] = []
    if result.ok:
        lines.append(
            f"OK: {source}: {result.records} record(s) in {len(result.chains)} chain(s), no break"
        )
    else:
        lines.append(
            f"BROKEN: {source}: {len(result.breaks)} of {len(result.chains)} chain(s) broken "
            f"({result.records} record(s) read)"
        )
        for brk in result.breaks:
            lines.append("  " + terminal_text(brk.describe()))
    broken = {brk.instance_id for brk in result.breaks}
    for chain in result.chains:
        label = "last good link" if chain.instance_id in broken else "verified head"
        head = f"seq {chain.head.seq}, hash {chain.head.hash}" if chain.head else "none"
        lines.append(
            f"  chain {terminal_text(chain.instance_id)!r}: {chain.records} record(s), "
            f"{label}: {head}"
        )
    keep = [
        anchor_text(c.instance_id, c.head)
        for c in result.chains
        if c.head is not None and c.instance_id not in broken
    ]
    if keep:
        # What to keep, to show next time that nothing before it was rewritten or cut off.
        lines.append("  next time: " + " ".join(f"--anchor {terminal_text(a)}" for a in keep))
    return "\n".join(lines) + "\n"


def anchor_text(instance_id: str, head: Link) -> str:
    """An ``--anchor`` value: ``INSTANCE=SEQ:HASH``."""
    return f"{instance_id}={head.seq}:{head.hash}"


def parse_anchor(text: str) -> tuple[str, Link]:
    """``INSTANCE=SEQ:HASH`` (the instance id may hold ``=``; the last one splits)."""
    instance_id, sep, link = text.rpartition("=")
    seq, colon, hash_ = link.partition(":")
    if not sep or not instance_id or not colon or not seq.isdigit():
        raise ValueError(f"not INSTANCE=SEQ:HASH: {text!r}")
    if len(hash_) != 64 or any(c not in "0123456789abcdef" for c in hash_):
        raise ValueError(f"not a SHA-256 hash in hex: {hash_!r}")
    return instance_id, Link(int(seq), hash_)


def verify_store(store: SqlStore, anchors: Mapping[str, Link] | None = None) -> tuple[bool, str]:
    """Verify every chain in a SQL store, in row-id order. Returns ``(ok, report)``; the CLI
    exits non-zero when ``ok`` is False. ``anchors``: links known to be in the chains (see
    :mod:`pgguard.audit.chain`)."""
    v = ChainVerifier(anchors)
    for position, record in store.chain():
        v.feed(record, position)
    result = v.finish()
    return result.ok, verify_report(result, store.safe_url)


def verify_jsonl(path: str | Path, anchors: Mapping[str, Link] | None = None) -> tuple[bool, str]:
    """Verify a JSON-lines file (positions are line numbers)."""
    v = ChainVerifier(anchors)
    try:
        for number, record in read_jsonl(path):
            v.feed(record, number)
    except ValueError as exc:
        return False, f"BROKEN: {exc}\n"
    result = v.finish()
    return result.ok, verify_report(result, str(path))
