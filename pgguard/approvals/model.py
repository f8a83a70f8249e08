"""Approval requests, the windows approvals grant, and the error deciders get (SPEC §6)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal, get_args

Status = Literal["pending", "approved", "denied", "expired", "withdrawn"]
STATUSES: Final[tuple[Status, ...]] = get_args(Status)
#: Statuses a request never leaves.
FINAL_STATUSES: Final[frozenset[str]] = frozenset(STATUSES) - {"pending"}

Event = Literal["requested", "decided", "expired", "withdrawn"]

#: Longest reason stored (it reaches the held client's error message and the webhook).
MAX_REASON_CHARS: Final = 2000


def new_id() -> str:
    """A short, unguessable request or window id (64 random bits, hex)."""
    return secrets.token_hex(8)


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    """One held statement waiting for (or past) a human decision."""

    id: str
    created: float
    expires_at: float
    requester: str
    groups: tuple[str, ...]
    prompt_id: str | None
    statement: str
    fingerprint: str | None
    params: tuple[str | None, ...]  # already encoded for display (see audit.text)
    rule: str
    approvers: tuple[str, ...]  # the rule's approver groups (patterns, as in the policy)
    status: Status = "pending"
    decider: str | None = None
    reason: str | None = None
    decided_at: float | None = None
    window_until: float | None = None  # the end of the window an approval granted
    instance_id: str = ""
    session_id: str = ""
    database: str = ""

    @classmethod
    def new(
        cls,
        *,
        requester: str,
        groups: Iterable[str],
        statement: str,
        rule: str,
        approvers: Iterable[str],
        now: float,
        timeout: float,
        prompt_id: str | None = None,
        fingerprint: str | None = None,
        params: Iterable[str | None] = (),
        instance_id: str = "",
        session_id: str = "",
        database: str = "",
    ) -> ApprovalRequest:
        """A fresh pending request with a new id, expiring ``timeout`` seconds from ``now``."""
        return cls(
            id=new_id(),
            created=now,
            expires_at=now + timeout,
            requester=requester,
            groups=tuple(groups),
            prompt_id=prompt_id,
            statement=statement,
            fingerprint=fingerprint,
            params=tuple(params),
            rule=rule,
            approvers=tuple(approvers),
            instance_id=instance_id,
            session_id=session_id,
            database=database,
        )

    @property
    def pending(self) -> bool:
        return self.status == "pending"

    def overdue(self, now: float) -> bool:
        """Still pending although its time is up (the holder has not marked it yet)."""
        return self.status == "pending" and now >= self.expires_at

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "created": self.created,
            "expires_at": self.expires_at,
            "requester": self.requester,
            "groups": list(self.groups),
            "prompt_id": self.prompt_id,
            "statement": self.statement,
            "fingerprint": self.fingerprint,
            "params": list(self.params),
            "rule": self.rule,
            "approvers": list(self.approvers),
            "status": self.status,
            "decider": self.decider,
            "reason": self.reason,
            "decided_at": self.decided_at,
            "window_until": self.window_until,
            "instance_id": self.instance_id,
            "session_id": self.session_id,
            "database": self.database,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ApprovalRequest:
        status = data.get("status", "pending")
        if status not in STATUSES:
            raise ValueError(f"unknown approval status {status!r}")
        return cls(
            id=str(data["id"]),
            created=float(data["created"]),
            expires_at=float(data["expires_at"]),
            requester=str(data["requester"]),
            groups=tuple(data.get("groups") or ()),
            prompt_id=data.get("prompt_id"),
            statement=str(data["statement"]),
            fingerprint=data.get("fingerprint"),
            params=tuple(data.get("params") or ()),
            rule=str(data["rule"]),
            approvers=tuple(data.get("approvers") or ()),
            status=status,
            decider=data.get("decider"),
            reason=data.get("reason"),
            decided_at=_opt_float(data.get("decided_at")),
            window_until=_opt_float(data.get("window_until")),
            instance_id=str(data.get("instance_id") or ""),
            session_id=str(data.get("session_id") or ""),
            database=str(data.get("database") or ""),
        )


@dataclass(frozen=True, slots=True)
class Window:
    """A grant from ``--for 30m``: ``user`` may run statements matching ``rule`` unasked until
    ``until`` (unless revoked)."""

    id: str
    user: str
    rule: str
    until: float
    granted_by: str
    request_id: str
    revoked: bool = False
    created: float = 0.0
    approvers: tuple[str, ...] = ()  # the rule's approvers: who may revoke it
    revoked_by: str | None = None
    revoked_at: float | None = None

    def active(self, now: float) -> bool:
        return not self.revoked and now < self.until

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "user": self.user,
            "rule": self.rule,
            "until": self.until,
            "granted_by": self.granted_by,
            "request_id": self.request_id,
            "revoked": self.revoked,
            "created": self.created,
            "approvers": list(self.approvers),
            "revoked_by": self.revoked_by,
            "revoked_at": self.revoked_at,
        }


class ApprovalError(Exception):
    """A decision (or revocation) was refused. ``status`` is HTTP-like: 400 bad input, 403 not
    allowed, 404 unknown id, 409 no longer pending / expired. ``str(exc)`` is safe to show.

    (A plain class, not a frozen dataclass: ``contextlib`` assigns ``__traceback__``.)"""

    def __init__(self, status: int, message: str, request: ApprovalRequest | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.request = request  # the request as it stands, when known

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"ApprovalError({self.status}, {self.message!r})"


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)
