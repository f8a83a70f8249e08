"""The approvals admin API and page, for :meth:`pgguard.proxy.admin.AdminServer.route`.

``approval_routes(store, validator, notifier)`` returns ``{"/api/approvals": …,
"/approvals": …}``:

* ``GET  /api/approvals?status=pending|decided|all|<status>&limit=N`` — a JSON list, newest
  first (``pending``, the default, leaves out requests already past their deadline);
* ``GET  /api/approvals/{id}``; ``GET /api/approvals/whoami``;
* ``POST /api/approvals/{id}/approve`` (``{"reason": …, "for": "30m"}``, both optional) and
  ``POST /api/approvals/{id}/deny`` (``{"reason": …}`` required) — the decided request;
* ``GET  /api/approvals/windows?active=1|0``; ``POST /api/approvals/windows/{id}/revoke``;
* ``GET  /approvals`` — a self-contained page (inline CSS and JS, no external assets).

Every ``/api`` call needs ``Authorization: Bearer <JWT>``, validated by the gateway's
:class:`~pgguard.identity.TokenValidator` (the same settings as client logins). Errors are
``{"error": "…"}`` with 400, 401, 403, 404, 405, 409 or 503. Anyone with a valid token sees the
requests they made and those they may decide (and the windows they hold or may revoke); only
approvers may decide (see :mod:`.rules`). The token is never logged.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import time
from collections.abc import Callable
from typing import Any, Final

from sqlalchemy.exc import SQLAlchemyError

from pgguard.identity import Identity, TokenError, TokenValidator
from pgguard.proxy.admin import Handler, Request, Response

from .model import ApprovalError, ApprovalRequest, Window
from .page import PAGE_TEMPLATE
from .rules import check_decider, is_approver, parse_window
from .store import ApprovalStore
from .webhook import WebhookNotifier

log = logging.getLogger("pgguard.approvals.api")

API_PREFIX: Final = "/api/approvals"
PAGE_PREFIX: Final = "/approvals"
DEFAULT_LIMIT: Final = 100
MAX_LIMIT: Final = 1000
#: A request still pending this long past its deadline lost its holder (a replica died):
#: listing expires it (the holder, when alive, does so itself at the deadline).
SWEEP_GRACE: Final = 30.0

_SECURITY_HEADERS: Final = {
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
}


def _error(status: int, message: str) -> Response:
    response = Response.json(status, {"error": message})
    response.headers.update(_SECURITY_HEADERS)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="pgguard"'
    return response


def _ok(data: Any, status: int = 200) -> Response:
    response = Response.json(status, data)
    response.headers.update(_SECURITY_HEADERS)
    return response


def _not_allowed(allow: str) -> Response:
    response = _error(405, "method not allowed")
    response.headers["Allow"] = allow
    return response


def bearer_token(request: Request) -> str | None:
    """The token of an ``Authorization: Bearer …`` header, or None."""
    scheme, _, token = request.headers.get("authorization", "").strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    return token


class ApprovalsAPI:
    """The handlers; :func:`approval_routes` wires them up."""

    def __init__(
        self,
        store: ApprovalStore,
        validator: TokenValidator,
        notifier: WebhookNotifier,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.validator = validator
        self.notifier = notifier
        self.clock = clock

    # -- plumbing -------------------------------------------------------------------------

    async def _identity(self, request: Request) -> Identity | Response:
        token = bearer_token(request)
        if token is None:
            return _error(401, "an Authorization: Bearer <token> header is required")
        try:
            # validate() fetches a JWKS URL in a worker thread; HMAC checks are quick
            return await self.validator.validate(token)
        except TokenError as exc:
            return _error(401, f"token refused: {exc}")  # the message never holds the token

    def _view(self, r: ApprovalRequest, who: Identity, now: float) -> dict[str, Any]:
        doc = r.to_dict()
        doc["age"] = max(0.0, now - r.created)
        doc["overdue"] = r.overdue(now)
        doc["can_decide"] = check_decider(r, who.user, who.groups, now) is None
        return doc

    @staticmethod
    def _may_see(r: ApprovalRequest, who: Identity) -> bool:
        return r.requester == who.user or is_approver(r.approvers, who.groups)

    @staticmethod
    def _may_see_window(w: Window, who: Identity) -> bool:
        return w.user == who.user or is_approver(w.approvers, who.groups)

    @staticmethod
    def _body(request: Request) -> dict[str, Any]:
        if not request.body.strip():
            return {}
        try:
            doc = json.loads(request.body)
        except (ValueError, UnicodeDecodeError):
            raise ApprovalError(400, "the body must be a JSON object") from None
        if not isinstance(doc, dict):
            raise ApprovalError(400, "the body must be a JSON object")
        return doc

    @staticmethod
    def _query(request: Request, name: str, default: str | None = None) -> str | None:
        values = request.query.get(name)
        return values[-1] if values else default

    def _limit(self, request: Request) -> int:
        raw = self._query(request, "limit")
        if raw is None:
            return DEFAULT_LIMIT
        try:
            value = int(raw)
        except ValueError:
            raise ApprovalError(400, "limit must be an integer") from None
        return max(1, min(value, MAX_LIMIT))

    # -- /api/approvals -------------------------------------------------------------------

    async def handle_api(self, request: Request) -> Response:
        """Everything under ``/api/approvals``."""
        rest = request.path[len(API_PREFIX) :].strip("/")
        parts = rest.split("/") if rest else []
        who = await self._identity(request)
        if isinstance(who, Response):
            return who
        method = "GET" if request.method == "HEAD" else request.method
        try:
            if not parts:
                return await self._list(request, who) if method == "GET" else _not_allowed("GET")
            if parts == ["whoami"]:
                if method != "GET":
                    return _not_allowed("GET")
                return _ok({"user": who.user, "groups": list(who.groups)})
            if parts[0] == "windows":
                return await self._windows(request, who, parts[1:], method)
            if len(parts) == 1:
                return await self._get(who, parts[0]) if method == "GET" else _not_allowed("GET")
            if len(parts) == 2 and parts[1] in ("approve", "deny"):
                if method != "POST":
                    return _not_allowed("POST")
                return await self._decide(request, who, parts[0], parts[1] == "approve")
            return _error(404, "not found")
        except ApprovalError as exc:
            return _error(exc.status, exc.message)
        except SQLAlchemyError as exc:
            log.error("approval store %s failed: %s", self.store.safe_url, type(exc).__name__)
            return _error(503, "the approval store is unavailable")

    async def _list(self, request: Request, who: Identity) -> Response:
        status = self._query(request, "status", "pending") or "pending"
        limit = self._limit(request)
        try:
            requests = await asyncio.to_thread(self.store.list, status, limit)
        except ValueError as exc:
            raise ApprovalError(400, str(exc)) from None
        now = self.clock()
        if any(r.overdue(now - SWEEP_GRACE) for r in requests):
            await self._sweep(now)
            requests = await asyncio.to_thread(self.store.list, status, limit)
        if status == "pending":
            requests = [r for r in requests if not r.overdue(now)]
        return _ok([self._view(r, who, now) for r in requests if self._may_see(r, who)])

    async def _sweep(self, now: float) -> None:
        for r in await asyncio.to_thread(self.store.expire_overdue, now, SWEEP_GRACE):
            log.info("approval request %s expired (its holder is gone)", r.id)
            self.notifier.notify("expired", r)

    async def _get(self, who: Identity, request_id: str) -> Response:
        r = await asyncio.to_thread(self.store.get, request_id)
        if r is None or not self._may_see(r, who):
            return _error(404, f"no approval request {request_id}")
        return _ok(self._view(r, who, self.clock()))

    async def _decide(
        self, request: Request, who: Identity, request_id: str, approve: bool
    ) -> Response:
        body = self._body(request)
        reason = body.get("reason")
        if reason is not None and not isinstance(reason, str):
            raise ApprovalError(400, "reason must be a string")
        window = parse_window(body.get("for")) if approve else None
        if not approve and body.get("for") not in (None, ""):
            raise ApprovalError(400, "only an approval can grant a window")
        now = self.clock()
        decided = await asyncio.to_thread(
            self.store.decide, request_id, approve, who.user, who.groups, reason, window, now
        )
        log.info(
            "approval request %s %s by %s%s",
            decided.id,
            decided.status,
            who.user,
            f" with a {window:g}s window" if window is not None else "",
        )
        self.notifier.notify("decided", decided)
        return _ok(self._view(decided, who, now))

    async def _windows(
        self, request: Request, who: Identity, parts: list[str], method: str
    ) -> Response:
        if not parts:
            if method != "GET":
                return _not_allowed("GET")
            active = (self._query(request, "active", "1") or "1").lower() not in ("0", "false")
            now = self.clock()
            windows = await asyncio.to_thread(self.store.windows, active, now, self._limit(request))
            return _ok([w.to_dict() for w in windows if self._may_see_window(w, who)])
        if len(parts) == 2 and parts[1] == "revoke":
            if method != "POST":
                return _not_allowed("POST")
            window = await asyncio.to_thread(
                self.store.revoke_window, parts[0], who.user, who.groups, self.clock()
            )
            log.info("approval window %s revoked by %s", window.id, who.user)
            return _ok(window.to_dict())
        return _error(404, "not found")

    # -- /approvals -----------------------------------------------------------------------

    async def handle_page(self, request: Request) -> Response:
        """The approvals page (the token is entered in the page, not needed to load it)."""
        if request.path.rstrip("/") != PAGE_PREFIX:
            return Response.text(404, "not found\n")
        if request.method not in ("GET", "HEAD"):
            response = Response.text(405, "method not allowed\n")
            response.headers["Allow"] = "GET, HEAD"
            return response
        nonce = secrets.token_urlsafe(16)
        body = PAGE_TEMPLATE.replace("{{NONCE}}", nonce).encode()
        response = Response(200, body, "text/html; charset=utf-8")
        response.headers.update(_SECURITY_HEADERS)
        response.headers["Content-Security-Policy"] = (
            f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'unsafe-inline'; "
            "connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'none'; "
            "frame-ancestors 'none'"
        )
        return response


def approval_routes(
    store: ApprovalStore,
    validator: TokenValidator,
    notifier: WebhookNotifier,
    *,
    clock: Callable[[], float] = time.time,
) -> dict[str, Handler]:
    """The routes to register on the admin server: ``{prefix: handler}``."""
    api = ApprovalsAPI(store, validator, notifier, clock=clock)
    return {API_PREFIX: api.handle_api, PAGE_PREFIX: api.handle_page}


__all__ = ["API_PREFIX", "PAGE_PREFIX", "ApprovalsAPI", "approval_routes", "bearer_token"]
