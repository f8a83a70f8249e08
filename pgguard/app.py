"""Process lifecycle: start the gateway, handle signals, drain, and run several workers."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Literal, NoReturn

import anyio

from pgguard.config import Settings
from pgguard.identity import IdentityConfigError, TokenValidator
from pgguard.metrics import start_multiprocess, worker_exited
from pgguard.policy.loader import check_policy_files
from pgguard.policy.model import Policy
from pgguard.proxy.admin import start_admin
from pgguard.proxy.server import Gateway, run_coroutine

log = logging.getLogger("pgguard")
LIFECYCLE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


async def serve_async(
    settings: Settings,
    *,
    worker_id: int = 0,
    worker_group: int | None = None,
    policy: Policy | None = None,
    on_ready: Callable[[Gateway], None] | None = None,
) -> None:
    gateway = Gateway(settings, policy=policy)
    # The relay allocates a few short-lived containers per message; keep the cyclic collector
    # from walking the long-lived startup objects over and over.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    gateway.worker_id = worker_id
    gateway.worker_group = worker_group
    # Signal handlers first: a SIGHUP or SIGTERM that arrives as soon as the port accepts
    # connections must reload or drain, not kill the process.
    with anyio.open_signal_receiver(*LIFECYCLE_SIGNALS) as signals:
        # A worker starts with these blocked (see serve, Supervisor): pending ones arrive now.
        signal.pthread_sigmask(signal.SIG_UNBLOCK, LIFECYCLE_SIGNALS)
        admin = await start_admin(settings, gateway)  # /metrics, /healthz, /readyz
        await gateway.start()
        for prefix, handler in gateway.approval_routes().items():
            admin.route(prefix, handler)  # /api/approvals, /approvals
        log.info(
            "pgguard listening on %s:%s (event loop: %s)",
            settings.listen.host,
            gateway.port,
            type(asyncio.get_running_loop()).__module__.split(".")[0],
            extra={"worker": worker_id},
        )
        if on_ready is not None:
            on_ready(gateway)
        async for signum in signals:
            if signum == signal.SIGHUP:
                log.info("SIGHUP: reloading the policy", extra={"worker": worker_id})
                gateway.reload_policy()
                continue
            log.info(
                "%s: draining (deadline %.0fs)",
                signal.Signals(signum).name,
                settings.limits.drain_timeout,
                extra={"worker": worker_id},
            )
            await gateway.drain(settings.limits.drain_timeout)
            break
    await admin.close()
    log.info("pgguard stopped", extra={"worker": worker_id})


def load_startup_policy(settings: Settings) -> Policy | Literal[False] | None:
    """The policy to start with; False (after logging every problem) if it is invalid."""
    result = check_policy_files(settings.policies)
    for problem in result.warnings:
        log.warning("policy: %s", problem)
    if not result.ok:
        for problem in result.errors:
            log.error("policy: %s", problem)
        log.error("cannot start: the policy is invalid (see `pgguard policy check`)")
        return False
    return result.policy


def serve(settings: Settings) -> int:
    """Run the gateway in this process, or fork ``settings.workers`` workers sharing the port
    and supervise them."""
    try:
        TokenValidator(settings.identity)  # fail before forking if keys are unusable
    except IdentityConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    policy = load_startup_policy(settings)
    if policy is False:
        return 2
    if settings.workers <= 1:
        signal.pthread_sigmask(signal.SIG_BLOCK, LIFECYCLE_SIGNALS)  # until serve_async's handlers
        run_coroutine(functools.partial(serve_async, settings, policy=policy or None))
        return 0
    return Supervisor(settings, policy or None).run()


# --------------------------------------------------------------------------- several workers

#: A worker that dies sooner than this after it started is crash-looping: back off.
STABLE_SECONDS: Final = 10.0
#: The first back-off delay; it doubles with each quick death in a row, up to the maximum.
RESTART_DELAY_MIN: Final = 0.5
RESTART_DELAY_MAX: Final = 30.0
#: The supervisor also wakes this often without a signal (reaping does not rely on SIGCHLD
#: alone).
SUPERVISOR_TICK: Final = 5.0
#: What the supervisor waits for. Blocked in the parent for good (taken with sigtimedwait, so
#: no handler runs between two of its statements) and in each new worker until serve_async
#: has its handlers.
SUPERVISOR_SIGNALS: Final = frozenset((*LIFECYCLE_SIGNALS, signal.SIGCHLD))
#: A worker's exit status when it failed before serving (a port in use, the audit store).
WORKER_START_FAILED: Final = 3


def restart_delay(previous: float, uptime: float) -> float:
    """Seconds to wait before starting a worker again after it died.

    ``previous`` is the delay its last start waited (0 for none), ``uptime`` how long it ran.
    A worker that ran at least :data:`STABLE_SECONDS` is restarted at once; one that died
    sooner waits :data:`RESTART_DELAY_MIN`, then twice as long for each quick death in a row,
    at most :data:`RESTART_DELAY_MAX`. A crash loop never spins.
    """
    if uptime >= STABLE_SECONDS:
        return 0.0
    return min(max(previous * 2, RESTART_DELAY_MIN), RESTART_DELAY_MAX)


def describe_exit(wait_status: int) -> str:
    """``os.waitpid``'s status in words: "exited with status 1", "was killed by SIGKILL"."""
    code = os.waitstatus_to_exitcode(wait_status)
    if code >= 0:
        return f"exited with status {code}"
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    return f"was killed by {name}"


