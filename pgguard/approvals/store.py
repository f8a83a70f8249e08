"""Approval requests and windows in the shared store (the audit database, SPEC §6).

``ApprovalStore(url)`` opens the database through :class:`pgguard.audit.store.SqlStore`, so it
gets the same URL handling (``postgres://`` means psycopg 3), SQLite WAL / busy timeout /
``BEGIN IMMEDIATE`` writes, PostgreSQL durability settings, and the versioned schema (the
tables come from migration 2). ``ApprovalStore.on(sql_store)`` shares an already open store's
engine instead.

Every method is synchronous and thread-safe; the gateway calls them with
``asyncio.to_thread``. State changes are atomic: an ``UPDATE … WHERE id = :id AND status =
'pending'`` inside a write transaction that first locks the row (``SELECT … FOR UPDATE`` on
PostgreSQL, ``BEGIN IMMEDIATE`` on SQLite), so of two deciders racing on one request exactly
one wins and the other gets a 409 naming the winner.

On PostgreSQL every state change also sends ``NOTIFY pgguard_approvals, '<id>'`` (delivered
at commit), for a replica that prefers LISTEN to polling :meth:`ApprovalStore.statuses`.
"""

from __future__ import annotations

import builtins
import json
import math
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import replace
from typing import Any, Final

from sqlalchemy import Connection, select, text, update

from pgguard.audit.records import clean_str
from pgguard.audit.store import SchemaError, SqlStore

from .model import (
    FINAL_STATUSES,
    STATUSES,
    ApprovalError,
    ApprovalRequest,
    Status,
    Window,
    new_id,
)
from .rules import check_decider, check_revoker, clean_reason
from .schema import approvals_table, windows_table

#: The PostgreSQL NOTIFY channel; the payload is the request id.
NOTIFY_CHANNEL: Final = "pgguard_approvals"
#: The first schema version that has the approval tables.
APPROVALS_SCHEMA_VERSION: Final = 2
_CHUNK: Final = 500  # ids per IN (...) list

_JSON = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)


def _dumps(items: Iterable[Any]) -> str:
    return _JSON.encode(list(items))


def _loads(value: str | None) -> tuple[Any, ...]:
    return tuple(json.loads(value)) if value else ()


def _opt_clean(value: str | None) -> str | None:
    return None if value is None else clean_str(value)


def _request_row(r: ApprovalRequest) -> dict[str, Any]:
    return {
        "id": r.id,
        "created": r.created,
        "expires_at": r.expires_at,
        "username": clean_str(r.requester),
        "groups": _dumps(clean_str(g) for g in r.groups),
        "prompt_id": _opt_clean(r.prompt_id),
        "statement": clean_str(r.statement),
        "fingerprint": _opt_clean(r.fingerprint),
        "params": _dumps(_opt_clean(p) for p in r.params),
        "rule": r.rule,
        "approvers": _dumps(r.approvers),
        "status": r.status,
        "decider": _opt_clean(r.decider),
        "reason": _opt_clean(r.reason),
        "decided_at": r.decided_at,
        "window_until": r.window_until,
        "instance_id": r.instance_id,
        "session_id": r.session_id,
        "database": clean_str(r.database),
    }


def _request_from_row(m: Mapping[Any, Any]) -> ApprovalRequest:
    status = m["status"]
    if status not in STATUSES:  # pragma: no cover - only a hand-edited row
        raise ValueError(f"approval request {m['id']} has an unknown status {status!r}")
    return ApprovalRequest(
        id=m["id"],
        created=float(m["created"]),
        expires_at=float(m["expires_at"]),
        requester=m["username"],
        groups=_loads(m["groups"]),
        prompt_id=m["prompt_id"],
        statement=m["statement"],
        fingerprint=m["fingerprint"],
        params=_loads(m["params"]),
        rule=m["rule"],
        approvers=_loads(m["approvers"]),
        status=status,
        decider=m["decider"],
        reason=m["reason"],
        decided_at=None if m["decided_at"] is None else float(m["decided_at"]),
        window_until=None if m["window_until"] is None else float(m["window_until"]),
        instance_id=m["instance_id"],
        session_id=m["session_id"],
        database=m["database"],
    )


