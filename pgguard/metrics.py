"""Prometheus metrics (SPEC §7): every metric defined once, here, with bounded labels.

Two halves:

* :class:`Tally` — plain Python counters a :class:`~pgguard.proxy.server.Gateway` keeps on the
  event loop. The relay's hot path only does ``tally.bytes_client_to_server += len(data)``:
  no prometheus-client call, no lock, per message.
* :class:`Metrics` and :class:`MetricsCollector` — the prometheus-client objects, and the
  fold that moves what the tally gathered into them: once a second (``MetricsCollector.run``)
  and right before each scrape.

Labels are bounded: connection results, auth failure reasons, statement classes and decisions
and byte directions are closed sets (anything else is counted as ``other``/``unknown``); the
masked-column label is the policy's mask pattern, capped at :data:`MAX_MASK_LABELS` values.
There is never a label per user or per statement.

Several workers (``--workers N``): the serving parent calls :func:`start_multiprocess` before
forking, which points ``PROMETHEUS_MULTIPROC_DIR`` at a fresh directory (removed at exit).
Each worker then writes its values to files there (prometheus-client's multiprocess mode), and
``/metrics`` on any worker reports the totals across workers (:meth:`Metrics.exposition`).
Gauges use ``livesum``: the sum over the workers still alive (the parent calls
:func:`worker_exited` when one ends, before it starts a replacement); the policy reload gauge
uses ``livemax`` (1 if any live worker's last reload failed). Counters and the histogram of a
worker that ended stay in the totals: its files are kept, and its replacement (a new pid)
writes files of its own.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import os
import shutil
import tempfile
from bisect import bisect_left
from collections.abc import Mapping, Sequence, Sized
from dataclasses import dataclass
from typing import Final, Protocol

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
    multiprocess,
    values,
)

from pgguard.identity import TOKEN_ERROR_REASONS

log = logging.getLogger("pgguard.metrics")

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"
CONTENT_TYPE: Final = CONTENT_TYPE_LATEST

# --------------------------------------------------------------------------- label values

#: ``pgguard_connections_total{result}``: one result per client connection.
#: accepted: the session reached the relay; refused_limit: ``limits.max_connections``;
#: auth_failed: token/TLS/user/database refused; upstream_failed: the upstream could not be
#: reached, refused the login, or session setup on it failed; draining: refused during
#: shutdown; cancel: a CancelRequest connection; aborted: the client left or broke the
#: protocol during the handshake.
CONNECTION_RESULTS: Final[tuple[str, ...]] = (
    "accepted",
    "refused_limit",
    "auth_failed",
    "upstream_failed",
    "draining",
    "cancel",
    "aborted",
)

#: ``pgguard_auth_failures_total{reason}``: ``TokenError.reason`` values, then the gateway's own.
AUTH_FAILURE_REASONS: Final[tuple[str, ...]] = tuple(
    dict.fromkeys(
        (
            *TOKEN_ERROR_REASONS,
            "tls_required",
            "user_mismatch",
            "database",
            "too_large",
            "startup_refused",
            "other",
        )
    )
)

#: ``pgguard_statements_total{class}``: the policy's statement classes, ``unknown`` when no
#: analysis was made (no policy in force).
STATEMENT_CLASSES: Final[tuple[str, ...]] = (
    "read",
    "write",
    "ddl",
    "role",
    "function",
    "session",
    "transaction",
    "copy",
    "admin",
    "unknown",
)

#: ``pgguard_statements_total{decision}``: the audit record's decision (SPEC §5).
STATEMENT_DECISIONS: Final[tuple[str, ...]] = (
    "allow",
    "deny",
    "approved",
    "approval_denied",
    "approval_expired",
    "audit_only",
    "unknown",
)

#: ``pgguard_bytes_total{direction}``.
DIRECTIONS: Final[tuple[str, ...]] = ("client_to_server", "server_to_client")

#: Distinct ``column`` label values of ``pgguard_masked_values_total`` (more are ``other``).
MAX_MASK_LABELS: Final = 512

DURATION_BUCKETS: Final[tuple[float, ...]] = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)


@dataclass(frozen=True)
class MetricSpec:
    """One SPEC §7 metric: its exposed name, type and label names."""

    name: str
    kind: str  # "counter" | "gauge" | "histogram"
    labels: tuple[str, ...]
    help: str


#: The SPEC §7 set, in SPEC order.
SPEC_METRICS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec("pgguard_client_connections", "gauge", (), "Client connections open now."),
    MetricSpec(
        "pgguard_connections_total",
        "counter",
        ("result",),
        "Client connections, by how they ended the handshake.",
    ),
    MetricSpec(
        "pgguard_auth_failures_total",
        "counter",
        ("reason",),
        "Refused authentications, by reason.",
    ),
    MetricSpec(
        "pgguard_statements_total",
        "counter",
        ("class", "decision"),
        "Statements, by class and decision (recorded with the audit trail).",
    ),
    MetricSpec(
        "pgguard_statement_duration_seconds",
        "histogram",
        (),
        "Time from a statement being sent to its outcome being known.",
    ),
    MetricSpec(
        "pgguard_masked_values_total",
        "counter",
        ("column",),
        "Values masked in result rows, by the policy's mask column pattern.",
    ),
    MetricSpec(
        "pgguard_approvals_pending",
        "gauge",
        (),
        "Statements held for approval now.",
    ),
    MetricSpec(
        "pgguard_audit_queue_depth",
        "gauge",
        (),
        "Audit records queued or being written.",
    ),
    MetricSpec(
        "pgguard_audit_write_errors_total",
        "counter",
        (),
        "Failed audit store write attempts.",
    ),
    MetricSpec(
        "pgguard_upstream_errors_total",
        "counter",
        (),
        "Upstream connection, TLS, login and lost-connection errors.",
    ),
    MetricSpec(
        "pgguard_bytes_total",
        "counter",
        ("direction",),
        "Bytes relayed, by direction.",
    ),
)

#: Metrics beyond the SPEC §7 set.
EXTRA_METRICS: Final[tuple[MetricSpec, ...]] = (
    MetricSpec(
        "pgguard_policy_reload_failed",
        "gauge",
        (),
        "1 while the last policy reload failed (the previous policy stays in force), else 0.",
    ),
)

#: Every metric pgguard registers.
ALL_METRICS: Final[tuple[MetricSpec, ...]] = SPEC_METRICS + EXTRA_METRICS

_CONNECTION_RESULTS = frozenset(CONNECTION_RESULTS)
_AUTH_REASONS = frozenset(AUTH_FAILURE_REASONS)
_CLASSES = frozenset(STATEMENT_CLASSES)
_DECISIONS = frozenset(STATEMENT_DECISIONS)


# --------------------------------------------------------------------------- the tally


class Tally:
    """Plain counters of one gateway, folded into the metrics by :class:`MetricsCollector`.

    Only the event loop thread touches it. The fold takes (and resets) the dictionaries and
    the durations; the byte counts only grow (the collector remembers what it folded).
    """

    __slots__ = (
        "approvals_pending",
        "auth_failures",
        "bytes_client_to_server",
        "bytes_server_to_client",
        "connections",
        "duration_counts",
        "duration_sum",
        "masked",
        "statements",
    )

    def __init__(self) -> None:
        self.bytes_client_to_server = 0
        self.bytes_server_to_client = 0
        self.connections: dict[str, int] = {}
        self.auth_failures: dict[str, int] = {}
        self.statements: dict[tuple[str, str], int] = {}
        # Statement durations not yet folded, as the histogram keeps them: a count per
        # bucket (the last one is +Inf) and the sum in seconds (no per-statement observe).
        self.duration_counts = [0] * (len(DURATION_BUCKETS) + 1)
        self.duration_sum = 0.0
        self.masked: dict[str, int] = {}
        self.approvals_pending = 0  # set by the approvals code; a gauge

    def connection(self, result: str) -> None:
        if result not in _CONNECTION_RESULTS:
            result = "aborted"
        self.connections[result] = self.connections.get(result, 0) + 1

    def auth_failure(self, reason: str) -> None:
        if reason not in _AUTH_REASONS:
            reason = "other"
        self.auth_failures[reason] = self.auth_failures.get(reason, 0) + 1

    def statement(
        self, statement_class: str | None, decision: str | None, duration_ms: float | None
    ) -> None:
        """One statement (an audit record): its class, decision and duration."""
        cls = statement_class if statement_class is not None else "unknown"
        dec = decision if decision is not None else "unknown"
        key = (
            cls if cls in _CLASSES else "unknown",
            dec if dec in _DECISIONS else "unknown",
        )
        self.statements[key] = self.statements.get(key, 0) + 1
        if duration_ms is not None:
            seconds = duration_ms / 1000.0 if duration_ms > 0 else 0.0
            # bisect_left: the first bucket whose upper bound is >= seconds ("le").
            self.duration_counts[bisect_left(DURATION_BUCKETS, seconds)] += 1
            self.duration_sum += seconds

    def masked_values(self, counts: Mapping[str, int]) -> None:
        """Values masked per mask column pattern (``RowMasker.take_counts()``)."""
        masked = self.masked
        for column, n in counts.items():
            if n <= 0:
                continue
            if column not in masked and len(masked) >= MAX_MASK_LABELS:
                column = "other"
            masked[column] = masked.get(column, 0) + n


# --------------------------------------------------------------------------- prometheus side


def observe_many(histogram: Histogram, counts: Sequence[int], total: float) -> None:
    """Add ``counts[i]`` observations to bucket ``i`` of ``histogram`` (the last: +Inf) and
    ``total`` to its sum, at once. prometheus-client has no public call for this, so it uses
    the two attributes its own ``observe`` updates; without them (another version), each
    observation is replayed at its bucket's upper bound (the sum is then approximate)."""
    buckets = getattr(histogram, "_buckets", None)
    sum_value = getattr(histogram, "_sum", None)
    if buckets is not None and sum_value is not None and len(buckets) == len(counts):
        for value, n in zip(buckets, counts, strict=True):
            if n:
                value.inc(n)
        sum_value.inc(total)
        return
    for bound, n in zip((*DURATION_BUCKETS, DURATION_BUCKETS[-1] * 2), counts, strict=False):
        for _ in range(n):
            histogram.observe(bound)


