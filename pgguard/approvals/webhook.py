"""The approvals webhook (``approvals.webhook_url``): a Slack-compatible JSON POST when a
request is made, decided, expires or is withdrawn.

``notify`` only queues: one daemon thread per process delivers, in order, with a short
back-off between attempts. Nothing here blocks or raises into the caller, so a slow or dead
webhook never delays a held statement's timeout. Failures are logged with the scheme and host
only: a Slack incoming-webhook URL carries its secret in the path.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from typing import Any, Final
from urllib.parse import urlsplit

from .model import ApprovalRequest, Event

log = logging.getLogger("pgguard.approvals.webhook")

#: Pauses before the second, third and fourth attempt.
DEFAULT_BACKOFF: Final[tuple[float, ...]] = (0.5, 1.0, 2.0)
DEFAULT_TIMEOUT: Final = 5.0
QUEUE_SIZE: Final = 1000
_STATEMENT_PREVIEW: Final = 1000
_STOP: Final = object()


def _slack_escape(value: str) -> str:
    """Slack's mrkdwn control characters: a statement must not become a link or a ping
    (``<!channel>``, ``<https://…|click>``)."""
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _preview(statement: str) -> str:
    text = statement if len(statement) <= _STATEMENT_PREVIEW else statement[:_STATEMENT_PREVIEW]
    text = text.replace("```", "` ` `")  # stay inside the code block
    more = len(statement) - len(text)
    return _slack_escape(text) + (f"\n… ({more} more characters)" if more > 0 else "")


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds // 3600}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds // 60}m"
    return f"{seconds}s"


def summary(event: Event, request: ApprovalRequest, page_url: str | None = None) -> str:
    """The human text of a notification (Slack mrkdwn, user-controlled parts escaped)."""
    r = request
    rid, who, rule = _slack_escape(r.id), _slack_escape(r.requester), _slack_escape(r.rule)
    if event == "requested":
        approvers = _slack_escape(", ".join(r.approvers))
        lines = [
            f"pgguard: *{who}* asks to run a statement held by rule `{rule}` "
            f"on database `{_slack_escape(r.database)}` (request `{rid}`, approvers: "
            f"{approvers}, expires in {_duration(r.expires_at - r.created)})",
        ]
        if r.prompt_id:
            lines.append(f"prompt: `{_slack_escape(r.prompt_id)}`")
        lines.append(f"```{_preview(r.statement)}```")
        how = f"`pgguard approvals approve {rid}` or `pgguard approvals deny {rid} --reason …`"
        if page_url:
            how += f", or {_slack_escape(page_url)}"
        lines.append(f"Decide with {how}")
        return "\n".join(lines)
    if event == "decided":
        verb = "approved" if r.status == "approved" else "denied"
        text = f"pgguard: request `{rid}` ({who}, rule `{rule}`) was *{verb}*"
        if r.decider:
            text += f" by *{_slack_escape(r.decider)}*"
        if r.reason:
            text += f": {_slack_escape(r.reason)}"
        if r.window_until is not None and r.decided_at is not None:
            text += f" (window of {_duration(r.window_until - r.decided_at)} granted)"
        return text
    if event == "expired":
        return f"pgguard: request `{rid}` ({who}, rule `{rule}`) expired without a decision"
    text = f"pgguard: request `{rid}` ({who}, rule `{rule}`) was withdrawn"
    return text + (f": {_slack_escape(r.reason)}" if r.reason else "")


def payload(event: Event, request: ApprovalRequest, page_url: str | None = None) -> bytes:
    """The POST body: Slack's ``text`` plus the structured event and request."""
    doc = {"text": summary(event, request, page_url), "event": event, "request": request.to_dict()}
    return json.dumps(doc, separators=(",", ":"), ensure_ascii=True).encode()


def safe_url(url: str) -> str:
    """``scheme://host[:port]``: what may be logged of a webhook URL."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(invalid webhook URL)"
    return f"{parts.scheme}://{host}{port}"


def _describe(exc: BaseException) -> str:
    """A failure, without anything that could contain the URL."""
    if isinstance(exc, urllib.error.HTTPError):
        return f"HTTP {exc.code}"
    if isinstance(exc, urllib.error.URLError):
        reason = exc.reason
        if isinstance(reason, OSError):
            return reason.strerror or type(reason).__name__
        if isinstance(reason, TimeoutError | str):
            return "timed out" if isinstance(reason, TimeoutError) else "connection failed"
        return type(reason).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    return type(exc).__name__


def _retryable(exc: BaseException) -> bool:
    if isinstance(exc, urllib.error.HTTPError):
        return exc.code >= 500 or exc.code == 429
    return True  # connection refused, reset, timeout: the receiver may come back


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    # A redirect would resend the payload somewhere the operator did not configure.
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


class WebhookNotifier:
    """``WebhookNotifier(url)``; ``notify(event, request)``; ``close()`` on shutdown.

    With ``url=None`` every call is a no-op. ``page_url`` (the approvals page, if the
    gateway knows its public address) is added to the request announcement.
    """

    def __init__(
        self,
        url: str | None,
        *,
        page_url: str | None = None,
        backoff: Sequence[float] = DEFAULT_BACKOFF,
        timeout: float = DEFAULT_TIMEOUT,
        queue_size: int = QUEUE_SIZE,
    ) -> None:
        if url is not None and urlsplit(url).scheme not in ("http", "https"):
            raise ValueError("approvals.webhook_url must be an http:// or https:// URL")
        self.url = url or None
        self.page_url = page_url
        self.backoff = tuple(backoff)
        self.timeout = timeout
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=queue_size)
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._closing = threading.Event()
        self._opener = urllib.request.build_opener(_NoRedirect())
        self.delivered = 0  # counters, for tests and logs
        self.failed = 0

    @property
    def enabled(self) -> bool:
        return self.url is not None

    def __repr__(self) -> str:
        return f"WebhookNotifier({safe_url(self.url) if self.url else None!r})"

    # -- the caller's side ------------------------------------------------------------------

    def notify(self, event: Event, request: ApprovalRequest) -> None:
        """Queue a notification; returns at once and never raises."""
        if self.url is None or self._closing.is_set():
            return
        try:
            body = payload(event, request, self.page_url)
            self._ensure_thread()
            self._queue.put_nowait((event, request.id, body))
        except queue.Full:
            self.failed += 1
            log.warning(
                "approval webhook to %s: queue full, %s notification for %s dropped",
                safe_url(self.url),
                event,
                request.id,
            )
        except Exception:  # never into the caller (the relay, the API)
            self.failed += 1
            log.exception("approval webhook: cannot queue a %s notification", event)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued notification is delivered or given up (True), or until
        ``timeout`` seconds pass (False)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._queue.unfinished_tasks:
            if deadline is not None and time.monotonic() >= deadline:
                return False
            if self._thread is None or not self._thread.is_alive():
                return False
            time.sleep(0.01)
        return True

    def close(self, timeout: float = 5.0) -> None:
        """Deliver what is queued for up to ``timeout`` seconds, then stop (back-off pauses
        are cut short; an attempt in flight finishes within its HTTP timeout)."""
        if self.url is None:
            return
        self.flush(timeout)
        self._closing.set()
        thread = self._thread
        if thread is not None and thread.is_alive():
            with contextlib.suppress(queue.Full):  # the thread ends at _closing anyway
                self._queue.put_nowait(_STOP)
            thread.join(min(timeout, 1.0))

    # -- the delivery thread ---------------------------------------------------------------

    def _ensure_thread(self) -> None:
        with self._lock:
            pid = os.getpid()
            if pid != self._pid:  # a forked worker: the parent's thread did not come along
                self._pid = pid
                self._thread = None
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(
                    target=self._run, name="pgguard-approval-webhook", daemon=True
                )
                self._thread.start()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is _STOP:
                    return
                event, request_id, body = item
                self._deliver(event, request_id, body)
            except Exception:  # pragma: no cover - _deliver catches what it expects
                log.exception("approval webhook: delivery failed")
            finally:
                self._queue.task_done()

    def _deliver(self, event: str, request_id: str, body: bytes) -> bool:
        url = self.url
        assert url is not None
        attempts = len(self.backoff) + 1
        for attempt in range(1, attempts + 1):
            try:
                self._post(url, body)
            except Exception as exc:
                last = attempt == attempts or not _retryable(exc) or self._closing.is_set()
                log.warning(
                    "approval webhook to %s: %s notification for %s failed (attempt %d/%d): %s%s",
                    safe_url(url),
                    event,
                    request_id,
                    attempt,
                    attempts,
                    _describe(exc),
                    "; giving up" if last else "",
                )
                if last:
                    self.failed += 1
                    return False
                if self._closing.wait(self.backoff[attempt - 1]):
                    self.failed += 1
                    return False
            else:
                self.delivered += 1
                return True
        return False  # pragma: no cover - the loop always returns

    def _post(self, url: str, body: bytes) -> None:
        req = urllib.request.Request(
            url,
            data=body,
            method="POST",
            headers={"Content-Type": "application/json", "User-Agent": "pgguard"},
        )
        with self._opener.open(req, timeout=self.timeout) as response:
            response.read(65536)  # Slack answers "ok"; drain a little so the socket closes
