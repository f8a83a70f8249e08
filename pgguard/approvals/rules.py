"""Who may decide what (SPEC §6). Pure: the store, the API and the CLI all go through here.

Checks run in this order, so that someone who may not decide learns nothing about the
request's state: approver membership (403), self-approval (403), status (409), expiry (409).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

from pgguard.policy.model import GlobSet, parse_duration

from .model import MAX_REASON_CHARS, ApprovalError, ApprovalRequest, Window


def is_approver(approvers: Iterable[str], groups: Iterable[str]) -> bool:
    """True when one of ``groups`` is one of ``approvers``. Approvers are written as policy
    group names, which are globs like every other group pattern (``dba``, ``dba-*``)."""
    patterns = tuple(approvers)
    return bool(patterns) and GlobSet(patterns, "name").match_any(groups)


def _approver_text(approvers: Iterable[str]) -> str:
    names = list(approvers)
    return ", ".join(names) if names else "(no approver group configured)"


def check_decider(
    request: ApprovalRequest, user: str, groups: Iterable[str], now: float
) -> ApprovalError | None:
    """Why ``user`` (in ``groups``) may not decide ``request`` now, or None if they may."""
    if not is_approver(request.approvers, groups):
        return ApprovalError(
            403,
            f"{user} may not decide approval request {request.id}: only members of "
            f"{_approver_text(request.approvers)} may",
        )
    if user == request.requester:
        return ApprovalError(
            403, f"{user} may not decide approval request {request.id}: it is their own request"
        )
    if request.status != "pending":
        by = f" by {request.decider}" if request.decider else ""
        return ApprovalError(
            409, f"approval request {request.id} is already {request.status}{by}", request
        )
    if now >= request.expires_at:
        return ApprovalError(409, f"approval request {request.id} has expired", request)
    return None


def check_revoker(window: Window, user: str, groups: Iterable[str]) -> ApprovalError | None:
    """Why ``user`` may not revoke ``window``, or None. Only the rule's approvers may (the
    same people who could have granted it)."""
    if not is_approver(window.approvers, groups):
        return ApprovalError(
            403,
            f"{user} may not revoke window {window.id}: only members of "
            f"{_approver_text(window.approvers)} may",
        )
    if window.revoked:
        by = f" by {window.revoked_by}" if window.revoked_by else ""
        return ApprovalError(409, f"window {window.id} is already revoked{by}")
    return None


def clean_reason(reason: str | None, *, required: bool) -> str | None:
    """The reason stripped (None when empty); ApprovalError(400) when a required reason is
    missing or any reason is too long."""
    text = (reason or "").strip()
    if not text:
        if required:
            raise ApprovalError(400, "a reason is required to deny a request")
        return None
    if len(text) > MAX_REASON_CHARS:
        raise ApprovalError(400, f"the reason is too long (at most {MAX_REASON_CHARS} characters)")
    return text


def parse_window(value: object) -> float | None:
    """``"30m"`` / ``1800`` → seconds; None / "" → no window; ApprovalError(400) otherwise."""
    if value is None or value == "":
        return None
    try:
        seconds = parse_duration(value)
    except ValueError as exc:
        raise ApprovalError(400, f"invalid window: {exc}") from None
    if not math.isfinite(seconds):
        raise ApprovalError(400, "invalid window: not a finite duration")
    return seconds