def multiprocess_dir() -> str | None:
    """The multiprocess directory this process writes to, if any."""
    return os.environ.get(MULTIPROC_ENV) or None


def _select_value_class() -> None:
    """Make metrics created from now on use the value class the environment asks for.

    prometheus-client chooses it when it is first imported; pgguard may have imported it
    before the serving parent set ``PROMETHEUS_MULTIPROC_DIR``. One multiprocess value class
    per process (a second one would write the same files through other mappings).
    """
    is_multi = getattr(values.ValueClass, "_multiprocess", False)
    if multiprocess_dir() is not None:
        if not is_multi:
            values.ValueClass = values.MultiProcessValue()  # type: ignore[no-untyped-call]
    elif is_multi:
        values.ValueClass = values.MutexValue


class Metrics:
    """Every metric (the SPEC §7 set and :data:`EXTRA_METRICS`), in their own registry."""

    def __init__(self) -> None:
        _select_value_class()
        # No *_created series: they double the output for nothing.
        disable_created_metrics()  # type: ignore[no-untyped-call]
        self.multiprocess_dir = multiprocess_dir()
        self.registry = CollectorRegistry(auto_describe=True)
        reg = self.registry
        spec = {m.name: m for m in ALL_METRICS}

        def counter(name: str) -> Counter:
            s = spec[name]
            return Counter(s.name, s.help, s.labels, registry=reg)

        def gauge(name: str) -> Gauge:
            s = spec[name]
            return Gauge(s.name, s.help, s.labels, registry=reg, multiprocess_mode="livesum")

        self.client_connections = gauge("pgguard_client_connections")
        self.connections = counter("pgguard_connections_total")
        self.auth_failures = counter("pgguard_auth_failures_total")
        self.statements = counter("pgguard_statements_total")
        s = spec["pgguard_statement_duration_seconds"]
        self.statement_duration = Histogram(
            s.name, s.help, s.labels, registry=reg, buckets=DURATION_BUCKETS
        )
        self.masked_values = counter("pgguard_masked_values_total")
        self.approvals_pending = gauge("pgguard_approvals_pending")
        self.audit_queue_depth = gauge("pgguard_audit_queue_depth")
        self.audit_write_errors = counter("pgguard_audit_write_errors_total")
        self.upstream_errors = counter("pgguard_upstream_errors_total")
        self.bytes = counter("pgguard_bytes_total")
        s = spec["pgguard_policy_reload_failed"]
        # livemax: with several workers, 1 when any live worker runs on after a failed reload
        # (a sum would count workers, not the state).
        self.policy_reload_failed = Gauge(
            s.name, s.help, s.labels, registry=reg, multiprocess_mode="livemax"
        )
        # Every series of a closed label set exists from the start (at 0).
        for result in CONNECTION_RESULTS:
            self.connections.labels(result)
        for reason in AUTH_FAILURE_REASONS:
            self.auth_failures.labels(reason)
        for direction in DIRECTIONS:
            self.bytes.labels(direction)
        self._bytes_c2s = self.bytes.labels("client_to_server")
        self._bytes_s2c = self.bytes.labels("server_to_client")

    def exposition(self) -> bytes:
        """The Prometheus text format: this process's values, or with several workers the
        totals across every worker's files."""
        if self.multiprocess_dir is None:
            return generate_latest(self.registry)
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry, path=self.multiprocess_dir)  # type: ignore[no-untyped-call]
        return generate_latest(registry)


