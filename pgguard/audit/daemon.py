"""The audit writer process: ``python -m pgguard.audit.daemon FD``.

Each gateway process starts one and feeds it events over a socket pair (``FD``, see
:mod:`pgguard.audit.link`); this process builds the records (prompt ids, redaction,
fingerprints, parameters), and an :class:`~pgguard.audit.writer.AuditWriter` seals and writes
them with group commit, so none of that runs on the gateway's event loop or under its GIL.

One thread: it reads whatever arrived, builds those records, seals and writes them in one
transaction (group commit: what arrives during a commit goes into the next one), then answers
which tickets are durable (or failed) and the writer's status when it changed.

The process dies with its gateway (``PR_SET_PDEATHSIG``: a crashed gateway's unacknowledged
records are no more durable than they were in its own memory, and a restarted gateway must
not find an old writer still extending its chain), and ignores the lifecycle signals: its
gateway decides when it stops, by sending ``CLOSE`` (flush, answer ``CLOSED``, exit) or by
closing the socket.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import logging
import os
import select
import signal
import socket
import sys
import time
from typing import Any

from pgguard.audit import link
from pgguard.audit.chain import Link
from pgguard.audit.events import RecordBuilder, RecordOptions
from pgguard.audit.records import AuditRecord
from pgguard.audit.store import AuditStore, open_stores
from pgguard.audit.writer import AuditWriter

log = logging.getLogger("pgguard.audit")

_PR_SET_PDEATHSIG = 1
_OPEN_RETRY_S = 1.0
_EOF_CLOSE_S = 30.0  # the gateway vanished: the time left to write what was received
_READS_PER_PASS = 8  # at most this many 1 MB reads between two commits
_BUFFERED_GATHER_S = 0.1  # buffered mode: at most one commit per this long (or per batch)


class Answers:
    """What the gateway is owed: tickets durable or failed, and the status when it changed;
    sent as one frame per pass of the loop (one send per group commit, not per record)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.durable: list[int] = []
        self.failed: dict[str, list[int]] = {}
        self.sent_status: link.WriterStatus | None = None

    def callback(self, ticket: int) -> link.DurableCallback:
        def answer(error: BaseException | None) -> None:
            if error is None:
                self.durable.append(ticket)
            else:
                self.failed.setdefault(str(error), []).append(ticket)

        return answer

    def send_due(self, status: link.WriterStatus, *last: Any) -> None:
        messages: list[Any] = [(link.FAILED, t, m) for m, t in self.failed.items()]
        if self.durable:
            messages.append((link.DURABLE, self.durable))
        if status != self.sent_status:
            self.sent_status = status
            messages.append((link.STATUS, status.to_wire()))
        messages.extend(last)
        self.durable, self.failed = [], {}
        if messages:
            # A blocking send (the socket stays blocking; the loop reads with MSG_DONTWAIT):
            # a frame must never go out in part; the gateway always reads its end.
            # (if the gateway is gone, the loop sees EOF next)
            with contextlib.suppress(OSError):
                self.sock.sendall(link.encode_frame(messages))