def _window_from_row(m: Mapping[Any, Any]) -> Window:
    return Window(
        id=m["id"],
        user=m["username"],
        rule=m["rule"],
        until=float(m["until"]),
        granted_by=m["granted_by"],
        request_id=m["request_id"],
        revoked=bool(m["revoked"]),
        created=float(m["created"]),
        approvers=_loads(m["approvers"]),
        revoked_by=m["revoked_by"],
        revoked_at=None if m["revoked_at"] is None else float(m["revoked_at"]),
    )


def _statuses_for(status: str | Sequence[str] | None) -> builtins.list[str] | None:
    """``None``/``"all"``: every status; ``"decided"``: every final one; else those named."""
    if status is None or status == "all":
        return None
    names = [status] if isinstance(status, str) else list(status)
    out: builtins.list[str] = []
    for name in names:
        if name == "decided":
            out.extend(sorted(FINAL_STATUSES))
        elif name in STATUSES:
            out.append(name)
        else:
            raise ValueError(
                f"unknown status {name!r} (use all, decided or one of {', '.join(STATUSES)})"
            )
    return out


def _chunks(items: Sequence[str], size: int = _CHUNK) -> Iterator[list[str]]:
    for i in range(0, len(items), size):
        yield list(items[i : i + size])


class ApprovalStore:
    """Approval requests and windows in the audit database (SQLite or PostgreSQL).

    ``migrate=False`` (the CLI) refuses a database that has not been migrated to the
    approvals schema instead of migrating it.
    """

    def __init__(self, url: str, *, migrate: bool = True, echo: bool = False) -> None:
        self._init(SqlStore(url, migrate=migrate, echo=echo), owns=True)

    @classmethod
    def on(cls, sql: SqlStore) -> ApprovalStore:
        """An approval store sharing ``sql``'s engine (closing it leaves ``sql`` open)."""
        self = cls.__new__(cls)
        self._init(sql, owns=False)
        return self

    def _init(self, sql: SqlStore, *, owns: bool) -> None:
        self.sql = sql
        self._owns = owns
        self.engine = sql.engine
        self.dialect = sql.dialect
        if sql.schema_version < APPROVALS_SCHEMA_VERSION:  # pragma: no cover - migrate=False
            if owns:
                sql.close()
            raise SchemaError(
                f"store {sql.safe_url} has no approval tables (schema version "
                f"{sql.schema_version}); start pgguard serve once to migrate it"
            )

    @property
    def safe_url(self) -> str:
        return self.sql.safe_url

    def __repr__(self) -> str:
        return f"ApprovalStore({self.safe_url!r})"

    def close(self) -> None:
        if self._owns:
            self.sql.close()

    def __enter__(self) -> ApprovalStore:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- transactions ----------------------------------------------------------------------

    def _notify(self, conn: Connection, ids: Iterable[str]) -> None:
        if self.dialect != "postgresql":
            return
        for request_id in ids:
            conn.execute(
                text("SELECT pg_notify(:channel, :payload)"),
                {"channel": NOTIFY_CHANNEL, "payload": request_id},
            )

    def _locked(self, conn: Connection, request_id: str) -> ApprovalRequest | None:
        t = approvals_table
        row = conn.execute(select(t).where(t.c.id == request_id).with_for_update()).first()
        return None if row is None else _request_from_row(row._mapping)

    # -- requests --------------------------------------------------------------------------

    def create(self, request: ApprovalRequest) -> None:
        """Store a new request (its id must be new)."""
        with self.sql.write_transaction() as conn:
            conn.execute(approvals_table.insert().values(**_request_row(request)))

    def get(self, request_id: str) -> ApprovalRequest | None:
        t = approvals_table
        with self.sql.read_connection() as conn:
            row = conn.execute(select(t).where(t.c.id == request_id)).first()
        return None if row is None else _request_from_row(row._mapping)

    def list(
        self,
        status: str | Sequence[str] | None = None,
        limit: int | None = 100,
        since: float | None = None,
    ) -> builtins.list[ApprovalRequest]:
        """Requests, newest first. ``status``: None or ``"all"``, ``"decided"`` (every final
        status), or one status (or several); ``since``: created at or after (epoch)."""
        t = approvals_table
        q = select(t)
        statuses = _statuses_for(status)
        if statuses is not None:
            q = q.where(t.c.status.in_(statuses))
        if since is not None:
            q = q.where(t.c.created >= since)
        q = q.order_by(t.c.created.desc(), t.c.id.desc())
        if limit is not None:
            q = q.limit(max(int(limit), 0))
        with self.sql.read_connection() as conn:
            return [_request_from_row(row._mapping) for row in conn.execute(q)]

    def statuses(self, ids: Iterable[str]) -> dict[str, ApprovalRequest]:
        """The requests with these ids (unknown ids are absent): one query for the usual
        handful of held requests, the gateway's poll."""
        wanted = sorted(set(ids))
        out: dict[str, ApprovalRequest] = {}
        if not wanted:
            return out
        t = approvals_table
        with self.sql.read_connection() as conn:
            for chunk in _chunks(wanted):
                for row in conn.execute(select(t).where(t.c.id.in_(chunk))):
                    request = _request_from_row(row._mapping)
                    out[request.id] = request
        return out

    def decide(
        self,
        request_id: str,
        approve: bool,
        user: str,
        groups: Iterable[str],
        reason: str | None = None,
        window_seconds: float | None = None,
        now: float | None = None,
    ) -> ApprovalRequest:
        """Approve or deny a pending request as ``user`` (in ``groups``); the decided request.

        Enforces :func:`~pgguard.approvals.rules.check_decider`; a deny needs a reason; an
        approval with ``window_seconds`` also grants ``request.requester`` a window on
        ``request.rule`` until ``now + window_seconds``. Raises :class:`ApprovalError`."""
        now = time.time() if now is None else now
        groups = tuple(groups)
        reason = clean_reason(reason, required=not approve)
        if window_seconds is not None:
            if not approve:
                raise ApprovalError(400, "only an approval can grant a window")
            if not math.isfinite(window_seconds) or window_seconds <= 0:
                raise ApprovalError(400, "a window must be a positive duration")
        with self.sql.write_transaction() as conn:
            request = self._locked(conn, request_id)
            if request is None:
                raise ApprovalError(404, f"no approval request {request_id}")
            refusal = check_decider(request, user, groups, now)
            if refusal is not None:
                raise refusal
            until = now + window_seconds if window_seconds is not None else None
            decided = replace(
                request,
                status="approved" if approve else "denied",
                decider=user,
                reason=reason,
                decided_at=now,
                window_until=until,
            )
            t = approvals_table
            result = conn.execute(
                update(t)
                .where(t.c.id == request_id, t.c.status == "pending")
                .values(
                    status=decided.status,
                    decider=clean_str(user),
                    reason=reason,
                    decided_at=now,
                    window_until=until,
                )
            )
            if result.rowcount != 1:  # pragma: no cover - the row lock makes this unreachable
                raise ApprovalError(409, f"approval request {request_id} is no longer pending")
            if until is not None:
                conn.execute(
                    windows_table.insert().values(
                        id=new_id(),
                        username=request.requester,
                        rule=request.rule,
                        until=until,
                        granted_by=clean_str(user),
                        request_id=request.id,
                        approvers=_dumps(request.approvers),
                        revoked=False,
                        revoked_by=None,
                        revoked_at=None,
                        created=now,
                    )
                )
            self._notify(conn, [request_id])
        return decided

    def _finish(
        self, request_id: str, status: Status, reason: str | None, now: float
    ) -> ApprovalRequest | None:
        """Move a pending request to ``status``: the changed request, or None when there is
        nothing to change (unknown id, or no longer pending)."""
        t = approvals_table
        with self.sql.write_transaction() as conn:
            request = self._locked(conn, request_id)
            if request is None or request.status != "pending":
                return None
            conn.execute(
                update(t)
                .where(t.c.id == request_id, t.c.status == "pending")
                .values(status=status, reason=reason, decided_at=now)
            )
            self._notify(conn, [request_id])
        return replace(request, status=status, reason=reason, decided_at=now)

    def expire(self, request_id: str, now: float | None = None) -> ApprovalRequest | None:
        """Mark a pending request expired (the holder's timeout fired): the expired request,
        or None if it is no longer pending — a decision won the race, and
        :meth:`statuses` / :meth:`get` show which — or unknown."""
        return self._finish(request_id, "expired", None, time.time() if now is None else now)

    def withdraw(
        self, request_id: str, why: str | None = None, now: float | None = None
    ) -> ApprovalRequest | None:
        """Withdraw a pending request (the client cancelled or left; ``why`` is stored as the
        reason): the withdrawn request, or None if it is no longer pending or unknown."""
        reason = clean_reason(why[:1000] if why else None, required=False)
        return self._finish(request_id, "withdrawn", reason, time.time() if now is None else now)

    def expire_overdue(
        self, now: float | None = None, grace: float = 0.0
    ) -> builtins.list[ApprovalRequest]:
        """Expire every request still pending ``grace`` seconds after its deadline (its holder
        died with it); the requests this call expired."""
        now = time.time() if now is None else now
        t = approvals_table
        with self.sql.write_transaction() as conn:
            rows = conn.execute(
                select(t)
                .where(t.c.status == "pending", t.c.expires_at <= now - grace)
                .with_for_update()
            ).all()
            overdue = [_request_from_row(row._mapping) for row in rows]
            ids = [r.id for r in overdue]
            for chunk in _chunks(ids):
                conn.execute(
                    update(t)
                    .where(t.c.id.in_(chunk), t.c.status == "pending")
                    .values(status="expired", decided_at=now)
                )
            self._notify(conn, ids)
        return [replace(r, status="expired", decided_at=now) for r in overdue]

    # -- windows ---------------------------------------------------------------------------

    def active_window(self, user: str, rule: str, now: float | None = None) -> Window | None:
        """The unrevoked window of ``user`` on ``rule`` that lasts longest past ``now``."""
        now = time.time() if now is None else now
        w = windows_table
        q = (
            select(w)
            .where(
                w.c.username == user,
                w.c.rule == rule,
                w.c.revoked.is_(False),
                w.c.until > now,
            )
            .order_by(w.c.until.desc())
            .limit(1)
        )
        with self.sql.read_connection() as conn:
            row = conn.execute(q).first()
        return None if row is None else _window_from_row(row._mapping)

    def get_window(self, window_id: str) -> Window | None:
        w = windows_table
        with self.sql.read_connection() as conn:
            row = conn.execute(select(w).where(w.c.id == window_id)).first()
        return None if row is None else _window_from_row(row._mapping)

    def windows(
        self, active_only: bool = True, now: float | None = None, limit: int | None = 100
    ) -> builtins.list[Window]:
        """Windows, newest first; ``active_only``: unrevoked and not yet over."""
        w = windows_table
        q = select(w)
        if active_only:
            now = time.time() if now is None else now
            q = q.where(w.c.revoked.is_(False), w.c.until > now)
        q = q.order_by(w.c.created.desc(), w.c.id.desc())
        if limit is not None:
            q = q.limit(max(int(limit), 0))
        with self.sql.read_connection() as conn:
            return [_window_from_row(row._mapping) for row in conn.execute(q)]

    def revoke_window(
        self, window_id: str, user: str, groups: Iterable[str], now: float | None = None
    ) -> Window:
        """Revoke a window as ``user``: only members of the rule's approver groups may.
        The revoked window; raises :class:`ApprovalError` (403, 404, 409 already revoked)."""
        now = time.time() if now is None else now
        groups = tuple(groups)
        w = windows_table
        with self.sql.write_transaction() as conn:
            row = conn.execute(select(w).where(w.c.id == window_id).with_for_update()).first()
            if row is None:
                raise ApprovalError(404, f"no window {window_id}")
            window = _window_from_row(row._mapping)
            refusal = check_revoker(window, user, groups)
            if refusal is not None:
                raise refusal
            conn.execute(
                update(w)
                .where(w.c.id == window_id, w.c.revoked.is_(False))
                .values(revoked=True, revoked_by=clean_str(user), revoked_at=now)
            )
        return replace(window, revoked=True, revoked_by=user, revoked_at=now)