# --------------------------------------------------------------------------- the fold


class AuditView(Protocol):
    @property
    def depth(self) -> int: ...

    @property
    def errors(self) -> int: ...


class GatewayView(Protocol):
    """What the collector reads of a gateway."""

    @property
    def tally(self) -> Tally: ...

    @property
    def stats(self) -> Mapping[str, int]: ...

    @property
    def sessions(self) -> Sized: ...

    @property
    def audit(self) -> AuditView | None: ...

    @property
    def policy_error(self) -> str | None: ...


class MetricsCollector:
    """Folds a gateway's tally and state into :class:`Metrics`."""

    def __init__(self, gateway: GatewayView, metrics: Metrics | None = None) -> None:
        self.gateway = gateway
        self.metrics = metrics if metrics is not None else Metrics()
        self._bytes_c2s = 0
        self._bytes_s2c = 0
        self._upstream_errors = 0
        self._audit_errors = 0
        self._audit: object | None = None

    def fold(self) -> None:
        """Move everything counted since the last fold into the metrics; set the gauges."""
        gw, m = self.gateway, self.metrics
        tally = gw.tally
        n = tally.bytes_client_to_server
        if n > self._bytes_c2s:
            m._bytes_c2s.inc(n - self._bytes_c2s)
        self._bytes_c2s = n
        n = tally.bytes_server_to_client
        if n > self._bytes_s2c:
            m._bytes_s2c.inc(n - self._bytes_s2c)
        self._bytes_s2c = n

        if tally.connections:
            taken, tally.connections = tally.connections, {}
            for result, count in taken.items():
                m.connections.labels(result).inc(count)
        if tally.auth_failures:
            taken, tally.auth_failures = tally.auth_failures, {}
            for reason, count in taken.items():
                m.auth_failures.labels(reason).inc(count)
        if tally.statements:
            stmts, tally.statements = tally.statements, {}
            for (cls, decision), count in stmts.items():
                m.statements.labels(cls, decision).inc(count)
        if any(tally.duration_counts):
            counts, total = tally.duration_counts, tally.duration_sum
            tally.duration_counts = [0] * len(counts)
            tally.duration_sum = 0.0
            observe_many(m.statement_duration, counts, total)
        if tally.masked:
            taken, tally.masked = tally.masked, {}
            for column, count in taken.items():
                m.masked_values.labels(column).inc(count)

        n = gw.stats.get("upstream_errors", 0)
        if n > self._upstream_errors:
            m.upstream_errors.inc(n - self._upstream_errors)
        self._upstream_errors = n

        audit = gw.audit
        if audit is not self._audit:  # a new writer counts from 0
            self._audit, self._audit_errors = audit, 0
        if audit is not None:
            n = audit.errors
            if n > self._audit_errors:
                m.audit_write_errors.inc(n - self._audit_errors)
            self._audit_errors = n
        m.audit_queue_depth.set(audit.depth if audit is not None else 0)
        m.client_connections.set(len(gw.sessions))
        m.approvals_pending.set(tally.approvals_pending)
        m.policy_reload_failed.set(0 if gw.policy_error is None else 1)

    def exposition(self) -> bytes:
        """Fold, then the text format."""
        self.fold()
        return self.metrics.exposition()

    async def run(self, interval: float = 1.0) -> None:
        """Fold every ``interval`` seconds until cancelled."""
        while True:
            await asyncio.sleep(interval)
            try:
                self.fold()
            except Exception:  # a metrics bug must not stop the gateway
                log.exception("metrics fold failed")