class Daemon:
    """One writer process: a single thread that reads events, builds records and writes
    them; each pass writes everything that arrived while the previous commit ran."""

    def __init__(self, sock: socket.socket, config: link.WriterConfig) -> None:
        self.sock = sock
        self.config = config
        self.builder = RecordBuilder(
            RecordOptions(config.param_cap, config.redact_literals, config.redact_params)
        )
        self.writer: AuditWriter | None = None
        self.stores: list[AuditStore] = []
        self.open_error: str | None = None
        self.failed_opening = 0
        # Records received while no store could be opened (bounded like the writer's queue).
        self.waiting: list[AuditRecord] = []
        self.dropped = 0
        self.answers = Answers(sock)
        self.last_write = 0.0

    def status(self) -> link.WriterStatus:
        w = self.writer
        if w is None:
            return link.WriterStatus(
                healthy=False,
                depth=len(self.waiting),
                errors=self.failed_opening,
                dropped=self.dropped,
                last_error=self.open_error,
            )
        error = w.last_error
        head = w.head
        return link.WriterStatus(
            healthy=w.healthy,
            depth=w.depth,
            written=w.written,
            errors=w.errors + self.failed_opening,
            dropped=w.dropped + self.dropped,
            abandoned=w.abandoned,
            last_error=None if error is None else f"{type(error).__name__}: {error}",
            head=None if head is None else (head.seq, head.hash),
        )

    def open(self) -> bool:
        """Open the stores and the writer; False (reported) if a store cannot open."""
        try:
            self.stores = open_stores(
                self.config.url, self.config.jsonl, fsync=self.config.sync != "normal"
            )
        except Exception as exc:
            self.failed_opening += 1
            self.open_error = f"{type(exc).__name__}: {exc}"
            log.error("audit store cannot be opened: %s", exc)
            return False
        self.open_error = None
        self.writer = AuditWriter(
            self.stores,
            mode="strict" if self.config.mode == "strict" else "buffered",
            instance_id=self.config.instance_id,
            queue_size=self.config.queue_size,
            start=False,
            resume_hint=None if self.config.resume is None else Link(*self.config.resume),
            seal_in_place=True,  # every record was built (or unpickled) here
        )
        waiting, self.waiting = self.waiting, []
        for record in waiting:
            self.writer.submit(record)
        return True

    def submit(self, record: AuditRecord, ticket: int) -> None:
        callback = self.answers.callback(ticket) if ticket else None
        if self.writer is not None:
            self.writer.submit(record, callback)
            return
        # No store yet: keep the record (bounded); a strict statement is not confirmed.
        if len(self.waiting) >= self.config.queue_size:
            self.dropped += 1
        else:
            self.waiting.append(record)
        if callback is not None:
            callback(RuntimeError(f"audit store unavailable: {self.open_error}"))

    def handle(self, message: tuple[Any, ...]) -> float | None:
        """Act on one message; a CLOSE returns its timeout."""
        kind = message[0]
        if kind == link.STATEMENT:
            _, ticket, session_id, run, described, approval = message
            try:
                record = self.builder.statement(
                    session_id, link.run_from_wire(run), described, approval
                )
            except Exception as exc:  # a producer bug: say so, never hang the statement
                log.exception("audit: cannot build a statement record")
                if ticket:
                    self.answers.callback(ticket)(exc)
                return None
            self.submit(record, ticket)
        elif kind == link.RECORD:
            _, ticket, record = message
            self.submit(self.builder.redacted(record), ticket)
        elif kind == link.SESSION:
            self.builder.session(link.context_from_wire(message[1]))
        elif kind == link.FORGET:
            self.builder.forget(message[1])
        elif kind == link.CLOSE:
            return float(message[1])
        return None

    def run(self, reader: link.FrameReader, close_timeout: float | None = None) -> None:
        sock = self.sock
        sock.setblocking(True)
        poller = select.poll()
        poller.register(sock, select.POLLIN)
        retry_at = 0.0  # when a failed store (or opening) may be tried again
        # Buffered mode: nobody waits for a commit, so commits gather a while of records
        # (a commit and its fsync cost far more than a row).
        gather = _BUFFERED_GATHER_S if self.config.mode != "strict" else 0.0
        while close_timeout is None:
            now = time.monotonic()
            writer = self.writer
            if writer is None:
                wait: float | None = max(0.0, retry_at - now)
            elif writer.pending:
                due = retry_at
                if gather and writer.depth < writer.batch_size:
                    due = max(due, self.last_write + gather)
                wait = max(0.0, due - now)
            else:
                wait = None
            if poller.poll(None if wait is None else wait * 1000.0):
                close_timeout = self._read(reader)
            now = time.monotonic()
            if now < retry_at:
                pass
            elif self.writer is None:
                if not self.open():
                    retry_at = now + _OPEN_RETRY_S
            elif self.writer.pending and (
                now >= self.last_write + gather or self.writer.depth >= self.writer.batch_size
            ):
                self.last_write = now
                if not self.writer.pump():
                    retry_at = now + self.writer.retry_delay
            self.answers.send_due(self.status())
        self.close(close_timeout)

    def _read(self, reader: link.FrameReader) -> float | None:
        """Everything the socket holds now (up to a few MB); a CLOSE or EOF ends the loop."""
        for _ in range(_READS_PER_PASS):
            try:
                data = self.sock.recv(1 << 20, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return None
            except OSError:
                data = b""
            if not data:
                return _EOF_CLOSE_S  # the gateway is gone: write what we have
            for message in reader.feed(data):
                timeout = self.handle(message)
                if timeout is not None:
                    return timeout
        return None

    def close(self, timeout: float) -> None:
        """Write what is left within ``timeout``, then report and stop."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.writer is None:
                if not self.waiting:
                    break
                if not self.open():
                    time.sleep(min(_OPEN_RETRY_S, max(0.0, deadline - time.monotonic())))
                continue
            if not self.writer.pending or self.writer.pump():
                break
            self.answers.send_due(self.status())
            time.sleep(min(self.writer.retry_delay, max(0.0, deadline - time.monotonic())))
        if self.writer is not None:
            self.writer.give_up()  # whatever is still queued is counted as abandoned
        status = self.status()
        if self.writer is None and self.waiting:
            log.error("audit: %d record(s) never written: no store opened", len(self.waiting))
            status = link.WriterStatus(
                healthy=False,
                dropped=status.dropped + len(self.waiting),
                abandoned=len(self.waiting),
                last_error=self.open_error,
            )
        self.answers.send_due(status, (link.CLOSED, status.to_wire()))
        for store in self.stores:
            with contextlib.suppress(Exception):
                store.close()


def _die_with_parent(parent: int) -> None:
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:  # the parent died before the line above
        os._exit(1)


def main(argv: list[str]) -> int:
    fd, parent = int(argv[1]), int(argv[2])
    _die_with_parent(parent)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT, signal.SIGTERM, signal.SIGHUP})
    sock = socket.socket(fileno=fd)
    reader = link.FrameReader()
    pending: list[Any] = []
    while not pending:
        data = sock.recv(1 << 16)
        if not data:
            return 0
        pending = reader.feed(data)
    kind, config = pending[0][0], pending[0][1]
    if kind != link.CONFIG or not isinstance(config, link.WriterConfig):
        print("pgguard audit writer: the first message must be its configuration", file=sys.stderr)
        return 2
    from pgguard.logs import setup_logging

    setup_logging(config.log_level, config.log_format)
    daemon = Daemon(sock, config)
    daemon.open()  # before any record: a strict statement fails only if the store cannot open
    # Records are freed by reference counting; keep the cyclic collector from walking the
    # long-lived start-up objects (SQLAlchemy, pglast) every few thousand records.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    close_timeout: float | None = None
    for message in pending[1:]:
        close_timeout = daemon.handle(message)
        if close_timeout is not None:
            break
    daemon.run(reader, close_timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
