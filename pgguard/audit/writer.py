"""The audit writer: seals records into the chain and writes them in batches (group commit)
to every configured store.

pgguard runs it in the audit writer process (:mod:`pgguard.audit.daemon`) without a thread of
its own, calling :meth:`AuditWriter.pump` from its one loop. Started with a thread (the
default), it can serve a caller that must never block: ``submit`` only appends to an
in-memory queue under a lock held for a few instructions, and the thread takes everything
queued at that moment (up to ``batch_size``), seals each record (``instance_id``, ``seq``,
``prev_hash``, ``hash``), writes the batch to each store, and then reports.

Modes (SPEC §5, ``audit.mode``):

* ``strict``: ``on_durable(None)`` is called — from the writer thread; wrap it with
  ``loop.call_soon_threadsafe`` — once the batch holding the record is committed in every
  store; only then may the relay release the statement's result. If a store fails,
  ``on_durable(exc)`` is called instead and the relay refuses the statement. The failed
  batch is kept and retried first (with backoff), so nothing is lost and nothing is
  acknowledged before it is durable; records submitted while the store is failing are
  queued too but their callbacks fail at once (``healthy`` is False: the relay can refuse
  statements before running them). A full queue fails the callback with
  :class:`AuditQueueFull` (the record is counted in ``dropped``).
* ``buffered``: ``on_durable(None)`` is called at once, from ``submit``. A full queue drops
  the record (``dropped`` counts them; a warning is logged) instead of blocking or failing
  the statement. ``flush`` / ``close`` on SIGTERM write what is queued.

Metrics: ``depth`` (records queued or in the batch being written: pgguard_audit_queue_depth),
``errors`` (failed write attempts: pgguard_audit_write_errors_total), ``dropped``,
``written``.

On start, the writer resumes its chain from the stores (the highest ``(seq, hash)`` any store
holds for ``instance_id``), so a restarted instance continues where it stopped.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Literal

from pgguard.audit.chain import ChainState, Link
from pgguard.audit.records import AuditRecord

if TYPE_CHECKING:
    from pgguard.audit.store import AuditStore

log = logging.getLogger("pgguard.audit")

DurableCallback = Callable[[BaseException | None], None]
Mode = Literal["strict", "buffered"]


class AuditUnavailable(RuntimeError):
    """A record could not be made durable (the relay refuses the statement in strict mode)."""


class AuditQueueFull(AuditUnavailable):
    """The writer's queue is full."""


class AuditClosed(AuditUnavailable):
    """The writer is closed (or was closed before the record could be written)."""


_Item = tuple[AuditRecord, DurableCallback | None]


