"""The gateway's end of the audit pipe: it starts the writer process (:mod:`pgguard.audit.daemon`)
and hands it events, a frame per event-loop turn.

The relay's cost per statement is a tuple appended to a list; everything else (records,
hashes, stores) runs in the writer process. Strict mode: ``on_durable`` is called on the
event loop once the writer reports the record committed (or failed). The link is bounded:
while the writer is not keeping up (``queue_size`` events unsent, or the socket's buffer
full), a strict record fails at once and a buffered one is dropped and counted.

If the writer process dies, every waiting statement fails (its result is not released), the
link reports the store unhealthy, and a new writer starts a second later and gets the
configuration and the live sessions again; its chain continues from the store.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any, cast

from pgguard.audit import link
from pgguard.audit.events import SessionContext
from pgguard.audit.records import AuditRecord
from pgguard.audit.writer import AuditClosed, AuditQueueFull, AuditUnavailable
from pgguard.protocol.statements import StatementRun

log = logging.getLogger("pgguard.audit")

DurableCallback = Callable[[BaseException | None], None]
_RESPAWN_DELAY_S = 1.0
_RESPAWN_DELAY_MAX_S = 30.0
# Blocked while the writer is spawned: until it ignores them itself (after its imports), a
# Ctrl-C or a group-wide SIGTERM/SIGHUP must not kill it (its gateway decides when it stops).
_WRITER_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}
_BUFFERED_FLUSH_S = 0.05
_SOCKET_BUFFER_LIMIT = 32 * 1024 * 1024  # bytes written and not yet read by the writer


class AuditLink(asyncio.Protocol):
    """Hands audit events to a writer process; the surface the gateway uses."""

    def __init__(self, config: link.WriterConfig, secret_env: frozenset[str] = frozenset()) -> None:
        self.config = config
        # The writer needs none of pgguard's secrets (its store URL comes over the pipe):
        # PGGUARD_* variables and those ``secret_env`` names are left out of its environment.
        self.environment = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith("PGGUARD_") and k not in secret_env
        }
        self.mode = config.mode
        self.instance_id = config.instance_id
        self.status = link.WriterStatus()
        self.tickets = link.TicketBook()
        # Live sessions, re-sent to a new writer as they are then (a SET pgguard.prompt_id
        # since the start, the last refused batch).
        self.sessions: dict[str, SessionContext] = {}
        self.dropped_here = 0  # events this side could not hand over
        self._out: list[Any] = []
        self._scheduled = False
        self._transport: asyncio.Transport | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._reader = link.FrameReader()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False
        self._closed: asyncio.Future[link.WriterStatus] | None = None
        self._respawn: asyncio.TimerHandle | None = None
        self._respawn_delay = _RESPAWN_DELAY_S
        self._spawning: asyncio.Task[None] | None = None
        self._got_closed = False  # the writer answered CLOSE (it wrote what it could)
        self._link_error: str | None = None

    # -- what the gateway reads ---------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return self._link_error is None and self.status.healthy

    @property
    def last_error(self) -> BaseException | None:
        text = self._link_error or self.status.last_error
        return None if text is None else AuditUnavailable(text)

    @property
    def depth(self) -> int:
        return self.status.depth + len(self._out)

    @property
    def errors(self) -> int:
        return self.status.errors

    @property
    def dropped(self) -> int:
        return self.status.dropped + self.dropped_here

    @property
    def abandoned(self) -> int:
        return self.status.abandoned

    @property
    def written(self) -> int:
        return self.status.written

    @property
    def pid(self) -> int | None:
        return self._process.pid if self._process is not None else None

    # -- starting ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        await self._spawn()

    async def _spawn(self) -> None:
        assert self._loop is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            previous = signal.pthread_sigmask(signal.SIG_BLOCK, _WRITER_SIGNALS)
            try:
                self._process = subprocess.Popen(
                    [
                        sys.executable,
                        "-m",
                        "pgguard.audit.daemon",
                        str(theirs.fileno()),
                        str(os.getpid()),
                    ],
                    pass_fds=(theirs.fileno(),),
                    stdin=subprocess.DEVNULL,
                    env=self.environment,
                )
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, previous)
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._reader = link.FrameReader()
        try:
            await self._loop.create_unix_connection(lambda: self, sock=ours)
        except BaseException:
            ours.close()
            self._stop_process()
            raise
        log.debug("audit writer process %d started", self._process.pid)

    def _stop_process(self) -> None:
        """Kill and reap the current writer process (it must not write on beside the next)."""
        proc = self._process
        if proc is not None and proc.poll() is None:
            proc.kill()
            try:
                proc.wait(2.0)
            except subprocess.TimeoutExpired:
                log.error("audit writer process %d did not die", proc.pid)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        self._transport = transport
        config = self.config
        if self.status.head is not None:
            # A writer after one that died: where the chain was, for stores that cannot say.
            config = replace(config, resume=self.status.head)
        first: list[Any] = [(link.CONFIG, config)]
        first.extend((link.SESSION, link.context_to_wire(c)) for c in self.sessions.values())
        transport.write(link.encode_frame(first))
        self._link_error = None
        if self._out:
            self._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        if self._closed is not None and not self._closed.done():
            self._closed.set_result(self.status)
        failed = self.tickets.take_all()
        if self._closing:
            if self._process is not None:
                self._process.poll()
            error: BaseException = AuditClosed("pgguard: the audit trail is closed")
        else:
            # Whatever ended the link (the writer died, or its frames were unreadable), the
            # old writer must be gone before the next one continues the chain.
            self._stop_process()
            code = self._process.returncode if self._process is not None else None
            self._link_error = f"the audit writer process exited (status {code})"
            log.error("audit: %s; starting another", self._link_error)
            error = AuditUnavailable(f"pgguard: {self._link_error}")
            self._schedule_respawn()
        for callback in failed:
            _call(callback, error)

    def _schedule_respawn(self) -> None:
        if self._loop is None or self._closing or self._respawn is not None:
            return
        self._respawn = self._loop.call_later(self._respawn_delay, self._start_again)

    def _start_again(self) -> None:
        self._respawn = None
        if self._closing or self._loop is None:
            return
        self._spawning = self._loop.create_task(self._spawn_or_retry())

    async def _spawn_or_retry(self) -> None:
        try:
            await self._spawn()
        except Exception as exc:
            self._link_error = f"cannot start the audit writer process: {exc}"
            log.error("audit: %s; trying again in %.1fs", self._link_error, self._respawn_delay)
            self._respawn_delay = min(self._respawn_delay * 2, _RESPAWN_DELAY_MAX_S)
            self._schedule_respawn()
        else:
            self._respawn_delay = _RESPAWN_DELAY_S
        finally:
            self._spawning = None

    # -- answers ----------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        try:
            messages = self._reader.feed(data)
        except link.LinkError as exc:
            log.error("audit: %s", exc)
            if self._transport is not None:
                self._transport.abort()
            return
        for message in messages:
            kind = message[0]
            if kind == link.DURABLE:
                for callback in self.tickets.take(message[1]):
                    _call(callback, None)
            elif kind == link.FAILED:
                error = AuditUnavailable(f"pgguard: audit store unavailable: {message[2]}")
                self.status = _unhealthy(self.status, message[2])
                for callback in self.tickets.take(message[1]):
                    _call(callback, error)
            elif kind == link.STATUS:
                self.status = link.WriterStatus.from_wire(message[1])
            elif kind == link.CLOSED:
                self.status = link.WriterStatus.from_wire(message[1])
                self._got_closed = True
                if self._closed is not None and not self._closed.done():
                    self._closed.set_result(self.status)

    # -- events -----------------------------------------------------------------------------

    def session(self, ctx: SessionContext) -> None:
        """A session's shared fields, before its first statement."""
        self.sessions[ctx.session_id] = ctx
        self._send((link.SESSION, link.context_to_wire(ctx)))

    def forget(self, session_id: str) -> None:
        """The session ended (after its last record)."""
        if self.sessions.pop(session_id, None) is not None:
            self._send((link.FORGET, session_id))

    def submit(self, record: AuditRecord, on_durable: DurableCallback | None = None) -> None:
        """A whole record (session start/end, auth failures, reloads, approvals)."""
        ticket = self._ticket(on_durable)
        if ticket >= 0:
            self._send((link.RECORD, ticket, record))

    def statement(
        self,
        session_id: str,
        run: StatementRun,
        described: tuple[Any, ...],
        approval: tuple[str, str] | None,
        on_durable: DurableCallback | None = None,
    ) -> None:
        """One statement run; its record is built by the writer. ``described`` is
        ``(statement_class, objects, command, audit_only)``; ``approval`` the approval it ran
        under: (request id, the rule that asked for it)."""
        ticket = self._ticket(on_durable)
        if ticket >= 0:
            wire = link.run_to_wire(run)
            self._send((link.STATEMENT, ticket, session_id, wire, described, approval))

    def _ticket(self, on_durable: DurableCallback | None) -> int:
        """0 (no answer wanted), a ticket, or -1 if the event is refused here."""
        if self._closing:
            self._answer(on_durable, AuditClosed("pgguard: the audit trail is closed"))
            self.dropped_here += 1
            return -1
        # The bound is buffered mode's: in strict mode the event is a statement that has run
        # (or a session's start or end), and its session waits for it (up to
        # audit.strict_timeout), so the backlog cannot grow past the sessions held.
        if self.mode != "strict" and (
            len(self._out) >= self.config.queue_size or self._backlogged()
        ):
            self.dropped_here += 1
            if self.dropped_here & (self.dropped_here - 1) == 0:
                log.warning("audit: writer not keeping up, %d event(s) dropped", self.dropped_here)
            self._answer(on_durable, AuditQueueFull("pgguard: the audit queue is full"))
            return -1
        if on_durable is None or self.mode != "strict":
            self._answer(on_durable, None)  # buffered: never waits
            return 0
        return self.tickets.issue(on_durable)

    def _answer(self, on_durable: DurableCallback | None, error: BaseException | None) -> None:
        """Answer at once, but never from inside the caller (the relay is mid-message)."""
        if on_durable is None:
            return
        if self._loop is not None:
            self._loop.call_soon(_call, on_durable, error)
        else:
            _call(on_durable, error)

    def _backlogged(self) -> bool:
        t = self._transport
        return t is not None and t.get_write_buffer_size() > _SOCKET_BUFFER_LIMIT

    def _send(self, message: Any) -> None:
        self._out.append(message)
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            if self.mode == "strict":
                self._loop.call_soon(self._flush)  # a statement waits for this one
            else:
                # Nobody waits: one write (and one wake-up of the writer) per interval.
                self._loop.call_later(_BUFFERED_FLUSH_S, self._flush)

    def _flush(self) -> None:
        self._scheduled = False
        if self._transport is None or not self._out:
            return
        out, self._out = self._out, []
        self._transport.write(link.encode_frame(out))

    # -- stopping ---------------------------------------------------------------------------

    async def close(self, timeout: float = 30.0) -> bool:
        """Write everything sent so far and stop the writer process; True if nothing was
        left unwritten."""
        if self._respawn is not None:
            self._respawn.cancel()
            self._respawn = None
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        if self._spawning is not None:
            # A new writer is being started: let it take what is queued.
            await asyncio.wait({self._spawning}, timeout=max(0.1, deadline - time.monotonic()))
        elif self._transport is None and self._out and not self._closing:
            # between writers: give the next one a moment to take what is queued
            await self._spawn_now(deadline)
        self._closing = True
        self._flush()
        ok = True
        if self._transport is not None:
            self._closed = loop.create_future()
            self._transport.write(
                link.encode_frame([(link.CLOSE, max(0.1, deadline - time.monotonic() - 0.5))])
            )
            try:
                await asyncio.wait_for(
                    asyncio.shield(self._closed), max(0.2, deadline - time.monotonic())
                )
            except TimeoutError:
                ok = False
                log.error("audit writer did not finish within %.1f s", timeout)
            if not self._got_closed:
                ok = False  # it died (or timed out) before saying what it wrote
            if self._transport is not None:
                self._transport.close()
        elif self._out:
            ok = False
        proc = self._process
        if proc is not None:
            end = time.monotonic() + 2.0
            while proc.poll() is None and time.monotonic() < end:
                await asyncio.sleep(0.02)
            if proc.poll() is None:
                proc.kill()
                await asyncio.to_thread(proc.wait)
        left = len(self._out) + len(self.tickets)
        for callback in self.tickets.take_all():
            _call(callback, AuditClosed("pgguard: the audit trail closed"))
        return ok and left == 0 and self.status.abandoned == 0

    async def _spawn_now(self, deadline: float) -> None:
        try:
            await asyncio.wait_for(self._spawn(), max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            log.error("audit: cannot start a writer to flush: %s", exc)


def _unhealthy(status: link.WriterStatus, message: str) -> link.WriterStatus:
    return replace(status, healthy=False, last_error=message)


def _call(callback: DurableCallback, error: BaseException | None) -> None:
    try:
        callback(error)
    except Exception:
        log.exception("audit on_durable callback failed")
