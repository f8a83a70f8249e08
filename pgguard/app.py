"""Process lifecycle: start the gateway, handle signals, drain, and run several workers."""

from __future__ import annotations

import asyncio
import functools
import gc
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Literal

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
        # A worker starts with these blocked (see serve): pending ones arrive here now.
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
    """Run the gateway in this process, or fork ``settings.workers`` workers sharing the port."""
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
    children: dict[int, int] = {}
    group = os.getpid()
    # Until each process has its handlers, a signal waits instead of killing it.
    signal.pthread_sigmask(signal.SIG_BLOCK, LIFECYCLE_SIGNALS)
    start_multiprocess()  # metrics: totals across workers (a temp dir, removed at exit)
    for worker_id in range(settings.workers):
        pid = os.fork()
        if pid == 0:
            try:
                run_coroutine(
                    functools.partial(
                        serve_async,
                        settings,
                        worker_id=worker_id,
                        worker_group=group,
                        policy=policy or None,
                    )
                )
            except BaseException:
                log.exception("worker %d crashed", worker_id)
                os._exit(1)
            os._exit(0)
        children[pid] = worker_id

    def forward(signum: int, _frame: object) -> None:
        for child in list(children):
            try:
                os.kill(child, signum)
            except ProcessLookupError:
                children.pop(child, None)

    for signum in LIFECYCLE_SIGNALS:
        signal.signal(signum, forward)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, LIFECYCLE_SIGNALS)
    status = 0
    while children:
        try:
            pid, code = os.wait()
        except ChildProcessError:
            break
        except InterruptedError:
            continue
        worker_id = children.pop(pid, -1)
        worker_exited(pid)
        if code != 0:
            status = 1
            log.error("worker %d exited with status %d", worker_id, code)
        time.sleep(0)
    sys.stdout.flush()
    return status