class AuditWriter:
    """Seal and write audit records in the background; see the module docstring."""

    def __init__(
        self,
        stores: Sequence[AuditStore],
        *,
        mode: Mode = "strict",
        instance_id: str,
        queue_size: int = 10000,
        batch_size: int = 500,
        retry_initial: float = 0.05,
        retry_max: float = 1.0,
        start: bool = True,
        resume_hint: Link | None = None,
        seal_in_place: bool = False,
    ) -> None:
        """``seal_in_place``: the submitted records are the writer's own (nothing else holds
        them; the writer process builds them), so sealing sets their chain fields instead of
        copying them."""
        if mode not in ("strict", "buffered"):
            raise ValueError(f"audit mode must be strict or buffered, not {mode!r}")
        if not instance_id:
            raise ValueError("an audit writer needs an instance_id")
        self.stores = list(stores)
        self.mode: Mode = mode
        self.instance_id = instance_id
        self.seal_in_place = seal_in_place
        self.queue_size = queue_size
        self.batch_size = batch_size
        self.retry_initial = retry_initial
        self.retry_max = retry_max

        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)  # the writer thread waits on it
        self._idle = threading.Condition(self._lock)  # flush() waits on it
        self._queue: deque[_Item] = deque()
        self._batch: list[_Item] = []  # sealed, being written (kept until every store has it)
        self._done: set[int] = set()  # stores that already committed the current batch
        self._chain = ChainState(instance_id)
        # Where this instance's chain was when no store can say (stdout only): a writer
        # started again after its predecessor died continues from it.
        self._resume_hint = resume_hint
        self._resumed = False
        self._closing = False
        self._abandon = False
        self._delay = retry_initial

        self.healthy = True
        self.last_error: BaseException | None = None
        self.submitted = 0
        self.written = 0
        self.dropped = 0
        self.errors = 0
        self.batches = 0
        self.abandoned = 0  # records left unwritten when the writer stopped
        self._settled = 0  # submitted records written or given up on
        self._unsealable = 0

        self._thread = threading.Thread(target=self._run, name="pgguard-audit", daemon=True)
        if start:
            self.start()

    # -- API for the relay --------------------------------------------------------------------

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    @property
    def depth(self) -> int:
        """Records queued or being written."""
        return len(self._queue) + len(self._batch)

    @property
    def head(self) -> Link | None:
        """The chain's last sealed link (written or about to be)."""
        return self._chain.head

    def submit(self, record: AuditRecord, on_durable: DurableCallback | None = None) -> None:
        """Queue ``record``; never blocks. See the module docstring for when ``on_durable``
        is called, and from which thread."""
        strict = self.mode == "strict"
        error: BaseException | None = None
        report = False
        with self._lock:
            if self._closing:
                self.dropped += 1
                error = AuditClosed("pgguard: the audit trail is closed")
                report = True
            elif len(self._queue) >= self.queue_size:
                self.dropped += 1
                error = AuditQueueFull(
                    f"pgguard: the audit queue is full ({self.queue_size} records)"
                )
                report = True
            else:
                self.submitted += 1
                if strict and not self.healthy:
                    # The store is failing: the record waits for it, its statement does not.
                    error = self.last_error or AuditUnavailable("pgguard: audit store failing")
                    self._queue.append((record, None))
                    report = True
                else:
                    self._queue.append((record, on_durable if strict else None))
                    report = not strict
                self._wake.notify()
        if error is not None and not strict:
            if isinstance(error, AuditQueueFull) and (self.dropped & (self.dropped - 1)) == 0:
                log.warning("audit queue full: %d record(s) dropped so far", self.dropped)
            error = None  # buffered mode never refuses a statement
        if report and on_durable is not None:
            _call(on_durable, _unavailable(error) if error is not None else None)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every record submitted before the call is written (records submitted
        meanwhile are not waited for); False on timeout or if some could not be written."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            target = self.submitted
            lost = self.abandoned + self._unsealable
            while self._settled < target:
                if not self._thread.is_alive():
                    break
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(remaining if remaining is not None else 0.5)
            return self._settled >= target and self.abandoned + self._unsealable == lost

    def close(self, timeout: float | None = 30.0) -> bool:
        """Stop accepting records, write what is queued (retrying a failing store until
        ``timeout``), stop the thread. Returns True if nothing was left unwritten. The stores
        are not closed (whoever opened them closes them)."""
        with self._lock:
            self._closing = True
            self._wake.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout)
            if self._thread.is_alive():
                with self._lock:
                    self._abandon = True
                    self._wake.notify_all()
                self._thread.join(5.0)
        else:
            self._abandon_all()
        return self.abandoned == 0

    def __enter__(self) -> AuditWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- without a thread -------------------------------------------------------------------

    def pump(self) -> bool:
        """Seal and write everything queued, in the calling thread, for a process that runs
        no writer thread (``start=False``): the audit writer process, whose one thread also
        reads its input, so no GIL is handed back and forth. Callbacks run in this thread.
        False if a store failed: the batch is kept and the next call retries it first (wait
        :attr:`retry_delay` before that)."""
        if not self._resumed and not self._resume_once():
            self._grow_delay()
            return False
        while True:
            items: list[_Item] = []
            with self._lock:
                if not self._batch:
                    if not self._queue:
                        self._idle.notify_all()
                        return True
                    take = min(len(self._queue), self.batch_size)
                    items = [self._queue.popleft() for _ in range(take)]
            if items:
                self._seal(items)
                if not self._batch:
                    continue
            if not self._write_batch():
                self._grow_delay()
                return False

    @property
    def pending(self) -> bool:
        """Records are queued or a batch waits to be written."""
        return bool(self._queue or self._batch or not self._resumed)

    @property
    def retry_delay(self) -> float:
        return self._delay

    def _grow_delay(self) -> None:
        with self._lock:
            self._delay = min(self._delay * 2, self.retry_max)

    def give_up(self) -> None:
        """Without a thread: stop, counting what is left as abandoned (see :meth:`close`)."""
        self._abandon_all()

    # -- the writer thread ------------------------------------------------------------------

    def _run(self) -> None:
        try:
            if not self._resume():
                return
            while True:
                with self._lock:
                    while not self._batch and not self._queue and not self._closing:
                        self._idle.notify_all()
                        self._wake.wait()
                    if not self._batch and not self._queue:
                        self._idle.notify_all()
                        return  # closing, and nothing left
                    if not self._batch:
                        take = min(len(self._queue), self.batch_size)
                        items = [self._queue.popleft() for _ in range(take)]
                    else:
                        items = []
                if items:
                    self._seal(items)
                    if not self._batch:
                        continue
                if not self._write_batch() and not self._backoff():
                    return
        except BaseException:  # pragma: no cover - a bug; never leave callers waiting
            log.exception("audit writer thread crashed")
            raise
        finally:
            self._abandon_all()

    def _resume(self) -> bool:
        """Continue the chain from the stores' last link of this instance (False: gave up)."""
        while not self._resume_once():
            if not self._backoff():
                return False
        return True

    def _resume_once(self) -> bool:
        try:
            heads = [s.last_link(self.instance_id) for s in self.stores]
        except Exception as exc:
            self._failed(exc, "reading the chain head")
            return False
        known = [h for h in heads if h is not None]
        if not known and self._resume_hint is not None:
            known = [self._resume_hint]
        head = max(known, key=lambda link: link.seq) if known else None
        self._chain.resume(head)
        with self._lock:
            self._resumed = True
            if not self.healthy:
                self._recovered()
        if head is not None:
            log.info(
                "audit chain of instance %s continues after seq %d", self.instance_id, head.seq
            )
        return True

    def _seal(self, items: list[_Item]) -> None:
        batch: list[_Item] = []
        for record, callback in items:
            try:
                sealed = self._chain.next(record, self.seal_in_place)
            except Exception as exc:  # a record nothing can serialise: a producer bug
                log.exception("audit record dropped: cannot be sealed")
                with self._lock:
                    self.dropped += 1
                    self._unsealable += 1
                    self._settled += 1
                if callback is not None:
                    _call(callback, _unavailable(exc))
                continue
            batch.append((sealed, callback))
        with self._lock:
            self._batch = batch
            self._done = set()

    def _write_batch(self) -> bool:
        records = [record for record, _ in self._batch]
        for index, store in enumerate(self.stores):
            if index in self._done:
                continue
            try:
                store.append(records)
            except Exception as exc:
                self._failed(exc, f"writing {len(records)} record(s) to {store!r}")
                return False
            self._done.add(index)
        callbacks = [cb for _, cb in self._batch if cb is not None]
        with self._lock:
            self.written += len(records)
            self._settled += len(records)
            self.batches += 1
            self._batch = []
            self._done = set()
            if not self.healthy:
                self._recovered()
            self._delay = self.retry_initial
            self._idle.notify_all()
        for cb in callbacks:
            _call(cb, None)
        return True

    def _failed(self, exc: Exception, doing: str) -> None:
        """A store failed: fail every waiting strict callback (the records stay queued)."""
        callbacks: list[DurableCallback] = []
        with self._lock:
            self.errors += 1
            if self.healthy:
                log.error("audit store failing (%s): %s", doing, exc)
            else:
                log.debug("audit store still failing (%s): %s", doing, exc)
            self.healthy = False
            self.last_error = exc
            for i, (record, cb) in enumerate(self._batch):
                if cb is not None:
                    callbacks.append(cb)
                    self._batch[i] = (record, None)
            if any(cb is not None for _, cb in self._queue):
                queue: deque[_Item] = deque()
                for record, cb in self._queue:
                    if cb is not None:
                        callbacks.append(cb)
                    queue.append((record, None))
                self._queue = queue
        error = _unavailable(exc)
        for cb in callbacks:
            _call(cb, error)

    def _recovered(self) -> None:
        # under self._lock
        self.healthy = True
        self.last_error = None
        log.warning("audit store recovered")

    def _backoff(self) -> bool:
        """Sleep before a retry; False if the writer must give up (closed past its timeout)."""
        with self._lock:
            if self._abandon:
                return False
            self._wake.wait(self._delay)
            self._delay = min(self._delay * 2, self.retry_max)
            return not self._abandon

    def _abandon_all(self) -> None:
        """The thread is gone: whatever is left will not be written."""
        with self._lock:
            left = self._batch + list(self._queue)
            self._batch = []
            self._queue.clear()
            self._closing = True
            self.dropped += len(left)
            self.abandoned += len(left)
            self._settled += len(left)
            self._idle.notify_all()
        if left:
            log.error(
                "audit writer stopped with %d record(s) unwritten (instance %s, last error: %s)",
                len(left),
                self.instance_id,
                self.last_error,
            )
        error = AuditClosed("pgguard: the audit trail closed before the record was written")
        for _, cb in left:
            if cb is not None:
                _call(cb, error)


def _unavailable(exc: BaseException) -> BaseException:
    if isinstance(exc, AuditUnavailable):
        return exc
    err = AuditUnavailable(f"pgguard: audit store unavailable: {exc}")
    err.__cause__ = exc
    return err


def _call(callback: DurableCallback, error: BaseException | None) -> None:
    try:
        callback(error)
    except Exception:
        log.exception("audit on_durable callback failed")