@dataclass
class WorkerSlot:
    """One worker id, whose processes come and go."""

    worker_id: int
    starts: int = 0  # processes started for this id (1: the initial start)
    started: float = 0.0  # time.monotonic() of the last start
    delay: float = 0.0  # what the last start waited (the back-off so far)
    restart_at: float | None = None  # when to start it again (monotonic), while it is down


class Supervisor:
    """The serving parent with several workers.

    It forks them (they share the ports through SO_REUSEPORT), forwards SIGTERM, SIGINT and
    SIGHUP to them, and replaces a worker that exits while it is not shutting down, with the
    same worker id (so the same audit chain and cancel socket name), backing off when one
    keeps dying. A worker that cannot start at all in the initial start stops pgguard, as a
    single process would: the orchestrator sees the failure instead of an empty shell.
    """

    def __init__(self, settings: Settings, policy: Policy | None) -> None:
        self.settings = settings
        self.startup_policy = policy
        self.group = os.getpid()  # names the workers' cancel sockets
        self.slots = [WorkerSlot(i) for i in range(settings.workers)]
        self.children: dict[int, WorkerSlot] = {}
        self.stopping = False
        self.status = 0
        self._worker_mask: set[int] = set()

    def run(self) -> int:
        # A parent started with SIGCHLD ignored would have its children reaped for it, with
        # no exit status to act on.
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        before = signal.pthread_sigmask(signal.SIG_BLOCK, SUPERVISOR_SIGNALS)
        # A worker starts with the parent's original mask plus the lifecycle signals (until
        # its handlers are in place), exactly as the initial fork always did; SIGCHLD is not
        # blocked there (a worker runs children of its own).
        self._worker_mask = set(before) | set(LIFECYCLE_SIGNALS)
        start_multiprocess()  # metrics: totals across workers (a temp dir, removed at exit)
        for slot in self.slots:
            self._start(slot, self.startup_policy)
        while True:
            self._reap()
            if self.stopping and not self.children:
                break
            self._start_due()
            info = signal.sigtimedwait(SUPERVISOR_SIGNALS, self._wait_seconds())
            if info is None or info.si_signo == signal.SIGCHLD:
                continue  # reaped at the top of the loop
            if info.si_signo == signal.SIGHUP:
                self._forward(signal.SIGHUP)  # each worker reloads; nothing restarts
                continue
            if not self.stopping:
                log.info("%s: stopping the workers", signal.Signals(info.si_signo).name)
            self._stop(info.si_signo)
        sys.stdout.flush()
        return self.status

    # -- signals ---------------------------------------------------------------------------

    def _forward(self, signum: int) -> None:
        # A worker still starting has the signal blocked and takes it once its handlers are
        # in place.
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    def _stop(self, signum: int) -> None:
        """Shut down: pass the signal on (again, if it repeats) and restart nothing more."""
        self.stopping = True
        for slot in self.slots:
            slot.restart_at = None  # a worker waiting for its restart stays down
        self._forward(signum)

    def _wait_seconds(self) -> float:
        now = time.monotonic()
        due = [s.restart_at - now for s in self.slots if s.restart_at is not None]
        return max(0.0, min([SUPERVISOR_TICK, *due]))

    # -- workers ---------------------------------------------------------------------------

    def _reap(self) -> None:
        """Collect every worker that exited; schedule its restart unless shutting down."""
        while self.children:
            try:
                pid, wait_status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                break
            slot = self.children.pop(pid, None)
            if slot is None:
                continue
            worker_exited(pid)  # its live gauges stop counting; its counters stay in the totals
            how = describe_exit(wait_status)
            if self.stopping:
                if wait_status != 0:
                    self.status = 1
                    log.error("worker %d (pid %d) %s", slot.worker_id, pid, how)
                continue
            code = os.waitstatus_to_exitcode(wait_status)
            if code == WORKER_START_FAILED and slot.starts == 1:
                log.error(
                    "worker %d (pid %d) could not start: stopping the workers", slot.worker_id, pid
                )
                self.status = 1
                self._stop(signal.SIGTERM)
                continue
            now = time.monotonic()
            uptime = now - slot.started
            slot.delay = restart_delay(slot.delay, uptime)
            slot.restart_at = now + slot.delay
            log.log(
                logging.WARNING if code == 0 else logging.ERROR,
                "worker %d (pid %d) %s after %.1fs; restarting it in %.1fs",
                slot.worker_id,
                pid,
                how,
                uptime,
                slot.delay,
            )

    def _start_due(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.restart_at is not None and slot.restart_at <= now:
                slot.restart_at = None
                policy = self._current_policy(slot)
                if policy is not False:
                    self._start(slot, policy)

    def _current_policy(self, slot: WorkerSlot) -> Policy | Literal[False] | None:
        """The policy files as they are now: a replacement must not serve the start-up
        policy when its siblings have reloaded a newer one. An invalid policy keeps the
        worker down (as it would stop pgguard at start-up), retried with back-off."""
        result = check_policy_files(self.settings.policies)
        if result.ok:
            return result.policy
        for problem in result.errors:
            log.error("policy: %s", problem)
        self._retry_later(slot, "the policy is invalid (see `pgguard policy check`)")
        return False

    def _retry_later(self, slot: WorkerSlot, why: str) -> None:
        slot.delay = restart_delay(slot.delay, 0.0)
        slot.restart_at = time.monotonic() + slot.delay
        log.error(
            "cannot start worker %d: %s; trying again in %.1fs", slot.worker_id, why, slot.delay
        )

    def _start(self, slot: WorkerSlot, policy: Policy | None) -> None:
        try:
            pid = os.fork()
        except OSError as exc:
            self._retry_later(slot, f"fork failed: {exc}")
            return
        if pid == 0:
            self._run_worker(slot.worker_id, policy)  # never returns
        slot.started = time.monotonic()
        slot.starts += 1
        self.children[pid] = slot
        if slot.starts > 1:
            log.warning("worker %d restarted (pid %d)", slot.worker_id, pid)

    def _run_worker(self, worker_id: int, policy: Policy | None) -> NoReturn:
        """In the forked worker: serve until told to stop, then leave without running the
        parent's exit handlers (the metrics directory is the parent's)."""
        signal.pthread_sigmask(signal.SIG_SETMASK, self._worker_mask)
        serving = False

        def ready(_gateway: Gateway) -> None:
            nonlocal serving
            serving = True

        try:
            run_coroutine(
                functools.partial(
                    serve_async,
                    self.settings,
                    worker_id=worker_id,
                    worker_group=self.group,
                    policy=policy,
                    on_ready=ready,
                )
            )
        except BaseException:
            if not serving:
                log.exception("worker %d could not start", worker_id)
                os._exit(WORKER_START_FAILED)
            log.exception("worker %d crashed", worker_id)
            os._exit(1)
        os._exit(0)
