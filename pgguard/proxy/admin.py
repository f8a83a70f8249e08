"""The admin HTTP listener (SPEC §7): ``/metrics``, ``/healthz``, ``/readyz``.

A small HTTP/1.1 server on asyncio streams (it is not on the relay's hot path): one request per
connection (``Connection: close``), bounded request size, timeouts for slow clients, and any
error answered or logged, never raised into the event loop.

Other features add their pages through :meth:`AdminServer.route`: a path prefix and an async
handler taking a :class:`Request` and returning a :class:`Response` (e.g. the approvals API
under ``/api/approvals`` and the page under ``/approvals``).

With several workers every worker listens on the admin port (``SO_REUSEPORT``); any of them
answers, and ``/metrics`` reports the totals across workers (see :mod:`pgguard.metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, unquote, urlsplit

from pgguard.metrics import CONTENT_TYPE, Metrics, MetricsCollector

if TYPE_CHECKING:
    from pgguard.config import Settings
    from pgguard.proxy.server import Gateway

log = logging.getLogger("pgguard.admin")

MAX_HEAD_BYTES = 16 * 1024
MAX_BODY_BYTES = 1024 * 1024
READ_TIMEOUT = 10.0
WRITE_TIMEOUT = 10.0
MAX_CONNECTIONS = 128
UPSTREAM_CONNECT_TIMEOUT = 1.0
UPSTREAM_CACHE_SECONDS = 2.0
FOLD_INTERVAL = 1.0

_REASONS = {
    200: "OK",
    204: "No Content",
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    409: "Conflict",
    411: "Length Required",
    413: "Content Too Large",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    503: "Service Unavailable",
    505: "HTTP Version Not Supported",
}


@dataclass
class Request:
    """One parsed HTTP request."""

    method: str
    target: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]  # lower-case names
    body: bytes = b""
    client: str = ""


@dataclass
class Response:
    """What a handler answers."""

    status: int = 200
    body: bytes = b""
    content_type: str = "text/plain; charset=utf-8"
    headers: dict[str, str] = field(default_factory=dict)

    @classmethod
    def text(cls, status: int, text: str) -> Response:
        return cls(status, text.encode())

    @classmethod
    def json(cls, status: int, data: Any) -> Response:
        body = json.dumps(data, separators=(",", ":"), sort_keys=True).encode() + b"\n"
        return cls(status, body, "application/json")


Handler = Callable[[Request], Awaitable[Response]]


class BadRequest(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


# --------------------------------------------------------------------------- readiness


class Readiness:
    """The ``/readyz`` checks: listening and not draining, a policy in force, the audit store
    healthy, the upstream accepting TCP connections (probed with a short timeout, the answer
    cached).

    A failed policy *reload* does not make the gateway unready: the previous policy stays in
    force and keeps protecting traffic, and a bad policy rolled out to every replica must not
    take them all out of rotation at once. The check says so (``ok (reload failed: …)``) and
    ``pgguard_policy_reload_failed`` is there to alert on. Only a gateway that never had a
    policy load (``policy_loaded=False``) is unready while loading fails; ``pgguard serve``
    refuses to start on an invalid policy, so its gateways always start with one.
    """

    def __init__(
        self,
        gateway: Gateway,
        *,
        connect_timeout: float = UPSTREAM_CONNECT_TIMEOUT,
        cache_seconds: float = UPSTREAM_CACHE_SECONDS,
        policy_loaded: bool = True,
    ) -> None:
        self.gateway = gateway
        self.policy_loaded = policy_loaded
        self.connect_timeout = connect_timeout
        self.cache_seconds = cache_seconds
        self._upstream: tuple[float, str | None] | None = None  # (when, error or None)
        self._probe: asyncio.Task[str | None] | None = None

    async def check(self) -> tuple[list[str], dict[str, str]]:
        """(the names of the failed checks, check name → "ok" or what is wrong)."""
        gw = self.gateway
        checks: dict[str, str] = {}
        failed: list[str] = []

        def put(name: str, problem: str | None, ok: str = "ok") -> None:
            checks[name] = ok if problem is None else problem
            if problem is not None:
                failed.append(name)

        put("listening", "not yet" if gw.server is None else None, ok="yes")
        put("draining", "draining" if gw.draining else None, ok="no")
        policy_error = gw.policy_error
        if policy_error is None:
            self.policy_loaded = True
            put("policies", None)
        elif self.policy_loaded:
            put("policies", None, ok=f"ok (reload failed: {policy_error}"[:299] + ")")
        else:
            put("policies", f"load failed: {policy_error}"[:300])
        audit = gw.audit
        if audit is None:
            put("audit", None, ok="not configured")
        elif audit.healthy:
            put("audit", None)
        else:
            error = audit.last_error
            put("audit", f"audit store failing ({type(error).__name__ if error else 'unknown'})")
        put("upstream", await self._upstream_problem())
        return failed, checks

    async def _upstream_problem(self) -> str | None:
        cached = self._upstream
        now = time.monotonic()
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        if self._probe is None or self._probe.done():
            self._probe = asyncio.get_running_loop().create_task(self._connect())
        # shield: a client hanging up must not cancel a probe others wait for.
        problem = await asyncio.shield(self._probe)
        self._upstream = (time.monotonic(), problem)
        return problem

    async def _connect(self) -> str | None:
        up = self.gateway.settings.upstream
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, writer = await asyncio.open_connection(up.host, up.port)
        except TimeoutError:
            return f"upstream {up.host}:{up.port}: connect timed out"
        except OSError as exc:
            return f"upstream {up.host}:{up.port}: {exc.strerror or type(exc).__name__}"
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return None


# --------------------------------------------------------------------------- the server


class AdminServer:
    """The admin listener of one worker. ``await start()``; ``await close()``."""

    def __init__(
        self,
        settings: Settings,
        gateway: Gateway,
        *,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.collector = MetricsCollector(gateway, metrics)
        self.readiness = Readiness(gateway)
        self.routes: dict[str, Handler] = {}
        self.server: asyncio.base_events.Server | None = None
        self.port: int | None = None
        self._connections = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._fold_task: asyncio.Task[None] | None = None
        self.route("/metrics", self._metrics)
        self.route("/healthz", self._healthz)
        self.route("/readyz", self._readyz)

    # -- routing ---------------------------------------------------------------------------

    def route(self, prefix: str, handler: Handler) -> None:
        """Serve ``prefix`` and every path under it (``/api/approvals`` also serves
        ``/api/approvals/abc``) with ``handler``; the longest matching prefix wins."""
        if not prefix.startswith("/"):
            raise ValueError(f"a route starts with '/': {prefix!r}")
        self.routes[prefix.rstrip("/") or "/"] = handler

    def _handler_for(self, path: str) -> Handler | None:
        best: str | None = None
        for prefix in self.routes:
            matches = path == prefix or prefix == "/" or path.startswith(prefix + "/")
            if matches and (best is None or len(prefix) > len(best)):
                best = prefix
        return self.routes[best] if best is not None else None

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        admin = self.settings.admin
        self.server = await asyncio.start_server(
            self._serve_connection,
            admin.host,
            admin.port,
            limit=MAX_HEAD_BYTES,
            backlog=128,
            reuse_address=True,
            reuse_port=True if self.settings.workers > 1 else None,
        )
        sockets = self.server.sockets
        self.port = sockets[0].getsockname()[1] if sockets else admin.port
        self._fold_task = asyncio.get_running_loop().create_task(self.collector.run(FOLD_INTERVAL))

    async def close(self) -> None:
        """Stop listening, fold one last time (counts reach the multiprocess files)."""
        if self._fold_task is not None:
            self._fold_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._fold_task
            self._fold_task = None
        if self.server is not None:
            self.server.close()
            self.server = None
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        try:
            self.collector.fold()
        except Exception:
            log.exception("metrics fold failed")

    # -- connections -----------------------------------------------------------------------

    async def _serve_connection(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        self._connections += 1
        try:
            if self._connections > MAX_CONNECTIONS:
                await self._send(writer, Response.text(503, "too many admin connections\n"))
                return
            await self._exchange(reader, writer)
        except asyncio.CancelledError:
            raise
        except Exception:  # never let a request take the process down
            log.exception("admin request failed")
        finally:
            self._connections -= 1
            if task is not None:
                self._tasks.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 1.0)

    async def _exchange(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        client = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else str(peer or "")
        try:
            async with asyncio.timeout(READ_TIMEOUT):
                request = await read_request(reader, client)
        except BadRequest as exc:
            await self._send(writer, Response.text(exc.status, f"{exc}\n"))
            await _discard_input(reader)
            return
        except TimeoutError:
            await self._send(writer, Response.text(408, "request timed out\n"))
            return
        if request is None:
            return  # the client left without a request
        try:
            response = await self.dispatch(request)
        except Exception:
            log.exception("admin handler failed for %s %s", request.method, request.path)
            response = Response.text(500, "internal error\n")
        await self._send(writer, response, head_only=request.method == "HEAD")

    async def dispatch(self, request: Request) -> Response:
        handler = self._handler_for(request.path)
        if handler is None:
            return Response.text(404, "not found\n")
        return await handler(request)

    async def _send(
        self, writer: asyncio.StreamWriter, response: Response, *, head_only: bool = False
    ) -> None:
        status = response.status
        lines = [
            f"HTTP/1.1 {status} {_REASONS.get(status, 'Status')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
            "Connection: close",
            "Cache-Control: no-store",
            f"X-Pgguard-Worker: {self.gateway.worker_id}",
        ]
        lines.extend(f"{k}: {v}" for k, v in response.headers.items())
        head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
        writer.write(head if head_only else head + response.body)
        with contextlib.suppress(OSError, TimeoutError):
            async with asyncio.timeout(WRITE_TIMEOUT):
                await writer.drain()

    # -- built-in pages --------------------------------------------------------------------

    async def _metrics(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed()
        self.collector.fold()
        # Reading the workers' files (or the registry) off the event loop.
        body = await asyncio.to_thread(self.collector.metrics.exposition)
        return Response(200, body, CONTENT_TYPE)

    async def _healthz(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed()
        return Response.text(200, "ok\n")

    async def _readyz(self, request: Request) -> Response:
        if request.method not in ("GET", "HEAD"):
            return _not_allowed()
        failed, checks = await self.readiness.check()
        return Response.json(
            503 if failed else 200,
            {"status": "not ready" if failed else "ready", "failed": failed, "checks": checks},
        )


async def _discard_input(reader: asyncio.StreamReader) -> None:
    """After answering a bad request, read (and drop) what the client still sends for a
    moment, so that closing does not reset the connection before it reads the answer."""
    with contextlib.suppress(Exception):
        async with asyncio.timeout(1.0):
            left = MAX_BODY_BYTES
            while left > 0:
                chunk = await reader.read(min(left, 65536))
                if not chunk:
                    return
                left -= len(chunk)


def _not_allowed() -> Response:
    response = Response.text(405, "method not allowed\n")
    response.headers["Allow"] = "GET, HEAD"
    return response


async def read_request(reader: asyncio.StreamReader, client: str = "") -> Request | None:
    """Read one request (head, and a body of at most MAX_BODY_BYTES by Content-Length).
    None if the client closed before sending anything; BadRequest if it is not valid."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        if not exc.partial.strip():
            return None
        raise BadRequest(400, "incomplete request") from None
    except asyncio.LimitOverrunError:
        raise BadRequest(431, "request head too large") from None
    except ValueError:  # the limit, as some stream implementations report it
        raise BadRequest(431, "request head too large") from None
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes every byte
        raise BadRequest(400, "bad request") from None
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    if len(parts) != 3:
        raise BadRequest(400, "bad request line")
    method, target, version = parts
    if not version.startswith("HTTP/1."):
        raise BadRequest(505 if version.startswith("HTTP/") else 400, "HTTP/1.x only")
    if not method.isalpha() or not method.isupper():
        raise BadRequest(400, "bad method")
    if not target.startswith("/"):
        raise BadRequest(400, "bad request target")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        if not line:
            continue
        name, sep, value = line.partition(":")
        if not sep or not name or name != name.strip() or " " in name:
            raise BadRequest(400, "bad header line")
        headers[name.lower()] = value.strip()
    if "transfer-encoding" in headers:
        raise BadRequest(501, "chunked requests are not supported")
    body = b""
    length_text = headers.get("content-length")
    if length_text is not None:
        if not length_text.isdigit():
            raise BadRequest(400, "bad Content-Length")
        length = int(length_text)
        if length > MAX_BODY_BYTES:
            raise BadRequest(413, "request body too large")
        try:
            body = await reader.readexactly(length)
        except asyncio.IncompleteReadError:
            raise BadRequest(400, "incomplete request body") from None
    split = urlsplit(target)
    return Request(
        method=method,
        target=target,
        path=unquote(split.path) or "/",
        query=parse_qs(split.query),
        headers=headers,
        body=body,
        client=client,
    )


async def start_admin(
    settings: Settings, gateway: Gateway, routes: Mapping[str, Handler] | None = None
) -> AdminServer:
    """Start the admin listener of this worker (logged; a port in use is an error)."""
    admin = AdminServer(settings, gateway)
    for prefix, handler in (routes or {}).items():
        admin.route(prefix, handler)
    try:
        await admin.start()
    except OSError as exc:
        log.error(
            "cannot listen on the admin port %s:%s: %s",
            settings.admin.host,
            settings.admin.port,
            exc,
        )
        raise
    log.info(
        "admin listening on http://%s:%s (/metrics, /healthz, /readyz)",
        settings.admin.host,
        admin.port,
        extra={"worker": gateway.worker_id},
    )
    return admin
