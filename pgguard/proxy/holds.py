"""Held statements waiting for approval: the gateway's side of SPEC §6.

The relay (:class:`~pgguard.protocol.relay.RelayCore`) holds a ``require_approval``
statement and everything after it; :class:`ApprovalBroker` turns the hold into a request in
the shared store (the audit database), tells the client with a NOTICE, and polls the store
for the decision, which any replica, the CLI or the admin API may make. Approval lets the held
statement run unchanged (masks still apply); denial, expiry, the client's CancelRequest or
its disconnection end the request, and the first three fail the statement in its place.

Store calls run in threads (``asyncio.to_thread``); the event loop never waits on them.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pgguard.approvals.model import ApprovalRequest
from pgguard.audit.text import fingerprint, redact_secrets
from pgguard.policy.identity_guard import Hold, Refusal
from pgguard.protocol.messages import NoticeResponse, error_fields

if TYPE_CHECKING:
    from pgguard.approvals.store import ApprovalStore
    from pgguard.approvals.webhook import WebhookNotifier

log = logging.getLogger("pgguard.approvals")

POLL_INTERVAL = 0.25


@dataclass
class HeldStatement:
    """One session's statement waiting for a decision."""

    request: ApprovalRequest
    decide: Callable[[ApprovalRequest], None]  # called once, on the event loop


class ApprovalBroker:
    """Creates requests for held statements and delivers the decisions to their sessions."""

    def __init__(
        self,
        store: ApprovalStore,
        notifier: WebhookNotifier,
        timeout: float,
        admin_url: str,
        on_count: Callable[[int], None] | None = None,
    ) -> None:
        self.store = store
        self.notifier = notifier
        self.timeout = timeout
        self.admin_url = admin_url
        self.on_count = on_count
        self.waiting: dict[str, HeldStatement] = {}
        self._poller: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ requests
    def new_request(
        self,
        *,
        hold: Hold,
        sql: str,
        user: str,
        groups: tuple[str, ...],
        prompt_id: str | None,
        instance_id: str,
        session_id: str,
        database: str,
        params: tuple[str | None, ...] = (),
    ) -> ApprovalRequest:
        return ApprovalRequest.new(
            requester=user,
            groups=groups,
            statement=redact_secrets(sql),
            rule=hold.rule,
            approvers=hold.approvers,
            now=time.time(),
            timeout=self.timeout,
            prompt_id=prompt_id,
            fingerprint=fingerprint(sql),
            params=params,
            instance_id=instance_id,
            session_id=session_id,
            database=database,
        )

    async def submit(
        self, request: ApprovalRequest, decide: Callable[[ApprovalRequest], None]
    ) -> ApprovalRequest | None:
        """Store the request (None when an approval window already covers it: the caller
        runs the statement at once) and start waiting for its decision."""
        window = await asyncio.to_thread(
            self.store.active_window, request.requester, request.rule, time.time()
        )
        if window is not None:
            return None
        await asyncio.to_thread(self.store.create, request)
        self.waiting[request.id] = HeldStatement(request, decide)
        self._count()
        self.notifier.notify("requested", request)
        if self._poller is None or self._poller.done():
            self._poller = asyncio.get_running_loop().create_task(self._poll())
        return request

    def notice(self, request: ApprovalRequest) -> bytes:
        """The NoticeResponse that tells the client its statement waits, and how to decide."""
        approvers = ", ".join(request.approvers) or "an approver"
        text = (
            f"pgguard: {request.rule}: statement held for approval by {approvers}; "
            f"request {request.id}, expires in {int(self.timeout)}s"
        )
        hint = (
            f"approve with: pgguard approvals approve {request.id}"
            f" (or at {self.admin_url}/approvals)"
        )
        return NoticeResponse(error_fields("NOTICE", "01000", text, hint=hint)).encode()

    async def withdraw(self, request_id: str, why: str) -> None:
        """The client cancelled or left: the request ends without a decision."""
        if self.waiting.pop(request_id, None) is None:
            return
        self._count()
        try:
            found = await asyncio.to_thread(self.store.withdraw, request_id, why)
        except Exception:
            log.exception("could not withdraw approval request %s", request_id)
            return
        if found is not None:
            self.notifier.notify("withdrawn", found)

    # ------------------------------------------------------------------ decisions
    async def _poll(self) -> None:
        while self.waiting:
            await asyncio.sleep(POLL_INTERVAL)
            ids = list(self.waiting)
            try:
                states = await asyncio.to_thread(self.store.statuses, ids)
            except Exception as exc:
                log.warning("approvals: cannot read the store: %s", exc)
                continue
            now = time.time()
            for request_id in ids:
                state = states.get(request_id)
                if state is None or request_id not in self.waiting:
                    continue
                if state.status == "pending" and now >= state.expires_at:
                    try:
                        expired = await asyncio.to_thread(self.store.expire, request_id, now)
                    except Exception as exc:
                        log.warning("approvals: cannot expire %s: %s", request_id, exc)
                        continue
                    if expired is None:
                        continue  # decided meanwhile: the next poll sees it
                    self.notifier.notify("expired", expired)
                    state = expired
                if state.status == "pending":
                    continue
                held = self.waiting.pop(request_id, None)
                if held is not None:
                    self._count()
                    held.decide(state)

    def _count(self) -> None:
        if self.on_count is not None:
            self.on_count(len(self.waiting))

    async def close(self) -> None:
        if self._poller is not None:
            self._poller.cancel()


def verdict_for(request: ApprovalRequest) -> Refusal | None:
    """What the held statement becomes: None to run it, or the refusal to fail it with."""
    if request.status == "approved":
        return None
    if request.status == "denied":
        who = request.decider or "an approver"
        reason = f": {request.reason}" if request.reason else ""
        return Refusal(
            request.rule,
            f"request {request.id} denied by {who}{reason}",
            decision="approval_denied",
            approval_id=request.id,
        )
    if request.status == "expired":
        return Refusal(
            request.rule,
            f"request {request.id} expired without a decision",
            decision="approval_expired",
            approval_id=request.id,
        )
    return Refusal(
        request.rule, f"request {request.id} was withdrawn", "57014", approval_id=request.id
    )
