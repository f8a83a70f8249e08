"""Terminal output of ``pgguard approvals …``: statements and names are attacker-controlled,
so every cell goes through :func:`pgguard.audit.query.terminal_text` (control characters
escaped, one line)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from pgguard.audit.query import terminal_text

from .model import ApprovalRequest, Window


def age(seconds: float) -> str:
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


def timestamp(ts: float | None) -> str:
    if ts is None:
        return ""
    return datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M:%SZ")


def _status(r: ApprovalRequest, now: float) -> str:
    return "overdue" if r.overdue(now) else r.status


def request_table(requests: Sequence[ApprovalRequest], now: float) -> str:
    """One line per request, newest first, with a header; or a note when there are none."""
    if not requests:
        return "no approval requests\n"
    rows = [("ID", "STATUS", "AGE", "REQUESTER", "RULE", "DATABASE", "DECIDER", "STATEMENT")]
    for r in requests:
        rows.append(
            (
                r.id,
                _status(r, now),
                age(now - r.created),
                terminal_text(r.requester, limit=20),
                terminal_text(r.rule, limit=30),
                terminal_text(r.database, limit=16),
                terminal_text(r.decider or "", limit=16),
                terminal_text(r.statement, limit=100),
            )
        )
    return _columns(rows)


def request_detail(r: ApprovalRequest, now: float) -> str:
    """Several lines about one (usually just decided) request."""
    lines = [
        f"request {r.id}: {_status(r, now)}",
        f"  requester: {terminal_text(r.requester)} ({terminal_text(', '.join(r.groups))})",
        f"  rule: {terminal_text(r.rule)} (approvers: {terminal_text(', '.join(r.approvers))})",
        f"  database: {terminal_text(r.database)}",
    ]
    if r.prompt_id:
        lines.append(f"  prompt: {terminal_text(r.prompt_id)}")
    lines.append(f"  statement: {terminal_text(r.statement, limit=2000)}")
    if r.decider:
        lines.append(f"  decided by: {terminal_text(r.decider)} at {timestamp(r.decided_at)}")
    if r.reason:
        lines.append(f"  reason: {terminal_text(r.reason)}")
    if r.window_until is not None:
        lines.append(f"  window until: {timestamp(r.window_until)}")
    return "\n".join(lines) + "\n"


def window_table(windows: Sequence[Window], now: float) -> str:
    if not windows:
        return "no approval windows\n"
    rows = [("ID", "USER", "RULE", "UNTIL", "LEFT", "GRANTED BY", "REQUEST", "STATE")]
    for w in windows:
        state = (
            f"revoked by {terminal_text(w.revoked_by or '?', limit=16)}"
            if w.revoked
            else ("active" if w.active(now) else "over")
        )
        rows.append(
            (
                w.id,
                terminal_text(w.user, limit=20),
                terminal_text(w.rule, limit=30),
                timestamp(w.until),
                age(w.until - now) if w.active(now) else "",
                terminal_text(w.granted_by, limit=16),
                w.request_id,
                state,
            )
        )
    return _columns(rows)


def _columns(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    out = []
    for row in rows:
        cells = [cell.ljust(widths[i]) for i, cell in enumerate(row[:-1])]
        out.append("  ".join([*cells, row[-1]]).rstrip())
    return "\n".join(out) + "\n"