# --------------------------------------------------------------------------- several workers

_owner: dict[str, int] = {}


def start_multiprocess() -> str:
    """Serving parent, before forking workers: point ``PROMETHEUS_MULTIPROC_DIR`` at a fresh
    directory (any stale values are not carried over) and remove it when this process exits.
    Returns the directory."""
    path = tempfile.mkdtemp(prefix="pgguard-metrics-")
    previous = os.environ.get(MULTIPROC_ENV)
    os.environ[MULTIPROC_ENV] = path
    _owner[path] = os.getpid()

    def cleanup() -> None:
        if _owner.get(path) != os.getpid():
            return  # a forked worker leaving through atexit: not ours to remove
        shutil.rmtree(path, ignore_errors=True)
        if os.environ.get(MULTIPROC_ENV) == path:
            if previous is None:
                os.environ.pop(MULTIPROC_ENV, None)
            else:
                os.environ[MULTIPROC_ENV] = previous

    atexit.register(cleanup)
    return path


def worker_exited(pid: int) -> None:
    """Serving parent: a worker ended; its live gauges no longer count (its counters and
    histogram still do). Call it before starting a replacement, so a reused pid starts with
    fresh gauges."""
    path = multiprocess_dir()
    if path is not None:
        try:
            multiprocess.mark_process_dead(pid, path)  # type: ignore[no-untyped-call]
        except OSError as exc:
            log.debug("metrics: cleaning up after worker %d: %s", pid, exc)
