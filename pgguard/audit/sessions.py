"""Recorded sessions from the audit trail: listing and psql-like replay. Pure."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from pgguard.audit.query import more_note, terminal_text
from pgguard.audit.recording import RecordedError, RecordedStatement, render_transcript
from pgguard.audit.records import AuditRecord, format_ts


def entry_of(record: AuditRecord) -> RecordedStatement:
    """The recorded statement a statement record carries (its preview, or what is known)."""
    preview = record.extra.get("preview") if record.extra else None
    if isinstance(preview, dict):
        entry = RecordedStatement.from_dict(preview)
        return RecordedStatement(
            statement=record.statement or "",
            columns=entry.columns,
            rows=entry.rows,
            truncated=entry.truncated,
            row_count=entry.row_count,
            command_tag=entry.command_tag,
            error=entry.error,
            dropped_bytes=entry.dropped_bytes,
        )
    error = None
    if record.sqlstate:
        message = record.extra.get("error") if record.extra else None
        if not message and record.rule and record.decision not in ("allow", "audit_only"):
            message = f"pgguard: {record.rule}: refused"  # recorded before messages were kept
        error = RecordedError(record.sqlstate, str(message or record.sqlstate))
    tag = None
    if error is None and record.extra.get("executed") is False:
        tag = "(not run: the request failed or was refused before it)"
    elif error is None and record.command:
        tag = record.command + (f" {record.rows}" if record.rows is not None else "")
    return RecordedStatement(statement=record.statement or "", command_tag=tag, error=error)


def transcript(records: Sequence[AuditRecord]) -> str:
    """Replay one session's records as a psql-like transcript."""
    start = next((r for r in records if r.event == "session_start"), None)
    end = next((r for r in records if r.event == "session_end"), None)
    first = start or (records[0] if records else None)
    meta: dict[str, Any] = {}
    if first is not None:
        meta = {
            "session_id": first.session_id,
            "user": first.user,
            "email": first.email,
            "agent": first.agent,
            "database": first.database,
            "client_addr": first.client_addr,
            "application_name": first.application_name,
            "upstream_role": first.upstream_role,
            "started_at": format_ts(first.ts),
            "ended_at": format_ts(end.ts) if end is not None else None,
        }
    entries = [entry_of(r) for r in records if r.event == "statement"]
    return render_transcript(entries, meta)


def session_rows(starts: Sequence[AuditRecord], *, more: bool = False) -> str:
    """`sessions list`: one line per session start. ``more``: the limit cut the list."""
    header = f"{'session':<18} {'started (UTC)':<26} {'user':<16} {'database':<12} client"
    lines = [header, "-" * len(header)]
    for r in starts:
        lines.append(
            f"{terminal_text(r.session_id):<18} {format_ts(r.ts):<26} "
            f"{terminal_text(r.user, limit=16):<16} {terminal_text(r.database, limit=12):<12} "
            f"{terminal_text(r.client_addr)}"
        )
    n = len(starts)
    lines.append(more_note(n, "session") if more else f"({n} session{'s' if n != 1 else ''})")
    return "\n".join(lines) + "\n"
