"""The serving parent's pure parts: the restart back-off, exit descriptions, and the
``/readyz`` policy check after a failed reload. The processes themselves are tested in
tests/integration/test_lifecycle.py and test_reload_workers.py."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from types import SimpleNamespace
from typing import Any, cast

import pytest

from pgguard.app import (
    RESTART_DELAY_MAX,
    RESTART_DELAY_MIN,
    STABLE_SECONDS,
    describe_exit,
    restart_delay,
)
from pgguard.proxy.admin import Readiness

# --------------------------------------------------------------------------- back-off


def test_a_worker_that_ran_a_while_restarts_at_once() -> None:
    assert restart_delay(0.0, STABLE_SECONDS) == 0.0
    assert restart_delay(0.0, 3600.0) == 0.0
    # Even after a crash loop: a stable run resets the back-off.
    assert restart_delay(RESTART_DELAY_MAX, STABLE_SECONDS + 1) == 0.0


def test_quick_deaths_back_off_doubling_up_to_the_maximum() -> None:
    delays = []
    delay = 0.0
    for _ in range(12):
        delay = restart_delay(delay, 0.1)
        delays.append(delay)
    assert delays[:7] == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert set(delays[6:]) == {RESTART_DELAY_MAX}
    assert RESTART_DELAY_MIN == 0.5 and RESTART_DELAY_MAX == 30.0


def test_a_crash_loop_never_spins() -> None:
    # Whatever came before, a worker that dies at once waits at least the minimum.
    for previous in (0.0, 0.1, 0.25, 0.5, 7.0, 29.0, 30.0, 1000.0):
        assert RESTART_DELAY_MIN <= restart_delay(previous, 0.0) <= RESTART_DELAY_MAX


def test_quick_death_after_a_stable_run_starts_the_back_off_again() -> None:
    delay = restart_delay(8.0, STABLE_SECONDS * 2)
    assert delay == 0.0
    assert restart_delay(delay, 1.0) == RESTART_DELAY_MIN


# --------------------------------------------------------------------------- exit status


def _wait_status(child: int) -> int:
    _, status = os.waitpid(child, 0)
    return status


def test_describe_exit() -> None:
    pid = os.fork()
    if pid == 0:
        os._exit(3)
    assert describe_exit(_wait_status(pid)) == "exited with status 3"
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    assert describe_exit(_wait_status(pid)) == "exited with status 0"
    pid = os.fork()
    if pid == 0:
        signal.pause()
        os._exit(0)
    os.kill(pid, signal.SIGKILL)
    assert describe_exit(_wait_status(pid)) == "was killed by SIGKILL"


# --------------------------------------------------------------------------- /readyz


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def _gateway(policy_error: str | None) -> SimpleNamespace:
    return SimpleNamespace(
        server=object(),
        draining=False,
        policy_error=policy_error,
        audit=None,
        settings=SimpleNamespace(upstream=SimpleNamespace(host="127.0.0.1", port=_closed_port())),
    )


def _check(readiness: Readiness) -> tuple[list[str], dict[str, str]]:
    return asyncio.run(readiness.check())


@pytest.mark.parametrize("error", ["policy.yaml:3: unknown action 'explode'", "x" * 1000])
def test_a_failed_reload_keeps_the_policy_check_ready(error: str) -> None:
    gateway = _gateway(error)
    failed, checks = _check(Readiness(cast(Any, gateway), connect_timeout=0.2))
    assert "policies" not in failed  # (the closed upstream port fails "upstream")
    assert checks["policies"].startswith("ok (reload failed: ")
    assert checks["policies"].endswith(")") and len(checks["policies"]) <= 300
    assert error[:50] in checks["policies"]
    gateway.policy_error = None
    assert _check(Readiness(cast(Any, gateway), connect_timeout=0.2))[1]["policies"] == "ok"


def test_a_policy_that_never_loaded_is_not_ready() -> None:
    gateway = _gateway("policy.yaml: not found")
    readiness = Readiness(cast(Any, gateway), connect_timeout=0.2, policy_loaded=False)
    failed, checks = _check(readiness)
    assert "policies" in failed
    assert checks["policies"] == "load failed: policy.yaml: not found"
    # Once a load succeeds, a later failure leaves the loaded policy in force: ready.
    gateway.policy_error = None
    assert "policies" not in _check(readiness)[0]
    gateway.policy_error = "broken again"
    failed, checks = _check(readiness)
    assert "policies" not in failed
    assert checks["policies"] == "ok (reload failed: broken again)"
